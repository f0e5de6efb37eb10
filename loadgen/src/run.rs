//! `tiercast loadgen run`: drives a scenario against a deployment and
//! reports what every device got.
//!
//! Honest measurement:
//! - open loop: every send has a scheduled time, and is started at that time
//!   whatever the previous sends are doing; latency counts from the
//!   scheduled time, so a stall shows as latency (coordinated omission is
//!   corrected by construction, not by interpolation);
//! - exact accounting: every device's expected messages (each member's
//!   devices but the sender's) against its receipts; lost, duplicate and
//!   out-of-order counts are exact. A tier-3 notification covers every
//!   earlier message of its channel (notifications coalesce by design);
//! - many UDP sockets (`--sockets`) so one socket is not the bottleneck;
//!   loadgen's CPU is reported beside the servers'.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use serde_json::json;
use tiercast_client::{ClientError, Event, Session, SessionConfig};

use crate::scenario::{ConversationPlan, RateKind, Scenario, Sender, layout};
use crate::target::{Target, TargetSpec, cpu_seconds};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub scenario: Scenario,
    pub target: TargetSpec,
    /// Client UDP sockets the devices are spread over.
    pub sockets: usize,
    /// Each device's SDK reorder window.
    pub reorder_window: Duration,
    pub progress: bool,
}

/// One device's receipts, written by its event task.
#[derive(Debug, Default)]
struct DeviceLog {
    /// First receipt of each message id: microseconds since the run base.
    arrivals: HashMap<u64, u64>,
    /// Tier-3 notifications per conversation, in arrival order.
    notifies: HashMap<u64, Vec<(u64, u64)>>,
    duplicates: HashMap<u64, u64>,
    out_of_order: HashMap<u64, u64>,
    newest: HashMap<u64, u64>,
    connected_after_us: Option<u64>,
    connects: u64,
    /// When the last connection was lost (for reconnect times).
    lost_at_us: Option<u64>,
    reconnect_us: Vec<u64>,
    /// When each connect completed (us since the run's base).
    connected_at_us: Vec<u64>,
    errors: HashMap<String, u64>,
    /// Index into the target's edges of the current connection.
    edge: Option<usize>,
}

/// A message the run sent.
#[derive(Debug, Clone, Copy)]
struct Sent {
    id: u64,
    conversation: u64,
    scheduled_us: u64,
    sender_client: u64,
    warm: bool,
}

/// Per-tier (and total) figures. The first keys are the same as `tiercast
/// demo --json` writes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierFigures {
    pub messages_sent: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Deliveries of measured (post-warm-up) messages per second of the
    /// measured window.
    pub deliveries_per_s: f64,
    /// Refused or failed sends by code.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Tier 3 only: "delivered" counts devices notified (a notification
    /// covers earlier ids); `pulled` counts the bodies devices pulled
    /// (the scenario's `pull_fraction` of notifications).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notified: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled: Option<u64>,
}

fn quantiles(h: &Histogram<u64>, f: &mut TierFigures) {
    if h.is_empty() {
        return;
    }
    f.p50_us = h.value_at_quantile(0.50);
    f.p90_us = h.value_at_quantile(0.90);
    f.p99_us = h.value_at_quantile(0.99);
    f.p999_us = h.value_at_quantile(0.999);
    f.max_us = h.max();
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// The outcome of a run: the JSON report plus the histograms (for `--hgrm`)
/// and the timeline (for `--plot`).
#[derive(Debug)]
pub struct RunReport {
    pub json: serde_json::Value,
    pub histograms: Vec<(String, Histogram<u64>)>,
    pub timeline: Vec<TimelinePoint>,
    pub text: String,
    pub lost: u64,
    /// Sends refused or failed (every code): a run with any is not clean,
    /// whatever its lost count says.
    pub send_errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub t_s: u64,
    pub sends: u64,
    pub deliveries: u64,
    pub p99_us: u64,
}

fn now_us(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

pub async fn run(opts: RunOptions) -> anyhow::Result<RunReport> {
    let s = opts.scenario.clone();
    let mut target = tokio::task::spawn_blocking({
        let spec = opts.target.clone();
        move || Target::start(&spec)
    })
    .await??;
    let result = drive(&s, &opts, &target).await;
    target.shutdown();
    result
}

async fn drive(s: &Scenario, opts: &RunOptions, target: &Target) -> anyhow::Result<RunReport> {
    let base = Instant::now();
    let http = reqwest::Client::new();
    let now = tiercast_engine::auth::now_unix();
    let publisher = target.keys.mint_publisher("loadgen", now, 24 * 3600);

    // Conversations, with the tier each is served by.
    let first_id = 1_000_000 + u64::from(rand::random::<u16>()) * 100_000;
    let plans = layout(s, first_id);
    let tiers = create_conversations(&http, &target.api, &publisher, s, &plans).await?;

    // Devices: connect at the scenario's rate, spread over UDP sockets.
    let sockets: Vec<quinn::Endpoint> = (0..opts.sockets.max(1))
        .map(|_| tiercast_client::client_endpoint("127.0.0.1:0".parse().expect("literal"), 4 << 20))
        .collect::<Result<_, _>>()
        .context("binding client sockets")?;
    let rss0 = target.edge_rss();
    let progress = Progress::new(opts.progress, s.devices());
    let pulls = Arc::new(AtomicU64::new(0));
    let pull_fraction: HashMap<u64, f64> = plans
        .iter()
        .map(|p| (p.id, s.conversations[p.group].pull_fraction))
        .collect();
    let pull_fraction = Arc::new(pull_fraction);
    let mut meta: Vec<Meta> = Vec::with_capacity(s.devices() as usize);
    let mut sessions: Vec<(u64, Session)> = Vec::with_capacity(s.devices() as usize);
    let gap = Duration::from_secs_f64(1.0 / s.connect_rate);
    let connect_start = Instant::now();
    for i in 0..s.devices() {
        let user = i / s.devices_per_user + 1;
        let d = i % s.devices_per_user;
        // A label of loadgen's own (the edge issues the real device id).
        let client_id = user * 10 + d + 1;
        let e = i as usize % target.edges.len();
        let mut order = target.edges[e..].to_vec();
        order.extend_from_slice(&target.edges[..e]);
        let mut cfg = SessionConfig::new(
            order,
            target.trusted_pem.clone(),
            target.keys.mint_user(user, now, 24 * 3600),
            0,
        );
        cfg.endpoint = Some(sockets[i as usize % sockets.len()].clone());
        cfg.report_duplicates = true;
        cfg.reorder_window = opts.reorder_window;
        cfg.device = format!("loadgen-{client_id}");
        let (session, events) = Session::start(cfg);
        let log = Arc::new(Mutex::new(DeviceLog::default()));
        tokio::spawn(consume(
            events,
            log.clone(),
            base,
            progress.clone(),
            target.edges.clone(),
            PullCtx {
                session: session_client_getter(&session),
                fractions: pull_fraction.clone(),
                pulls: pulls.clone(),
            },
        ));
        meta.push(Meta {
            user,
            client_id,
            log,
            started_us: now_us(base),
        });
        sessions.push((client_id, session));
        // Pace the connects (open loop on the connect schedule).
        tokio::time::sleep_until((connect_start + gap * (i as u32 + 1)).into()).await;
    }
    let connect_deadline = Instant::now() + Duration::from_secs(60) + gap * s.devices() as u32;
    while progress.connected.load(Ordering::Relaxed) < s.devices() {
        if Instant::now() > connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_elapsed = connect_start.elapsed();
    let rss1 = target.edge_rss();
    // Server and loadgen CPU over the same window: from here (everyone
    // connected) to the end of the settle.
    let server_cpu0 = target.server_cpu();
    let loadgen_cpu0 = cpu_seconds(std::process::id());
    let connected = progress.connected.load(Ordering::Relaxed);

    // The open-loop send schedule.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let send_errors: Arc<Mutex<HashMap<(u8, String), u64>>> = Arc::default();
    // A user's first device sends for the user.
    let by_user: HashMap<u64, usize> = meta
        .iter()
        .enumerate()
        .filter(|(_, d)| d.client_id % 10 == 1)
        .map(|(i, d)| (d.user, i))
        .collect();
    let sessions = Arc::new(sessions);
    let weights: Vec<f64> = s.conversations.iter().map(|g| g.weight).collect();
    let pick_group =
        rand::distr::weighted::WeightedIndex::new(&weights).context("group weights")?;
    let by_group: Vec<Vec<&ConversationPlan>> = (0..s.conversations.len())
        .map(|g| plans.iter().filter(|p| p.group == g).collect())
        .collect();
    let total_s = s.warmup_s + s.duration_s;
    let send_start = Instant::now();
    let send_start_us = now_us(base);
    let mut t = 0.0f64;
    let mut in_flight = Vec::new();
    let client_msg = Arc::new(AtomicU64::new(1));
    let mut storm_done = s.reconnect_storm.is_none();
    let mut storm_report = None;
    let mut fault_done = s.edge_fault.is_none();
    let mut fault_report: Option<(Vec<usize>, u64)> = None;
    let mut restart_task = None;
    loop {
        let gap = match s.rate.kind {
            RateKind::Constant => 1.0 / s.rate.messages_per_s,
            RateKind::Poisson => {
                let u: f64 = rand::rng().random_range(f64::EPSILON..1.0);
                -u.ln() / s.rate.messages_per_s
            }
        };
        t += gap;
        if t >= total_s {
            break;
        }
        if !storm_done
            && let Some(storm) = &s.reconnect_storm
            && t >= s.warmup_s + storm.at_s
        {
            storm_done = true;
            let on_edge: Vec<usize> = meta
                .iter()
                .enumerate()
                .filter(|(_, m)| m.log.lock().expect("log").edge == Some(storm.edge))
                .map(|(i, _)| i)
                .collect();
            for &i in &on_edge {
                sessions[i].1.reconnect();
            }
            storm_report = Some((on_edge.len(), now_us(base)));
        }
        if !fault_done
            && let Some(fault) = &s.edge_fault
            && t >= fault.at_s
        {
            fault_done = true;
            // A rolling restart moves every device at some point.
            let restart = fault.signal == crate::scenario::FaultSignal::Restart;
            let on_edge: Vec<usize> = meta
                .iter()
                .enumerate()
                .filter(|(_, m)| restart || m.log.lock().expect("log").edge == Some(fault.edge))
                .map(|(i, _)| i)
                .collect();
            if fault.signal == crate::scenario::FaultSignal::Restart {
                let restart = target.rolling_restart()?;
                restart_task = Some(tokio::task::spawn_blocking(move || {
                    let r = restart.run();
                    (r, std::time::Instant::now())
                }));
            } else {
                target.signal_edge(fault.edge, fault.signal.name())?;
            }
            fault_report = Some((on_edge, now_us(base)));
        }
        let at = send_start + Duration::from_secs_f64(t);
        tokio::time::sleep_until(at.into()).await;
        let mut rng = rand::rng();
        let g = rng.sample(&pick_group);
        let plan = by_group[g][rng.random_range(0..by_group[g].len())];
        let warm = t < s.warmup_s;
        let scheduled_us = send_start_us + (t * 1e6) as u64;
        let body = body(scheduled_us, s.payload_bytes);
        progress.sends.fetch_add(1, Ordering::Relaxed);
        let conversation = plan.id;
        let sent = sent.clone();
        let errors = send_errors.clone();
        let tier = tiers.get(&conversation).copied().unwrap_or(1);
        match s.conversations[g].sender {
            Sender::Member => {
                let member = plan.members[rng.random_range(0..plan.members.len())];
                let Some(&di) = by_user.get(&member) else {
                    continue;
                };
                let sessions = sessions.clone();
                let cmid = client_msg.fetch_add(1, Ordering::Relaxed);
                in_flight.push(tokio::spawn(async move {
                    let (client_id, session) = &sessions[di];
                    match session
                        .send(conversation, cmid, body, Duration::from_secs(30))
                        .await
                    {
                        Ok(ok) => sent.lock().expect("sent").push(Sent {
                            id: ok.message_id,
                            conversation,
                            scheduled_us,
                            sender_client: *client_id,
                            warm,
                        }),
                        Err(e) => {
                            *errors
                                .lock()
                                .expect("errors")
                                .entry((tier, code_name(&e)))
                                .or_default() += 1
                        }
                    }
                }));
            }
            Sender::Publisher => {
                let http = http.clone();
                let url = format!("{}/v1/conversations/{conversation}/messages", target.api);
                let token = publisher.clone();
                in_flight.push(tokio::spawn(async move {
                    let r = http
                        .post(url)
                        .bearer_auth(token)
                        .json(&json!({"body": String::from_utf8_lossy(&body)}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            match v["id"].as_str().and_then(|s| s.parse().ok()) {
                                Some(id) => sent.lock().expect("sent").push(Sent {
                                    id,
                                    conversation,
                                    scheduled_us,
                                    sender_client: 0,
                                    warm,
                                }),
                                // A 2xx without a message id: the send is
                                // not known to have happened.
                                None => {
                                    *errors
                                        .lock()
                                        .expect("errors")
                                        .entry((tier, "bad_answer".into()))
                                        .or_default() += 1
                                }
                            }
                        }
                        Ok(r) => {
                            *errors
                                .lock()
                                .expect("errors")
                                .entry((tier, format!("http_{}", r.status().as_u16())))
                                .or_default() += 1
                        }
                        Err(_) => {
                            *errors
                                .lock()
                                .expect("errors")
                                .entry((tier, "http_unreachable".into()))
                                .or_default() += 1
                        }
                    }
                }));
            }
        }
        in_flight.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
    }
    for h in in_flight {
        let _ = h.await;
    }
    // A rolling restart still going when the sends end is waited for (its
    // restarts are part of the run).
    let restart_done_us = match restart_task {
        Some(t) => {
            let (result, done) = t.await.context("rolling restart")?;
            result.context("rolling restart")?;
            Some(now_us(base).saturating_sub(done.elapsed().as_micros() as u64))
        }
        None => None,
    };
    let sends_done_us = now_us(base);

    // Settle: until every device has everything (checked exactly), or the
    // scenario's settle time.
    let sent = std::mem::take(&mut *sent.lock().expect("sent"));
    let members: HashMap<u64, &[u64]> =
        plans.iter().map(|p| (p.id, p.members.as_slice())).collect();
    let devices_of_user: HashMap<u64, Vec<usize>> =
        meta.iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, d)| {
                m.entry(d.user).or_default().push(i);
                m
            });
    let settle_deadline = Instant::now() + Duration::from_secs_f64(s.settle_s);
    loop {
        let missing = count_missing(&sent, &members, &devices_of_user, &meta, &tiers);
        progress.set_missing(missing);
        if missing == 0 || Instant::now() >= settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let server_cpu1 = target.server_cpu();
    let loadgen_cpu1 = cpu_seconds(std::process::id());
    progress.finish();

    // Tally, per tier and in total.
    let mut figures: HashMap<u8, TierFigures> = HashMap::new();
    let mut hist: HashMap<u8, Histogram<u64>> = HashMap::new();
    let mut all_hist = histogram();
    let mut per_second: HashMap<u64, (u64, u64, Histogram<u64>)> = HashMap::new();
    for m in &sent {
        let tier = tiers.get(&m.conversation).copied().unwrap_or(1);
        let f = figures.entry(tier).or_default();
        f.messages_sent += 1;
        let sec = m.scheduled_us.saturating_sub(send_start_us) / 1_000_000;
        per_second
            .entry(sec)
            .or_insert_with(|| (0, 0, histogram()))
            .0 += 1;
        for &user in members.get(&m.conversation).copied().unwrap_or(&[]) {
            for &di in devices_of_user.get(&user).map(Vec::as_slice).unwrap_or(&[]) {
                let d = &meta[di];
                if d.client_id == m.sender_client {
                    continue;
                }
                f.expected_deliveries += 1;
                let log = d.log.lock().expect("log");
                let arrival = if tier == 3 {
                    log.notifies
                        .get(&m.conversation)
                        .and_then(|v| v.iter().find(|(id, _)| *id >= m.id))
                        .map(|&(_, at)| at)
                        .or_else(|| log.arrivals.get(&m.id).copied())
                } else {
                    log.arrivals.get(&m.id).copied()
                };
                match arrival {
                    Some(at) => {
                        f.deliveries += 1;
                        let lat = at.saturating_sub(m.scheduled_us).max(1);
                        if !m.warm {
                            hist.entry(tier)
                                .or_insert_with(histogram)
                                .saturating_record(lat);
                            all_hist.saturating_record(lat);
                            let asec = at.saturating_sub(send_start_us) / 1_000_000;
                            let e = per_second
                                .entry(asec)
                                .or_insert_with(|| (0, 0, histogram()));
                            e.1 += 1;
                            e.2.saturating_record(lat);
                        }
                    }
                    None => f.lost += 1,
                }
            }
        }
    }
    // Duplicates and out-of-order receipts, by the conversation's tier.
    let mut reconnect_us = Vec::new();
    let mut connect_us = Vec::new();
    let mut errors: HashMap<String, u64> = HashMap::new();
    let send_errors_map = send_errors.lock().expect("errors").clone();
    let send_errors: u64 = send_errors_map.values().sum();
    for ((tier, code), n) in send_errors_map.iter() {
        *figures
            .entry(*tier)
            .or_default()
            .errors
            .entry(code.clone())
            .or_default() += n;
        *errors.entry(code.clone()).or_default() += n;
    }
    for d in &meta {
        let log = d.log.lock().expect("log");
        for (conv, n) in &log.duplicates {
            figures
                .entry(tiers.get(conv).copied().unwrap_or(1))
                .or_default()
                .duplicates += n;
        }
        for (conv, n) in &log.out_of_order {
            figures
                .entry(tiers.get(conv).copied().unwrap_or(1))
                .or_default()
                .out_of_order += n;
        }
        if let Some(c) = log.connected_after_us {
            connect_us.push(c.saturating_sub(d.started_us));
        }
        reconnect_us.extend(log.reconnect_us.iter().copied());
        for (k, v) in &log.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let measured_s = s.duration_s.max(1e-9);
    let mut total = TierFigures::default();
    for (tier, f) in figures.iter_mut() {
        if let Some(h) = hist.get(tier) {
            quantiles(h, f);
            f.deliveries_per_s = h.len() as f64 / measured_s;
        }
        total.messages_sent += f.messages_sent;
        total.expected_deliveries += f.expected_deliveries;
        total.deliveries += f.deliveries;
        total.lost += f.lost;
        total.duplicates += f.duplicates;
        total.out_of_order += f.out_of_order;
        for (code, n) in &f.errors {
            *total.errors.entry(code.clone()).or_default() += n;
        }
    }
    quantiles(&all_hist, &mut total);
    total.deliveries_per_s = all_hist.len() as f64 / measured_s;
    if let Some(f) = figures.get_mut(&3) {
        f.notified = Some(f.deliveries);
        f.pulled = Some(pulls.load(Ordering::Relaxed));
    }

    let mut timeline: Vec<TimelinePoint> = per_second
        .into_iter()
        .map(|(sec, (sends, deliveries, h))| TimelinePoint {
            t_s: sec,
            sends,
            deliveries,
            p99_us: if h.is_empty() {
                0
            } else {
                h.value_at_quantile(0.99)
            },
        })
        .collect();
    timeline.sort_by_key(|p| p.t_s);

    let q = |v: &mut Vec<u64>, p: f64| -> u64 {
        if v.is_empty() {
            return 0;
        }
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let connect = json!({
        "connections": s.devices(),
        "connected": connected,
        "failed": s.devices() - connected.min(s.devices()),
        "p50_ms": q(&mut connect_us, 0.5) as f64 / 1e3,
        "p99_ms": q(&mut connect_us, 0.99) as f64 / 1e3,
        "max_ms": q(&mut connect_us, 1.0) as f64 / 1e3,
        "rate_per_s": connected as f64 / connect_elapsed.as_secs_f64(),
        "seconds": connect_elapsed.as_secs_f64(),
    });
    let deliveries_total = total.deliveries.max(1) as f64;
    let server_cpu = match (server_cpu0, server_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let servers = json!({
        "processes": target.servers.iter().map(|p| json!({"role": p.role, "pid": p.pid()})).collect::<Vec<_>>(),
        "cpu_s": server_cpu,
        "cpu_s_per_million_deliveries": server_cpu.map(|c| c / deliveries_total * 1e6),
        "cpu_us_per_delivery": server_cpu.map(|c| c / deliveries_total * 1e6),
        "cpu_ms_per_message": server_cpu.map(|c| c / total.messages_sent.max(1) as f64 * 1e3),
        "edge_rss_bytes_before_connect": rss0,
        "edge_rss_bytes_connected": rss1,
        "rss_per_connection_bytes": match (rss0, rss1) {
            (Some(a), Some(b)) if connected > 0 => Some(b.saturating_sub(a) / connected),
            _ => None,
        },
        "rss_bytes_end": target.server_rss(),
    });
    let loadgen_cpu = match (loadgen_cpu0, loadgen_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let fault = match (&s.edge_fault, fault_report) {
        (Some(f), Some((on_edge, at_us))) => {
            // How long the devices of the signalled edge took to be
            // connected again (to another edge), from the signal.
            let n = on_edge.len();
            let mut back: Vec<u64> = on_edge
                .iter()
                .filter_map(|&i| {
                    let l = meta[i].log.lock().expect("log");
                    l.connected_at_us
                        .iter()
                        .find(|&&t| t >= at_us)
                        .map(|&t| t - at_us)
                })
                .collect();
            json!({
                "signal": f.signal.name(),
                "edge": f.edge,
                "at_s": f.at_s,
                "restart_s": restart_done_us.map(|d| d.saturating_sub(at_us) as f64 / 1e6),
                "devices_on_edge": n,
                "devices_back": back.len(),
                "back_p50_ms": q(&mut back, 0.5) as f64 / 1e3,
                "back_p99_ms": q(&mut back, 0.99) as f64 / 1e3,
                "back_max_ms": q(&mut back, 1.0) as f64 / 1e3,
            })
        }
        _ => serde_json::Value::Null,
    };
    let storm = storm_report.map(|(n, _)| {
        json!({
            "devices_dropped": n,
            "reconnect_p50_ms": q(&mut reconnect_us, 0.5) as f64 / 1e3,
            "reconnect_p99_ms": q(&mut reconnect_us, 0.99) as f64 / 1e3,
            "reconnect_max_ms": q(&mut reconnect_us, 1.0) as f64 / 1e3,
            "reconnects": reconnect_us.len(),
        })
    });
    let mut tiers_json = serde_json::Map::new();
    let mut tier_keys: Vec<u8> = figures.keys().copied().collect();
    tier_keys.sort_unstable();
    for t in &tier_keys {
        tiers_json.insert(t.to_string(), serde_json::to_value(&figures[t])?);
    }
    let mut report = serde_json::to_value(&total)?;
    let obj = report
        .as_object_mut()
        .expect("struct serializes to an object");
    obj.insert("scenario".into(), serde_json::to_value(s)?);
    obj.insert(
        "target".into(),
        json!({"mode": target.mode, "edges": target.edges.len()}),
    );
    obj.insert("versions".into(), json!({"tiercast": env!("CARGO_PKG_VERSION"), "protocol": tiercast_client::connection::PROTOCOL_VERSION}));
    obj.insert("machine".into(), machine());
    obj.insert("tiers".into(), serde_json::Value::Object(tiers_json));
    obj.insert("errors".into(), serde_json::to_value(&errors)?);
    obj.insert("send_errors".into(), json!(send_errors));
    obj.insert("connect".into(), connect);
    obj.insert("servers".into(), servers);
    obj.insert("loadgen".into(), json!({"cpu_s": loadgen_cpu, "sockets": opts.sockets, "pulls": pulls.load(Ordering::Relaxed)}));
    obj.insert(
        "reconnect_storm".into(),
        storm.unwrap_or(serde_json::Value::Null),
    );
    obj.insert("edge_fault".into(), fault);
    // The SDK's reorder window, summed over the devices: live messages
    // held (ids of a second engine node seen in their conversation), of
    // those put back in id order, and released after a larger id.
    let (mut held, mut reordered, mut late) = (0u64, 0u64, 0u64);
    for (_, session) in sessions.iter() {
        let st = session.stats();
        held += st.held.load(Ordering::Relaxed);
        reordered += st.reordered.load(Ordering::Relaxed);
        late += st.late.load(Ordering::Relaxed);
    }
    obj.insert(
        "reorder".into(),
        json!({"held": held, "reordered": reordered, "late": late}),
    );
    obj.insert("timeline".into(), serde_json::to_value(&timeline)?);
    obj.insert(
        "run_seconds".into(),
        json!((sends_done_us.saturating_sub(send_start_us)) as f64 / 1e6),
    );

    for (_, session) in sessions.iter() {
        session.close();
    }
    let text = render(s, target, &figures, &tier_keys, &total, &report);
    let mut histograms: Vec<(String, Histogram<u64>)> = tier_keys
        .iter()
        .filter_map(|t| hist.remove(t).map(|h| (format!("tier {t}"), h)))
        .collect();
    histograms.push(("all".into(), all_hist));
    Ok(RunReport {
        lost: total.lost,
        send_errors,
        json: report,
        histograms,
        timeline,
        text,
    })
}

fn code_name(e: &ClientError) -> String {
    e.code().map_or_else(
        || match e {
            ClientError::Timeout(_) => "timeout".to_owned(),
            ClientError::Connect(_) => "connect".to_owned(),
            _ => "protocol".to_owned(),
        },
        |c| c.name().to_owned(),
    )
}

/// A body that carries its scheduled time (for the live p99), padded.
fn body(scheduled_us: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len);
    b.put_slice(format!("{scheduled_us:016x}").as_bytes());
    while b.len() < len {
        b.put_u8(b'.');
    }
    b.freeze()
}

fn scheduled_of(body: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(body.get(..16)?).ok()?, 16).ok()
}

/// Users added per API call: the engine's default
/// `engine.max_members_per_call`.
const MEMBERS_PER_CALL: usize = 1_000;

async fn create_conversations(
    http: &reqwest::Client,
    api: &str,
    publisher: &str,
    s: &Scenario,
    plans: &[ConversationPlan],
) -> anyhow::Result<HashMap<u64, u8>> {
    let results = futures::stream::iter(plans.iter())
        .map(|p| async move {
            // At most MEMBERS_PER_CALL users per call (the API's default
            // cap): the rest are added in further calls.
            let mut chunks = p.members.chunks(MEMBERS_PER_CALL);
            let first = chunks.next().unwrap_or(&[]);
            let r = http
                .post(format!("{api}/v1/conversations"))
                .bearer_auth(publisher)
                .json(&json!({"id": p.id.to_string(), "name": format!("loadgen {}", p.id), "members": first}))
                .send()
                .await
                .context("creating a conversation")?;
            anyhow::ensure!(
                r.status().is_success(),
                "creating conversation {}: {}",
                p.id,
                r.status()
            );
            let mut v: serde_json::Value = r.json().await?;
            for chunk in chunks {
                let r = http
                    .post(format!("{api}/v1/conversations/{}/members", p.id))
                    .bearer_auth(publisher)
                    .json(&json!({"users": chunk}))
                    .send()
                    .await
                    .context("adding members")?;
                anyhow::ensure!(
                    r.status().is_success(),
                    "adding members to conversation {}: {}",
                    p.id,
                    r.status()
                );
                v = r.json().await?;
            }
            if let Some(t) = s.conversations[p.group].tier {
                let r = http
                    .put(format!("{api}/v1/conversations/{}/tier", p.id))
                    .bearer_auth(publisher)
                    .json(&json!({"tier": t}))
                    .send()
                    .await?;
                anyhow::ensure!(
                    r.status().is_success(),
                    "pinning conversation {}: {}",
                    p.id,
                    r.status()
                );
                v = r.json().await?;
            }
            let tier = v["tier"].as_u64().unwrap_or(1) as u8;
            anyhow::Ok((p.id, tier))
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

struct PullCtx {
    session: Arc<dyn Fn() -> Option<tiercast_client::Client> + Send + Sync>,
    fractions: Arc<HashMap<u64, f64>>,
    pulls: Arc<AtomicU64>,
}

fn session_client_getter(
    session: &Session,
) -> Arc<dyn Fn() -> Option<tiercast_client::Client> + Send + Sync> {
    let watch = session.current();
    Arc::new(move || watch.borrow().clone())
}

async fn consume(
    mut events: tiercast_client::Events,
    log: Arc<Mutex<DeviceLog>>,
    base: Instant,
    progress: Arc<Progress>,
    edges: Vec<SocketAddr>,
    pull: PullCtx,
) {
    while let Some(e) = events.recv().await {
        let at = now_us(base);
        let mut l = log.lock().expect("log");
        match e {
            Event::Connected { edge, .. } => {
                l.connects += 1;
                l.edge = edges.iter().position(|e| *e == edge);
                if l.connected_after_us.is_none() {
                    l.connected_after_us = Some(at);
                    progress.connected.fetch_add(1, Ordering::Relaxed);
                }
                l.connected_at_us.push(at);
                if let Some(lost) = l.lost_at_us.take() {
                    l.reconnect_us.push(at - lost);
                }
            }
            Event::Disconnected { error } => {
                l.lost_at_us = Some(at);
                l.edge = None;
                *l.errors
                    .entry(format!("disconnect_{}", code_name(&error)))
                    .or_default() += 1;
            }
            Event::Stopped { error } => {
                *l.errors
                    .entry(format!("stopped_{}", code_name(&error)))
                    .or_default() += 1;
            }
            Event::Message(m) => {
                let newest = l.newest.get(&m.conversation).copied().unwrap_or(0);
                if m.id < newest {
                    *l.out_of_order.entry(m.conversation).or_default() += 1;
                }
                l.newest.insert(m.conversation, newest.max(m.id));
                l.arrivals.entry(m.id).or_insert(at);
                progress.delivered(scheduled_of(&m.body).map(|s| at.saturating_sub(s)));
            }
            Event::Duplicate {
                conversation,
                message_id,
            } => {
                // A tier-3 notification the SDK dropped is out of order when
                // it is older than the newest one shown, else a repeat.
                let newest_notified = l
                    .notifies
                    .get(&conversation)
                    .and_then(|n| n.iter().map(|(id, _)| *id).max());
                if newest_notified.is_some_and(|n| message_id < n) {
                    *l.out_of_order.entry(conversation).or_default() += 1;
                } else {
                    *l.duplicates.entry(conversation).or_default() += 1;
                }
            }
            Event::Notify {
                conversation,
                message_id,
            } => {
                l.notifies
                    .entry(conversation)
                    .or_default()
                    .push((message_id, at));
                progress.delivered(None);
                let f = pull.fractions.get(&conversation).copied().unwrap_or(0.0);
                if f > 0.0
                    && rand::rng().random_bool(f)
                    && let Some(client) = (pull.session)()
                {
                    let pulls = pull.pulls.clone();
                    tokio::spawn(async move {
                        if client.pull(conversation, message_id).await.is_ok() {
                            pulls.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
            Event::ReadMarker { .. } => {}
        }
    }
}

/// Deliveries still missing (exact, over every device).
fn count_missing(
    sent: &[Sent],
    members: &HashMap<u64, &[u64]>,
    devices_of_user: &HashMap<u64, Vec<usize>>,
    meta: &[Meta],
    tiers: &HashMap<u64, u8>,
) -> u64 {
    // Tier 3: a device is complete for a channel once notified of its
    // newest message.
    let mut newest3: HashMap<u64, u64> = HashMap::new();
    let mut missing = 0;
    for m in sent {
        if tiers.get(&m.conversation) == Some(&3) {
            let e = newest3.entry(m.conversation).or_insert(0);
            *e = (*e).max(m.id);
            continue;
        }
        for &u in members.get(&m.conversation).copied().unwrap_or(&[]) {
            for &di in devices_of_user.get(&u).map(Vec::as_slice).unwrap_or(&[]) {
                let d = &meta[di];
                if d.client_id != m.sender_client
                    && !d.log.lock().expect("log").arrivals.contains_key(&m.id)
                {
                    missing += 1;
                }
            }
        }
    }
    for (conv, newest) in newest3 {
        for &u in members.get(&conv).copied().unwrap_or(&[]) {
            for &di in devices_of_user.get(&u).map(Vec::as_slice).unwrap_or(&[]) {
                let log = meta[di].log.lock().expect("log");
                let done = log
                    .notifies
                    .get(&conv)
                    .is_some_and(|v| v.iter().any(|(id, _)| *id >= newest));
                if !done {
                    missing += 1;
                }
            }
        }
    }
    missing
}

struct Meta {
    user: u64,
    client_id: u64,
    log: Arc<Mutex<DeviceLog>>,
    started_us: u64,
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .ok();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|m| m.trim().to_owned())
    });
    json!({"cpus": cpus, "cpu_model": cpu_model, "memory_bytes": mem, "kernel": kernel, "os": std::env::consts::OS, "arch": std::env::consts::ARCH})
}

fn render(
    s: &Scenario,
    target: &Target,
    figures: &HashMap<u8, TierFigures>,
    tier_keys: &[u8],
    total: &TierFigures,
    report: &serde_json::Value,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {} on {} ({} devices)",
        s.name,
        target.mode,
        s.devices()
    );
    let _ = writeln!(
        out,
        "{:<6} {:>8} {:>10} {:>10} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "tier",
        "sent",
        "expected",
        "delivered",
        "lost",
        "dups",
        "ooo",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "deliv/s"
    );
    let row = |name: &str, f: &TierFigures, out: &mut String| {
        let ms = |us: u64| us as f64 / 1e3;
        let _ = writeln!(
            out,
            "{:<6} {:>8} {:>10} {:>10} {:>6} {:>6} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.0}",
            name,
            f.messages_sent,
            f.expected_deliveries,
            f.deliveries,
            f.lost,
            f.duplicates,
            f.out_of_order,
            ms(f.p50_us),
            ms(f.p90_us),
            ms(f.p99_us),
            ms(f.p999_us),
            ms(f.max_us),
            f.deliveries_per_s
        );
    };
    for t in tier_keys {
        row(&t.to_string(), &figures[t], &mut out);
    }
    row("all", total, &mut out);
    if let Some(f) = figures.get(&3)
        && let (Some(notified), Some(pulled)) = (f.notified, f.pulled)
    {
        let _ = writeln!(
            out,
            "tier 3: delivered = devices notified ({notified}); bodies pulled {pulled}"
        );
    }
    for t in tier_keys {
        if !figures[t].errors.is_empty() {
            let list: Vec<String> = figures[t]
                .errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            let _ = writeln!(out, "tier {t} send errors: {}", list.join(", "));
        }
    }
    let c = &report["connect"];
    let _ = writeln!(
        out,
        "connect: {}/{} in {:.1} s ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        c["connected"],
        c["connections"],
        c["seconds"].as_f64().unwrap_or(0.0),
        c["rate_per_s"].as_f64().unwrap_or(0.0),
        c["p50_ms"].as_f64().unwrap_or(0.0),
        c["p99_ms"].as_f64().unwrap_or(0.0),
        c["max_ms"].as_f64().unwrap_or(0.0)
    );
    let sv = &report["servers"];
    if let Some(cpu) = sv["cpu_s"].as_f64() {
        let _ = writeln!(
            out,
            "servers: {:.2} CPU s ({:.1} CPU s per million deliveries, {:.2} ms per message), edge RSS {:.1} MiB connected, {} B per connection",
            cpu,
            sv["cpu_s_per_million_deliveries"].as_f64().unwrap_or(0.0),
            sv["cpu_ms_per_message"].as_f64().unwrap_or(0.0),
            sv["edge_rss_bytes_connected"].as_u64().unwrap_or(0) as f64 / 1048576.0,
            sv["rss_per_connection_bytes"]
        );
    }
    if let Some(cpu) = report["loadgen"]["cpu_s"].as_f64() {
        let _ = writeln!(out, "loadgen: {cpu:.2} CPU s");
    }
    if !report["reconnect_storm"].is_null() {
        let st = &report["reconnect_storm"];
        let _ = writeln!(
            out,
            "reconnect storm: {} devices dropped at once; back in p50 {} ms, p99 {} ms, max {} ms",
            st["devices_dropped"],
            st["reconnect_p50_ms"],
            st["reconnect_p99_ms"],
            st["reconnect_max_ms"]
        );
    }
    let ro = &report["reorder"];
    if ro["held"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "reorder window: {} live messages held, {} put back in id order, {} later than the window",
            ro["held"], ro["reordered"], ro["late"]
        );
    }
    if !report["edge_fault"].is_null() {
        let f = &report["edge_fault"];
        let what = match f["signal"].as_str().unwrap_or("?") {
            "rolling restart" => format!(
                "rolling restart of every edge from {} s (done {} s later)",
                f["at_s"], f["restart_s"]
            ),
            sig => format!("SIG{sig} to edge {} at {} s", f["edge"], f["at_s"]),
        };
        let _ = writeln!(
            out,
            "edge fault: {what}; {} devices on it, {} back on another edge in p50 {} ms, p99 {} ms, max {} ms",
            f["devices_on_edge"],
            f["devices_back"],
            f["back_p50_ms"],
            f["back_p99_ms"],
            f["back_max_ms"]
        );
    }
    if let Some(e) = report["errors"].as_object()
        && !e.is_empty()
    {
        let _ = writeln!(out, "errors: {}", serde_json::Value::Object(e.clone()));
    }
    out
}

/// Live counters and the progress bar.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    connected: AtomicU64,
    sends: AtomicU64,
    deliveries: AtomicU64,
    missing: AtomicU64,
    live: Mutex<Histogram<u64>>,
    started: Instant,
    devices: u64,
}

impl Progress {
    fn new(show: bool, devices: u64) -> Arc<Self> {
        let bar = show.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let p = Arc::new(Self {
            bar,
            connected: AtomicU64::new(0),
            sends: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            live: Mutex::new(histogram()),
            started: Instant::now(),
            devices,
        });
        if p.bar.is_some() {
            let weak = Arc::downgrade(&p);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    let Some(p) = weak.upgrade() else { return };
                    p.redraw();
                }
            });
        }
        p
    }

    fn delivered(&self, latency_us: Option<u64>) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = latency_us {
            self.live.lock().expect("live").saturating_record(l.max(1));
        }
    }

    fn set_missing(&self, n: u64) {
        self.missing.store(n, Ordering::Relaxed);
    }

    fn redraw(&self) {
        let Some(bar) = &self.bar else { return };
        let p99 = {
            let h = self.live.lock().expect("live");
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(0.99)
            }
        };
        bar.set_message(format!(
            "{:>5.1}s | conns {}/{} | sends {} | deliveries {} | p99 {:.2} ms",
            self.started.elapsed().as_secs_f64(),
            self.connected.load(Ordering::Relaxed),
            self.devices,
            self.sends.load(Ordering::Relaxed),
            self.deliveries.load(Ordering::Relaxed),
            p99 as f64 / 1e3
        ));
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            self.redraw();
            b.finish();
        }
    }
}
