//! A deployment as an operator runs it: `tiercast engine` and two `tiercast
//! edge` processes on a Redis Cluster started by `scripts/redis-cluster.sh`;
//! a chat and a tier-3 broadcast reach devices on both edges. Readiness is
//! each process printing its addresses; every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tiercast_client::{Client, ClientConfig, Delivery};

const SECRET: &str = "cluster-process-test-secret";
const WAIT: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Redis {
    dir: String,
    nodes: String,
}

impl Redis {
    fn up() -> Self {
        let out = Command::new(repo().join("scripts/redis-cluster.sh"))
            .arg("up")
            .output()
            .expect("redis-cluster.sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        Self {
            dir: get("TIERCAST_REDIS_DIR="),
            nodes: get("TIERCAST_REDIS_NODES="),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/redis-cluster.sh"))
            .args(["down", "--dir", &self.dir])
            .output();
    }
}

/// A `tiercast` process whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(args: &[String]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tiercast"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tiercast starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The value after `label` on the line that has it.
    fn wait_for(&self, label: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{label}` line in time"));
            if let Some(v) = line.trim().strip_prefix(label) {
                return v.split_whitespace().next().unwrap_or("").to_owned();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn common_args(redis: &Redis, dir: &std::path::Path) -> Vec<String> {
    let nodes: Vec<String> = redis.nodes.split(',').map(|n| format!("\"{n}\"")).collect();
    [
        format!("node.token_secret={SECRET}"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_and_two_edge_processes_serve_a_chat_and_a_broadcast() {
    let redis = Redis::up();
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["engine".to_string()];
    args.extend(common_args(&redis, &tmp.path().join("engine")));
    let engine = Proc::spawn(&args);
    let api = engine.wait_for("HTTP API:");

    let mut edges = Vec::new();
    for i in 0..2 {
        let mut args = vec!["edge".to_string()];
        args.extend(common_args(&redis, &tmp.path().join(format!("edge{i}"))));
        args.extend(["--set".into(), format!("node.store_url={api}")]);
        let p = Proc::spawn(&args);
        let quic = p.wait_for("QUIC edge:");
        let cert = p.wait_for("certificate:");
        edges.push((p, quic, std::fs::read_to_string(cert).unwrap()));
    }

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
        ClientConfig::new(
            quic.parse().unwrap(),
            cert.clone(),
            keys.mint_user(user, now, 600),
            user * 10,
        )
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
    let id = r["id"].as_u64().unwrap();
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
