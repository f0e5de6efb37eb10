//! The reorder window (pure; time is an argument).
//!
//! One engine node publishes each conversation's messages in id order, so
//! a device sees them in order with no help. Several engine nodes (every
//! edge embeds one, and sends through different edges get ids from
//! different nodes) each publish in order, but their streams interleave:
//! a message with a smaller id from one node can arrive after a larger one
//! from another, by the publish jitter plus the skew between the nodes'
//! clocks (ids carry their node's wall time; skew is bounded by
//! `engine.max_clock_skew_ms`).
//!
//! So, per conversation: while only one engine node's ids arrive, a message
//! is released at once. Once ids from a second node are seen (and for a
//! while after the last such switch), each message is held for `window`
//! after it arrived and released in id order: a smaller id arriving within
//! the window of a larger one goes out first. A message that arrives after
//! a larger id was already released (it was later than the window) is
//! released at once and counted as late; nothing is ever dropped here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tiercast_schemas::ids::{NODE_BITS, SEQ_BITS};
use tiercast_schemas::wire::Message;

/// After ids of a second node were last seen, holding goes on this many
/// windows (the nodes' streams keep interleaving while both send).
const MULTI_NODE_WINDOWS: u32 = 100;

fn node_of(id: u64) -> u16 {
    ((id >> SEQ_BITS) & ((1 << NODE_BITS) - 1)) as u16
}

#[derive(Debug, Default)]
struct Conv {
    /// Held messages by id, with when each may go.
    held: BTreeMap<u64, (Instant, Message)>,
    /// The largest id released.
    released: u64,
    last_node: Option<u16>,
    /// Holding applies until then (several nodes seen).
    hold_until: Option<Instant>,
}

/// Counts, exact.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReorderStats {
    /// Messages that were held at all.
    pub held: u64,
    /// Messages put back in order: released before a larger id that had
    /// arrived first.
    pub reordered: u64,
    /// Messages released after a larger id (they came later than the
    /// window): the app saw these out of order.
    pub late: u64,
}

#[derive(Debug)]
pub struct Reorder {
    window: Duration,
    convs: crate::resume::IdMap<Conv>,
    /// Messages held now, all conversations (so asking is O(1)).
    holding: usize,
    pub stats: ReorderStats,
}

impl Reorder {
    /// `window` zero: nothing is ever held.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            convs: crate::resume::IdMap::default(),
            holding: 0,
            stats: ReorderStats::default(),
        }
    }

    /// A live message arrived at `now`: what to hand to the app now, in
    /// order (this one, or earlier held ones whose time came, or nothing).
    pub fn push(&mut self, m: Message, now: Instant) -> Vec<Message> {
        let mut out = Vec::new();
        self.push_into(m, now, &mut out);
        out
    }

    /// [`Reorder::push`], appending what goes out now to `out`: a caller
    /// that keeps `out` between messages allocates nothing for a message
    /// released at once (the load generator's devices, one per delivery).
    pub fn push_into(&mut self, m: Message, now: Instant, out: &mut Vec<Message>) {
        let window = self.window;
        let conv = m.conversation;
        let c = self.convs.entry(conv).or_default();
        let node = node_of(m.id);
        if c.last_node.is_some_and(|n| n != node) && !window.is_zero() {
            c.hold_until = Some(now + window * MULTI_NODE_WINDOWS);
        }
        c.last_node = Some(node);
        if m.id <= c.released {
            self.stats.late += 1;
            out.push(m);
            return;
        }
        let in_hold = c.hold_until.is_some_and(|t| now < t);
        if !in_hold && c.held.is_empty() {
            c.released = m.id;
            out.push(m);
            return;
        }
        if c.held
            .last_key_value()
            .is_some_and(|(&last, _)| m.id < last)
        {
            self.stats.reordered += 1;
        }
        self.stats.held += 1;
        if c.held.insert(m.id, (now + window, m)).is_none() {
            self.holding += 1;
        }
        out.extend(self.due_in(conv, now));
    }

    /// Whether any message is held (a timer is due at [`Reorder::next_due`]).
    pub fn is_holding(&self) -> bool {
        self.holding > 0
    }

    /// Held messages whose time came by `now`, every conversation, each
    /// conversation in id order.
    pub fn due(&mut self, now: Instant) -> Vec<Message> {
        let convs: Vec<u64> = self
            .convs
            .iter()
            .filter(|(_, c)| c.held.values().any(|(t, _)| *t <= now))
            .map(|(&k, _)| k)
            .collect();
        convs
            .into_iter()
            .flat_map(|conv| self.due_in(conv, now))
            .collect()
    }

    /// Releases, in id order, every held message of `conv` up to the
    /// largest id whose time came.
    fn due_in(&mut self, conv: u64, now: Instant) -> Vec<Message> {
        let Some(c) = self.convs.get_mut(&conv) else {
            return Vec::new();
        };
        let Some(upto) = c
            .held
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(&id, _)| id)
            .next_back()
        else {
            return Vec::new();
        };
        let rest = c.held.split_off(&(upto + 1));
        let out: Vec<Message> = std::mem::replace(&mut c.held, rest)
            .into_values()
            .map(|(_, m)| m)
            .collect();
        if let Some(m) = out.last() {
            c.released = c.released.max(m.id);
        }
        self.holding -= out.len();
        out
    }

    /// When the next held message is due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        if self.holding == 0 {
            return None;
        }
        self.convs
            .values()
            .flat_map(|c| c.held.values().map(|(t, _)| *t))
            .min()
    }

    /// Everything held, in id order per conversation (the connection ended).
    pub fn flush(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        for c in self.convs.values_mut() {
            let held = std::mem::take(&mut c.held);
            if let Some((&last, _)) = held.last_key_value() {
                c.released = c.released.max(last);
            }
            out.extend(held.into_values().map(|(_, m)| m));
        }
        self.holding = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const W: Duration = Duration::from_millis(20);

    fn id(ms: u64, node: u64) -> u64 {
        (ms << (NODE_BITS + SEQ_BITS)) | (node << SEQ_BITS)
    }

    fn msg(id: u64) -> Message {
        Message {
            id,
            conversation: 7,
            sender: 1,
            sender_client: 1,
            body: Bytes::new(),
        }
    }

    fn ids(ms: &[Message]) -> Vec<u64> {
        ms.iter().map(|m| m.id).collect()
    }

    #[test]
    fn one_node_is_never_held() {
        let mut r = Reorder::new(W);
        let t = Instant::now();
        for ms in 1..10 {
            assert_eq!(ids(&r.push(msg(id(ms, 1)), t)), vec![id(ms, 1)]);
        }
        assert_eq!(r.next_due(), None);
        assert_eq!(r.stats, ReorderStats::default());
    }

    #[test]
    fn two_nodes_are_put_in_order_within_the_window() {
        let mut r = Reorder::new(W);
        let t = Instant::now();
        assert_eq!(ids(&r.push(msg(id(10, 1)), t)), vec![id(10, 1)]);
        // Node 2's id 12 arrives, then node 1's 11 (published 1 ms earlier).
        assert!(r.push(msg(id(12, 2)), t).is_empty(), "held");
        assert!(r.push(msg(id(11, 1)), t + W / 2).is_empty(), "held");
        assert_eq!(r.next_due(), Some(t + W));
        assert!(r.due(t + W / 4).is_empty());
        assert_eq!(ids(&r.due(t + W)), vec![id(11, 1), id(12, 2)]);
        assert_eq!(r.stats.reordered, 1);
        assert_eq!(r.stats.late, 0);
    }

    #[test]
    fn later_than_the_window_is_released_late_not_dropped() {
        let mut r = Reorder::new(W);
        let t = Instant::now();
        r.push(msg(id(10, 1)), t);
        assert!(r.push(msg(id(20, 2)), t).is_empty());
        assert_eq!(ids(&r.due(t + W)), vec![id(20, 2)]);
        assert_eq!(ids(&r.push(msg(id(15, 1)), t + W * 2)), vec![id(15, 1)]);
        assert_eq!(r.stats.late, 1);
    }

    #[test]
    fn flush_gives_everything_held_in_order() {
        let mut r = Reorder::new(W);
        let t = Instant::now();
        r.push(msg(id(10, 1)), t);
        r.push(msg(id(30, 2)), t);
        r.push(msg(id(20, 1)), t);
        assert_eq!(ids(&r.flush()), vec![id(20, 1), id(30, 2)]);
        assert_eq!(r.next_due(), None);
    }

    #[test]
    fn a_zero_window_holds_nothing() {
        let mut r = Reorder::new(Duration::ZERO);
        let t = Instant::now();
        r.push(msg(id(10, 1)), t);
        assert_eq!(r.push(msg(id(12, 2)), t).len(), 1);
        assert_eq!(r.push(msg(id(11, 1)), t).len(), 1);
        assert_eq!(r.stats.late, 1);
    }

    /// Pushes, due passes and flushes in a mixed order across conversations
    /// and nodes: every message comes out exactly once, `push_into` says what
    /// `push` says, and the held count always matches what is held.
    #[test]
    fn every_message_comes_out_once_and_the_held_count_is_exact() {
        let t = Instant::now();
        let mut a = Reorder::new(W);
        let mut b = Reorder::new(W);
        let mut out_a = Vec::new();
        let mut out_b = Vec::new();
        let mut scratch = Vec::new();
        let mut pushed = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..2_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let now = t + Duration::from_millis(step / 4);
            if x.is_multiple_of(11) {
                out_a.extend(a.due(now));
                out_b.extend(b.due(now));
            } else if x.is_multiple_of(97) {
                out_a.extend(a.flush());
                out_b.extend(b.flush());
            } else {
                let ms = step + (x >> 8) % 30;
                let mut m = msg(id(ms, (x >> 16) % 3) | ((step + 1) & 0xfff));
                m.conversation = (x >> 20) % 4;
                pushed.push((m.conversation, m.id));
                out_a.extend(a.push(m.clone(), now));
                scratch.clear();
                b.push_into(m, now, &mut scratch);
                out_b.append(&mut scratch);
            }
            assert_eq!(ids(&out_a), ids(&out_b), "step {step}");
            let held: usize = b.convs.values().map(|c| c.held.len()).sum();
            assert_eq!(b.holding, held, "step {step}");
            assert_eq!(b.is_holding(), b.next_due().is_some(), "step {step}");
        }
        out_b.extend(b.flush());
        assert!(!b.is_holding());
        let mut got: Vec<(u64, u64)> = out_b.iter().map(|m| (m.conversation, m.id)).collect();
        got.sort_unstable();
        pushed.sort_unstable();
        assert_eq!(got, pushed, "each message out exactly once");
        assert!(b.stats.held > 0 && b.stats.reordered > 0, "{:?}", b.stats);
    }
}
