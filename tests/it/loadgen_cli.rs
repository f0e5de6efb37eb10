//! `tiercast loadgen run` against a node it starts itself, and `tiercast
//! loadgen plan` on the run's JSON: the reports come out and their counts
//! are consistent (lost = 0, deliveries = expected, tiers add up to the
//! total).

use std::process::Command;

use serde_json::Value;
use tiercast_testkit as common;
use tiercast_testkit::repo;

fn tiercast() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tiercast"))
}

#[test]
fn a_short_scenario_reports_every_delivery_and_plans_a_fleet() {
    let _turn = tiercast_testkit::shared();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let hgrm = dir.path().join("run.hgrm");
    let plot = dir.path().join("run.svg");
    let out = tiercast()
        .args(["loadgen", "run", "--self-hosted", "--quiet", "--scenario"])
        .arg(repo().join("tests/scenarios/smoke.toml"))
        .arg("--json")
        .arg(&json)
        .arg("--hgrm")
        .arg(&hgrm)
        .arg("--plot")
        .arg(&plot)
        .output()
        .expect("tiercast runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "expected_deliveries",
        "deliveries",
        "lost",
        "duplicates",
        "p50_us",
        "p99_us",
        "p999_us",
        "max_us",
    ] {
        assert!(v[key].is_u64(), "total `{key}` missing: {v}");
    }
    assert_eq!(v["lost"], 0);
    assert!(v["messages_sent"].as_u64().unwrap() > 0);
    assert_eq!(v["deliveries"], v["expected_deliveries"]);
    // The scenario's two rate steps, each with its own results.
    let stages = v["stages"].as_array().expect("per-stage results");
    assert_eq!(stages.len(), 2, "{stages:?}");
    let sends = |i: usize| stages[i]["sends"].as_u64().unwrap();
    assert_eq!(stages[1]["messages_per_s"], 60.0);
    assert!(
        sends(1) > sends(0),
        "60 msg/s sends more than 20 msg/s: {stages:?}"
    );
    assert!(sends(0) + sends(1) <= v["messages_sent"].as_u64().unwrap());
    assert!(stages.iter().all(|s| s["p99_us"].as_u64().unwrap() > 0));
    let tiers = v["tiers"].as_object().unwrap();
    assert_eq!(
        tiers.keys().cloned().collect::<Vec<_>>(),
        vec!["1", "2", "3"],
        "every tier was exercised"
    );
    let sum = |k: &str| tiers.values().map(|t| t[k].as_u64().unwrap()).sum::<u64>();
    for k in [
        "messages_sent",
        "expected_deliveries",
        "deliveries",
        "lost",
        "duplicates",
    ] {
        assert_eq!(sum(k), v[k].as_u64().unwrap(), "tiers add up for {k}");
    }
    for t in tiers.values() {
        assert!(t["errors"].is_object(), "errors by code per tier: {t}");
        assert!(t["p50_us"].as_u64().unwrap() <= t["p99_us"].as_u64().unwrap());
        assert!(t["p99_us"].as_u64().unwrap() <= t["max_us"].as_u64().unwrap());
    }
    assert_eq!(v["connect"]["connected"], 80);
    assert_eq!(v["scenario"]["name"], "smoke");
    assert!(v["servers"]["cpu_s"].as_f64().unwrap() > 0.0);
    assert!(v["servers"]["rss_per_connection_bytes"].is_u64());
    assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert!(!v["timeline"].as_array().unwrap().is_empty());
    let h = std::fs::read_to_string(&hgrm).unwrap();
    assert!(h.contains("# tier 1") && h.contains("# tier 3") && h.contains("Total count"));
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg") && svg.contains("latency by percentile"));

    // The run calibrates a plan.
    let tfvars = dir.path().join("terraform.tfvars.json");
    let out = tiercast()
        .args(["loadgen", "plan", "--workload"])
        .arg(repo().join("loadgen/workloads/10m-mixed.toml"))
        .arg("--calibration")
        .arg(&json)
        .arg("--tfvars")
        .arg(&tfvars)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("answer:") && text.contains("assumed"),
        "{text}"
    );
    let tf: Value = serde_json::from_str(&std::fs::read_to_string(&tfvars).unwrap()).unwrap();
    for k in ["edge_count", "redis_shards", "db_nodes"] {
        assert!(tf[k].as_u64().unwrap() >= 1, "{k}: {tf}");
    }

    // The same run, as if it had lost deliveries: no plan, one line why.
    let mut bad = v.clone();
    bad["lost"] = 7.into();
    let bad_json = dir.path().join("lossy.json");
    std::fs::write(&bad_json, bad.to_string()).unwrap();
    let out = tiercast()
        .args(["loadgen", "plan", "--workload"])
        .arg(repo().join("loadgen/workloads/10m-mixed.toml"))
        .arg("--calibration")
        .arg(&bad_json)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lost 7 deliveries"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn bad_flags_and_files_are_one_line_errors() {
    let out = tiercast()
        .args([
            "loadgen",
            "run",
            "--scenario",
            "/nonexistent.toml",
            "--self-hosted",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read scenario"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = tiercast()
        .args(["loadgen", "run", "--scenario"])
        .arg(repo().join("loadgen/scenarios/mixed.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "no target");

    let out = tiercast()
        .args([
            "loadgen",
            "run",
            "--self-hosted",
            "--edges",
            "3",
            "--scenario",
        ])
        .arg(repo().join("loadgen/scenarios/mixed.toml"))
        .env_remove("TIERCAST_REDIS_NODES")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "3 edges need Redis");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--redis"));

    let dir = tempfile::tempdir().unwrap();
    let cal = dir.path().join("cal.json");
    std::fs::write(&cal, "{\"scenario\": {\"name\": \"x\"}}").unwrap();
    let out = tiercast()
        .args(["loadgen", "plan", "--workload"])
        .arg(repo().join("loadgen/workloads/10m-mixed.toml"))
        .arg("--calibration")
        .arg(&cal)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--self-hosted"));
}

/// A run whose sends are all refused (the servers' body limit below the
/// scenario's payload, through the environment the self-hosted servers
/// inherit) is not "lost 0, success": it reports the failed sends by code
/// and exits 1.
#[test]
fn refused_sends_fail_the_run() {
    let _turn = tiercast_testkit::shared();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = tiercast()
        .args(["loadgen", "run", "--self-hosted", "--quiet", "--scenario"])
        .arg(repo().join("tests/scenarios/smoke.toml"))
        .arg("--json")
        .arg(&json)
        .env("TIERCAST_ENGINE__MAX_BODY_BYTES", "8")
        .output()
        .expect("tiercast runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("sends failed"), "{stderr}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["send_errors"].as_u64().unwrap() > 0, "{v}");
    assert!(v["errors"]["body_too_large"].as_u64().unwrap() > 0, "{v}");
}

/// Two generators drive one deployment at once, as from two machines: each
/// its own users (`--user-offset`) and conversation ids (`--run-id`), the
/// edge named by `localhost:PORT` (resolved) with `--server-name`. Each
/// counts exactly its own deliveries: both complete with nothing lost, and
/// the deployment saw the sum of their messages.
#[test]
fn two_generators_share_a_deployment_without_colliding() {
    let _turn = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let secret = "a deployment secret of more than thirty-two bytes";
    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_tiercast"));
    node.args(["edge", "--ready-json"])
        .args(["--set", &format!("node.token_secret={secret}")])
        .args(["--set", &format!("node.data_dir={}", dir.path().display())])
        .args([
            "--set",
            "node.http_listen=127.0.0.1:0",
            "--set",
            "edge.listen=127.0.0.1:0",
        ])
        .args([
            "--set",
            "edge.rates.send.per_s=100000",
            "--set",
            "edge.rates.send.burst=100000",
        ])
        .args([
            "--set",
            "edge.rates.sync.per_s=100000",
            "--set",
            "edge.rates.sync.burst=100000",
        ])
        .args([
            "--set",
            "edge.rates.fetch.per_s=100000",
            "--set",
            "edge.rates.fetch.burst=100000",
        ]);
    let node = common::process::Proc::spawn(node);
    let ready = node.ready();
    let port = ready.quic.unwrap().port();
    let generator = |offset: &str, run_id: &str, json: &std::path::Path, extra: &[String]| {
        let hdr = json.with_extension("hdr");
        std::process::Command::new(env!("CARGO_BIN_EXE_tiercast"))
            .args(extra)
            .arg(repo().join("tests/scenarios/smoke.toml"))
            .args([
                "--edge",
                &format!("localhost:{port}"),
                "--server-name",
                "localhost",
            ])
            .args(["--api", &ready.http, "--secret", secret])
            .args(["--ca", ready.certificate.as_deref().unwrap()])
            .args(["--user-offset", offset, "--run-id", run_id])
            .arg("--json")
            .arg(json)
            .arg("--hdr")
            .arg(hdr)
            .spawn()
            .expect("loadgen starts")
    };
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let run = |rest: &[&str]| -> Vec<String> {
        ["loadgen", "run", "--quiet"]
            .iter()
            .chain(rest)
            .map(|s| s.to_string())
            .chain(["--scenario".to_owned()])
            .collect()
    };
    // A also reads the node's CPU and memory from its /metrics, as a run
    // against real hardware does.
    let metrics = format!("{}/metrics", ready.http);
    let mut ga = generator("0", "1", &a, &run(&["--edge-metrics", &metrics]));
    let mut gb = generator("1000000", "2", &b, &run(&[]));
    assert!(ga.wait().unwrap().success(), "generator A");
    assert!(gb.wait().unwrap().success(), "generator B");
    let read = |p: &std::path::Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (va, vb) = (read(&a), read(&b));
    for v in [&va, &vb] {
        assert_eq!(v["lost"], 0);
        assert_eq!(v["send_errors"], 0);
        assert_eq!(v["deliveries"], v["expected_deliveries"]);
        assert!(v["deliveries"].as_u64().unwrap() > 0);
    }
    assert!(
        va["servers"]["cpu_s"].as_f64().unwrap() > 0.0,
        "{}",
        va["servers"]
    );
    assert!(va["servers"]["cpu_us_per_delivery"].as_f64().unwrap() > 0.0);
    assert!(va["servers"]["edge_rss_bytes_connected"].as_u64().unwrap() > 0);
    assert!(vb["servers"]["cpu_s"].is_null(), "B was given no /metrics");
    assert_eq!(va["loadgen"]["user_offset"], 0);
    assert_eq!(vb["loadgen"]["user_offset"], 1_000_000);
    assert_eq!(
        (
            va["loadgen"]["run_id"].as_u64(),
            vb["loadgen"]["run_id"].as_u64()
        ),
        (Some(1), Some(2))
    );
    // The deployment stored both generators' messages.
    let stored = common::metric(
        &http_get(&format!("{}/metrics", ready.http)),
        "tiercast_engine_messages_stored_total",
    );
    let sent = va["messages_sent"].as_u64().unwrap() + vb["messages_sent"].as_u64().unwrap();
    assert_eq!(stored, sent, "each generator's messages, none shared");

    // One report of the two: counts added, latencies from the merged
    // histograms (a quantile of the mixture lies between the generators').
    let merged = dir.path().join("merged.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiercast"))
        .args(["loadgen", "merge"])
        .args([&a, &b])
        .arg("--hdr")
        .arg(a.with_extension("hdr"))
        .arg("--hdr")
        .arg(b.with_extension("hdr"))
        .arg("--json")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vm = read(&merged);
    for key in ["messages_sent", "expected_deliveries", "deliveries", "lost"] {
        assert_eq!(
            vm[key].as_u64().unwrap(),
            va[key].as_u64().unwrap() + vb[key].as_u64().unwrap(),
            "{key}"
        );
    }
    for key in ["p50_us", "p99_us"] {
        let (x, y) = (va[key].as_u64().unwrap(), vb[key].as_u64().unwrap());
        let m = vm[key].as_u64().unwrap();
        assert!(
            x.min(y) <= m && m <= x.max(y),
            "{key}: {m} not within {x}..{y}"
        );
    }
    assert_eq!(
        vm["max_us"].as_u64().unwrap(),
        va["max_us"]
            .as_u64()
            .unwrap()
            .max(vb["max_us"].as_u64().unwrap())
    );
    assert_eq!(vm["merged_from"].as_array().unwrap().len(), 2);
    // A generator merged with itself shared its users: refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiercast"))
        .args(["loadgen", "merge"])
        .args([&a, &a])
        .arg("--hdr")
        .arg(a.with_extension("hdr"))
        .arg("--hdr")
        .arg(a.with_extension("hdr"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run id") && err.lines().count() == 1, "{err}");
}

/// A plain HTTP/1.1 GET on loopback (bounded by timeouts): the body.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map_or(out.clone(), |(_, b)| b.to_owned())
}
