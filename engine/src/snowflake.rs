//! Snowflake ids: 41 bits of milliseconds since [`EPOCH_MS`], 10 bits of
//! node id, 12 bits of sequence. Ids from one node strictly increase; ids
//! from two nodes never collide as long as their node ids differ (which the
//! node-id lease guarantees in a cluster).
//!
//! [`Snowflake`] is the pure state machine: it takes the time as an argument.
//! [`IdGenerator`] wraps it with the system clock and the policy for a clock
//! that steps back: wait it out up to a bound, then refuse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use tiercast_schemas::ids::{EPOCH_MS, NODE_BITS, SEQ_BITS, min_id_at};
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
const MAX_TIME: u64 = (1 << 41) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("node id {0} is out of range (0..={MAX_NODE})")]
    NodeOutOfRange(u16),
    /// The clock is behind the last id issued; `behind_ms` says by how much.
    #[error("clock moved back by {behind_ms} ms")]
    ClockBehind { behind_ms: u64 },
    /// All 4096 ids of this millisecond are used; try again next millisecond.
    #[error("sequence exhausted for this millisecond")]
    SequenceExhausted,
    #[error("clock is before the epoch or past the 41-bit range")]
    ClockOutOfRange,
    /// The node-id lease could not be renewed: issuing ids could duplicate
    /// another node's.
    #[error("node-id lease lost")]
    LeaseLost,
    /// This node's wall clock is off the cluster's common clock by more
    /// than `engine.max_clock_skew_ms`: its ids would sort wrongly against
    /// other nodes' (fix the node's time sync).
    #[error("clock is {skew_ms} ms off the cluster clock (limit {max_ms} ms)")]
    ClockSkew { skew_ms: i64, max_ms: u64 },
}

/// The parts of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub unix_ms: u64,
    pub node: u16,
    pub seq: u16,
}

pub fn compose(unix_ms: u64, node: u16, seq: u16) -> u64 {
    ((unix_ms - EPOCH_MS) << (NODE_BITS + SEQ_BITS))
        | (u64::from(node) << SEQ_BITS)
        | u64::from(seq)
}

pub fn parts(id: u64) -> Parts {
    Parts {
        unix_ms: (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS,
        node: ((id >> SEQ_BITS) & u64::from(MAX_NODE)) as u16,
        seq: (id & MAX_SEQ) as u16,
    }
}

/// The pure generator: no clock, no waiting.
#[derive(Debug, Clone)]
pub struct Snowflake {
    node: u16,
    last_ms: u64,
    seq: u64,
}

impl Snowflake {
    pub fn try_new(node: u16) -> Result<Self, IdError> {
        if node > MAX_NODE {
            return Err(IdError::NodeOutOfRange(node));
        }
        Ok(Self {
            node,
            last_ms: 0,
            seq: 0,
        })
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    /// The next id at wall time `unix_ms`, or why there is none.
    pub fn next_at(&mut self, unix_ms: u64) -> Result<u64, IdError> {
        if unix_ms < EPOCH_MS || unix_ms - EPOCH_MS > MAX_TIME {
            return Err(IdError::ClockOutOfRange);
        }
        if unix_ms < self.last_ms {
            return Err(IdError::ClockBehind {
                behind_ms: self.last_ms - unix_ms,
            });
        }
        if unix_ms == self.last_ms {
            if self.seq == MAX_SEQ {
                return Err(IdError::SequenceExhausted);
            }
            self.seq += 1;
        } else {
            self.last_ms = unix_ms;
            self.seq = 0;
        }
        Ok(compose(self.last_ms, self.node, self.seq as u16))
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Until when a node-id lease lets this process issue ids: a monotonic
/// deadline that the lease's renewer pushes forward after every renewal and
/// that every id checks. Ids stop at the deadline even if the renewer is
/// stuck (a hung command, a starved runtime), not only when it reports a
/// failure.
///
/// The gate also holds this node's clock skew: the renewer measures the
/// wall clock against the Redis server's (`TIME` inside the renewal
/// script), and ids stop while the skew exceeds the bound. Ids of two
/// nodes are compared by their time part, and a device resumes from a
/// little before its cursor (the SDK's resync window, 3 s): a node whose
/// clock is further behind than that issues ids that land before cursors
/// other nodes' ids have already moved, and a resume would skip them.
#[derive(Debug)]
pub struct LeaseGate {
    base: Instant,
    /// Nanoseconds after `base` (a deadline at or before `base` is 0, and 0
    /// is closed: no elapsed time is below it).
    until_ns: AtomicU64,
    /// Local wall clock minus the common clock, at the last measurement
    /// (exported as `tiercast_clock_skew_ms`).
    skew_ms: Gauge,
    /// The largest |skew| ids are issued at; 0: not checked.
    max_skew_ms: AtomicU64,
}

impl Default for LeaseGate {
    fn default() -> Self {
        Self::closed()
    }
}

impl LeaseGate {
    pub fn closed() -> Self {
        Self {
            base: Instant::now(),
            until_ns: AtomicU64::new(0),
            skew_ms: Gauge::default(),
            max_skew_ms: AtomicU64::new(0),
        }
    }

    /// Records a measured skew (local wall clock minus the common clock).
    pub fn record_skew(&self, skew_ms: i64) {
        self.skew_ms.set(skew_ms);
    }

    pub fn skew_ms(&self) -> i64 {
        self.skew_ms.get()
    }

    /// The skew as a metric (to register).
    pub fn skew_gauge(&self) -> Gauge {
        self.skew_ms.clone()
    }

    /// Ids stop while |skew| exceeds `max_ms` (0: never).
    pub fn set_max_skew(&self, max_ms: u64) {
        self.max_skew_ms.store(max_ms, Ordering::Release);
    }

    /// `Err` with the skew when it is beyond the bound.
    pub fn check_skew(&self) -> Result<(), IdError> {
        let max_ms = self.max_skew_ms.load(Ordering::Acquire);
        let skew_ms = self.skew_ms();
        if max_ms > 0 && skew_ms.unsigned_abs() > max_ms {
            return Err(IdError::ClockSkew { skew_ms, max_ms });
        }
        Ok(())
    }

    /// Ids may be issued until `at` (later calls move it either way: a
    /// renewal sent at t makes the lease good until t + margin).
    pub fn open_until(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.base).as_nanos() as u64;
        self.until_ns.store(ns, Ordering::Release);
    }

    /// No more ids: the lease is someone else's.
    pub fn close(&self) {
        self.until_ns.store(0, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        let now = self.base.elapsed().as_nanos() as u64;
        now < self.until_ns.load(Ordering::Acquire)
    }
}

/// Ids from the system clock for one node.
#[derive(Debug)]
pub struct IdGenerator {
    state: Mutex<Snowflake>,
    /// Closed when the node-id lease is not known to hold (cluster mode).
    lease: Option<Arc<LeaseGate>>,
    /// How long a backward clock step is waited out before a send fails.
    /// NTP slews small corrections; a step larger than this is an operator
    /// problem, and failing loudly beats stalling every send behind it.
    max_backstep: Duration,
}

impl IdGenerator {
    pub fn try_new(node: u16, max_backstep: Duration) -> Result<Self, IdError> {
        Ok(Self {
            state: Mutex::new(Snowflake::try_new(node)?),
            lease: None,
            max_backstep,
        })
    }

    /// Ids are issued only while `gate` is open (the node-id lease holds).
    pub fn with_lease(mut self, gate: Arc<LeaseGate>) -> Self {
        self.lease = Some(gate);
        self
    }

    pub fn node(&self) -> u16 {
        self.state.lock().expect("snowflake lock").node()
    }

    /// One attempt at an id at wall time `now`, without waiting: the id,
    /// or how long to wait before the next attempt (the clock is behind by
    /// less than `max_backstep` in all, counted in `waited`, or this
    /// millisecond's sequence is used up). Callers that must issue an id
    /// under a lock of their own use this and wait outside it.
    pub fn poll_id(&self, now: u64, waited: &mut Duration) -> Result<IdPoll, IdError> {
        match self.step(now, waited) {
            Step::Id(id) => Ok(IdPoll::Ready(id)),
            Step::Wait(d) => Ok(IdPoll::Wait(d)),
            Step::Fail(e) => Err(e),
        }
    }

    /// The next id. Waits (asynchronously) when the clock is behind, up to
    /// `max_backstep`, or when this millisecond's sequence is used up.
    pub async fn next_id(&self) -> Result<u64, IdError> {
        let mut waited = Duration::ZERO;
        loop {
            match self.step(now_unix_ms(), &mut waited) {
                Step::Id(id) => return Ok(id),
                Step::Wait(d) => tokio::time::sleep(d).await,
                Step::Fail(e) => return Err(e),
            }
        }
    }

    /// [`Self::next_id`] with the clock and the sleep supplied: the same
    /// policy, testable without real time.
    pub fn next_id_with(
        &self,
        mut clock: impl FnMut() -> u64,
        mut sleep: impl FnMut(Duration),
    ) -> Result<u64, IdError> {
        let mut waited = Duration::ZERO;
        loop {
            match self.step(clock(), &mut waited) {
                Step::Id(id) => return Ok(id),
                Step::Wait(d) => sleep(d),
                Step::Fail(e) => return Err(e),
            }
        }
    }

    /// One decision of the policy: an id, a wait, or a refusal.
    fn step(&self, now: u64, waited: &mut Duration) -> Step {
        if let Some(gate) = &self.lease {
            if !gate.is_open() {
                return Step::Fail(IdError::LeaseLost);
            }
            if let Err(e) = gate.check_skew() {
                return Step::Fail(e);
            }
        }
        let result = self.state.lock().expect("snowflake lock").next_at(now);
        match result {
            Ok(id) => Step::Id(id),
            Err(IdError::ClockBehind { behind_ms }) => {
                let d = Duration::from_millis(behind_ms);
                if *waited + d > self.max_backstep {
                    Step::Fail(IdError::ClockBehind { behind_ms })
                } else {
                    *waited += d;
                    Step::Wait(d)
                }
            }
            Err(IdError::SequenceExhausted) => Step::Wait(Duration::from_micros(200)),
            Err(e) => Step::Fail(e),
        }
    }
}

/// What [`IdGenerator::poll_id`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdPoll {
    Ready(u64),
    Wait(Duration),
}

enum Step {
    Id(u64),
    Wait(Duration),
    Fail(IdError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const T0: u64 = EPOCH_MS + 1_000_000;

    #[test]
    fn ids_pass_the_lease_gate_only_before_its_deadline() {
        let gate = Arc::new(LeaseGate::closed());
        let ids = IdGenerator::try_new(7, Duration::ZERO)
            .unwrap()
            .with_lease(gate.clone());
        let at = || T0;
        assert_eq!(ids.next_id_with(at, |_| {}), Err(IdError::LeaseLost));
        gate.open_until(Instant::now() + Duration::from_secs(60));
        assert!(ids.next_id_with(at, |_| {}).is_ok());
        // A deadline in the past closes it without anyone calling close():
        // a stuck renewer cannot keep ids flowing.
        gate.open_until(Instant::now() - Duration::from_millis(1));
        assert_eq!(ids.next_id_with(at, |_| {}), Err(IdError::LeaseLost));
        gate.open_until(Instant::now() + Duration::from_secs(60));
        gate.close();
        assert_eq!(ids.next_id_with(at, |_| {}), Err(IdError::LeaseLost));
    }

    #[test]
    fn layout_round_trips() {
        let id = compose(T0, 513, 4095);
        assert_eq!(
            parts(id),
            Parts {
                unix_ms: T0,
                node: 513,
                seq: 4095
            }
        );
        assert!(min_id_at(T0) <= id && id < min_id_at(T0 + 1));
    }

    #[test]
    fn node_out_of_range_is_refused() {
        assert_eq!(
            Snowflake::try_new(1024).unwrap_err(),
            IdError::NodeOutOfRange(1024)
        );
    }

    #[test]
    fn sequence_exhaustion_is_reported_not_wrapped() {
        let mut g = Snowflake::try_new(1).unwrap();
        for _ in 0..4096 {
            g.next_at(T0).unwrap();
        }
        assert_eq!(g.next_at(T0), Err(IdError::SequenceExhausted));
        assert!(g.next_at(T0 + 1).is_ok());
    }

    #[test]
    fn small_backstep_is_waited_out() {
        let g = IdGenerator::try_new(3, Duration::from_millis(50)).unwrap();
        let mut t = T0 + 100;
        let first = g.next_id_with(|| t, |_| {}).unwrap();
        t = T0 + 80; // the clock steps back 20 ms
        let slept = std::cell::Cell::new(Duration::ZERO);
        let clock = std::cell::Cell::new(t);
        let second = g
            .next_id_with(
                || clock.get(),
                |d| {
                    slept.set(slept.get() + d);
                    clock.set(clock.get() + d.as_millis() as u64);
                },
            )
            .unwrap();
        assert!(second > first);
        assert_eq!(slept.get(), Duration::from_millis(20));
    }

    #[test]
    fn large_backstep_is_refused_never_duplicated() {
        let g = IdGenerator::try_new(3, Duration::from_millis(50)).unwrap();
        g.next_id_with(|| T0 + 10_000, |_| {}).unwrap();
        let err = g.next_id_with(|| T0, |_| {}).unwrap_err();
        assert_eq!(err, IdError::ClockBehind { behind_ms: 10_000 });
    }

    proptest! {
        /// Whatever the clock does (forward, still, small steps back), the ids
        /// a node issues strictly increase and carry its node id.
        #[test]
        fn ids_strictly_increase(node in 0u16..=MAX_NODE, steps in proptest::collection::vec(-5i64..20, 1..2000)) {
            let mut g = Snowflake::try_new(node).unwrap();
            let mut t = T0 as i64;
            let mut last = 0u64;
            for s in steps {
                t += s;
                match g.next_at(t as u64) {
                    Ok(id) => {
                        prop_assert!(id > last);
                        prop_assert_eq!(parts(id).node, node);
                        last = id;
                    }
                    Err(IdError::ClockBehind { .. } | IdError::SequenceExhausted) => {}
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
        }

        /// Two nodes sharing one clock never issue the same id.
        #[test]
        fn nodes_never_collide(a in 0u16..=MAX_NODE, b in 0u16..=MAX_NODE, n in 1usize..3000) {
            prop_assume!(a != b);
            let (mut ga, mut gb) = (Snowflake::try_new(a).unwrap(), Snowflake::try_new(b).unwrap());
            let mut seen = HashSet::new();
            for i in 0..n {
                let t = T0 + (i / 7) as u64;
                for g in [&mut ga, &mut gb] {
                    if let Ok(id) = g.next_at(t) {
                        prop_assert!(seen.insert(id));
                    }
                }
            }
        }
    }
}
