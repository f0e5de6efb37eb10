//! Per-conversation publish order (pure; no I/O, no clock).
//!
//! Sends to one conversation are stored concurrently (the store's group
//! commit batches them), so they finish in any order; published in that
//! order, devices would see ids out of order. The sequencer makes the
//! order of publishing the order of ids, per conversation:
//!
//! 1. [`Sequencer::enter`] issues the id under the sequencer's lock and
//!    records it as in flight: no smaller id of that conversation can be
//!    issued after it.
//! 2. [`Sequencer::complete`] records the send as finished, with the job to
//!    publish (or none: refused, failed, a duplicate). If nobody is
//!    publishing this conversation and the oldest in-flight send is
//!    finished, the caller becomes the conversation's publisher and gets
//!    the run of finished jobs at the head, oldest first.
//! 3. The publisher publishes them in that order and asks [`Sequencer::next`]
//!    for more until none are ready; then publishing passes to whoever
//!    completes the new head.
//!
//! One conversation's publishes are thus serial while its stores overlap;
//! different conversations never wait for each other (the lock is held
//! only to update a map).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Debug)]
enum Slot<J> {
    InFlight,
    Done(Option<J>),
}

#[derive(Debug)]
struct Queue<J> {
    slots: BTreeMap<u64, Slot<J>>,
    publishing: bool,
}

impl<J> Default for Queue<J> {
    fn default() -> Self {
        Self {
            slots: BTreeMap::new(),
            publishing: false,
        }
    }
}

impl<J> Queue<J> {
    /// Takes the finished run at the head (skipping sends with no job).
    fn take_ready(&mut self) -> Vec<J> {
        let mut out = Vec::new();
        while let Some(entry) = self.slots.first_entry() {
            if matches!(entry.get(), Slot::InFlight) {
                break;
            }
            if let Slot::Done(Some(job)) = entry.remove() {
                out.push(job);
            }
        }
        out
    }
}

#[derive(Debug)]
pub struct Sequencer<J> {
    convs: Mutex<HashMap<u64, Queue<J>>>,
}

impl<J> Default for Sequencer<J> {
    fn default() -> Self {
        Self {
            convs: Mutex::new(HashMap::new()),
        }
    }
}

impl<J> Sequencer<J> {
    /// Issues an id with `issue` (under the lock) and records it in flight
    /// for `conv`. `issue` must return increasing ids (a Snowflake
    /// generator does). An error records nothing.
    pub fn enter<E>(&self, conv: u64, issue: impl FnOnce() -> Result<u64, E>) -> Result<u64, E> {
        let mut convs = self.convs.lock().expect("sequencer lock");
        let id = issue()?;
        convs
            .entry(conv)
            .or_default()
            .slots
            .insert(id, Slot::InFlight);
        Ok(id)
    }

    /// Records `id` of `conv` as finished with `job` (None: nothing to
    /// publish). Returns the jobs to publish, oldest first, when the caller
    /// becomes the conversation's publisher; it must then publish them and
    /// call [`Self::next`] until that returns None.
    pub fn complete(&self, conv: u64, id: u64, job: Option<J>) -> Option<Vec<J>> {
        let mut convs = self.convs.lock().expect("sequencer lock");
        let q = convs.get_mut(&conv)?;
        match q.slots.get_mut(&id) {
            Some(slot @ Slot::InFlight) => *slot = Slot::Done(job),
            _ => return None,
        }
        if q.publishing {
            return None;
        }
        let ready = q.take_ready();
        if ready.is_empty() {
            if q.slots.is_empty() {
                convs.remove(&conv);
            }
            return None;
        }
        q.publishing = true;
        Some(ready)
    }

    /// The publisher's next run of finished jobs, or None: publishing of
    /// `conv` ends here (the next completion of its head takes it up).
    pub fn next(&self, conv: u64) -> Option<Vec<J>> {
        let mut convs = self.convs.lock().expect("sequencer lock");
        let q = convs.get_mut(&conv)?;
        let ready = q.take_ready();
        if ready.is_empty() {
            q.publishing = false;
            if q.slots.is_empty() {
                convs.remove(&conv);
            }
            return None;
        }
        Some(ready)
    }

    /// Conversations with sends in flight or being published.
    pub fn active(&self) -> usize {
        self.convs.lock().expect("sequencer lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Drives a sequencer the way the engine does, in a chosen completion
    /// order, and returns what was published, in order.
    fn run(convs: &[u64], order: &[usize], skip: &[bool]) -> Vec<(u64, u64)> {
        let seq = Sequencer::<(u64, u64)>::default();
        let mut next_id = 0u64;
        let ids: Vec<(u64, u64)> = convs
            .iter()
            .map(|&c| {
                let id = seq
                    .enter::<()>(c, || {
                        next_id += 1;
                        Ok(next_id)
                    })
                    .unwrap();
                (c, id)
            })
            .collect();
        let mut published = Vec::new();
        for &i in order {
            let (c, id) = ids[i];
            let job = (!skip[i]).then_some((c, id));
            if let Some(mut batch) = seq.complete(c, id, job) {
                loop {
                    published.append(&mut batch);
                    match seq.next(c) {
                        Some(b) => batch = b,
                        None => break,
                    }
                }
            }
        }
        assert_eq!(seq.active(), 0, "every conversation's queue is gone");
        published
    }

    #[test]
    fn a_later_id_waits_for_an_earlier_one() {
        let seq = Sequencer::<u64>::default();
        let a = seq.enter::<()>(7, || Ok(10)).unwrap();
        let b = seq.enter::<()>(7, || Ok(11)).unwrap();
        assert_eq!(seq.complete(7, b, Some(b)), None, "11 waits for 10");
        assert_eq!(seq.complete(7, a, Some(a)), Some(vec![10, 11]));
        assert_eq!(seq.next(7), None);
        assert_eq!(seq.active(), 0);
    }

    #[test]
    fn a_failed_send_releases_the_ones_behind_it() {
        let seq = Sequencer::<u64>::default();
        let a = seq.enter::<()>(7, || Ok(10)).unwrap();
        let b = seq.enter::<()>(7, || Ok(11)).unwrap();
        assert_eq!(seq.complete(7, b, Some(b)), None);
        assert_eq!(seq.complete(7, a, None), Some(vec![11]));
        assert_eq!(seq.next(7), None);
    }

    #[test]
    fn completions_while_publishing_go_to_the_publisher() {
        let seq = Sequencer::<u64>::default();
        let a = seq.enter::<()>(7, || Ok(10)).unwrap();
        assert_eq!(seq.complete(7, a, Some(a)), Some(vec![10]));
        let b = seq.enter::<()>(7, || Ok(11)).unwrap();
        assert_eq!(seq.complete(7, b, Some(b)), None, "the publisher takes it");
        assert_eq!(seq.next(7), Some(vec![11]));
        assert_eq!(seq.next(7), None);
        assert_eq!(seq.active(), 0);
    }

    #[test]
    fn conversations_do_not_wait_for_each_other() {
        let seq = Sequencer::<u64>::default();
        let a = seq.enter::<()>(1, || Ok(10)).unwrap();
        let b = seq.enter::<()>(2, || Ok(11)).unwrap();
        assert_eq!(seq.complete(2, b, Some(b)), Some(vec![11]));
        assert_eq!(seq.next(2), None);
        assert_eq!(seq.complete(1, a, Some(a)), Some(vec![10]));
    }

    #[test]
    fn an_error_issuing_records_nothing() {
        let seq = Sequencer::<u64>::default();
        assert_eq!(seq.enter(1, || Err("clock")), Err("clock"));
        assert_eq!(seq.active(), 0);
    }

    proptest! {
        /// Whatever order sends finish in, each conversation's jobs are
        /// published exactly once each, in id order, and nothing is left.
        #[test]
        fn publishes_each_conversation_in_id_order(
            convs in proptest::collection::vec(0u64..4, 1..40),
            seed in any::<u64>(),
            skips in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let mut order: Vec<usize> = (0..convs.len()).collect();
            // A seeded shuffle (Fisher-Yates with an LCG).
            let mut s = seed | 1;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let skip = &skips[..convs.len()];
            let published = run(&convs, &order, skip);
            let mut expected: Vec<(u64, u64)> = convs
                .iter()
                .enumerate()
                .filter(|(i, _)| !skip[*i])
                .map(|(i, &c)| (c, i as u64 + 1))
                .collect();
            let mut got = published.clone();
            got.sort();
            expected.sort();
            prop_assert_eq!(got, expected);
            for c in 0..4 {
                let ids: Vec<u64> = published.iter().filter(|p| p.0 == c).map(|p| p.1).collect();
                prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "conversation {} out of order: {:?}", c, ids);
            }
        }
    }
}
