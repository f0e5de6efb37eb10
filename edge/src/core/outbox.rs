//! A connection's outbound frames on their way into its delivery stream.
//!
//! A frame is written into the QUIC stream at once when the stream takes
//! it; what the stream cannot take yet (flow control, the send window)
//! waits here, up to `cap` frames. A live frame offered to a full outbox
//! marks a slow consumer (the connection is closed, and its next connect
//! catches up from the store), except a tier-3 notification: those are
//! coalesced to the newest id per conversation and written once there is
//! room, so a slow device gets one notification per conversation however
//! many it missed. Inbox pages go in beside the cap ([`Outbox::push_bulk`]):
//! the shard reads the next page only once the outbox is empty, so a large
//! inbox never looks like a slow consumer.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// What happened to an offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// A notification set aside for a full outbox.
    Coalesced,
    /// The outbox is full: a slow consumer.
    Overflow,
}

#[derive(Debug)]
pub struct Outbox {
    queue: VecDeque<Bytes>,
    cap: usize,
    coalesced: HashMap<u64, u64>,
}

/// Result of one write attempt into the stream: how many of the offered
/// frames it took whole (a partly taken frame is advanced in place and
/// stays first), or `None` when it took nothing more (blocked).
pub type Taken = Option<usize>;

impl Outbox {
    pub fn new(cap: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            cap,
            coalesced: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.coalesced.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Offers a live frame; `notify` = (conversation, id) for a tier-3
    /// notification.
    pub fn offer(&mut self, frame: Bytes, notify: Option<(u64, u64)>) -> Offer {
        if self.queue.len() < self.cap {
            self.queue.push_back(frame);
            return Offer::Queued;
        }
        match notify {
            Some((conversation, id)) => {
                let e = self.coalesced.entry(conversation).or_insert(0);
                *e = (*e).max(id);
                Offer::Coalesced
            }
            None => Offer::Overflow,
        }
    }

    /// Queues frames past the cap (an inbox page, a Drain frame).
    pub fn push_bulk(&mut self, frames: impl IntoIterator<Item = Bytes>) {
        self.queue.extend(frames);
    }

    /// Hands queued frames to `write` until it takes no more or all are
    /// out, then the coalesced notifications (`notify_frame` encodes one).
    /// True when everything is out.
    pub fn flush(
        &mut self,
        mut write: impl FnMut(&mut [Bytes]) -> Taken,
        notify_frame: impl Fn(u64, u64) -> Bytes,
    ) -> bool {
        loop {
            while !self.queue.is_empty() {
                let Some(n) = write(self.queue.make_contiguous()) else {
                    return false;
                };
                if n == 0 {
                    return false;
                }
                self.queue.drain(..n);
            }
            if self.coalesced.is_empty() {
                return true;
            }
            let mut latest: Vec<(u64, u64)> = self.coalesced.drain().collect();
            latest.sort_unstable();
            self.queue
                .extend(latest.into_iter().map(|(c, id)| notify_frame(c, id)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that takes `room` whole frames, then blocks.
    fn stream(room: &mut usize, out: &mut Vec<Bytes>) -> impl FnMut(&mut [Bytes]) -> Taken {
        move |frames: &mut [Bytes]| {
            let n = frames.len().min(*room);
            *room -= n;
            out.extend(frames[..n].iter().cloned());
            (n > 0).then_some(n)
        }
    }

    fn nf(c: u64, id: u64) -> Bytes {
        Bytes::from(format!("n{c}:{id}"))
    }

    #[test]
    fn a_frame_the_stream_takes_goes_out_shared_not_copied() {
        let mut o = Outbox::new(4);
        let frame = Bytes::from_static(b"frame");
        assert_eq!(o.offer(frame.clone(), None), Offer::Queued);
        let (mut room, mut out) = (10, Vec::new());
        assert!(o.flush(stream(&mut room, &mut out), nf));
        assert_eq!(out[0].as_ptr(), frame.as_ptr(), "the same bytes");
        assert!(o.is_empty());
    }

    #[test]
    fn a_blocked_stream_fills_the_outbox_then_marks_a_slow_consumer() {
        let mut o = Outbox::new(2);
        let f = Bytes::from_static(b"f");
        assert_eq!(o.offer(f.clone(), None), Offer::Queued);
        assert_eq!(o.offer(f.clone(), None), Offer::Queued);
        let (mut room, mut out) = (0, Vec::new());
        assert!(!o.flush(stream(&mut room, &mut out), nf));
        assert_eq!(o.offer(f.clone(), None), Offer::Overflow);
        // The stream takes one: there is room again.
        let (mut room, mut out) = (1, Vec::new());
        assert!(!o.flush(stream(&mut room, &mut out), nf));
        assert_eq!(o.len(), 1);
        assert_eq!(o.offer(f, None), Offer::Queued);
    }

    #[test]
    fn notifications_for_a_full_outbox_coalesce_per_conversation() {
        let mut o = Outbox::new(1);
        assert_eq!(o.offer(nf(5, 100), Some((5, 100))), Offer::Queued);
        for id in 101..=150 {
            assert_eq!(o.offer(nf(5, id), Some((5, id))), Offer::Coalesced);
        }
        assert_eq!(o.offer(nf(6, 7), Some((6, 7))), Offer::Coalesced);
        // A message (not a notification) still overflows.
        assert_eq!(o.offer(Bytes::from_static(b"m"), None), Offer::Overflow);
        let (mut room, mut out) = (10, Vec::new());
        assert!(o.flush(stream(&mut room, &mut out), nf));
        assert_eq!(
            out,
            vec![nf(5, 100), nf(5, 150), nf(6, 7)],
            "the newest id per conversation"
        );
        assert!(o.is_empty());
    }

    #[test]
    fn inbox_pages_go_in_beside_the_cap() {
        let mut o = Outbox::new(1);
        o.push_bulk((0..10).map(|i| Bytes::from(vec![i])));
        assert_eq!(o.len(), 10);
        let (mut room, mut out) = (4, Vec::new());
        assert!(!o.flush(stream(&mut room, &mut out), nf));
        let (mut room, mut out2) = (100, Vec::new());
        assert!(o.flush(stream(&mut room, &mut out2), nf));
        out.extend(out2);
        assert_eq!(out.len(), 10);
        assert!(
            out.iter().enumerate().all(|(i, b)| b[0] == i as u8),
            "in order"
        );
    }
}
