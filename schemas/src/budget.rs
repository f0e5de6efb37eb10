//! How many messages a reply may carry in one frame. A history page, an
//! inbox page and a Sync reply are each one frame ([`MAX_FRAME_BYTES`]);
//! they are filled message by message against an estimate of what each
//! costs encoded, so the reply never exceeds the frame and the rest is
//! fetched by the next request (`more`).

use crate::framing::MAX_FRAME_BYTES;

/// Bytes a `Message` costs in a frame beyond its body (ids, vtable, vector
/// headers), rounded up; the tests below check it against encoded frames.
pub const MESSAGE_OVERHEAD: usize = 96;

/// Bytes a `SyncEntry` costs beyond its messages (conversation, tier,
/// latest, read, more, vtable), rounded up.
pub const SYNC_ENTRY_OVERHEAD: usize = 64;

/// Bytes of a reply frame that are not its messages or entries (prefix,
/// root table, request id, body union).
pub const FRAME_HEADROOM: usize = 128;

/// The room left in one reply frame, spent as messages are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameBudget {
    left: usize,
}

impl FrameBudget {
    /// A page of messages: the frame less its headroom.
    pub const fn page() -> Self {
        Self {
            left: MAX_FRAME_BYTES - FRAME_HEADROOM,
        }
    }

    /// A Sync reply of `entries` entries: a page less what the entries
    /// themselves cost.
    pub fn sync(entries: usize) -> Self {
        Self {
            left: Self::page()
                .left
                .saturating_sub(entries.saturating_mul(SYNC_ENTRY_OVERHEAD)),
        }
    }

    /// Bytes left.
    pub fn left(&self) -> usize {
        self.left
    }

    /// What a message with a body of `body_len` bytes costs.
    pub fn cost(body_len: usize) -> usize {
        body_len.saturating_add(MESSAGE_OVERHEAD)
    }

    /// Whether a page is worth reading: room for at least two messages'
    /// overhead. Without it an entry says `more` and is synced again.
    pub fn can_start_page(&self) -> bool {
        self.left >= MESSAGE_OVERHEAD * 2
    }

    /// How many of the messages with bodies of `body_lens` (in order) fit,
    /// at least one: a history or inbox page always carries its first
    /// message (a body is far below the frame). Spends nothing.
    pub fn fit_page(&self, body_lens: impl IntoIterator<Item = usize>) -> usize {
        let mut used = 0usize;
        let mut n = 0;
        for len in body_lens {
            used = used.saturating_add(Self::cost(len));
            if used > self.left && n > 0 {
                break;
            }
            n += 1;
        }
        n
    }

    /// How many of the messages with bodies of `body_lens` (in order) fit
    /// in what is left, possibly none; spends their cost.
    pub fn take(&mut self, body_lens: impl IntoIterator<Item = usize>) -> usize {
        let mut n = 0;
        for len in body_lens {
            let cost = Self::cost(len);
            if cost > self.left {
                break;
            }
            self.left -= cost;
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Message, ServerBody, ServerFrame, SyncEntry};

    fn msg(id: u64, len: usize) -> Message {
        Message {
            id: u64::MAX - id,
            conversation: u64::MAX,
            sender: u64::MAX,
            sender_client: u64::MAX,
            body: bytes::Bytes::from(vec![b'x'; len]),
        }
    }

    /// The estimates bound what the encoder writes: a page filled to the
    /// budget is one frame, with any body length.
    #[test]
    fn the_overheads_bound_encoded_frames() {
        for len in [0, 1, 17, 100, 1000, 4096, 16_384] {
            let n = FrameBudget::page().fit_page(std::iter::repeat_n(len, 10_000));
            let messages: Vec<Message> = (0..n as u64).map(|i| msg(i, len)).collect();
            let frame = ServerFrame::new(
                u64::MAX,
                ServerBody::Messages {
                    conversation: u64::MAX,
                    messages,
                    more: true,
                },
            )
            .encode();
            assert!(
                frame.len() <= FRAME_HEADROOM + n * FrameBudget::cost(len),
                "{n} bodies of {len}: {} bytes",
                frame.len()
            );
            assert!(frame.len() <= MAX_FRAME_BYTES, "{len}: {}", frame.len());
        }
        // A Sync reply: entries, each with a few messages.
        let entries = 50;
        let mut budget = FrameBudget::sync(entries);
        let mut out = Vec::new();
        for c in 0..entries as u64 {
            let k = budget.take([300, 300, 300]);
            out.push(SyncEntry {
                conversation: u64::MAX - c,
                tier: 2,
                messages: (0..k as u64).map(|i| msg(i, 300)).collect(),
                latest_id: u64::MAX,
                read_id: u64::MAX,
                more: true,
            });
        }
        let frame = ServerFrame::new(u64::MAX, ServerBody::SyncResult { entries: out }).encode();
        assert!(frame.len() <= MAX_FRAME_BYTES, "{}", frame.len());
    }

    #[test]
    fn a_page_keeps_what_fits_and_always_its_first_message() {
        let b = FrameBudget::page();
        assert_eq!(b.left(), MAX_FRAME_BYTES - FRAME_HEADROOM);
        let per = FrameBudget::cost(1000);
        let fits = b.left() / per;
        assert_eq!(b.fit_page(std::iter::repeat_n(1000, fits + 5)), fits);
        assert_eq!(b.fit_page([10, 10, 10]), 3);
        assert_eq!(b.fit_page([MAX_FRAME_BYTES * 2]), 1);
        assert_eq!(b.fit_page([]), 0);
    }

    #[test]
    fn a_sync_reply_spends_its_budget_across_entries() {
        let mut b = FrameBudget::sync(10);
        assert_eq!(
            b.left(),
            FrameBudget::page().left() - 10 * SYNC_ENTRY_OVERHEAD
        );
        // Three 30 KB bodies: two fit, the third does not.
        assert_eq!(b.take([30_000, 30_000, 30_000]), 2);
        assert_eq!(
            b.left(),
            FrameBudget::sync(10).left() - 2 * FrameBudget::cost(30_000)
        );
        // A body larger than what is left: none, and nothing spent.
        let left = b.left();
        assert_eq!(b.take([left]), 0);
        assert_eq!(b.left(), left);
        assert!(b.can_start_page());
        b.take(std::iter::repeat_n(0, 10_000));
        assert!(!b.can_start_page());
        // More cursors than a frame holds: nothing left, no panic.
        assert_eq!(FrameBudget::sync(usize::MAX).left(), 0);
    }
}
