//! The figures a run reports, as text for people and JSON for scripts. The
//! JSON keys are an interface (docs/loadgen.md): `expected_deliveries`,
//! `deliveries`, `lost`, `duplicates`, `p50_us`, `p99_us`, `p999_us`,
//! `max_us` at least.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scenario::Scenario;
use crate::tracker::Tally;

#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub messages_sent: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Figures {
    pub fn new(messages_sent: u64, t: &Tally) -> Self {
        let q = |p: f64| {
            if t.latency_us.is_empty() {
                0
            } else {
                t.latency_us.value_at_quantile(p)
            }
        };
        Self {
            messages_sent,
            expected_deliveries: t.expected,
            deliveries: t.delivered,
            lost: t.lost,
            duplicates: t.duplicates,
            unexpected: t.unexpected,
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: t.latency_us.max(),
        }
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        format!(
            "messages sent:        {}\n\
             deliveries expected:  {}\n\
             delivered:            {}\n\
             lost:                 {}\n\
             duplicates:           {}\n\
             unexpected:           {}\n\
             latency p50:          {} us\n\
             latency p99:          {} us\n\
             latency p99.9 / max:  {} us / {} us\n",
            self.messages_sent,
            self.expected_deliveries,
            self.deliveries,
            self.lost,
            self.duplicates,
            self.unexpected,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us
        )
    }
}

// ---------------------------------------------------------------------
// `tiercast loadgen run`'s report: one typed value, written as JSON by
// `run --json` and read back by `plan` (and anything that compares runs).
// Every section defaults when absent, so reports written by earlier builds
// still read.

/// The counts and latencies of one tier, or of the whole run. The first
/// keys are the same as `tiercast demo --json` writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunFigures {
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
}

impl RunFigures {
    /// Adds `other`'s counts (messages, deliveries, losses, duplicates,
    /// out of order); latencies and rates are set apart.
    pub fn add_counts(&mut self, other: &RunFigures) {
        self.messages_sent += other.messages_sent;
        self.expected_deliveries += other.expected_deliveries;
        self.deliveries += other.deliveries;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
    }

    /// Fills the latency quantiles from `h` (left at 0 when it is empty).
    pub fn set_latency(&mut self, h: &hdrhistogram::Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.p50_us = h.value_at_quantile(0.50);
        self.p90_us = h.value_at_quantile(0.90);
        self.p99_us = h.value_at_quantile(0.99);
        self.p999_us = h.value_at_quantile(0.999);
        self.max_us = h.max();
    }
}

/// One tier's section of a run report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TierFigures {
    #[serde(flatten)]
    pub figures: RunFigures,
    /// Refused or failed sends by code.
    pub errors: BTreeMap<String, u64>,
    /// Tier 3 only: "delivered" counts devices notified (a notification
    /// covers earlier ids); `pulled` counts the bodies devices pulled
    /// (the scenario's `pull_fraction` of notifications).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notified: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetInfo {
    /// How the servers were reached: "self-hosted single node",
    /// "self-hosted: engine + N edges on Redis Cluster", or an external
    /// deployment.
    pub mode: String,
    pub edges: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Versions {
    pub tiercast: String,
    pub protocol: u16,
}

/// The machine loadgen ran on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Machine {
    pub cpus: u64,
    pub cpu_model: Option<String>,
    pub memory_bytes: Option<u64>,
    pub kernel: Option<String>,
    pub os: String,
    pub arch: String,
    /// The machine's floor for a delivery, measured before the load: CPU
    /// microseconds of the kernel sending one delivery-sized UDP datagram
    /// to one of many loopback receivers (the cheaper of `sendto` and
    /// `sendmmsg`; `udp_floor` has both). Per-delivery costs are also given
    /// as multiples of it.
    pub udp_floor_us: Option<f64>,
    pub udp_floor: Option<tiercast_bench::udp_floor::UdpFloor>,
}

impl Machine {
    /// This machine, from /proc where there is one.
    pub fn this() -> Self {
        let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
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
        Self {
            cpus: cpus as u64,
            cpu_model,
            memory_bytes,
            kernel,
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            udp_floor_us: None,
            udp_floor: None,
        }
    }
}

/// How the devices connected.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectFigures {
    pub connections: u64,
    pub connected: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub rate_per_s: f64,
    pub seconds: f64,
    /// Connects over the whole run that an edge shed (refused for load,
    /// `unavailable`), each followed by the devices' shed backoff.
    pub shed: u64,
    /// Of those, refusals that carried the edge's turn (`retry-after-ms`),
    /// waited for instead of the shed backoff.
    pub paced: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerProcess {
    pub role: String,
    pub pid: u32,
    /// This process's CPU seconds over the servers' window (restarts
    /// included).
    pub cpu_s: Option<f64>,
}

/// The servers' CPU and memory (self-hosted only; null otherwise).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerFigures {
    pub processes: Vec<ServerProcess>,
    /// CPU seconds from everyone connected to the end of the settle.
    pub cpu_s: Option<f64>,
    pub cpu_us_per_delivery: Option<f64>,
    /// `cpu_us_per_delivery` as a multiple of `machine.udp_floor_us`.
    pub cpu_floors_per_delivery: Option<f64>,
    pub cpu_ms_per_message: Option<f64>,
    pub edge_rss_bytes_before_connect: Option<u64>,
    pub edge_rss_bytes_connected: Option<u64>,
    pub rss_per_connection_bytes: Option<u64>,
    pub rss_bytes_end: Option<u64>,
    /// The edges' coalesced store calls at the end of the run, by op
    /// (`register_clients`, `conversations_of_users`, `inboxes`): how many store
    /// calls (`batches`) carried how many connects' calls (`calls`). An
    /// edge killed and restarted counts from its restart: its resume storm.
    #[serde(default)]
    pub store_batches: std::collections::BTreeMap<String, StoreBatches>,
    /// The sends' store commits on the edges at the end of the run
    /// (`tiercast_engine_store_commit_seconds`, summed over the edges):
    /// what a send waits for before its fan-out. Null when no edge
    /// answered.
    #[serde(default)]
    pub store_commits: Option<StoreCommits>,
}

/// The sends' store commits ([`ServerFigures::store_commits`]): one per
/// send that reached its insert (a retried duplicate's included), timed
/// from the insert's start to its answer: its inbox rows and dedupe key,
/// the wait for its group's turn, the commit and, on the embedded store,
/// the fsync.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreCommits {
    pub count: u64,
    pub mean_ms: f64,
    /// The bound of the histogram's bucket that holds the 50th / 99th
    /// percentile: that share of the commits took at most this long (the
    /// bounds double from 0.1 ms, so this is within a factor of 2).
    pub p50_ms_at_most: Option<f64>,
    pub p99_ms_at_most: Option<f64>,
    /// The histogram: `[bound_ms, commits that took at most that long]`,
    /// cumulative, ascending; the last bound is infinite (`null`).
    pub buckets: Vec<(Option<f64>, u64)>,
    pub sum_s: f64,
}

impl StoreCommits {
    /// From the cumulative `buckets` and `sum_s`: the count, the mean and
    /// the percentiles' bounds.
    pub fn from_buckets(buckets: Vec<(Option<f64>, u64)>, sum_s: f64) -> Self {
        let count = buckets.last().map_or(0, |b| b.1);
        let at_most = |q: f64| {
            let rank = (q * count as f64).ceil() as u64;
            buckets
                .iter()
                .find(|b| count > 0 && b.1 >= rank)
                .and_then(|b| b.0)
        };
        Self {
            count,
            mean_ms: if count > 0 {
                sum_s * 1e3 / count as f64
            } else {
                0.0
            },
            p50_ms_at_most: at_most(0.50),
            p99_ms_at_most: at_most(0.99),
            sum_s,
            buckets,
        }
    }

    /// Two histograms added bucket by bucket (each from its own edges).
    /// Histograms of different bounds (servers of different versions)
    /// cannot be: the one of more commits stands.
    pub fn add(&self, other: &Self) -> Self {
        let same_bounds = self.buckets.len() == other.buckets.len()
            && self
                .buckets
                .iter()
                .zip(&other.buckets)
                .all(|(a, b)| a.0 == b.0);
        if !same_bounds {
            return if other.count > self.count {
                other
            } else {
                self
            }
            .clone();
        }
        let buckets = self
            .buckets
            .iter()
            .zip(&other.buckets)
            .map(|(a, b)| (a.0, a.1 + b.1))
            .collect();
        Self::from_buckets(buckets, self.sum_s + other.sum_s)
    }
}

/// Store calls made for coalesced calls ([`ServerFigures::store_batches`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreBatches {
    pub batches: u64,
    pub calls: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadgenFigures {
    /// Loadgen's own CPU over the servers' window.
    pub cpu_s: Option<f64>,
    /// Loadgen's CPU per delivery its devices received (the same count as
    /// `servers.cpu_us_per_delivery`): the measuring side's cost.
    #[serde(default)]
    pub cpu_us_per_delivery: Option<f64>,
    /// What drove the devices: `core` or `sessions` (`--driver`).
    #[serde(default)]
    pub driver: String,
    pub sockets: usize,
    /// Tier-3 bodies pulled.
    pub pulls: u64,
    /// The share of the edges' datagrams the devices dropped on purpose
    /// (`--client-loss-pct`), and how many that was.
    pub client_loss: f64,
    pub datagrams_dropped: u64,
    /// Datagrams the kernel dropped at loadgen's own sockets because their
    /// receive buffers were full, read at the end of the run: loss on the
    /// measuring side, which QUIC recovered at the price of latency.
    /// `None` where `/proc/net/udp` cannot be read.
    #[serde(default)]
    pub receive_drops: Option<u64>,
    /// This generator's users are `user_offset + 1 ..= user_offset + users`.
    #[serde(default)]
    pub user_offset: u64,
    /// The block its conversation ids came from (`--run-id`, or random).
    #[serde(default)]
    pub run_id: u16,
}

/// A reconnect storm: the devices of one edge told to reconnect at once,
/// or (an edge killed and restarted) dropped by its crash, timed from the
/// moment it listened again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StormFigures {
    pub devices_dropped: usize,
    pub reconnect_p50_ms: f64,
    pub reconnect_p99_ms: f64,
    pub reconnect_max_ms: f64,
    pub reconnects: usize,
    /// Devices back in each second after the edge listened again (a
    /// crashed and restarted edge; empty for a storm of dropped clients).
    #[serde(default)]
    pub reconnects_per_s: Vec<u64>,
}

/// An edge signalled mid-run, and how its devices came back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultFigures {
    /// `kill`, `term` or `rolling restart`.
    pub signal: String,
    pub edge: usize,
    pub at_s: f64,
    /// A rolling restart: seconds from its start to the last edge back.
    pub restart_s: Option<f64>,
    pub devices_on_edge: usize,
    pub devices_back: usize,
    pub back_p50_ms: f64,
    pub back_p99_ms: f64,
    pub back_max_ms: f64,
    /// A single node killed and restarted: its delivery-path counters read
    /// from its `/metrics` just before the kill (they start again at 0
    /// after it): backplane drops and gaps, gap repairs, slow consumers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters_before: BTreeMap<String, f64>,
}

/// The SDK's reorder window, summed over the devices: live messages held
/// (ids of a second engine node seen in their conversation), of those put
/// back in id order, and released after a larger id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReorderFigures {
    pub held: u64,
    pub reordered: u64,
    pub late: u64,
}

/// A delivery that never arrived, with the receiving device's story.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LostDelivery {
    pub device: usize,
    pub user: u64,
    pub conversation: u64,
    pub tier: u8,
    pub message_id: u64,
    /// When it was scheduled and when the sender had its id, seconds
    /// since the run began, and whether the id came from the engine's
    /// deduplication record (a retried send stored by an earlier attempt).
    pub scheduled_s: f64,
    pub acked_s: f64,
    pub acked_as_duplicate: bool,
    /// When the device's connections came up, seconds since the run began.
    pub device_connects_s: Vec<f64>,
    /// The newest id of the conversation the device did receive.
    pub device_newest_id: u64,
    pub device_errors: BTreeMap<String, u64>,
    /// The device's SDK at the end: connections made, resumes finished
    /// (fewer than connections: the last resume had not caught up when
    /// the run ended) and resume syncs retried.
    pub device_connects: u64,
    pub device_resumes: u64,
    pub device_resume_retries: u64,
    /// The id the device's last resume synced this conversation from
    /// (0: it did not sync it), and its cursor there at the end.
    pub device_resumed_from_id: u64,
    pub device_cursor_id: u64,
}

/// One rate step of a scenario with stages: the messages scheduled in it,
/// their deliveries and those deliveries' latencies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StageFigures {
    pub stage: usize,
    /// Seconds from the first send.
    pub start_s: f64,
    pub end_s: f64,
    /// The rate the scenario asked for.
    pub messages_per_s: f64,
    pub sends: u64,
    pub sends_per_s: f64,
    /// Deliveries of the messages sent in the step (per second of the
    /// step's length).
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TimelinePoint {
    pub t_s: u64,
    pub sends: u64,
    pub deliveries: u64,
    pub p99_us: u64,
}

/// What `tiercast loadgen run --json` writes (docs/loadgen.md has each
/// key).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunReport {
    #[serde(flatten)]
    pub total: RunFigures,
    /// The scenario as run (`None` when a report's scenario no longer
    /// reads as one: the figures still do).
    #[serde(deserialize_with = "lenient_scenario")]
    pub scenario: Option<Scenario>,
    pub target: TargetInfo,
    pub versions: Versions,
    pub machine: Machine,
    /// By tier number ("1", "2", "3"), the tiers that carried messages.
    pub tiers: BTreeMap<String, TierFigures>,
    /// Failed sends and connection errors by code.
    pub errors: BTreeMap<String, u64>,
    /// Sends refused or failed (every code): a run with any is not clean,
    /// whatever its lost count says.
    pub send_errors: u64,
    pub connect: ConnectFigures,
    pub servers: ServerFigures,
    pub loadgen: LoadgenFigures,
    pub reconnect_storm: Option<StormFigures>,
    pub edge_fault: Option<FaultFigures>,
    pub reorder: ReorderFigures,
    /// Deliveries missing at the end (up to 20): which device, which
    /// message, and what the device went through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_sample: Vec<LostDelivery>,
    pub timeline: Vec<TimelinePoint>,
    /// Per stage, for a scenario with `[[stages]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageFigures>,
    /// Seconds from the first send to the last.
    pub run_seconds: f64,
    /// A report `loadgen merge` made: the generators it combined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
}

fn lenient_scenario<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Scenario>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl RunReport {
    pub fn scenario_name(&self) -> &str {
        self.scenario.as_ref().map_or("?", |s| s.name.as_str())
    }

    /// Whether nothing was lost and no send failed.
    pub fn clean(&self) -> bool {
        self.total.lost == 0 && self.send_errors == 0
    }

    /// The report for people.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let devices = self.scenario.as_ref().map_or(0, Scenario::devices);
        let _ = writeln!(
            out,
            "scenario {} on {} ({devices} devices)",
            self.scenario_name(),
            self.target.mode,
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
        let row = |name: &str, f: &RunFigures, out: &mut String| {
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
        for (t, f) in &self.tiers {
            row(t, &f.figures, &mut out);
        }
        row("all", &self.total, &mut out);
        if let Some(f) = self.tiers.get("3")
            && let (Some(notified), Some(pulled)) = (f.notified, f.pulled)
        {
            let _ = writeln!(
                out,
                "tier 3: delivered = devices notified ({notified}); bodies pulled {pulled}"
            );
        }
        for (t, f) in &self.tiers {
            if !f.errors.is_empty() {
                let list: Vec<String> = f
                    .errors
                    .iter()
                    .map(|(code, n)| format!("{code} {n}"))
                    .collect();
                let _ = writeln!(out, "tier {t} send errors: {}", list.join(", "));
            }
        }
        let c = &self.connect;
        let _ = writeln!(
            out,
            "connect: {}/{} in {:.1} s ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            c.connected, c.connections, c.seconds, c.rate_per_s, c.p50_ms, c.p99_ms, c.max_ms
        );
        if c.shed > 0 {
            let _ = writeln!(
                out,
                "connects shed by the edges (refused for load): {}, of which {} told when to come back (the rest waited on the shed backoff)",
                c.shed, c.paced
            );
        }
        let sv = &self.servers;
        if let Some(cpu) = sv.cpu_s {
            let rss_per_connection = sv
                .rss_per_connection_bytes
                .map_or_else(|| "null".to_owned(), |b| b.to_string());
            let _ = writeln!(
                out,
                "servers: {:.2} CPU s ({:.1} CPU us per delivery, {:.2} ms per message), edge RSS {:.1} MiB connected, {} B per connection",
                cpu,
                sv.cpu_us_per_delivery.unwrap_or(0.0),
                sv.cpu_ms_per_message.unwrap_or(0.0),
                sv.edge_rss_bytes_connected.unwrap_or(0) as f64 / 1048576.0,
                rss_per_connection
            );
        }
        if let Some(c) = sv.store_commits.as_ref().filter(|c| c.count > 0) {
            let bound = |b: Option<f64>| {
                b.map_or_else(
                    || "over the last bucket".to_owned(),
                    |ms| format!("<= {ms} ms"),
                )
            };
            let _ = writeln!(
                out,
                "store commits of sends: {}, mean {:.2} ms, p50 {}, p99 {}",
                c.count,
                c.mean_ms,
                bound(c.p50_ms_at_most),
                bound(c.p99_ms_at_most)
            );
        }
        if let (Some(us), Some(f)) = (self.machine.udp_floor_us, &self.machine.udp_floor) {
            let _ = writeln!(
                out,
                "machine floor: {us:.2} us per {}-byte UDP datagram to one of {} loopback receivers (sendto {:.2}, sendmmsg {:.2}){}",
                f.datagram_bytes,
                f.receivers,
                f.sendto_us,
                f.sendmmsg_us,
                sv.cpu_floors_per_delivery
                    .map(|x| format!("; server CPU per delivery = {x:.1} floors"))
                    .unwrap_or_default()
            );
        }
        if let Some(cpu) = self.loadgen.cpu_s {
            let per = self
                .loadgen
                .cpu_us_per_delivery
                .map(|x| format!(", {x:.1} us per delivery"))
                .unwrap_or_default();
            let driver = if self.loadgen.driver.is_empty() {
                String::new()
            } else {
                format!(" (devices on {})", self.loadgen.driver)
            };
            let _ = writeln!(out, "loadgen: {cpu:.2} CPU s{per}{driver}");
        }
        if let Some(n) = self.loadgen.receive_drops.filter(|&n| n > 0) {
            let _ = writeln!(
                out,
                "loadgen's sockets dropped {n} datagrams (full receive buffers): the measuring side lost packets, QUIC recovered them, latencies include it (more --sockets spread the load)"
            );
        }
        if self.loadgen.client_loss > 0.0 {
            let _ = writeln!(
                out,
                "injected loss: devices dropped {:.2} % of what the edges sent them ({} datagrams)",
                self.loadgen.client_loss * 100.0,
                self.loadgen.datagrams_dropped
            );
        }
        for st in &self.stages {
            let _ = writeln!(
                out,
                "stage {} ({:.1}-{:.1} s, {} msg/s asked): {} sent ({:.1}/s), their {} deliveries ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                st.stage,
                st.start_s,
                st.end_s,
                st.messages_per_s,
                st.sends,
                st.sends_per_s,
                st.deliveries,
                st.deliveries_per_s,
                st.p50_us as f64 / 1e3,
                st.p99_us as f64 / 1e3,
                st.max_us as f64 / 1e3
            );
        }
        if let Some(st) = &self.reconnect_storm {
            let _ = writeln!(
                out,
                "reconnect storm: {} devices dropped at once, {} back in p50 {} ms, p99 {} ms, max {} ms",
                st.devices_dropped,
                st.reconnects,
                st.reconnect_p50_ms,
                st.reconnect_p99_ms,
                st.reconnect_max_ms
            );
            if !st.reconnects_per_s.is_empty() {
                let _ = writeln!(
                    out,
                    "  devices back per second after the edge listened again: {:?}",
                    st.reconnects_per_s
                );
            }
        }
        let ro = &self.reorder;
        if ro.held > 0 {
            let _ = writeln!(
                out,
                "reorder window: {} live messages held, {} put back in id order, {} later than the window",
                ro.held, ro.reordered, ro.late
            );
        }
        if let Some(f) = &self.edge_fault {
            let what = match f.signal.as_str() {
                "rolling restart" => format!(
                    "rolling restart of every edge from {} s (done {} s later)",
                    f.at_s,
                    f.restart_s
                        .map_or_else(|| "?".to_owned(), |s| s.to_string())
                ),
                "KILL and restart" => format!(
                    "SIGKILL to edge {} at {} s, started again (listening {} s later)",
                    f.edge,
                    f.at_s,
                    f.restart_s
                        .map_or_else(|| "?".to_owned(), |s| format!("{s:.3}"))
                ),
                sig => format!("SIG{sig} to edge {} at {} s", f.edge, f.at_s),
            };
            let whence = if f.signal == "KILL and restart" {
                "back"
            } else {
                "back on another edge"
            };
            let _ = writeln!(
                out,
                "edge fault: {what}; {} devices on it, {} {whence} in p50 {} ms, p99 {} ms, max {} ms (from the signal)",
                f.devices_on_edge, f.devices_back, f.back_p50_ms, f.back_p99_ms, f.back_max_ms
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(
                out,
                "errors: {}",
                serde_json::to_string(&self.errors).unwrap_or_default()
            );
        }
        out
    }
}

#[cfg(test)]
mod run_report_tests {
    use super::*;

    /// Every run report kept in docs/runs reads back as a `RunReport`, and
    /// writing it again keeps its figures.
    #[test]
    fn the_reports_in_docs_runs_read_back() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runs");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            // Only loadgen run reports (docs/runs holds other JSON too).
            if v.get("connect").is_none() || v.get("tiers").is_none() {
                continue;
            }
            let r: RunReport = serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(r.total.deliveries, v["deliveries"].as_u64().unwrap());
            assert_eq!(r.total.lost, v["lost"].as_u64().unwrap(), "{}", p.display());
            let again = serde_json::to_value(&r).unwrap();
            assert_eq!(again["deliveries"], v["deliveries"]);
            assert_eq!(again["tiers"].as_object().unwrap().len(), r.tiers.len());
            n += 1;
        }
        assert!(n >= 10, "{n} run reports");
    }
}
