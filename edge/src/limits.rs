//! Request rate limits: token buckets (GCRA, `governor`) per connection and
//! per user, for each request kind that costs the store something. A
//! request past its bucket is refused with `rate_limited` and a retry-after;
//! it costs nothing else and the connection goes on.
//!
//! The per-user bucket is the per-connection one times
//! `edge.rates.user_factor`, so a user's devices together cannot take more
//! than a few devices' share, while one device cannot starve the others.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tiercast_engine::config::InvalidSetting;

/// One bucket: `per_s` requests a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_s: u32,
    pub burst: u32,
}

impl Rate {
    fn quota(self, factor: u32) -> Quota {
        let nz = |v: u32| NonZeroU32::new(v.max(1)).expect("at least 1");
        Quota::per_second(nz(self.per_s.saturating_mul(factor)))
            .allow_burst(nz(self.burst.saturating_mul(factor)))
    }
}

/// `edge.rates`: the buckets of each request kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rates {
    /// Sends. A person types a few messages a second at most; a bot that
    /// needs more publishes over HTTP.
    pub send: Rate,
    /// Fetches, including tier-3 pulls (one per notification read).
    pub fetch: Rate,
    /// Syncs: a resume takes a listing and a few pages.
    pub sync: Rate,
    /// Read markers.
    pub read: Rate,
    /// A user's bucket is this many connections' worth.
    pub user_factor: u32,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            send: Rate {
                per_s: 20,
                burst: 50,
            },
            fetch: Rate {
                per_s: 50,
                burst: 200,
            },
            sync: Rate {
                per_s: 10,
                burst: 40,
            },
            read: Rate {
                per_s: 20,
                burst: 50,
            },
            user_factor: 3,
        }
    }
}

impl Rates {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        for (name, r) in [
            ("edge.rates.send", self.send),
            ("edge.rates.fetch", self.fetch),
            ("edge.rates.sync", self.sync),
            ("edge.rates.read", self.read),
        ] {
            if !(1..=1_000_000).contains(&r.per_s) || !(1..=1_000_000).contains(&r.burst) {
                return Err(InvalidSetting::new(
                    name,
                    "per_s and burst must be 1..=1000000",
                ));
            }
        }
        if !(1..=64).contains(&self.user_factor) {
            return Err(InvalidSetting::new(
                "edge.rates.user_factor",
                "must be 1..=64",
            ));
        }
        Ok(())
    }
}

/// The request kinds that are limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Send,
    Fetch,
    Sync,
    Read,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Send => "send",
            Kind::Fetch => "fetch",
            Kind::Sync => "sync",
            Kind::Read => "read",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const KINDS: [Kind; 4] = [Kind::Send, Kind::Fetch, Kind::Sync, Kind::Read];

fn rate_of(rates: &Rates, kind: Kind) -> Rate {
    match kind {
        Kind::Send => rates.send,
        Kind::Fetch => rates.fetch,
        Kind::Sync => rates.sync,
        Kind::Read => rates.read,
    }
}

/// The edge's per-user buckets (shared by a user's connections here).
pub struct UserLimits {
    buckets: Vec<DefaultKeyedRateLimiter<u64>>,
}

impl std::fmt::Debug for UserLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserLimits")
    }
}

impl UserLimits {
    pub fn new(rates: &Rates) -> Self {
        Self {
            buckets: KINDS
                .iter()
                .map(|&k| RateLimiter::dashmap(rate_of(rates, k).quota(rates.user_factor)))
                .collect(),
        }
    }

    /// Forgets users whose buckets are full again (call now and then).
    pub fn shrink(&self) {
        for b in &self.buckets {
            b.retain_recent();
            b.shrink_to_fit();
        }
    }
}

/// The clock every bucket reads. Making one (quanta's `Clock::new`) reads
/// CPUID and is not cheap: per connection and per request it was as much of
/// an edge's CPU in a reconnect storm as quinn-proto's packet parsing.
fn clock() -> DefaultClock {
    static CLOCK: std::sync::LazyLock<DefaultClock> =
        std::sync::LazyLock::new(DefaultClock::default);
    CLOCK.clone()
}

/// One connection's buckets.
pub struct ConnLimits {
    buckets: Vec<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for ConnLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnLimits")
    }
}

impl ConnLimits {
    pub fn new(rates: &Rates) -> Self {
        Self {
            buckets: KINDS
                .iter()
                .map(|&k| RateLimiter::direct_with_clock(rate_of(rates, k).quota(1), clock()))
                .collect(),
        }
    }

    /// Takes one token of `kind` from this connection's and the user's
    /// bucket; `Err(wait)` if either is empty (then neither is charged
    /// beyond the connection's, which refilling covers).
    pub fn check(&self, users: &UserLimits, user: u64, kind: Kind) -> Result<(), Duration> {
        let now = clock().now();
        self.buckets[kind.index()]
            .check()
            .map_err(|not_until| not_until.wait_time_from(now))?;
        users.buckets[kind.index()]
            .check_key(&user)
            .map_err(|not_until| not_until.wait_time_from(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_with_a_wait() {
        let rates = Rates {
            send: Rate { per_s: 1, burst: 3 },
            user_factor: 2,
            ..Rates::default()
        };
        let users = UserLimits::new(&rates);
        let a = ConnLimits::new(&rates);
        for _ in 0..3 {
            assert!(a.check(&users, 7, Kind::Send).is_ok());
        }
        let wait = a.check(&users, 7, Kind::Send).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Other kinds have their own buckets.
        assert!(a.check(&users, 7, Kind::Fetch).is_ok());
        // A second connection of the user has its own 3, but the user's
        // bucket (2 x 3 = 6) ends it after 3 more.
        let b = ConnLimits::new(&rates);
        for _ in 0..3 {
            assert!(b.check(&users, 7, Kind::Send).is_ok());
        }
        let c = ConnLimits::new(&rates);
        assert!(c.check(&users, 7, Kind::Send).is_err(), "user bucket empty");
        // Another user is not affected.
        assert!(c.check(&users, 8, Kind::Send).is_ok());
    }
}
