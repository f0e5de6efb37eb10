//! Prometheus metrics of the engine. Every process builds one
//! `prometheus_client` registry, lets each part register its own families,
//! and serves it at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct EngineMetrics {
    pub messages_stored: Counter,
    pub duplicate_sends: Counter,
    pub send_errors: Family<CodeLabel, Counter>,
    pub publishes: Family<TierLabel, Counter>,
    pub publish_bytes: Family<TierLabel, Counter>,
    pub publish_failures: Counter,
    pub publish_retries: Counter,
    pub republished: Counter,
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
        m
    }
}

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
    out
}
