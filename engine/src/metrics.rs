//! Prometheus metrics of the engine. Every process builds one
//! `prometheus_client` registry, lets each part register its own families,
//! and serves it at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A latency histogram in seconds: 100 us to about 52 s, doubling (20
/// buckets): store commits and fan-out on one scale.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 20,
    ))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug)]
pub struct EngineMetrics {
    pub messages_stored: Counter,
    pub duplicate_sends: Counter,
    pub send_errors: Family<CodeLabel, Counter>,
    pub publishes: Family<TierLabel, Counter>,
    pub publish_bytes: Family<TierLabel, Counter>,
    pub publish_failures: Counter,
    pub publish_retries: Counter,
    pub republished: Counter,
    /// Publishes given up within `engine.publish_retry_ms` that went out
    /// later from the background, and those dropped for good.
    pub late_publishes: Counter,
    pub late_publishes_dropped: Counter,
    /// One message's store commit (insert with its inboxes and dedupe key).
    pub store_commit_seconds: Histogram,
    /// From a message's id (taken as the send was accepted) to the end of
    /// its publish to the backplane: what a send waits for before fan-out.
    pub publish_delay_seconds: Histogram,
    /// Store calls made for coalesced calls (see `crate::batch`), by op:
    /// `store_batched_calls / store_batches` is the batching factor.
    pub store_batches: Family<OpLabel, Counter>,
    pub store_batched_calls: Family<OpLabel, Counter>,
    /// Syncs answered, and the store calls they made (their ratio: store
    /// calls per Sync, 2 plus one per 8 pages read).
    pub syncs: Counter,
    pub sync_store_calls: Counter,
    /// Calls served at `/internal/store` (edges on a remote store), by op.
    pub internal_store_calls: Family<OpLabel, Counter>,
}

impl EngineMetrics {
    /// The counters of one coalesced op.
    pub fn batch_counters(&self, op: &'static str) -> crate::batch::BatchCounters {
        let label = OpLabel { op };
        crate::batch::BatchCounters {
            batches: self.store_batches.get_or_create(&label).clone(),
            calls: self.store_batched_calls.get_or_create(&label).clone(),
        }
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            messages_stored: Counter::default(),
            duplicate_sends: Counter::default(),
            send_errors: Family::default(),
            publishes: Family::default(),
            publish_bytes: Family::default(),
            publish_failures: Counter::default(),
            publish_retries: Counter::default(),
            republished: Counter::default(),
            late_publishes: Counter::default(),
            late_publishes_dropped: Counter::default(),
            store_commit_seconds: seconds_histogram(),
            publish_delay_seconds: seconds_histogram(),
            store_batches: Family::default(),
            store_batched_calls: Family::default(),
            syncs: Counter::default(),
            sync_store_calls: Counter::default(),
            internal_store_calls: Family::default(),
        }
    }
}

impl EngineMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tiercast_engine");
        r.register(
            "messages_stored",
            "Messages persisted",
            m.messages_stored.clone(),
        );
        r.register(
            "duplicate_sends",
            "Sends answered from an earlier identical send",
            m.duplicate_sends.clone(),
        );
        r.register(
            "send_errors",
            "Refused sends by error code",
            m.send_errors.clone(),
        );
        r.register(
            "publishes",
            "Backplane publishes by tier",
            m.publishes.clone(),
        );
        r.register(
            "publish_bytes",
            "Backplane payload bytes published by tier",
            m.publish_bytes.clone(),
        );
        r.register(
            "publish_failures",
            "Publishes that failed after the message was stored",
            m.publish_failures.clone(),
        );
        r.register(
            "publish_retries",
            "Publishes tried again after a failure (a Redis failover, a moved slot), within engine.publish_retry_ms",
            m.publish_retries.clone(),
        );
        r.register(
            "republished",
            "Messages published again because their sender retried (the first attempt may have stored the message and died before publishing it)",
            m.republished.clone(),
        );
        r.register(
            "late_publishes",
            "Publishes that failed within engine.publish_retry_ms and went out later from the background (devices connected meanwhile get the message late, not never)",
            m.late_publishes.clone(),
        );
        r.register(
            "late_publishes_dropped",
            "Failed publishes given up for good (the backplane away for 10 minutes, too many waiting, or the engine stopped): devices catch up on their next resume",
            m.late_publishes_dropped.clone(),
        );
        r.register(
            "store_commit_seconds",
            "Time to commit one message to the store (with its inboxes and dedupe key)",
            m.store_commit_seconds.clone(),
        );
        r.register(
            "publish_delay_seconds",
            "From a message's id (the send accepted) to its publish to the backplane done: store, ordering and publish",
            m.publish_delay_seconds.clone(),
        );
        r.register(
            "store_batches",
            "Store calls made for coalesced calls, by op (register_clients: device registrations at connect; conversations_of_users: the conversation listings at connect; inboxes: inbox pages at connect and while a device drains its inbox)",
            m.store_batches.clone(),
        );
        r.register(
            "store_batched_calls",
            "Calls coalesced into those store calls, by op (divided by store_batches: the batching factor)",
            m.store_batched_calls.clone(),
        );
        r.register("syncs", "Syncs answered", m.syncs.clone());
        r.register(
            "sync_store_calls",
            "Store calls made by Syncs: the read markers and conversation states, then one per 8 pages",
            m.sync_store_calls.clone(),
        );
        r.register(
            "internal_store_calls",
            "Store calls served to edges at /internal/store, by op (a device's send: one send_context and one insert_message)",
            m.internal_store_calls.clone(),
        );
        m
    }
}

/// This process's CPU time and resident memory, read from `/proc` at each
/// scrape: what a load generator against a deployment reads to measure
/// the servers (`tiercast_process_cpu_seconds_total`,
/// `tiercast_process_resident_memory_bytes`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCollector;

/// CPU seconds (user + system) process `pid` has used, from `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Clock ticks per second of `/proc` CPU times (asked once).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident memory of process `pid`, bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// (CPU seconds, resident bytes) of this process; `None` off Linux.
pub fn process_usage() -> Option<(f64, u64)> {
    let pid = std::process::id();
    Some((cpu_seconds(pid)?, rss_bytes(pid)?))
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some((cpu_s, rss)) = process_usage() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(cpu_s);
        cpu.encode(encoder.encode_descriptor(
            "tiercast_process_cpu_seconds",
            "CPU time (user + system) this process has used",
            None,
            cpu.metric_type(),
        )?)?;
        let mem = ConstGauge::new(i64::try_from(rss).unwrap_or(i64::MAX));
        mem.encode(encoder.encode_descriptor(
            "tiercast_process_resident_memory_bytes",
            "Resident memory of this process",
            None,
            mem.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
    out
}
