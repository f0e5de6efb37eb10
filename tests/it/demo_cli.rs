//! `tiercast demo` as a user runs it: the binary, its report per tier, its
//! JSON, its exit code.

use std::process::Command;

#[test]
fn demo_reports_no_loss_and_writes_the_json_keys() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("demo.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tiercast"))
        .args([
            "demo",
            "--users",
            "4",
            "--chats",
            "2",
            "--messages",
            "5",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("tiercast runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("lost:                 0"), "{stdout}");

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for key in [
        "expected_deliveries",
        "deliveries",
        "lost",
        "duplicates",
        "p50_us",
        "p99_us",
    ] {
        assert!(v[key].is_u64(), "missing {key} in {v}");
    }
    // Tier 1: 4 users x 2 devices, chats {1,2,3} and {4,1,2}: users 1 and 2
    // are in both. Each user's first device sends 5 messages into each of
    // its chats: (2 + 2 + 1 + 1) x 5 = 30 messages, each to 3 x 2 - 1 = 5
    // devices, one publish per member.
    let t1 = &v["tiers"]["1"];
    assert_eq!(t1["messages_sent"], 30);
    assert_eq!(t1["expected_deliveries"], 150);
    assert_eq!(t1["deliveries"], 150);
    assert_eq!(t1["planned_tiers"], serde_json::json!([1, 1]));
    assert_eq!(t1["publishes"], 90);
    // Tier 2: a group of the 4 users, each sending 5: 20 messages, each to
    // 4 x 2 - 1 = 7 devices; one publish per message (one edge).
    let t2 = &v["tiers"]["2"];
    assert_eq!(t2["messages_sent"], 20);
    assert_eq!(t2["expected_deliveries"], 140);
    assert_eq!(t2["deliveries"], 140);
    assert_eq!(t2["planned_tiers"], serde_json::json!([2]));
    assert_eq!(t2["publishes"], 20);
    // Tier 3: a channel of 16 (4 online), 5 messages from the backend, each
    // pulled by all 8 devices; one notification publish per message.
    let t3 = &v["tiers"]["3"];
    assert_eq!(t3["messages_sent"], 5);
    assert_eq!(t3["expected_deliveries"], 40);
    assert_eq!(t3["deliveries"], 40);
    assert_eq!(t3["planned_tiers"], serde_json::json!([3]));
    assert_eq!(t3["publishes"], 5);
    for t in ["1", "2", "3"] {
        assert_eq!(v["tiers"][t]["lost"], 0, "tier {t}");
        assert_eq!(v["tiers"][t]["duplicates"], 0, "tier {t}");
    }
    // The totals (the keys the demo always wrote) add the tiers up.
    assert_eq!(v["messages_sent"], 55);
    assert_eq!(v["expected_deliveries"], 330);
    assert_eq!(v["deliveries"], 330);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicates"], 0);
    assert!(v["p50_us"].as_u64().unwrap() <= v["p99_us"].as_u64().unwrap());
}

#[test]
fn bad_flags_exit_64_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_tiercast"))
        .args(["demo", "--devices", "4"])
        .output()
        .expect("tiercast runs");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--devices"), "{stderr}");
}
