//! A handshake flood: thousands of real QUIC Initial packets (made by
//! quinn-proto, each a new connection attempt) from many source ports,
//! never completed. The edge's handshake state stays bounded (a cap on
//! handshakes in flight; above a rate, a stateless Retry first), and a
//! device connected before the flood is served throughout.
//!
//! The figures (printed, and written to `$TIERCAST_FIGURES_DIR` when set)
//! go to docs/security.md; the test asserts bounds, never times.

use tiercast_testkit as common;

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{WAIT, start};

const INITIALS: usize = 4_000;
const SOURCES: usize = 64;

/// `INITIALS` first datagrams of new client connections to `edge`.
fn initials(edge: std::net::SocketAddr, pem: &str) -> Vec<Vec<u8>> {
    some_initials(edge, pem, INITIALS)
}

/// `n` first datagrams of new client connections to `edge`.
fn some_initials(edge: std::net::SocketAddr, pem: &str, n: usize) -> Vec<Vec<u8>> {
    let crypto = tiercast_client::tls::client_crypto(pem).unwrap();
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let cfg = quinn_proto::ClientConfig::new(crypto.clone());
        let (_, mut conn) = ep.connect(now, cfg, edge, "localhost").unwrap();
        let mut buf = Vec::with_capacity(1500);
        let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
        buf.truncate(t.size);
        out.push(buf);
    }
    out
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn flood(name: &str, settings: &[(&str, &str)], cap: u64) -> serde_json::Value {
    let t = start(settings).await;
    t.chat(1, &[1, 2]).await;
    let (a, _ra) = t.device(1, 10).await;
    let (_b, mut rb) = t.device(2, 20).await;
    let packets = initials(t.node.quic_addr, &t.node.cert_pem);
    let rss_before = rss_bytes();
    let metrics = |name: &str| common::metric(&t.node.metrics(), name);

    // Sample the edge while the flood runs.
    let done = Arc::new(AtomicBool::new(false));
    let (max_in_flight, max_rss) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (done, mif, mrss) = (done.clone(), max_in_flight.clone(), max_rss.clone());
        let registry_text = t.node.metrics_source();
        tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                let m = common::metric(&registry_text(), "tiercast_edge_handshakes_in_flight ");
                mif.fetch_max(m, Ordering::Relaxed);
                mrss.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let target = t.node.quic_addr;
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let sockets: Vec<UdpSocket> = (0..SOURCES)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (i, p) in packets.iter().enumerate() {
            let _ = sockets[i % SOURCES].send_to(p, target);
        }
        started.elapsed()
    });
    // The device is served while the flood runs: pings and a message.
    let mut rtts = Vec::new();
    while !sender.is_finished() || rtts.len() < 20 {
        let t0 = Instant::now();
        a.ping(rtts.len() as u64)
            .await
            .expect("served during the flood");
        rtts.push(t0.elapsed());
    }
    let flood_time = sender.join().unwrap();
    let sent = a
        .send(1, 1, Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert_eq!(common::next_message(&mut rb).await.id, sent.message_id);
    // Every flooded handshake gives up (hello_timeout_ms) and its state goes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics("tiercast_edge_handshakes_in_flight ") > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshakes never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::Release);
    sampler.await.unwrap();
    rtts.sort();
    let figures = serde_json::json!({
        "scenario": name,
        "initials_sent": INITIALS,
        "source_ports": SOURCES,
        "flood_seconds": flood_time.as_secs_f64(),
        "retries_sent": metrics("tiercast_edge_retries_sent_total"),
        "handshakes_refused": metrics("tiercast_edge_handshakes_refused_total"),
        "max_handshakes_in_flight": max_in_flight.load(Ordering::Relaxed),
        "handshake_cap": cap,
        "rss_before_bytes": rss_before,
        "rss_max_bytes": max_rss.load(Ordering::Relaxed),
        "rss_growth_bytes": max_rss.load(Ordering::Relaxed).saturating_sub(rss_before),
        "pings_during_flood": rtts.len(),
        "ping_p50_us": rtts[rtts.len() / 2].as_micros() as u64,
        "ping_max_us": rtts.last().unwrap().as_micros() as u64,
    });
    println!("handshake flood: {figures}");
    if let Some(dir) = std::env::var_os("TIERCAST_FIGURES_DIR") {
        let path = std::path::Path::new(&dir).join(format!("handshake-flood-{name}.json"));
        std::fs::write(path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    }
    assert!(
        figures["max_handshakes_in_flight"].as_u64().unwrap() <= cap,
        "{figures}"
    );
    assert!(
        figures["rss_growth_bytes"].as_u64().unwrap() < 256 << 20,
        "{figures}"
    );
    t.node.shutdown().await;
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_keeps_memory_bounded_and_devices_served() {
    // Above 100 new connections a second, addresses must be validated: the
    // flood is answered with stateless Retry packets.
    let retry = flood(
        "retry",
        &[
            ("edge.retry_above_per_s", "100"),
            ("edge.max_handshakes_in_flight", "256"),
            ("edge.hello_timeout_ms", "1000"),
        ],
        256,
    )
    .await;
    assert!(retry["retries_sent"].as_u64().unwrap() > 0, "{retry}");
    // Retry off: the cap on handshakes in flight refuses the rest.
    let capped = flood(
        "cap",
        &[
            ("edge.retry_above_per_s", "1000000"),
            ("edge.max_handshakes_in_flight", "256"),
            ("edge.hello_timeout_ms", "1000"),
        ],
        256,
    )
    .await;
    assert!(
        capped["handshakes_refused"].as_u64().unwrap() > 0,
        "{capped}"
    );
}

/// An edge with no room for another handshake refuses a new connection
/// with QUIC's CONNECTION_REFUSED, its reason phrase the device's turn
/// (`retry-after-ms`, ADR 0015). The SDK reports it as `unavailable` (the
/// edge shed load, `is_shed`) with that turn, and a session counts every
/// such refusal and comes back at its turn (the policy's delays are
/// checked in `reconnect`'s unit tests) until there is room: each of the
/// edge's refusals after the flood is one of the session's, exactly, and
/// every one carried a turn. The flood's handshakes never finish, so no
/// slot frees for 3 s: a stall, through which the session is sent away
/// for longer each time rather than every few milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_refused_for_load_is_told_unavailable_and_when_to_come_back() {
    use tiercast_client::ClientError;
    use tiercast_client::resume::is_shed;
    use tiercast_schemas::wire::ErrorCode;

    const SLOTS: u64 = 8;
    const FLOOD: usize = 24;
    let t = start(&[
        ("edge.retry_above_per_s", "1000000"),
        ("edge.max_handshakes_in_flight", "8"),
        ("edge.hello_timeout_ms", "3000"),
    ])
    .await;
    t.chat(1, &[1, 2]).await;
    let metrics = |name: &str| common::metric(&t.node.metrics(), name);
    // Handshakes that never finish take every slot; the rest are refused.
    flood_slots(&t, FLOOD);
    let refused_by_flood = FLOOD as u64 - SLOTS;
    wait_for("the flood to fill the slots", &|| {
        metrics("tiercast_edge_handshakes_in_flight ") == SLOTS
            && metrics("tiercast_edge_handshakes_refused_total") == refused_by_flood
    })
    .await;

    // A connect now: refused, and told why.
    let e = match tiercast_client::Client::connect(t.client_config(1, 10).await).await {
        Err(e) => e,
        Ok(_) => panic!("connected with no slot free"),
    };
    // Told when to come back: a turn from the edge's pacer, at most its
    // horizon ahead.
    let ClientError::Refused {
        code: ErrorCode::Unavailable,
        ref message,
        retry_after: Some(after),
    } = e
    else {
        panic!("not a paced refusal: {e:?}");
    };
    assert_eq!(message, tiercast_client::connection::REFUSED);
    assert!(after <= tiercast_edge::core::pacer::HORIZON, "{after:?}");
    assert!(is_shed(&e));
    assert_eq!(
        metrics("tiercast_edge_handshakes_refused_total"),
        refused_by_flood + 1
    );

    // A session: refused while the flood holds the slots, then in once the
    // flood's handshakes give up (hello_timeout_ms).
    let mut cfg = t.session_config(2, 20).await;
    cfg.shed_backoff_base = Duration::from_millis(100);
    cfg.shed_backoff_cap = Duration::from_millis(400);
    let device = common::Device::start(cfg);
    device
        .wait_until("the session in, after the flood", WAIT, |l| l.connects == 1)
        .await;
    let shed = device.session.stats().shed.load(Ordering::Relaxed);
    assert!(shed >= 1, "the session was never refused");
    assert_eq!(
        metrics("tiercast_edge_handshakes_refused_total"),
        refused_by_flood + 1 + shed,
        "every refusal after the flood was one of the session's, counted as shed"
    );
    assert_eq!(
        device.session.stats().paced.load(Ordering::Relaxed),
        shed,
        "every refusal carried a turn"
    );
    // Without the stall rule the turn is 50 ms over 8 slots, about 6 ms,
    // and the session would have been refused some 400 times in the 3 s;
    // with it (and the session's 400 ms cap) about a dozen.
    assert!(shed <= 40, "{shed} refusals across the stall");
    // And it is served.
    let (a, _ra) = t.device(1, 11).await;
    let sent = a.send(1, 1, Bytes::from_static(b"in")).await.unwrap();
    device
        .wait_until("the message", WAIT, |l| {
            l.messages.iter().any(|m| m.id == sent.message_id)
        })
        .await;
    t.node.shutdown().await;
}

/// With `edge.pace_refusals = false` the refusal is bare: `unavailable`
/// with no turn, and the SDK falls back on its shed backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_does_not_pace_refuses_without_a_turn() {
    use tiercast_client::ClientError;
    use tiercast_schemas::wire::ErrorCode;

    let t = start(&[
        ("edge.retry_above_per_s", "1000000"),
        ("edge.max_handshakes_in_flight", "2"),
        ("edge.pace_refusals", "false"),
    ])
    .await;
    let metrics = |name: &str| common::metric(&t.node.metrics(), name);
    flood_slots(&t, 2);
    wait_for("the flood to fill the slots", &|| {
        metrics("tiercast_edge_handshakes_in_flight ") == 2
    })
    .await;
    let e = match tiercast_client::Client::connect(t.client_config(1, 10).await).await {
        Err(e) => e,
        Ok(_) => panic!("connected with no slot free"),
    };
    assert_eq!(
        e,
        ClientError::Refused {
            code: ErrorCode::Unavailable,
            message: tiercast_client::connection::REFUSED.into(),
            retry_after: None,
        }
    );
    t.node.shutdown().await;
}

/// Sends `n` first packets of handshakes that never go further.
fn flood_slots(t: &common::TestNode, n: usize) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for p in some_initials(t.node.quic_addr, &t.node.cert_pem, n) {
        socket.send_to(&p, t.node.quic_addr).unwrap();
    }
}

/// Polls `ok` until it holds (bounded by `WAIT`).
async fn wait_for(what: &str, ok: &dyn Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
