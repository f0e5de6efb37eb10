//! A timer wheel: one per shard, in place of a timer per connection.
//!
//! Every connection has at most one deadline that matters at a time (the
//! earliest of quinn-proto's timers and the edge's own: Hello, token
//! expiry, the inbox seam). The shard files the connection's key under the
//! 1 ms tick of that deadline; a wake-up takes every key whose tick has
//! come. Entries are never removed early: a key that fires before its
//! connection's real deadline (the deadline moved later) is checked and
//! filed again, which costs one look. Deadlines beyond the wheel's span are
//! filed in its last slot with their real tick and moved on when reached.
//!
//! Finding the next occupied slot is a scan of a 4096-bit occupancy map (64
//! words), so an idle shard's sleep is computed without visiting slots.

use std::time::{Duration, Instant};

/// Slots, one per tick: a span of about 4 s at 1 ms.
const SLOTS: usize = 4096;
const WORDS: usize = SLOTS / 64;
const TICK: Duration = Duration::from_millis(1);
const TICK_NANOS: u32 = 1_000_000;
const TICKS_PER_S: u64 = 1_000;

#[derive(Debug)]
pub struct Wheel {
    origin: Instant,
    /// The next tick to fire: every tick before it has fired.
    now_tick: u64,
    /// `(tick, key)` per slot.
    slots: Vec<Vec<(u64, usize)>>,
    occupied: [u64; WORDS],
    len: usize,
}

impl Wheel {
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            now_tick: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            occupied: [0; WORDS],
            len: 0,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first tick at or after `at` (a deadline never fires early).
    fn tick_of(&self, at: Instant) -> u64 {
        self.ticks_to(at, true)
    }

    /// Whole ticks from the origin to `at` (0 before it), the part of a
    /// tick rounded up or down. In u64 and u32: the u128 division of
    /// `as_nanos` was a tenth of a busy shard's timer work (it runs for
    /// every deadline filed).
    fn ticks_to(&self, at: Instant, round_up: bool) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        let part = if round_up {
            d.subsec_nanos().div_ceil(TICK_NANOS)
        } else {
            d.subsec_nanos() / TICK_NANOS
        };
        d.as_secs()
            .saturating_mul(TICKS_PER_S)
            .saturating_add(u64::from(part))
    }

    fn instant_of(&self, tick: u64) -> Instant {
        self.origin + TICK * u32::try_from(tick).unwrap_or(u32::MAX)
    }

    /// Files `key` to fire at `at` (or at the next tick, if `at` is past).
    pub fn insert(&mut self, at: Instant, key: usize) {
        let tick = self.tick_of(at).max(self.now_tick);
        self.file(tick, key);
        self.len += 1;
    }

    fn file(&mut self, tick: u64, key: usize) {
        let slot_tick = tick.min(self.now_tick + SLOTS as u64 - 1);
        let slot = (slot_tick % SLOTS as u64) as usize;
        self.slots[slot].push((tick, key));
        self.occupied[slot / 64] |= 1 << (slot % 64);
    }

    /// Ticks from `now_tick` to the next occupied slot.
    fn next_occupied(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let start = (self.now_tick % SLOTS as u64) as usize;
        let (w0, b0) = (start / 64, start % 64);
        let first = self.occupied[w0] & (!0u64 << b0);
        if first != 0 {
            return Some((w0 * 64 + first.trailing_zeros() as usize - start) as u64);
        }
        for i in 1..=WORDS {
            let w = (w0 + i) % WORDS;
            let mut m = self.occupied[w];
            if i == WORDS {
                // Back at the first word: only the bits before the start.
                m &= (1u64 << b0).wrapping_sub(1);
            }
            if m != 0 {
                let slot = w * 64 + m.trailing_zeros() as usize;
                return Some(((slot + SLOTS - start) % SLOTS) as u64);
            }
        }
        None
    }

    /// When the shard must wake next (None: nothing filed).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_occupied()
            .map(|d| self.instant_of(self.now_tick + d))
    }

    /// Moves the keys whose deadline is at or before `now` into `due`.
    pub fn expire(&mut self, now: Instant, due: &mut Vec<usize>) {
        // Ticks up to `end` inclusive are due.
        let end = self.ticks_to(now, false);
        while self.now_tick <= end {
            let Some(d) = self.next_occupied() else {
                self.now_tick = end + 1;
                break;
            };
            let tick = self.now_tick + d;
            if tick > end {
                self.now_tick = end + 1;
                break;
            }
            let slot = (tick % SLOTS as u64) as usize;
            let mut entries = std::mem::take(&mut self.slots[slot]);
            self.occupied[slot / 64] &= !(1 << (slot % 64));
            self.now_tick = tick + 1;
            for &(t, key) in &entries {
                if t <= end {
                    due.push(key);
                    self.len -= 1;
                } else {
                    // A far deadline reached the end of the span: onwards
                    // (into this same slot, now the span's last).
                    self.file(t, key);
                }
            }
            // The slot keeps its buffer for its next tick (an allocation
            // per tick and slot showed in a busy loop's profile), unless
            // far deadlines were filed into it meanwhile.
            if self.slots[slot].is_empty() {
                entries.clear();
                self.slots[slot] = entries;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn keys_fire_in_deadline_order_and_never_early() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        w.insert(t0 + ms(30), 3);
        w.insert(t0 + ms(10), 1);
        w.insert(t0 + ms(20), 2);
        w.insert(t0 + ms(20), 22);
        assert_eq!(w.len(), 4);
        assert_eq!(w.next_deadline(), Some(t0 + ms(10)));
        let mut due = Vec::new();
        w.expire(t0 + ms(9), &mut due);
        assert!(due.is_empty(), "nothing before its deadline");
        w.expire(t0 + ms(20), &mut due);
        assert_eq!(due, vec![1, 2, 22]);
        assert_eq!(w.next_deadline(), Some(t0 + ms(30)));
        due.clear();
        w.expire(t0 + ms(1_000), &mut due);
        assert_eq!(due, vec![3]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn a_deadline_in_the_past_fires_on_the_next_expiry() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        let mut due = Vec::new();
        w.expire(t0 + ms(50), &mut due);
        w.insert(t0 + ms(5), 7);
        w.expire(t0 + ms(51), &mut due);
        assert_eq!(due, vec![7]);
    }

    #[test]
    fn deadlines_beyond_the_span_and_around_the_wrap_fire_at_their_tick() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        // Past the 4096-tick span, twice over.
        w.insert(t0 + ms(10_000), 1);
        w.insert(t0 + ms(4_095), 2);
        w.insert(t0 + ms(4_097), 3);
        let mut due = Vec::new();
        let mut fired = Vec::new();
        let mut now = t0;
        // Wake whenever the wheel asks to, as a shard does.
        for _ in 0..100 {
            let Some(next) = w.next_deadline() else { break };
            assert!(next >= now, "the next deadline is never in the past");
            now = next;
            due.clear();
            w.expire(now, &mut due);
            for &k in &due {
                fired.push((k, now.duration_since(t0).as_millis()));
            }
        }
        assert_eq!(fired, vec![(2, 4_095), (3, 4_097), (1, 10_000)]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_deadline_files_under_the_first_tick_at_or_after_it() {
        let t0 = Instant::now();
        let w = Wheel::new(t0);
        let us = Duration::from_micros;
        assert_eq!(w.tick_of(t0), 0);
        assert_eq!(w.tick_of(t0 + us(1)), 1);
        assert_eq!(w.tick_of(t0 + ms(1)), 1);
        assert_eq!(w.tick_of(t0 + ms(1) + us(1)), 2);
        assert_eq!(w.tick_of(t0 + ms(2_999) + us(999)), 3_000);
        assert_eq!(w.tick_of(t0 + ms(3_000)), 3_000);
        assert_eq!(w.tick_of(t0 + ms(3_000) + us(1)), 3_001);
        // Before the origin: tick 0, never a wrap.
        assert_eq!(Wheel::new(t0 + ms(5)).tick_of(t0), 0);
        // The constants agree with the tick.
        assert_eq!(Duration::from_nanos(u64::from(TICK_NANOS)), TICK);
        assert_eq!(TICKS_PER_S * u64::from(TICK_NANOS), 1_000_000_000);
    }

    #[test]
    fn many_keys_in_one_tick_and_slots_across_words() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        for k in 0..1_000 {
            w.insert(t0 + ms(k as u64 % 200), k);
        }
        let mut due = Vec::new();
        w.expire(t0 + ms(99), &mut due);
        assert_eq!(due.len(), 500);
        w.expire(t0 + ms(199), &mut due);
        due.sort_unstable();
        assert_eq!(due, (0..1_000).collect::<Vec<_>>());
    }
}
