//! When a device the edge refuses should come back.
//!
//! Past `edge.max_handshakes_in_flight` the edge refuses a new connection
//! before TLS (QUIC's `CONNECTION_REFUSED`). Left to its own backoff, a
//! refused device guesses: too soon and it is refused again (a whole
//! connection built and dropped on both sides), too late and the edge
//! idles while devices sleep. The edge knows better: its handshake slots
//! are a queue whose throughput is the slots over the time a handshake
//! holds one (Little's law). The pacer hands each refusal the next free
//! turn at that throughput, so the refused devices come back spread at
//! the rate the edge admits them, in the order they were refused: a
//! queue kept by the devices, costing the edge a counter. The turn goes
//! in the refusal's reason phrase (`retry-after-ms=N`,
//! `tiercast_schemas::wire::refusal_reason`; patched quinn-proto, ADR
//! 0015), which the SDK honours.
//!
//! An underestimate of the time a handshake takes (early in a storm, the
//! first handshakes finish fast) gives turns too soon: those devices are
//! refused again and handed a later turn. So does a stall: handshakes that
//! never finish (a flood of Initials that go no further holds every slot
//! until the Hello timeout) leave no departure to measure. While no slot
//! has freed since the refusals began, a refused device waits at least the
//! time since they began (its own wait; the queue's turns are not pushed
//! out): one that comes back into the same stall is sent away for about
//! twice as long each time, instead of every few milliseconds. The turns
//! never run further ahead than `horizon`.
//!
//! Little's law gives the rate the slots turn over at *now*, and in a
//! storm that is the rate of an edge (and, on one machine, of its devices)
//! busy refusing: handshakes wait for a core, their hold time grows, and
//! the turns handed out then are spread at that slow rate for up to the
//! horizon. Once the arrivals stop, the edge idles between turns while it
//! could admit several times as many (measured at 100,000 devices: for
//! 40 s, 0-15 handshakes in flight and 260-570 admitted a second, after up
//! to 1,300 a second just before; `docs/benchmarks.md`, "The pace of the
//! best second"). So the pacer also counts departures per second and hands
//! turns at the faster of the two: the current Little's-law rate, or
//! three quarters of the best second seen in the last minute. Too early
//! a turn costs a second refusal (and a later turn); too late a turn
//! costs the edge's idle time, which nothing gets back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The furthest ahead a turn is handed out: the SDK's shed backoff cap.
pub const HORIZON: Duration = Duration::from_secs(60);

/// Before any handshake has finished: a guess that errs short.
const FIRST_GUESS: Duration = Duration::from_millis(50);

/// The weight of the newest handshake in the running mean (1/32).
const EWMA_SHIFT: u32 = 5;

/// Departures are counted per window of this length.
const WINDOW: Duration = Duration::from_secs(1);

/// How long the best window's rate is trusted without being matched.
const BEST_FOR: Duration = Duration::from_secs(60);

/// The share of the best window's rate that turns are handed at: 3/4.
const BEST_SHARE: (u32, u32) = (3, 4);

pub(crate) struct Pacer {
    slots: u32,
    horizon: Duration,
    state: Mutex<State>,
}

struct State {
    /// The latest turn handed out.
    next: Option<Instant>,
    /// Running mean of the time a handshake holds its slot, in ns.
    mean_ns: Option<u64>,
    /// The first refusal since a slot last freed.
    stalled_since: Option<Instant>,
    /// The window departures are being counted in: its start and count.
    window: Option<(Instant, u32)>,
    /// The most departures in one closed window, and when it closed.
    best: Option<(u32, Instant)>,
}

impl Pacer {
    pub fn new(slots: usize, horizon: Duration) -> Self {
        Self {
            slots: u32::try_from(slots.max(1)).unwrap_or(u32::MAX),
            horizon,
            state: Mutex::new(State {
                next: None,
                mean_ns: None,
                stalled_since: None,
                window: None,
                best: None,
            }),
        }
    }

    /// A handshake left its slot (done, failed or abandoned) at `now`,
    /// after `held`.
    pub fn left(&self, now: Instant, held: Duration) {
        let ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        let mut s = self.state.lock().expect("pacer lock");
        s.stalled_since = None;
        s.window = Some(match s.window {
            Some((start, n)) if now.saturating_duration_since(start) < WINDOW => (start, n + 1),
            closed => {
                if let Some((_, n)) = closed {
                    let beaten = s.best.is_none_or(|(best, at)| {
                        n >= best || now.saturating_duration_since(at) > BEST_FOR
                    });
                    if beaten {
                        s.best = Some((n, now));
                    }
                }
                (now, 1)
            }
        });
        s.mean_ns = Some(match s.mean_ns {
            None => ns,
            Some(m) => {
                let m = i128::from(m);
                let step = (i128::from(ns) - m) >> EWMA_SHIFT;
                u64::try_from(m + step).unwrap_or(0)
            }
        });
    }

    /// The time between two admissions: at the current throughput, or at
    /// a share of the best second's if that is faster.
    fn interval(&self, s: &State, now: Instant) -> Duration {
        let current = s
            .mean_ns
            .map_or(FIRST_GUESS, Duration::from_nanos)
            .checked_div(self.slots)
            .unwrap_or_default();
        let best = s
            .best
            .filter(|&(_, at)| now.saturating_duration_since(at) <= BEST_FOR)
            .and_then(|(n, _)| (WINDOW * BEST_SHARE.1).checked_div(n.saturating_mul(BEST_SHARE.0)));
        best.map_or(current, |best| best.min(current))
    }

    /// A connection refused at `now`: how long the device should wait.
    pub fn refused(&self, now: Instant) -> Duration {
        let mut s = self.state.lock().expect("pacer lock");
        let stalled = now.saturating_duration_since(*s.stalled_since.get_or_insert(now));
        let interval = self.interval(&s, now);
        let turn = s.next.map_or(now, |n| n.max(now)) + interval;
        // A stall lengthens this device's wait, not the queue: the first
        // handshakes of a storm may take a while to finish, and the devices
        // refused meanwhile must not push everybody's turns out.
        let wait = (turn - now).max(stalled);
        if wait > self.horizon {
            // Past the horizon the turn is not taken: the device comes back
            // at the horizon and is handed a turn then.
            return self.horizon;
        }
        s.next = Some(turn);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_spread_at_the_rate_the_slots_turn_over() {
        // 100 slots, each handshake holding one for 200 ms: 500 admissions
        // a second, one every 2 ms.
        let p = Pacer::new(100, Duration::from_secs(60));
        let now = Instant::now();
        for _ in 0..64 {
            p.left(now, Duration::from_millis(200));
        }
        let waits: Vec<Duration> = (0..1_000).map(|_| p.refused(now)).collect();
        assert_eq!(waits[0], Duration::from_millis(2));
        assert_eq!(waits[999], Duration::from_millis(2_000));
        assert!(
            waits
                .windows(2)
                .all(|w| w[1] - w[0] == Duration::from_millis(2))
        );
        // Time moving on (and handshakes finishing, as they do) uses up
        // the turns: a refusal a second later is handed the turn after the
        // last, not one a second further.
        p.left(now + Duration::from_secs(1), Duration::from_millis(200));
        let later = p.refused(now + Duration::from_secs(1));
        assert_eq!(later, Duration::from_millis(1_002));
        // Past the last turn, the queue is empty again.
        p.left(now + Duration::from_secs(10), Duration::from_millis(200));
        assert_eq!(
            p.refused(now + Duration::from_secs(10)),
            Duration::from_millis(2)
        );
    }

    #[test]
    fn the_mean_follows_the_handshakes_and_the_horizon_caps_the_wait() {
        let p = Pacer::new(10, Duration::from_secs(1));
        let now = Instant::now();
        // No handshake seen: the first guess, 50 ms over 10 slots.
        assert_eq!(p.refused(now), Duration::from_millis(5));
        // Slower handshakes lengthen the interval, moving by 1/32 each.
        p.left(now, Duration::from_millis(100));
        p.left(now, Duration::from_millis(420));
        assert_eq!(
            p.state.lock().unwrap().mean_ns,
            Some(110_000_000),
            "100 ms + (420 - 100) / 32"
        );
        // A turn beyond the horizon is not taken: the wait is the horizon
        // and the next refusal gets the same.
        for _ in 0..100 {
            p.refused(now);
        }
        assert_eq!(p.refused(now), Duration::from_secs(1));
        assert_eq!(p.refused(now), Duration::from_secs(1));
    }

    #[test]
    fn while_no_slot_frees_a_device_refused_again_waits_about_twice_as_long() {
        // Slots held by handshakes that never finish: nothing leaves.
        let p = Pacer::new(8, Duration::from_secs(60));
        let t0 = Instant::now();
        let first = p.refused(t0);
        assert_eq!(first, Duration::from_micros(6_250), "50 ms over 8 slots");
        // One device, back at each turn it is handed, into the same stall:
        // each wait at least the stall so far, so the stall is crossed in a
        // handful of refusals, not one every 6 ms.
        let mut at = t0 + first;
        let mut refusals = 1;
        while at < t0 + Duration::from_secs(3) {
            let wait = p.refused(at);
            assert!(wait >= at - t0, "{wait:?} shorter than the stall");
            at += wait;
            refusals += 1;
        }
        assert!(refusals <= 12, "{refusals} refusals across a 3 s stall");
        // A slot frees: the stall is over, and turns follow the handshakes.
        p.left(at, Duration::from_millis(80));
        let after = p.refused(at + Duration::from_secs(60));
        assert_eq!(after, Duration::from_millis(10), "80 ms over 8 slots");
    }

    #[test]
    fn turns_keep_the_best_seconds_pace_when_handshakes_slow_down() {
        // 100 slots. For one second the slots turn over 400 times (fast
        // handshakes); then handshakes slow to 2 s each, as in a storm on
        // busy cores: Little's law alone would hand a turn every 20 ms.
        let p = Pacer::new(100, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..400u32 {
            p.left(
                t0 + Duration::from_micros(2_500) * i,
                Duration::from_millis(250),
            );
        }
        let slow = t0 + Duration::from_secs(1);
        for _ in 0..64 {
            p.left(slow, Duration::from_secs(2));
        }
        assert_eq!(p.state.lock().unwrap().best.map(|(n, _)| n), Some(400));
        // Turns at 3/4 of the best second's 400: 300 a second.
        let waits: Vec<Duration> = (0..3).map(|_| p.refused(slow)).collect();
        let step = Duration::from_secs(1) / 300;
        assert_eq!(waits, [step, step * 2, step * 3]);
        // A minute on, with no second as good since, the fast second is
        // forgotten (the best is now a slow one) and Little's law is back:
        // the mean hold (near 2 s by now) over 100 slots.
        let later = slow + Duration::from_secs(120);
        p.left(later, Duration::from_secs(2));
        p.left(later + Duration::from_secs(1), Duration::from_secs(2));
        let mean = Duration::from_nanos(p.state.lock().unwrap().mean_ns.unwrap());
        assert_eq!(p.refused(later + Duration::from_secs(1)), mean / 100);
        assert!(mean / 100 > step * 5);
    }
}
