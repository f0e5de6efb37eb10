//! The figures a run reports, as text for people and JSON for scripts. The
//! JSON keys are an interface (docs/loadgen.md): `expected_deliveries`,
//! `deliveries`, `lost`, `duplicates`, `p50_us`, `p99_us`, `p999_us`,
//! `max_us` at least.

use serde::Serialize;

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
