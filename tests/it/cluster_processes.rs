//! A deployment as an operator runs it: `tiercast engine` and two `tiercast
//! edge` processes on a Redis Cluster started by `scripts/redis-cluster.sh`;
//! a chat and a tier-3 broadcast reach devices on both edges. Readiness is
//! each process printing its addresses; every wait is bounded.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tiercast_client::{Client, ClientConfig, Delivery};
use tiercast_testkit::cluster::RedisCluster;
use tiercast_testkit::process::{Proc, skew_clock};

const SECRET: &str = "cluster-process-test-secret-0123456789";
const INTERNAL_SECRET: &str = "cluster-process-internal-secret-0123456789";
const WAIT: Duration = Duration::from_secs(20);

/// `tiercast ARGS --ready-json`; with `skew` (libfaketime's offset syntax,
/// e.g. "-5s") the process's wall clock is moved by that much.
fn tiercast(args: &[String], skew: Option<&str>) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiercast"));
    cmd.args(args).arg("--ready-json");
    if let Some(offset) = skew {
        skew_clock(&mut cmd, offset);
    }
    Proc::spawn(cmd)
}

fn common_args(redis: &RedisCluster, dir: &std::path::Path) -> Vec<String> {
    let nodes: Vec<String> = redis.nodes.iter().map(|n| format!("\"{n}\"")).collect();
    [
        format!("node.token_secret={SECRET}"),
        format!("auth.internal_secret={INTERNAL_SECRET}"),
        "edge.rates.send.per_s=100000".into(),
        "edge.rates.send.burst=100000".into(),
        format!("node.data_dir={}", dir.display()),
        "node.http_listen=127.0.0.1:0".into(),
        "edge.listen=127.0.0.1:0".into(),
        "backplane.kind=redis".into(),
        format!("backplane.redis.nodes=[{}]", nodes.join(",")),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// `tiercast engine` and `edges` `tiercast edge` processes on a fresh Redis
/// Cluster; each edge as (process, QUIC address, certificate PEM).
struct Deployment {
    api: String,
    edges: Vec<(Proc, std::net::SocketAddr, String)>,
    /// Each edge's HTTP address (its `/metrics`).
    edge_http: Vec<String>,
    _engine: Proc,
    _tmp: tempfile::TempDir,
    _redis: RedisCluster,
    _turn: std::sync::RwLockReadGuard<'static, ()>,
}

impl Deployment {
    fn start(edges: usize) -> Self {
        Self::start_skewed(&vec![None; edges])
    }

    /// One edge per entry of `skews`, each with its wall clock moved by it.
    fn start_skewed(skews: &[Option<&str>]) -> Self {
        let turn = tiercast_testkit::shared();
        let redis = RedisCluster::up(0);
        let tmp = tempfile::tempdir().unwrap();
        let mut args = vec!["engine".to_string()];
        args.extend(common_args(&redis, &tmp.path().join("engine")));
        let engine = tiercast(&args, None);
        let api = engine.ready().http;
        let mut edge_http = Vec::new();
        let edges = skews
            .iter()
            .enumerate()
            .map(|(i, skew)| {
                let mut args = vec!["edge".to_string()];
                args.extend(common_args(&redis, &tmp.path().join(format!("edge{i}"))));
                args.extend(["--set".into(), format!("node.store_url={api}")]);
                let p = tiercast(&args, *skew);
                let ready = p.ready();
                assert_eq!(ready.role, "edge");
                let quic = ready.quic.expect("an edge serves QUIC");
                edge_http.push(ready.http);
                let cert =
                    std::fs::read_to_string(ready.certificate.expect("a dev certificate")).unwrap();
                (p, quic, cert)
            })
            .collect();
        Self {
            api,
            edges,
            edge_http,
            _engine: engine,
            _tmp: tmp,
            _redis: redis,
            _turn: turn,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_and_two_edge_processes_serve_a_chat_and_a_broadcast() {
    let deployment = Deployment::start(2);
    let (api, edges) = (&deployment.api, &deployment.edges);

    let keys = tiercast_engine::auth::TokenKeys::new(SECRET.as_bytes());
    let now = tiercast_engine::auth::now_unix();
    let publisher = keys.mint_publisher("test", now, 600);
    let http = reqwest::Client::new();
    for (id, tier) in [(1, None), (2, Some(3))] {
        let r = http
            .post(format!("{api}/v1/conversations"))
            .bearer_auth(&publisher)
            .json(&json!({"id": id, "members": [1, 2]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        if let Some(t) = tier {
            let v: Value = http
                .put(format!("{api}/v1/conversations/{id}/tier"))
                .bearer_auth(&publisher)
                .json(&json!({"tier": t}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(v["tier"], t);
        }
    }

    let device = |edge: usize, user: u64| {
        let (_, quic, cert) = &edges[edge];
        ClientConfig::new(*quic, cert.clone(), keys.mint_user(user, now, 600), 0)
    };
    let (alice, mut alice_rx) = Client::connect(device(0, 1)).await.unwrap();
    let (bob, mut bob_rx) = Client::connect(device(1, 2)).await.unwrap();

    // A chat across edges (tier 1).
    let sent = alice
        .send(1, 1, Bytes::from_static(b"hi bob"))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Delivery::Message(m)) = bob_rx.recv().await {
                return m;
            }
        }
    })
    .await
    .expect("bob gets alice's message");
    assert_eq!((got.id, &got.body[..]), (sent.message_id, &b"hi bob"[..]));

    // A broadcast from the backend (tier 3): both devices are notified and
    // pull the body from their own edge.
    let r: Value = http
        .post(format!("{api}/v1/conversations/2/messages"))
        .bearer_auth(&publisher)
        .json(&json!({"body": "maintenance at noon"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id: u64 = r["id"].as_str().unwrap().parse().unwrap();
    for (client, rx) in [(&alice, &mut alice_rx), (&bob, &mut bob_rx)] {
        let (conv, mid) = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(Delivery::Notify {
                    conversation,
                    message_id,
                }) = rx.recv().await
                {
                    return (conversation, message_id);
                }
            }
        })
        .await
        .expect("notified");
        assert_eq!((conv, mid), (2, id));
        let m = client.pull(conv, mid).await.unwrap().expect("body");
        assert_eq!(&m.body[..], b"maintenance at noon");
    }
}

/// Ids a session's app saw, per conversation (each once: the SDK dedupes).
type Seen = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, HashSet<u64>>>>;

fn collect(mut events: tiercast_client::Events) -> Seen {
    let seen: Seen = Default::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let tiercast_client::Event::Message(m) = e {
                s.lock()
                    .unwrap()
                    .entry(m.conversation)
                    .or_default()
                    .insert(m.id);
            }
        }
    });
    seen
}

use std::collections::HashSet;

/// An edge process is killed (SIGKILL) while a publisher sends to a chat
/// (tier 1) and a group (tier 2): its devices reconnect to the other edge
/// and every device ends with every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_edge_process_loses_no_message() {
    let mut deployment = Deployment::start(2);
    let api = deployment.api.clone();
    let edges = &mut deployment.edges;
    let keys = tiercast_engine::auth::TokenKeys::new(SECRET.as_bytes());
    let now = tiercast_engine::auth::now_unix();
    let publisher = keys.mint_publisher("test", now, 600);
    let http = reqwest::Client::new();
    let users: Vec<u64> = (1..=6).collect();
    for (id, tier) in [(1u64, 1u8), (2, 2)] {
        let r = http
            .post(format!("{api}/v1/conversations"))
            .bearer_auth(&publisher)
            .json(&json!({"id": id, "members": users}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let r = http
            .put(format!("{api}/v1/conversations/{id}/tier"))
            .bearer_auth(&publisher)
            .json(&json!({"tier": tier}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let trusted = format!("{}\n{}", edges[0].2, edges[1].2);
    let addrs = [edges[0].1, edges[1].1];
    // Two devices per user: one starts on each edge.
    let mut devices = Vec::new();
    for &u in &users {
        for d in 0..2usize {
            let order = if d == 0 {
                vec![addrs[0], addrs[1]]
            } else {
                vec![addrs[1], addrs[0]]
            };
            let mut cfg = tiercast_client::SessionConfig::new(
                order,
                trusted.clone(),
                keys.mint_user(u, now, 600),
                0,
            );
            cfg.backoff_base = Duration::from_millis(50);
            cfg.backoff_cap = Duration::from_millis(1_000);
            // Notice the killed edge within 3 s.
            cfg.client.idle_timeout = Duration::from_secs(3);
            let (session, events) = tiercast_client::Session::start(cfg);
            devices.push((session, collect(events)));
        }
    }
    for (s, _) in &devices {
        s.client(WAIT).await.expect("every device connects");
    }

    let mut sent: [HashSet<u64>; 2] = Default::default();
    let mut killed = false;
    for i in 0..300u64 {
        let conv = 1 + i % 2;
        let v: Value = http
            .post(format!("{api}/v1/conversations/{conv}/messages"))
            .bearer_auth(&publisher)
            .json(&json!({"body": format!("m{i}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        sent[(conv - 1) as usize].insert(v["id"].as_str().expect("stored").parse().unwrap());
        if i == 100 {
            // SIGKILL: no drain, no goodbye.
            edges[0].0.child.kill().unwrap();
            edges[0].0.child.wait().unwrap();
            killed = true;
        }
    }
    assert!(killed);
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    for (s, seen) in &devices {
        loop {
            let ok = {
                let seen = seen.lock().unwrap();
                seen.get(&1) == Some(&sent[0]) && seen.get(&2) == Some(&sent[1])
            };
            if ok {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a device is missing messages: {:?} of {} / {:?} of {}",
                seen.lock().unwrap().get(&1).map(HashSet::len),
                sent[0].len(),
                seen.lock().unwrap().get(&2).map(HashSet::len),
                sent[1].len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = s;
    }
    let (mut received, mut duplicates, mut connects) = (0, 0, 0);
    for (s, _) in &devices {
        let st = s.stats();
        received += st.received.load(std::sync::atomic::Ordering::Relaxed);
        duplicates += st.duplicates.load(std::sync::atomic::Ordering::Relaxed);
        connects += st.connects.load(std::sync::atomic::Ordering::Relaxed);
    }
    eprintln!(
        "edge killed: 300 messages to 12 devices, expected 3600, delivered 3600 after dedupe, lost 0; frames received {received}, duplicates before dedupe {duplicates}, connects {connects}"
    );
    assert_eq!(received - duplicates, 3_600);
    assert!(
        connects >= 18,
        "the six devices of the killed edge reconnected"
    );
}

/// A metric's value (one sample, signed) from a process's `/metrics`.
async fn metric_i64(http_base: &str, name: &str) -> i64 {
    tiercast_testkit::scrape(http_base, name).await as i64
}

/// One edge's wall clock is 5 s behind (libfaketime on the process). Its
/// ids would sort 5 s early against the other nodes' and a resume (which
/// syncs from 3 s before the cursor) would skip them; instead the edge
/// measures its skew against the Redis servers' clock and issues no ids
/// (sends answer `unavailable`) while it still delivers. The other edge,
/// on time, serves sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_whose_clock_is_off_issues_no_ids() {
    let deployment = Deployment::start_skewed(&[None, Some("-5s")]);
    let (api, edges) = (&deployment.api, &deployment.edges);
    let on_time = metric_i64(&deployment.edge_http[0], "tiercast_clock_skew_ms").await;
    let behind = metric_i64(&deployment.edge_http[1], "tiercast_clock_skew_ms").await;
    assert!(on_time.abs() < 500, "edge 0 is on time: {on_time} ms");
    assert!(
        (-5_500..=-4_500).contains(&behind),
        "edge 1 measured its clock 5 s behind: {behind} ms"
    );

    let keys = tiercast_engine::auth::TokenKeys::new(SECRET.as_bytes());
    let now = tiercast_engine::auth::now_unix();
    let publisher = keys.mint_publisher("test", now, 600);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{api}/v1/conversations"))
        .bearer_auth(&publisher)
        .json(&json!({"id": 1, "members": [1, 2]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let device = |edge: usize, user: u64| {
        let (_, quic, cert) = &edges[edge];
        ClientConfig::new(*quic, cert.clone(), keys.mint_user(user, now, 600), 0)
    };
    let (alice, _alice_rx) = Client::connect(device(0, 1)).await.unwrap();
    let (bob, mut bob_rx) = Client::connect(device(1, 2)).await.unwrap();

    let refused = bob
        .send(1, 1, Bytes::from_static(b"from the skewed edge"))
        .await
        .expect_err("the skewed edge issues no id");
    assert_eq!(
        refused.code(),
        Some(tiercast_schemas::wire::ErrorCode::Unavailable),
        "refused as unavailable: {refused}"
    );
    assert!(refused.to_string().contains("cluster clock"), "{refused}");
    let sent = alice
        .send(1, 1, Bytes::from_static(b"from the edge on time"))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Delivery::Message(m)) = bob_rx.recv().await {
                return m;
            }
        }
    })
    .await
    .expect("the skewed edge still delivers");
    assert_eq!(got.id, sent.message_id);
}
