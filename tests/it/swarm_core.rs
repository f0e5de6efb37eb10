//! Loadgen's device core (`tiercast_loadgen::swarm`) against a real node
//! over QUIC on loopback: its devices behave as SDK sessions do. A device
//! connects and is issued its id, sends (the answer carries the stored
//! id), receives live, comes back after its connection is dropped and gets
//! what was sent meanwhile exactly once (resume and inbox, deduplicated),
//! and a device whose token is refused stops with the edge's code instead
//! of reconnecting for ever.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiercast_client::{ErrorCode, Event};
use tiercast_loadgen::swarm::{DeviceSpec, Reaction, Sink, Swarm, SwarmConfig};
use tiercast_testkit as common;

/// Every event with its device, in order.
#[derive(Default)]
struct Log {
    events: Mutex<Vec<(usize, Event)>>,
}

impl Sink for Log {
    fn event(&self, device: usize, event: Event) -> Reaction {
        self.events.lock().unwrap().push((device, event));
        Reaction::Nothing
    }

    fn pulled(&self, _device: usize) {}
}

impl Log {
    /// Waits (at most 20 s) until `f` holds for the events so far.
    async fn until(&self, what: &str, f: impl Fn(&[(usize, Event)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if f(&self.events.lock().unwrap()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.events.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn count(&self, f: impl Fn(&(usize, Event)) -> bool) -> usize {
        self.events.lock().unwrap().iter().filter(|e| f(e)).count()
    }
}

fn message_to(device: usize, id: u64) -> impl Fn(&(usize, Event)) -> bool {
    move |(d, e)| *d == device && matches!(e, Event::Message(m) if m.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_the_core_connect_send_resume_and_stop_as_sessions_do() {
    let node = common::start(&[]).await;
    node.chat(1, &[1, 2]).await;
    let log = Arc::new(Log::default());
    let tls = tiercast_client::tls::client_tls(&node.node.cert_pem).unwrap();
    let swarm = Swarm::start(SwarmConfig::new(tls), 2, false, log.clone()).unwrap();
    let edges = vec![node.node.quic_addr];
    let spec = |token: String| DeviceSpec {
        edges: edges.clone(),
        token,
        device: "core-test".into(),
        client_id: 0,
    };
    // Devices 0 and 1 (users 1 and 2) land on different shards.
    let a = swarm.add(spec(node.token(1)));
    let b = swarm.add(spec(node.token(2)));
    let refused = swarm.add(spec("not-a-token".into()));
    log.until("both devices connected", |ev| {
        [a, b].iter().all(|&d| {
            ev.iter().any(|(x, e)| {
                *x == d && matches!(e, Event::Connected { client_id, .. } if *client_id > 0)
            })
        })
    })
    .await;

    // A send from one device reaches the other live.
    let first = swarm
        .send(a, 1, 1, "hello".into(), Duration::from_secs(10))
        .await
        .expect("send");
    assert!(!first.duplicate);
    log.until("the live message", |ev| {
        ev.iter().any(message_to(b, first.message_id))
    })
    .await;

    // Device b's connection drops; a message sent meanwhile reaches it
    // once it is back, exactly once.
    swarm.reconnect(b);
    log.until("b disconnected", |ev| {
        ev.iter()
            .any(|(d, e)| *d == b && matches!(e, Event::Disconnected { .. }))
    })
    .await;
    let second = swarm
        .send(a, 1, 2, "while away".into(), Duration::from_secs(10))
        .await
        .expect("send");
    log.until("b back with the message sent while it was away", |ev| {
        ev.iter().any(message_to(b, second.message_id))
    })
    .await;
    // The same client message id again is answered with the first id.
    let again = swarm
        .send(a, 1, 2, "while away".into(), Duration::from_secs(10))
        .await
        .expect("retry");
    assert_eq!(again.message_id, second.message_id);
    assert!(again.duplicate);
    // The resume finished on both of b's connections.
    let stats = swarm.stats(b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.resumes.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "b's resumes did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.connects.load(std::sync::atomic::Ordering::Relaxed), 2);
    for id in [first.message_id, second.message_id] {
        assert_eq!(log.count(message_to(b, id)), 1, "message {id} once");
    }
    // The sender does not get its own messages back as new.
    assert_eq!(log.count(message_to(a, first.message_id)), 0);

    // The refused device stopped with the edge's code, and never connected.
    log.until("the refused device stopped", |ev| {
        ev.iter().any(|(d, e)| {
            *d == refused
                && matches!(e, Event::Stopped { error } if error.code() == Some(ErrorCode::Unauthenticated))
        })
    })
    .await;
    assert_eq!(
        log.count(|(d, e)| *d == refused && matches!(e, Event::Connected { .. })),
        0
    );
    swarm.close().await;
}
