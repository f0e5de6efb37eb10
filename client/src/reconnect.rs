//! A session's reconnect policy, pure: which edge to try next and how long
//! to wait first, given what happened to the last attempt. Exponential
//! backoff with full jitter over consecutive failures; a failed connect
//! tries the next edge in the list; a drain moves on after the edge's own
//! delay; a lost connection goes to a random *other* edge, so the devices
//! of an edge that died spread over the rest instead of all moving to the
//! next one in their lists; an edge that shed load (it refused the
//! connection: no room) is left for longer, on a second backoff with a
//! higher base and cap, so that a storm of devices spreads out instead of
//! coming back to be refused again and again. Time and chance come in as
//! arguments: the caller sleeps, and the tests draw from a seeded
//! generator.

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;

/// The `n`-th retry's delay: uniform in `0..=min(cap, base * 2^n)`.
pub fn full_jitter(rng: &mut impl Rng, base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(cap);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(if ms == 0 { 0 } else { rng.random_range(0..=ms) })
}

/// The shed backoff's defaults: a refused device's first retry comes
/// within 2 s, and after five refusals in a row it waits up to a minute
/// (a refused attempt costs the device a whole connection built and
/// dropped, and the edge a packet decrypted and answered: at 100,000
/// devices, refusals at the failure backoff's 5 s cap take both processes'
/// CPU, docs/benchmarks.md).
pub const SHED_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const SHED_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Where and when to connect next.
#[derive(Debug, Clone)]
pub struct Reconnect {
    edges: Vec<SocketAddr>,
    base: Duration,
    cap: Duration,
    shed_base: Duration,
    shed_cap: Duration,
    /// Index (modulo the edges) of the edge to try.
    edge: usize,
    /// Consecutive failures since the last connection.
    failures: u32,
}

impl Reconnect {
    /// Panics without edges (a session needs one).
    pub fn new(edges: Vec<SocketAddr>, base: Duration, cap: Duration) -> Self {
        assert!(!edges.is_empty(), "a session needs at least one edge");
        Self {
            edges,
            base,
            cap,
            shed_base: SHED_BACKOFF_BASE,
            shed_cap: SHED_BACKOFF_CAP,
            edge: 0,
            failures: 0,
        }
    }

    /// The backoff after the edge shed load ([`Reconnect::shed`]) instead
    /// of [`SHED_BACKOFF_BASE`] and [`SHED_BACKOFF_CAP`].
    #[must_use]
    pub fn with_shed_backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.shed_base = base;
        self.shed_cap = cap;
        self
    }

    /// The edge to try now.
    pub fn edge(&self) -> SocketAddr {
        self.edges[self.edge % self.edges.len()]
    }

    /// A connection was made: the backoff starts over.
    pub fn connected(&mut self) {
        self.failures = 0;
    }

    /// A connect failed: the next edge in the list, after a backoff that
    /// grows with each consecutive failure.
    pub fn connect_failed(&mut self, rng: &mut impl Rng) -> (SocketAddr, Duration) {
        self.failures = self.failures.saturating_add(1);
        self.edge += 1;
        let delay = full_jitter(rng, self.base, self.cap, self.failures);
        (self.edge(), delay)
    }

    /// The edge shed load (it refused the connect, `unavailable`): the next
    /// edge, after the shed backoff, whose ceiling grows with the same
    /// count of consecutive failures.
    pub fn shed(&mut self, rng: &mut impl Rng) -> (SocketAddr, Duration) {
        self.failures = self.failures.saturating_add(1);
        self.edge += 1;
        let delay = full_jitter(rng, self.shed_base, self.shed_cap, self.failures);
        (self.edge(), delay)
    }

    /// The edge shed load: at the turn it gave (`turn`, [`Reconnect::shed_until`]),
    /// or without one on the shed backoff ([`Reconnect::shed`]).
    pub fn refused(
        &mut self,
        rng: &mut impl Rng,
        turn: Option<Duration>,
    ) -> (SocketAddr, Duration) {
        match turn {
            Some(after) => self.shed_until(rng, after),
            None => self.shed(rng),
        }
    }

    /// The edge shed load and said when it will have room for this device
    /// (`after`, the turn its pacer handed out): the same edge then, plus
    /// up to a tenth more of jitter, at most the shed backoff's cap. It
    /// still counts as a failure, so a refusal without a turn that follows
    /// waits on the grown shed backoff.
    pub fn shed_until(&mut self, rng: &mut impl Rng, after: Duration) -> (SocketAddr, Duration) {
        self.failures = self.failures.saturating_add(1);
        let spread = u64::try_from(after.as_micros() / 10).unwrap_or(u64::MAX);
        let jitter = Duration::from_micros(rng.random_range(0..=spread));
        (self.edge(), (after + jitter).min(self.shed_cap))
    }

    /// The edge drained this device: the next edge, after the delay the
    /// edge chose (it spreads its devices over time).
    pub fn drained(&mut self, after: Duration) -> (SocketAddr, Duration) {
        self.edge += 1;
        (self.edge(), after)
    }

    /// A connection was lost: a random other edge, after a first backoff.
    pub fn lost(&mut self, rng: &mut impl Rng) -> (SocketAddr, Duration) {
        self.failures = 1;
        let others = self.edges.len().saturating_sub(1).max(1);
        self.edge += 1 + rng.random_range(0..others);
        let delay = full_jitter(rng, self.base, self.cap, self.failures);
        (self.edge(), delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn edges(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i)))
            .collect()
    }

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling() {
        let mut rng = StdRng::seed_from_u64(1);
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..40 {
            let ceiling = (100u64 << attempt.min(20)).min(5_000);
            for _ in 0..50 {
                let d = full_jitter(&mut rng, base, cap, attempt).as_millis() as u64;
                assert!(d <= ceiling, "attempt {attempt}: {d} > {ceiling}");
            }
        }
        // Spread out, not all at the ceiling.
        let spread: std::collections::HashSet<u128> = (0..100)
            .map(|_| full_jitter(&mut rng, base, cap, 6).as_millis())
            .collect();
        assert!(spread.len() > 20);
    }

    #[test]
    fn failed_connects_walk_the_list_with_a_growing_ceiling() {
        let mut rng = StdRng::seed_from_u64(2);
        let e = edges(3);
        let mut r = Reconnect::new(
            e.clone(),
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        assert_eq!(r.edge(), e[0]);
        let mut tried = Vec::new();
        for n in 1..=6u32 {
            let (addr, delay) = r.connect_failed(&mut rng);
            tried.push(addr);
            assert!(delay <= Duration::from_millis((100u64 << n).min(5_000)));
        }
        assert_eq!(tried, [e[1], e[2], e[0], e[1], e[2], e[0]]);
        // A connection resets the backoff: the next failure's ceiling is
        // base * 2 again.
        r.connected();
        for _ in 0..50 {
            let mut again = r.clone();
            assert!(again.connect_failed(&mut rng).1 <= Duration::from_millis(200));
        }
    }

    #[test]
    fn a_device_told_when_to_come_back_comes_back_then_to_the_same_edge() {
        let mut rng = StdRng::seed_from_u64(5);
        let e = edges(3);
        let mut r = Reconnect::new(
            e.clone(),
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
        .with_shed_backoff(Duration::from_secs(1), Duration::from_secs(60));
        let after = Duration::from_millis(2_500);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let (addr, delay) = r.clone().shed_until(&mut rng, after);
            assert_eq!(addr, e[0], "the edge that handed out the turn");
            assert!(
                (after..=after + after / 10).contains(&delay),
                "{delay:?} outside the turn and its tenth"
            );
            seen.insert(delay);
        }
        assert!(seen.len() > 100, "jittered: {} distinct waits", seen.len());
        // Never past the shed cap, whatever the edge says.
        assert_eq!(
            r.clone().shed_until(&mut rng, Duration::from_secs(600)).1,
            Duration::from_secs(60)
        );
        // It counts as a failure: a refusal without a turn next waits on
        // the shed backoff grown by one step (ceiling 1 s * 2^2).
        r.shed_until(&mut rng, after);
        for _ in 0..50 {
            assert!(r.clone().shed(&mut rng).1 <= Duration::from_secs(4));
        }
        let max = (0..400).map(|_| r.clone().shed(&mut rng).1).max().unwrap();
        assert!(max > Duration::from_secs(2), "ceiling not grown: {max:?}");
    }

    #[test]
    fn a_shed_device_waits_on_the_longer_backoff_and_a_connection_ends_it() {
        let e = edges(2);
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        let fresh = Reconnect::new(
            e.clone(),
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        assert_eq!(fresh.shed_base, SHED_BACKOFF_BASE);
        assert_eq!(fresh.shed_cap, SHED_BACKOFF_CAP);
        let mut tried = Vec::new();
        let mut longest = [Duration::ZERO; 9];
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut r = fresh.clone().with_shed_backoff(base, cap);
            for (n, most) in longest.iter_mut().enumerate() {
                let (addr, delay) = r.shed(&mut rng);
                if seed == 0 {
                    tried.push(addr);
                }
                // Under the shed ceiling: base * 2^n, capped.
                let ceiling = (base * (1 << (n + 1))).min(cap);
                assert!(delay <= ceiling, "refusal {}: {delay:?}", n + 1);
                *most = (*most).max(delay);
            }
            // A connection starts the count over; a plain failure after it
            // is on the short backoff again.
            r.connected();
            assert!(r.connect_failed(&mut rng).1 <= Duration::from_millis(200));
        }
        // Refusals also walk the list of edges.
        assert_eq!(tried[..4], [e[1], e[0], e[1], e[0]]);
        // The waits use their range: past the failure backoff's 5 s cap from
        // the third refusal on, and up to the shed cap at the end.
        assert!(longest[2] > Duration::from_secs(5), "{longest:?}");
        assert!(longest[8] > Duration::from_secs(50), "{longest:?}");
        assert!(longest.iter().all(|d| *d <= cap));
    }

    #[test]
    fn a_drain_moves_on_after_the_edges_delay() {
        let e = edges(2);
        let mut r = Reconnect::new(
            e.clone(),
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        assert_eq!(
            r.drained(Duration::from_millis(1234)),
            (e[1], Duration::from_millis(1234))
        );
        assert_eq!(r.drained(Duration::ZERO), (e[0], Duration::ZERO));
    }

    #[test]
    fn a_lost_connection_goes_to_another_edge_spread_at_random() {
        let e = edges(4);
        let mut counts = [0u32; 4];
        for seed in 0..400 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut r = Reconnect::new(
                e.clone(),
                Duration::from_millis(100),
                Duration::from_secs(5),
            );
            let (addr, delay) = r.lost(&mut rng);
            assert_ne!(addr, e[0], "never the edge just lost");
            assert!(delay <= Duration::from_millis(200));
            counts[e.iter().position(|a| *a == addr).unwrap()] += 1;
        }
        // The other three edges share the devices (about 133 each).
        assert_eq!(counts[0], 0);
        assert!(counts[1..].iter().all(|&c| c > 90), "{counts:?}");
        // With one edge there is no other: it is tried again.
        let one = edges(1);
        let mut r = Reconnect::new(
            one.clone(),
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        assert_eq!(r.lost(&mut StdRng::seed_from_u64(0)).0, one[0]);
    }
}
