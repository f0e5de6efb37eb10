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
    /// One message's store commit (insert with its inboxes and dedupe key).
    pub store_commit_seconds: Histogram,
    /// From a message's id (taken as the send was accepted) to the end of
    /// its publish to the backplane: what a send waits for before fan-out.
    pub publish_delay_seconds: Histogram,
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
            store_commit_seconds: seconds_histogram(),
            publish_delay_seconds: seconds_histogram(),
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
            "store_commit_seconds",
            "Time to commit one message to the store (with its inboxes and dedupe key)",
            m.store_commit_seconds.clone(),
        );
        r.register(
            "publish_delay_seconds",
            "From a message's id (the send accepted) to its publish to the backplane done: store, ordering and publish",
            m.publish_delay_seconds.clone(),
        );
        m
    }
}

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
    out
}
