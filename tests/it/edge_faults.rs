//! The edge faults as an operator meets them, under loadgen's own traffic:
//! `tiercast loadgen run --self-hosted --edges 3 --redis NODES` on a Redis
//! Cluster started by `scripts/redis-cluster.sh`, with chats (tier 1),
//! groups (tier 2) and a channel (tier 3) sending at 30 msg/s (members over
//! QUIC, the channel's backend over HTTP), and edge 0 signalled mid-run and
//! not restarted. Every delivery arrives (loadgen counts each device's
//! receipts exactly against what was sent), no send fails (the SDK retries
//! a send whose edge died on the next edge), and every device of the dead
//! edge is back on another one.

use tiercast_testkit as common;

use common::cluster::RedisCluster;
use common::repo;

use std::process::Command;

use serde_json::Value;

/// Runs the scenario against 3 self-hosted edges; returns the JSON report.
fn run(scenario: &str) -> Value {
    // The machine to this fleet alone: two deployments at once on a small
    // machine measure the machine, not the fault.
    let _turn = common::exclusive();
    let redis = RedisCluster::up(0);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tiercast"))
        .args(["loadgen", "run", "--self-hosted", "--edges", "3", "--quiet"])
        .args(["--redis", &redis.nodes_csv(), "--scenario"])
        .arg(repo().join("tests/scenarios").join(scenario))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("tiercast runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "loadgen exit {:?}\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn check(v: &Value, signal: &str) {
    assert_eq!(v["lost"], 0, "nothing lost");
    assert_eq!(v["deliveries"], v["expected_deliveries"]);
    assert_eq!(v["send_errors"], 0, "no send failed");
    let tiers = v["tiers"].as_object().unwrap();
    assert_eq!(
        tiers.keys().cloned().collect::<Vec<_>>(),
        vec!["1", "2", "3"],
        "every tier flowed"
    );
    for (t, f) in tiers {
        assert!(f["deliveries"].as_u64().unwrap() > 0, "tier {t}: {f}");
        assert_eq!(f["lost"], 0, "tier {t}");
    }
    let fault = &v["edge_fault"];
    assert_eq!(fault["signal"], signal);
    let on_edge = fault["devices_on_edge"].as_u64().unwrap();
    assert!(
        on_edge >= 90,
        "about a third of 300 devices were on edge 0: {fault}"
    );
    assert_eq!(
        fault["devices_back"], on_edge,
        "every device of the dead edge is back on another"
    );
}

#[test]
fn a_sigkilled_edge_under_traffic_in_every_tier_loses_nothing() {
    let v = run("edge-kill.toml");
    check(&v, "KILL");
}

#[test]
fn a_sigtermed_edge_drains_under_traffic_in_every_tier_and_loses_nothing() {
    let v = run("edge-term.toml");
    check(&v, "TERM");
}

/// A single node (store, engine and edge in one process) crashes and its
/// supervisor starts it again on the same addresses and data directory:
/// everything stored before the crash is still delivered, the publisher's
/// sends during the outage succeed on retry (the engine deduplicates them
/// by `client_msg_id`), and every device comes back to the restarted node,
/// told at once by a stateless reset it can verify (the reset key comes
/// from the fleet secret), not by waiting out its idle timeout.
#[test]
fn a_sigkilled_node_restarted_under_traffic_loses_nothing_and_resets_its_devices() {
    let _turn = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tiercast"))
        .args(["loadgen", "run", "--self-hosted", "--quiet", "--scenario"])
        .arg(repo().join("tests/scenarios/edge-restart.toml"))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("tiercast runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "loadgen exit {:?}\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["lost"], 0, "nothing lost");
    assert_eq!(v["deliveries"], v["expected_deliveries"]);
    assert_eq!(v["send_errors"], 0, "no send failed: {}", v["errors"]);
    let fault = &v["edge_fault"];
    assert_eq!(fault["signal"], "KILL and restart");
    assert_eq!(fault["devices_on_edge"], 300);
    assert_eq!(fault["devices_back"], 300);
    let storm = &v["reconnect_storm"];
    assert_eq!(storm["devices_dropped"], 300);
    assert_eq!(storm["reconnects"], 300, "every device back: {storm}");
    let per_s: u64 = storm["reconnects_per_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(per_s, 300, "the curve counts every device once");
    let errors = &v["errors"];
    assert_eq!(
        errors["disconnect_stateless_reset"], 300,
        "every device learnt of the restart from a verified reset: {errors}"
    );
    assert!(errors.get("disconnect_idle_timeout").is_none(), "{errors}");
}
