//! The rules of a resume, shared by [`crate::session::Session`] (a task
//! per device) and loadgen's device core (many devices on one loop): the
//! per-conversation cursors and read markers, deduplication by id, where a
//! resume syncs each conversation from, and which errors end a session or
//! are retried. Nothing here does I/O.

use std::collections::VecDeque;

use tiercast_schemas::ids::min_id_at;
use tiercast_schemas::wire::{Cursor, ErrorCode, Message, SyncEntry};

use crate::connection::ClientError;

/// A map keyed by an id the edge sent (a conversation's). Hashed with
/// FxHash rather than SipHash: these maps are touched on every delivery
/// (loadgen's device core spent 5.8 % of its CPU in map entries, these
/// and its own log's), and their keys come from the authenticated edge,
/// not from anyone who could pick colliding ones.
pub type IdMap<V> = rustc_hash::FxHashMap<u64, V>;

/// Errors after which reconnecting cannot help.
pub fn is_fatal(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::Unauthenticated
                | ErrorCode::TokenExpired
                | ErrorCode::TooManyDevices
                | ErrorCode::UnsupportedVersion
                | ErrorCode::ProtocolViolation
                | ErrorCode::UnknownDevice
                | ErrorCode::ConnectionReplaced
        )
    )
}

/// Errors that end a live connection for good: another connection of this
/// device took over (reconnecting would take it back, and so on).
pub fn ends_session(e: &ClientError) -> bool {
    matches!(e.code(), Some(ErrorCode::ConnectionReplaced))
}

/// The edge shed load: it refused a new connection (QUIC's
/// `CONNECTION_REFUSED`, past its handshakes in flight), closed one it had
/// no slot for, or could not serve the Hello. Coming back soon only adds
/// to its load, so a reconnect waits on the longer shed backoff
/// ([`crate::reconnect::Reconnect::shed`]).
pub fn is_shed(e: &ClientError) -> bool {
    e.code() == Some(ErrorCode::Unavailable)
}

/// Errors a request is retried after (on the next connection).
pub fn is_retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Connect(_) | ClientError::Closed { .. } | ClientError::Timeout(_) => true,
        ClientError::Refused { code, .. } => *code == ErrorCode::Unavailable,
        ClientError::RateLimited { .. } => true,
        ClientError::Protocol(_) => false,
    }
}

/// Per-conversation resume state.
#[derive(Debug, Default)]
pub struct State {
    pub cursors: IdMap<u64>,
    /// Recently seen ids per conversation (pruned below the cursor minus the
    /// window).
    pub seen: IdMap<SeenIds>,
    pub tiers: IdMap<u8>,
    pub read: IdMap<u64>,
    /// When the last connection ended (Unix ms, the edge's time); `None`
    /// until one has.
    pub disconnected_at_ms: Option<u64>,
    /// When the current connection began (Unix ms, the edge's time, taken
    /// before its handshake): the live path reaches the device from then.
    pub connected_at_ms: Option<u64>,
    /// When the first connection began (the same clock).
    pub first_connected_ms: Option<u64>,
    /// The start of the connection whose listing of conversations last
    /// completed: every conversation listed then has a cursor since.
    pub listed_from_ms: Option<u64>,
    /// The cursors a resume started from, until it completes.
    pub resume_from: Option<IdMap<u64>>,
    /// Per conversation, the id the last resume synced from (for
    /// diagnosis: [`Session::resumed_from`]).
    pub synced_from: IdMap<u64>,
}

/// Moves a per-conversation high-water mark (a cursor, a read marker) to
/// `id` if that is newer; true if it moved.
pub fn advance(marks: &mut IdMap<u64>, conversation: u64, id: u64) -> bool {
    let mark = marks.entry(conversation).or_insert(0);
    let newer = id > *mark;
    *mark = (*mark).max(id);
    newer
}

/// A conversation's recently seen ids, in order, in one buffer. Live ids
/// arrive mostly in increasing order, so an insert is mostly a push at the
/// back; an older one (a resume's page) is found by binary search. (A
/// B-tree set here cost loadgen's device core 1.5-2.7 % of its CPU: its
/// nodes were cold in cache at each delivery.)
#[derive(Debug, Default)]
pub struct SeenIds(VecDeque<u64>);

impl SeenIds {
    /// Adds `id`; false if it was there already.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.0.back().is_none_or(|&last| id > last) {
            self.0.push_back(id);
            return true;
        }
        match self.0.binary_search(&id) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, id);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forgets every id below `from`.
    pub fn prune_below(&mut self, from: u64) {
        let below = self.0.partition_point(|&id| id < from);
        self.0.drain(..below);
    }
}

/// Ids to keep per conversation before pruning.
pub const SEEN_PRUNE_AT: usize = 4_096;

impl State {
    /// Where a conversation without a cursor syncs from on this
    /// connection: `None` on the first (it starts at the connection's
    /// start); afterwards the start of the connection whose listing last
    /// completed, or of the first connection if none did, less the window
    /// (see `resume_inner`).
    pub fn new_conversation_since(&self, window_ms: u64) -> Option<u64> {
        self.disconnected_at_ms.map(|_| {
            let from = self.listed_from_ms.or(self.first_connected_ms).unwrap_or(0);
            min_id_at(from.saturating_sub(window_ms))
        })
    }

    /// Records the device's own sent message as seen (a sync or live copy
    /// of it is a duplicate) without moving the cursor.
    pub fn seen_own(&mut self, conversation: u64, id: u64) {
        self.seen.entry(conversation).or_default().insert(id);
    }

    /// Records a message; false if it was seen before.
    pub fn accept(&mut self, m: &Message, window_ids: u64) -> bool {
        let seen = self.seen.entry(m.conversation).or_default();
        if !seen.insert(m.id) {
            return false;
        }
        advance(&mut self.cursors, m.conversation, m.id);
        if seen.len() > SEEN_PRUNE_AT {
            let cursor = self.cursors[&m.conversation];
            let keep_from = cursor.saturating_sub(window_ids.saturating_mul(2));
            seen.prune_below(keep_from);
        }
        true
    }
}

/// The cursors a connection's resume starts from: those the last
/// connection ended with (`now`), except where an earlier resume that did
/// not finish started lower (its gap is still open). A conversation the
/// unfinished resume did not know (met on the live path since) starts at
/// the cursor the last connection ended with: everything up to it came in
/// order. Never the cursors as this connection's live traffic moves them:
/// those lie past whatever the last connection had in flight when it
/// ended.
pub fn resume_snapshot(resume_from: &mut Option<IdMap<u64>>, now: IdMap<u64>) -> IdMap<u64> {
    let pinned = resume_from.get_or_insert_with(IdMap::default);
    for (conversation, id) in now {
        let c = pinned.entry(conversation).or_insert(id);
        *c = (*c).min(id);
    }
    pinned.clone()
}

/// What a resume's retries start from: the listing and the cursors as they
/// were at its first attempt.
#[derive(Default)]
pub struct Pinned {
    pub listing: Option<Vec<SyncEntry>>,
    pub cursors: Option<IdMap<u64>>,
}

/// Where a resume takes up one listed conversation.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumeStart {
    /// Sync the conversation's messages after this id.
    SyncFrom(u64),
    /// Nothing to sync: the cursor starts at this id.
    StartAt(u64),
}

/// The resume's start for `entry`: from a little before the cursor the
/// device had (`current`); for a conversation new to it, from `since` on a
/// reconnect (see `resume_inner`), and on the first connect at the
/// connection's start for messages (nothing earlier is synced, and nothing
/// later is skipped: the live path reaches the device from then) or at the
/// latest id for tier-3 notifications (which carry only the newest id).
pub fn resume_start(
    current: Option<u64>,
    since: Option<u64>,
    entry: &SyncEntry,
    window_ids: u64,
    connected_at_ms: Option<u64>,
) -> ResumeStart {
    match (current, since) {
        (Some(c), _) => ResumeStart::SyncFrom(c.saturating_sub(window_ids)),
        (None, Some(from)) => ResumeStart::SyncFrom(from),
        (None, None) if entry.tier == 3 => ResumeStart::StartAt(entry.latest_id),
        (None, None) => ResumeStart::StartAt(connected_at_ms.map_or(entry.latest_id, min_id_at)),
    }
}

/// What a resume does after its listing: read markers newer than the
/// device's to announce, and the cursors to sync (see [`State::plan_resume`]).
#[derive(Debug, Default)]
pub struct ResumePlan {
    pub markers: Vec<(u64, u64)>,
    pub cursors: Vec<Cursor>,
}

/// What one entry of a cursor sync gives: a tier-3 notification to show,
/// messages to deliver (in order), and the cursor of the next page.
#[derive(Debug, Default)]
pub struct EntryOutcome {
    pub notify: Option<(u64, u64)>,
    pub messages: Vec<Message>,
    pub more: Option<Cursor>,
}

/// Cursors per Sync request of a resume.
pub const SYNC_BATCH: usize = 64;

impl State {
    /// The listing of a resume is in: where each conversation is taken up.
    /// A conversation without a cursor: on the first connection it starts
    /// at the connection's start (see [`resume_start`]). On a later one it
    /// syncs from the start of the connection whose listing last completed
    /// (the device joined it after that listing, and the live path may
    /// have been carrying its messages since), or from the first
    /// connection's start if no listing ever completed (then every
    /// conversation is new, and the live path has been reaching the device
    /// since then). Not from the last disconnect: messages in flight when
    /// that connection ended were sent before it.
    pub fn plan_resume(
        &mut self,
        listing: &[SyncEntry],
        pinned: &mut Pinned,
        window_ids: u64,
        resync_window_ms: u64,
    ) -> ResumePlan {
        let since = self.new_conversation_since(resync_window_ms);
        self.listed_from_ms = self.connected_at_ms;
        // The cursors as they were when this resume began (see
        // `resume_snapshot`).
        let snapshot = pinned
            .cursors
            .get_or_insert_with(|| self.cursors.clone())
            .clone();
        let mut plan = ResumePlan::default();
        for e in listing {
            self.tiers.insert(e.conversation, e.tier);
            if e.read_id > self.read.get(&e.conversation).copied().unwrap_or(0) {
                plan.markers.push((e.conversation, e.read_id));
            }
            // Not the cursor as live traffic on this connection has moved
            // it: a conversation without one in the snapshot is new to the
            // device.
            let current = snapshot.get(&e.conversation).copied();
            let cursor = match resume_start(current, since, e, window_ids, self.connected_at_ms) {
                ResumeStart::SyncFrom(id) => id,
                ResumeStart::StartAt(id) => {
                    // Live traffic may have moved it on already: kept.
                    let c = self.cursors.entry(e.conversation).or_insert(id);
                    *c = (*c).max(id);
                    continue;
                }
            };
            self.synced_from.insert(e.conversation, cursor);
            plan.cursors.push(Cursor {
                conversation: e.conversation,
                last_id: cursor,
            });
        }
        plan
    }

    /// One entry of a cursor sync that asked from `from`.
    pub fn take_entry(&mut self, entry: SyncEntry, from: u64) -> EntryOutcome {
        let SyncEntry {
            conversation,
            tier,
            messages,
            latest_id,
            more,
            ..
        } = entry;
        self.tiers.insert(conversation, tier);
        if tier == 3 {
            let newer = advance(&mut self.cursors, conversation, latest_id);
            return EntryOutcome {
                notify: newer.then_some((conversation, latest_id)),
                ..EntryOutcome::default()
            };
        }
        let last = messages.last().map_or(from, |m| m.id);
        EntryOutcome {
            notify: None,
            messages,
            more: more.then_some(Cursor {
                conversation,
                last_id: last,
            }),
        }
    }

    /// The tier of a conversation as last listed (1 until known).
    pub fn tier(&self, conversation: u64) -> u8 {
        self.tiers.get(&conversation).copied().unwrap_or(1)
    }
}

/// The smallest id span covering `window` (a resume's overlap).
pub fn window_ids(window: std::time::Duration) -> u64 {
    min_id_at(tiercast_schemas::ids::EPOCH_MS + window.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn map<const N: usize>(pairs: [(u64, u64); N]) -> IdMap<u64> {
        pairs.into_iter().collect()
    }

    fn entry(tier: u8, latest_id: u64) -> SyncEntry {
        SyncEntry {
            conversation: 9,
            tier,
            messages: Vec::new(),
            latest_id,
            read_id: 0,
            more: false,
        }
    }

    #[test]
    fn a_first_connect_starts_messages_at_the_connection_not_at_the_listing() {
        // The listing ran after a message was stored (its latest id) but
        // before that message arrived live: the cursor must stay below it,
        // so that if this connection ends first, the next resume syncs it.
        let connected_ms = tiercast_schemas::ids::EPOCH_MS + 1_000_000;
        let in_flight = min_id_at(connected_ms + 2_000) + 7;
        let window = min_id_at(tiercast_schemas::ids::EPOCH_MS + 3_000);
        let start = resume_start(None, None, &entry(2, in_flight), window, Some(connected_ms));
        assert_eq!(start, ResumeStart::StartAt(min_id_at(connected_ms)));
        assert!(min_id_at(connected_ms) < in_flight);
        // The next resume, with no message received meanwhile, syncs from
        // before the in-flight message.
        let ResumeStart::SyncFrom(from) = resume_start(
            Some(min_id_at(connected_ms)),
            None,
            &entry(2, in_flight),
            window,
            None,
        ) else {
            panic!("a known cursor syncs");
        };
        assert!(from < in_flight);
        // Tier 3 carries only the newest id: it starts there.
        assert_eq!(
            resume_start(None, None, &entry(3, in_flight), window, Some(connected_ms)),
            ResumeStart::StartAt(in_flight)
        );
        // A conversation met on a reconnect syncs from `since` (see
        // `resume_inner`).
        assert_eq!(
            resume_start(
                None,
                Some(42),
                &entry(1, in_flight),
                window,
                Some(connected_ms)
            ),
            ResumeStart::SyncFrom(42)
        );
    }

    #[test]
    fn a_resume_after_an_unfinished_one_keeps_its_gap_and_learns_new_conversations() {
        // The first connection's resume never finished (it pinned no
        // cursors: a first connect); live traffic then took conversation 1
        // to 50 and the connection was lost with 51 in flight.
        let mut resume_from = Some(IdMap::default());
        let ended = map([(1, 50)]);
        let s = resume_snapshot(&mut resume_from, ended);
        assert_eq!(s, map([(1, 50)]), "from where the connection ended");
        // That resume fails too; meanwhile live traffic on the second
        // connection took 1 to 90 and met conversation 2 at 70. The third
        // connection still starts conversation 1 at 50 (51 is in the gap)
        // and conversation 2 at 70.
        let s = resume_snapshot(&mut resume_from, map([(1, 90), (2, 70)]));
        assert_eq!(s, map([(1, 50), (2, 70)]));
        // A finished resume clears it: the next starts where the last
        // connection ended.
        let mut done = None;
        assert_eq!(resume_snapshot(&mut done, map([(1, 95)])), map([(1, 95)]));
    }

    #[test]
    fn a_conversation_without_a_cursor_on_a_reconnect_syncs_from_a_connection_start() {
        let t0 = tiercast_schemas::ids::EPOCH_MS + 1_000_000;
        let mut st = State {
            first_connected_ms: Some(t0),
            connected_at_ms: Some(t0),
            ..State::default()
        };
        assert_eq!(
            st.new_conversation_since(3_000),
            None,
            "the first connection"
        );
        // The first connection ended before its listing completed (60 s
        // in): every conversation is new, and the live path has reached
        // the device since it began, so that is where they sync from (not
        // the disconnect: messages in flight then were sent before it).
        st.disconnected_at_ms = Some(t0 + 60_000);
        assert_eq!(
            st.new_conversation_since(3_000),
            Some(min_id_at(t0 - 3_000))
        );
        // A later connection's listing completed: conversations joined
        // since sync from that connection's start.
        st.listed_from_ms = Some(t0 + 70_000);
        assert_eq!(
            st.new_conversation_since(3_000),
            Some(min_id_at(t0 + 67_000))
        );
    }

    #[test]
    fn a_devices_own_send_is_seen_but_does_not_move_its_cursor() {
        let mut st = State::default();
        let other = |id| Message {
            id,
            conversation: 9,
            sender: 2,
            sender_client: 20,
            body: Bytes::new(),
        };
        assert!(st.accept(&other(100), 0));
        // Its own message 500 acked while 300 (someone else's) is still on
        // its way: the cursor stays at 100, so a resume after a lost
        // connection syncs from before 300.
        st.seen_own(9, 500);
        assert_eq!(st.cursors[&9], 100);
        assert!(st.accept(&other(300), 0), "the older message still arrives");
        assert!(!st.accept(&other(500), 0), "its own message is a duplicate");
        assert_eq!(st.cursors[&9], 300);
    }

    #[test]
    fn marks_only_move_forward() {
        let mut marks = IdMap::default();
        assert!(advance(&mut marks, 1, 5));
        assert!(!advance(&mut marks, 1, 5), "the same id is not newer");
        assert!(!advance(&mut marks, 1, 3), "an older one neither");
        assert_eq!(marks[&1], 5);
        assert!(advance(&mut marks, 1, 9));
        assert!(advance(&mut marks, 2, 1), "per conversation");
    }

    #[test]
    fn messages_are_accepted_once_and_move_the_cursor() {
        let mut st = State::default();
        let m = |id| Message {
            id,
            conversation: 9,
            sender: 1,
            sender_client: 1,
            body: Bytes::new(),
        };
        assert!(st.accept(&m(5), 1));
        assert!(!st.accept(&m(5), 1));
        assert!(st.accept(&m(3), 1), "an older id is still new");
        assert_eq!(st.cursors[&9], 5);
        for id in 10..(10 + SEEN_PRUNE_AT as u64 + 10) {
            assert!(st.accept(&m(id), 4));
        }
        assert!(st.seen[&9].len() <= SEEN_PRUNE_AT);
    }

    #[test]
    fn seen_ids_agree_with_a_set_whatever_the_order() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut seen = SeenIds::default();
            let mut set = std::collections::BTreeSet::new();
            // Mostly rising ids, some repeats and older ones, some pruning.
            let mut next = 1_000u64;
            for _ in 0..300 {
                let id = match rng.random_range(0..10) {
                    0..=5 => {
                        next += rng.random_range(1..5);
                        next
                    }
                    6..=8 => rng.random_range(900..=next),
                    _ => {
                        let from = rng.random_range(900..=next);
                        seen.prune_below(from);
                        set = set.split_off(&from);
                        continue;
                    }
                };
                assert_eq!(seen.insert(id), set.insert(id), "id {id}");
                assert_eq!(seen.len(), set.len());
            }
            assert!(seen.0.iter().copied().eq(set.iter().copied()));
        }
    }
}
