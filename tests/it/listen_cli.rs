//! `tiercast listen` as a user runs it, against `tiercast dev`: two
//! listeners stay connected while a backend publishes to their conversation
//! and the conversation is moved through tiers 1 -> 2 -> 3 -> 2 -> 1; every
//! message is printed by every listener (tier 3 by pulling), and neither
//! exits. Every wait is bounded; readiness is the processes' own lines.

use std::process::Command;

use serde_json::{Value, json};
use tiercast_testkit::process::Proc;

/// `tiercast ARGS`, its stdout and stderr read by the test.
fn tiercast(args: &[&str]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiercast"));
    cmd.args(args);
    Proc::spawn_merged(cmd)
}

// The guard is a turn between tests (held for the whole test on purpose),
// not a lock on data the awaits could need.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_get_every_message_through_tier_changes() {
    let _turn = tiercast_testkit::shared();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let dev = tiercast(&[
        "dev",
        "--set",
        "edge.listen=127.0.0.1:0",
        "--set",
        "node.http_listen=127.0.0.1:0",
        "--set",
        &format!("node.data_dir={data}"),
    ]);
    let quic = dev.value_after("QUIC edge:");
    let api = dev.value_after("HTTP API:");
    let cert = dev.value_after("certificate:");
    let publisher = dev.value_after("publisher:");

    let http = reqwest::Client::new();
    let r = http
        .post(format!("{api}/v1/conversations"))
        .bearer_auth(&publisher)
        .json(&json!({"id": 1, "members": [1, 2, 3]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let listeners: Vec<Proc> = [1, 2]
        .iter()
        .map(|user| {
            let p = tiercast(&[
                "listen",
                "--addr",
                &quic,
                "--user",
                &user.to_string(),
                "--data-dir",
                &data,
                "--ca",
                &cert,
            ]);
            p.wait_for("listening as user");
            p
        })
        .collect();

    let mut bodies = Vec::new();
    for (step, tier) in [1, 2, 3, 2, 1].into_iter().enumerate() {
        let r: Value = http
            .put(format!("{api}/v1/conversations/1/tier"))
            .bearer_auth(&publisher)
            .json(&json!({ "tier": tier }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["tier"], tier, "step {step}");
        for i in 0..5 {
            let body = format!("step{step}-tier{tier}-m{i}");
            let r = http
                .post(format!("{api}/v1/conversations/1/messages"))
                .bearer_auth(&publisher)
                .json(&json!({ "body": body }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{body}");
            bodies.push(body);
        }
    }

    for (n, l) in listeners.iter().enumerate() {
        for body in &bodies {
            // In order: each body is printed after the one before it.
            let line = l.wait_for(&format!(": {body}  (id "));
            assert!(line.starts_with("[conversation 1] user 0: "), "{line}");
        }
        eprintln!("listener {n}: all {} messages", bodies.len());
    }
    for mut l in listeners {
        assert!(
            l.child.try_wait().unwrap().is_none(),
            "the listener is still running"
        );
        let _ = l.child.kill();
    }
}
