//! Exact delivery accounting: what every device should receive against what
//! it did receive. Nothing is sampled: lost, duplicate and unexpected counts
//! are exact, and latency is recorded for each first receipt.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hdrhistogram::Histogram;

/// What one device saw, kept by its receiving task.
#[derive(Debug, Default, Clone)]
pub struct DeviceLog {
    /// First receipt of each message id, with its latency in microseconds.
    pub first: HashMap<u64, u64>,
    /// Receipts of an id already received.
    pub duplicates: u64,
}

impl DeviceLog {
    /// Records a receipt; true if it is the first of this id.
    pub fn record(&mut self, id: u64, latency: Duration) -> bool {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        match self.first.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.duplicates += 1;
                false
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(us);
                true
            }
        }
    }
}

/// The verdict over all devices.
#[derive(Debug, Clone)]
pub struct Tally {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Received but not expected (a message for a device not in the
    /// conversation): must be zero.
    pub unexpected: u64,
    pub latency_us: Histogram<u64>,
}

impl Tally {
    /// Adds `other`'s counts and latencies to these.
    pub fn merge(&mut self, other: &Tally) {
        self.expected += other.expected;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.unexpected += other.unexpected;
        self.latency_us
            .add(&other.latency_us)
            .expect("tallies share their histogram bounds");
    }
}

/// Compares `expected[d]` (ids device `d` should get) with `logs[d]`.
pub fn tally(expected: &[HashSet<u64>], logs: &[DeviceLog]) -> Tally {
    let mut t = Tally {
        expected: 0,
        delivered: 0,
        lost: 0,
        duplicates: 0,
        unexpected: 0,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    };
    for (want, log) in expected.iter().zip(logs) {
        t.expected += want.len() as u64;
        t.duplicates += log.duplicates;
        for id in want {
            match log.first.get(id) {
                Some(&us) => {
                    t.delivered += 1;
                    t.latency_us.saturating_record(us.max(1));
                }
                None => t.lost += 1,
            }
        }
        t.unexpected += log.first.keys().filter(|id| !want.contains(id)).count() as u64;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_exact() {
        let expected = vec![HashSet::from([1, 2, 3]), HashSet::from([1])];
        let mut a = DeviceLog::default();
        assert!(a.record(1, Duration::from_micros(100)));
        assert!(!a.record(1, Duration::from_micros(900)));
        a.record(3, Duration::from_micros(300));
        let mut b = DeviceLog::default();
        b.record(1, Duration::from_micros(200));
        b.record(9, Duration::from_micros(200));
        let t = tally(&expected, &[a, b]);
        assert_eq!(
            (t.expected, t.delivered, t.lost, t.duplicates, t.unexpected),
            (4, 3, 1, 1, 1)
        );
        assert_eq!(t.latency_us.len(), 3);
        assert_eq!(t.latency_us.max(), 300);
    }

    #[test]
    fn merged_tallies_add_up() {
        let mut a = DeviceLog::default();
        a.record(1, Duration::from_micros(100));
        let mut b = DeviceLog::default();
        b.record(2, Duration::from_micros(500));
        b.record(2, Duration::from_micros(500));
        let mut t = tally(&[HashSet::from([1, 3])], std::slice::from_ref(&a));
        t.merge(&tally(&[HashSet::from([2])], std::slice::from_ref(&b)));
        assert_eq!(
            (t.expected, t.delivered, t.lost, t.duplicates, t.unexpected),
            (3, 2, 1, 1, 0)
        );
        assert_eq!(t.latency_us.len(), 2);
        assert_eq!(t.latency_us.max(), 500);
    }
}
