//! A connection's setup is timed by stage on the edge (accepted -> TLS done
//! -> Hello read -> Welcome, and the Hello's own steps), and a setup that
//! ends before Welcome is counted where it stopped: what tells a reconnect
//! storm's queue apart (docs/benchmarks.md, "Where a reconnect waits").

use tiercast_testkit as common;

use tiercast_client::Client;

const STAGES: [&str; 5] = [
    "tiercast_edge_handshake_seconds_count",
    "tiercast_edge_hello_wait_seconds_count",
    "tiercast_edge_hello_seconds_count",
    "tiercast_edge_hello_register_seconds_count",
    "tiercast_edge_hello_attach_seconds_count",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connect_is_timed_once_in_every_stage() {
    let node = common::start(&[]).await;
    node.chat(1, &[1, 2]).await;
    for (n, user) in [(1, 1u64), (2, 2)] {
        let cfg = node.client_config(user, 10 + user).await;
        let (client, _rx) = Client::connect(cfg).await.expect("device connects");
        let m = node.node.metrics();
        for stage in STAGES {
            assert_eq!(common::metric(&m, stage), n, "{stage} after {n} connects");
        }
        assert_eq!(
            common::metric(&m, "tiercast_edge_setups_abandoned_total"),
            0,
            "no setup abandoned"
        );
        // Each stage's time is a time, not a count passed off as one.
        for stage in STAGES {
            let sum = common::metric_f64(&m, &stage.replace("_count", "_sum"));
            assert!(sum.is_finite() && sum >= 0.0, "{stage}: sum {sum}");
        }
        drop(client);
    }
    node.node.shutdown().await;
}
