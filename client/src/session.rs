//! A device that stays connected: [`Session`] reconnects by itself
//! (exponential backoff with full jitter, rotating over the edges it was
//! given), resumes where it left off (its inbox arrives again, its cursors
//! are synced), drops duplicates by message id, and acks tier-1 messages.
//!
//! What the app sees is a stream of [`Event`]s in which every message
//! appears once, whichever way it came (live, inbox, sync).
//!
//! Resuming: a cursor is the newest id a device has per conversation. Ids
//! are time-ordered but two senders' messages can be published out of id
//! order by a few milliseconds, so a resume syncs from [`SessionConfig::
//! resync_window`] before the cursor and lets deduplication drop the overlap.
//!
//! A cursor only ever moves to an id the device received. A conversation a
//! device meets on its first connect starts at that connection's start
//! (the moment from which the live path reaches it), not at the listing's
//! latest id: a message stored before the listing but still on its way
//! live would otherwise sit below the cursor, and if that connection then
//! ended, no resume would look for it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tiercast_schemas::ids::min_id_at;
use tiercast_schemas::wire::{Cursor, ErrorCode, Message, SyncEntry};
use tokio::sync::{Notify, mpsc, watch};

use crate::connection::{Client, ClientConfig, ClientError, Delivery, SendOk};
use crate::reconnect::Reconnect;
use crate::reorder::Reorder;

/// Gives the token for the next (re)connect: a long-lived device refreshes
/// its token here.
pub type TokenSource = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct SessionConfig {
    /// Edges to connect to; after a failure the next one is tried.
    pub edges: Vec<SocketAddr>,
    /// How each connection is made. Its `addr` and `token` are not used:
    /// each connect goes to the edge [`crate::reconnect::Reconnect`]
    /// picks, with a token from [`SessionConfig::token`]; and its
    /// `client_id` is the device id the edge issued to this device before
    /// (kept by the app), or 0 for a new device: the first Welcome then
    /// carries the issued id ([`Event::Connected`], [`Session::client_id`]),
    /// and the session uses it for every reconnect.
    pub client: ClientConfig,
    pub token: TokenSource,
    /// Backoff: the n-th consecutive failure waits a random time in
    /// `0..=min(cap, base * 2^n)` ("full jitter").
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Messages per conversation per Sync page.
    pub sync_limit: u32,
    /// How far before a cursor a resume syncs from.
    pub resync_window: Duration,
    /// Connections go through this endpoint (one UDP socket for many
    /// sessions); without one the session makes its own.
    pub endpoint: Option<quinn::Endpoint>,
    pub event_buffer: usize,
    /// Also report each dropped duplicate as [`Event::Duplicate`] (load
    /// generators count them per conversation).
    pub report_duplicates: bool,
    /// How long a live message is held to put it in id order when several
    /// engine nodes publish to its conversation (see [`crate::reorder`]);
    /// with one engine node nothing is held. Zero: never hold.
    pub reorder_window: Duration,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("edges", &self.edges)
            .field("client_id", &self.client.client_id)
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    pub fn new(edges: Vec<SocketAddr>, trusted_pem: String, token: String, client_id: u64) -> Self {
        let first = edges
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            edges,
            client: ClientConfig::new(first, trusted_pem, String::new(), client_id),
            token: Arc::new(move || token.clone()),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            sync_limit: 200,
            resync_window: Duration::from_secs(3),
            endpoint: None,
            event_buffer: 65_536,
            report_duplicates: false,
            reorder_window: Duration::from_millis(20),
        }
    }
}

/// What a session tells its app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Connected (again). `client_id` is this device's id, issued by the
    /// edge on the first connect: keep it to reconnect as the same device.
    Connected { edge: SocketAddr, client_id: u64 },
    /// A message, once per id whichever way it arrived.
    Message(Message),
    /// A tier-3 message exists (pull it to show it).
    Notify { conversation: u64, message_id: u64 },
    /// The user read up to here on another device.
    ReadMarker { conversation: u64, message_id: u64 },
    /// The connection ended; the session reconnects.
    Disconnected { error: ClientError },
    /// A message that was dropped as already seen, or a tier-3
    /// notification not newer than the last one (only with
    /// [`SessionConfig::report_duplicates`]).
    Duplicate { conversation: u64, message_id: u64 },
    /// The session gave up (a refused token, too many devices): it will not
    /// reconnect.
    Stopped { error: ClientError },
}

/// Counters of a session, exact.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub connects: AtomicU64,
    /// Message frames received (live, inbox or sync), before deduplication.
    pub received: AtomicU64,
    /// Of those, dropped as already seen.
    pub duplicates: AtomicU64,
    pub syncs: AtomicU64,
    pub acked: AtomicU64,
    /// Resume syncs that failed and were tried again.
    pub resume_retries: AtomicU64,
    /// Resumes that finished (every conversation synced): one per
    /// connection when the device is caught up.
    pub resumes: AtomicU64,
    /// Live messages held by the reorder window, of those put back in id
    /// order, and messages released after a larger id (later than the
    /// window: seen out of order).
    pub held: AtomicU64,
    pub reordered: AtomicU64,
    pub late: AtomicU64,
    /// Tier-3 notifications dropped: their id was not newer than the
    /// conversation's cursor (a repeat, or older than one already shown).
    pub notifies_dropped: AtomicU64,
}

/// Errors after which reconnecting cannot help.
fn is_fatal(e: &ClientError) -> bool {
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
fn ends_session(e: &ClientError) -> bool {
    matches!(e.code(), Some(ErrorCode::ConnectionReplaced))
}

/// Errors a request is retried after (on the next connection).
fn is_retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Connect(_) | ClientError::Closed { .. } | ClientError::Timeout(_) => true,
        ClientError::Refused { code, .. } => *code == ErrorCode::Unavailable,
        ClientError::RateLimited { .. } => true,
        ClientError::Protocol(_) => false,
    }
}

/// Per-conversation resume state.
#[derive(Debug, Default)]
struct State {
    cursors: HashMap<u64, u64>,
    /// Recently seen ids per conversation (pruned below the cursor minus the
    /// window).
    seen: HashMap<u64, BTreeSet<u64>>,
    tiers: HashMap<u64, u8>,
    read: HashMap<u64, u64>,
    /// When the last connection ended (Unix ms, the edge's time); `None`
    /// until one has.
    disconnected_at_ms: Option<u64>,
    /// When the current connection began (Unix ms, the edge's time, taken
    /// before its handshake): the live path reaches the device from then.
    connected_at_ms: Option<u64>,
    /// When the first connection began (the same clock).
    first_connected_ms: Option<u64>,
    /// The start of the connection whose listing of conversations last
    /// completed: every conversation listed then has a cursor since.
    listed_from_ms: Option<u64>,
    /// The cursors a resume started from, until it completes.
    resume_from: Option<HashMap<u64, u64>>,
    /// Per conversation, the id the last resume synced from (for
    /// diagnosis: [`Session::resumed_from`]).
    synced_from: HashMap<u64, u64>,
}

/// Moves a per-conversation high-water mark (a cursor, a read marker) to
/// `id` if that is newer; true if it moved.
fn advance(marks: &mut HashMap<u64, u64>, conversation: u64, id: u64) -> bool {
    let mark = marks.entry(conversation).or_insert(0);
    let newer = id > *mark;
    *mark = (*mark).max(id);
    newer
}

/// Ids to keep per conversation before pruning.
const SEEN_PRUNE_AT: usize = 4_096;

impl State {
    /// Where a conversation without a cursor syncs from on this
    /// connection: `None` on the first (it starts at the connection's
    /// start); afterwards the start of the connection whose listing last
    /// completed, or of the first connection if none did, less the window
    /// (see `resume_inner`).
    fn new_conversation_since(&self, window_ms: u64) -> Option<u64> {
        self.disconnected_at_ms.map(|_| {
            let from = self.listed_from_ms.or(self.first_connected_ms).unwrap_or(0);
            min_id_at(from.saturating_sub(window_ms))
        })
    }

    /// Records the device's own sent message as seen (a sync or live copy
    /// of it is a duplicate) without moving the cursor.
    fn seen_own(&mut self, conversation: u64, id: u64) {
        self.seen.entry(conversation).or_default().insert(id);
    }

    /// Records a message; false if it was seen before.
    fn accept(&mut self, m: &Message, window_ids: u64) -> bool {
        let seen = self.seen.entry(m.conversation).or_default();
        if !seen.insert(m.id) {
            return false;
        }
        advance(&mut self.cursors, m.conversation, m.id);
        if seen.len() > SEEN_PRUNE_AT {
            let cursor = self.cursors[&m.conversation];
            let keep_from = cursor.saturating_sub(window_ids.saturating_mul(2));
            *seen = seen.split_off(&keep_from);
        }
        true
    }
}

struct Inner {
    cfg: SessionConfig,
    state: Mutex<State>,
    current: watch::Sender<Option<Client>>,
    closing: AtomicBool,
    close: Notify,
    stats: Arc<SessionStats>,
    acks: Mutex<Vec<u64>>,
    /// The device id in use: the configured one, or the one issued on the
    /// first connect.
    client_id: AtomicU64,
    reorder: Mutex<Reorder>,
}

/// A self-healing device session. Drop or [`Session::close`] ends it.
pub struct Session {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

/// The events of a session, in order.
pub type Events = mpsc::Receiver<Event>;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client_id", &self.client_id())
            .finish()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(c) = self.inner.current.borrow().as_ref() {
            c.close();
        }
    }
}

impl Session {
    /// Starts connecting in the background; the app reads the events.
    pub fn start(cfg: SessionConfig) -> (Self, Events) {
        assert!(!cfg.edges.is_empty(), "a session needs at least one edge");
        let cfg_client_id = cfg.client.client_id;
        let reorder = Mutex::new(Reorder::new(cfg.reorder_window));
        let (tx, events) = mpsc::channel(cfg.event_buffer);
        let inner = Arc::new(Inner {
            cfg,
            state: Mutex::new(State::default()),
            current: watch::channel(None).0,
            closing: AtomicBool::new(false),
            close: Notify::new(),
            stats: Arc::default(),
            acks: Mutex::new(Vec::new()),
            client_id: AtomicU64::new(cfg_client_id),
            reorder,
        });
        let task = tokio::spawn(supervise(inner.clone(), tx));
        (Self { inner, task }, events)
    }

    pub fn stats(&self) -> Arc<SessionStats> {
        self.inner.stats.clone()
    }

    /// The id the last resume synced `conversation` from (messages after
    /// it were asked for), and the device's cursor there now: what a lost
    /// message is checked against.
    pub fn resumed_from(&self, conversation: u64) -> (Option<u64>, Option<u64>) {
        let st = self.inner.state.lock().expect("state lock");
        (
            st.synced_from.get(&conversation).copied(),
            st.cursors.get(&conversation).copied(),
        )
    }

    /// This device's id: 0 until the edge has issued one (a new device
    /// before its first connect).
    pub fn client_id(&self) -> u64 {
        self.inner.client_id.load(Ordering::Relaxed)
    }

    /// The current connection, waiting up to `within` for one.
    pub async fn client(&self, within: Duration) -> Result<Client, ClientError> {
        let mut rx = self.inner.current.subscribe();
        let got = tokio::time::timeout(within, rx.wait_for(Option::is_some))
            .await
            .map_err(|_| ClientError::Timeout(within))?
            .map_err(|_| ClientError::Connect("session stopped".into()))?;
        Ok(got.clone().expect("waited for Some"))
    }

    /// A watch on the current connection (`None` while reconnecting).
    pub fn current(&self) -> watch::Receiver<Option<Client>> {
        self.inner.current.subscribe()
    }

    /// Sends, retrying across reconnects until `within` passes. The
    /// client message id makes the retries safe: the edge stores the
    /// message once and answers every retry with the first id.
    pub async fn send(
        &self,
        conversation: u64,
        client_msg_id: u64,
        body: Bytes,
        within: Duration,
    ) -> Result<SendOk, ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let client = self.client(left).await?;
            match client.send(conversation, client_msg_id, body.clone()).await {
                Ok(ok) => {
                    // The device has its own message: a later sync must not
                    // hand it back as new. Seen, but the cursor stays: it
                    // moves only with what arrived, and others' messages
                    // older than this one may still be on their way (a
                    // cursor moved past them would let a resume skip them
                    // if this connection ended first).
                    self.inner
                        .state
                        .lock()
                        .expect("state lock")
                        .seen_own(conversation, ok.message_id);
                    return Ok(ok);
                }
                Err(e) if is_retryable(&e) && tokio::time::Instant::now() < deadline => {
                    // Rate limited: as long as the edge says (bounded by the
                    // deadline); otherwise a short pause before the retry.
                    let pause = match &e {
                        ClientError::RateLimited { retry_after, .. } => *retry_after,
                        _ => Duration::from_millis(20),
                    };
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    tokio::time::sleep(pause.min(left)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Marks a conversation read up to `message_id` (the other devices see
    /// it at once).
    pub async fn read(
        &self,
        conversation: u64,
        message_id: u64,
        within: Duration,
    ) -> Result<(), ClientError> {
        let client = self.client(within).await?;
        client.read(conversation, message_id).await
    }

    /// The newest read marker this device knows for a conversation.
    pub fn read_marker(&self, conversation: u64) -> Option<u64> {
        self.inner
            .state
            .lock()
            .expect("state lock")
            .read
            .get(&conversation)
            .copied()
    }

    /// Drops the current connection as a network blip would; the session
    /// reconnects and resumes by itself.
    pub fn reconnect(&self) {
        if let Some(c) = self.inner.current.borrow().as_ref() {
            c.close();
        }
    }

    /// Stops reconnecting and closes the connection.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.close.notify_waiters();
        if let Some(c) = self.inner.current.borrow().as_ref() {
            c.close();
        }
    }
}

impl Inner {
    /// Runs `f` on the reorder window and copies its counts to the stats.
    fn reorder<T>(&self, f: impl FnOnce(&mut Reorder) -> T) -> T {
        let mut r = self.reorder.lock().expect("reorder lock");
        let out = f(&mut r);
        let s = r.stats;
        self.stats.held.store(s.held, Ordering::Relaxed);
        self.stats.reordered.store(s.reordered, Ordering::Relaxed);
        self.stats.late.store(s.late, Ordering::Relaxed);
        out
    }

    fn window_ids(&self) -> u64 {
        min_id_at(tiercast_schemas::ids::EPOCH_MS + self.cfg.resync_window.as_millis() as u64)
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

/// Why one connection ended.
enum Ended {
    /// The edge is draining: reconnect (elsewhere) after this long.
    Drain(Duration),
    Lost(ClientError),
    Closed,
}

async fn supervise(inner: Arc<Inner>, events: mpsc::Sender<Event>) {
    let cfg = &inner.cfg;
    let endpoint = match &cfg.endpoint {
        Some(e) => e.clone(),
        None => {
            let bind: SocketAddr = if cfg.edges[0].is_ipv6() {
                "[::]:0".parse().expect("literal")
            } else {
                "0.0.0.0:0".parse().expect("literal")
            };
            match crate::connection::client_endpoint(bind, 1 << 20) {
                Ok(e) => e,
                Err(e) => {
                    let _ = events
                        .send(Event::Stopped {
                            error: ClientError::Connect(e.to_string()),
                        })
                        .await;
                    return;
                }
            }
        }
    };
    // One TLS state for every connection of this device: the session
    // tickets an edge sends make the next connect a resumption.
    let tls = match &cfg.client.tls {
        Some(t) => Some(t.clone()),
        None => crate::tls::ClientTls::new(&cfg.client.trusted_pem).ok(),
    };
    let mut policy = Reconnect::new(cfg.edges.clone(), cfg.backoff_base, cfg.backoff_cap);
    let mut addr = policy.edge();
    let mut delay = Duration::ZERO;
    while !inner.closing() {
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = inner.close.notified() => return,
            }
        }
        let ccfg = ClientConfig {
            addr,
            token: (cfg.token)(),
            client_id: inner.client_id.load(Ordering::Relaxed),
            tls: tls.clone(),
            ..cfg.client.clone()
        };
        let started_ms = crate::connection::unix_ms();
        let (client, deliveries) = match Client::connect_on(&endpoint, ccfg).await {
            Ok(c) => c,
            Err(e) if is_fatal(&e) => {
                let _ = events.send(Event::Stopped { error: e }).await;
                return;
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "connect failed; backing off");
                (addr, delay) = policy.connect_failed(&mut rand::rng());
                continue;
            }
        };
        policy.connected();
        {
            let mut st = inner.state.lock().expect("state lock");
            let at = started_ms.saturating_add_signed(client.clock_offset_ms);
            st.connected_at_ms = Some(at);
            st.first_connected_ms.get_or_insert(at);
        }
        inner.stats.connects.fetch_add(1, Ordering::Relaxed);
        inner.client_id.store(client.client_id, Ordering::Relaxed);
        inner.current.send_replace(Some(client.clone()));
        let connected = Event::Connected {
            edge: addr,
            client_id: client.client_id,
        };
        if events.send(connected).await.is_err() {
            client.close();
            return;
        }
        let ended = serve_connection(&inner, &client, deliveries, &events).await;
        inner.current.send_replace(None);
        // In the edge's time: a device's own clock may be off by hours.
        let edge_now = crate::connection::unix_ms().saturating_add_signed(client.clock_offset_ms);
        inner.state.lock().expect("state lock").disconnected_at_ms = Some(edge_now);
        match ended {
            Ended::Closed => return,
            Ended::Drain(after) => (addr, delay) = policy.drained(after),
            Ended::Lost(error) if ends_session(&error) => {
                let _ = events.send(Event::Stopped { error }).await;
                return;
            }
            Ended::Lost(error) => {
                if events.send(Event::Disconnected { error }).await.is_err() {
                    return;
                }
                (addr, delay) = policy.lost(&mut rand::rng());
            }
        }
    }
}

/// One connection's life: deliveries in, a resume sync beside them, acks
/// out every few milliseconds.
async fn serve_connection(
    inner: &Arc<Inner>,
    client: &Client,
    mut deliveries: crate::connection::Deliveries,
    events: &mpsc::Sender<Event>,
) -> Ended {
    // The cursors as the last connection left them, taken before this
    // connection's first live message: live traffic on the new edge moves
    // the cursors on at once, and a resume from those would skip what
    // came between the old connection's end and the new one's start. If
    // the last resume did not finish (its connection ended too), this one
    // starts from where that one did.
    let cursors = {
        let mut st = inner.state.lock().expect("state lock");
        let now = st.cursors.clone();
        resume_snapshot(&mut st.resume_from, now)
    };
    let resync = tokio::spawn(resume(
        inner.clone(),
        client.clone(),
        events.clone(),
        cursors,
    ));
    let mut ack_tick = tokio::time::interval(Duration::from_millis(25));
    let ended = loop {
        tokio::select! {
            d = deliveries.recv() => match d {
                Some(Delivery::Message(m)) => {
                    let ready = inner.reorder(|r| r.push(m, Instant::now()));
                    if !deliver_all(inner, ready, events).await {
                        break Ended::Closed;
                    }
                }
                Some(Delivery::Notify { conversation, message_id }) => {
                    let newer = advance(
                        &mut inner.state.lock().expect("state lock").cursors,
                        conversation,
                        message_id,
                    );
                    if !newer {
                        // Already known (or older than what is): dropped,
                        // and counted like a dropped duplicate message.
                        inner.stats.notifies_dropped.fetch_add(1, Ordering::Relaxed);
                        if inner.cfg.report_duplicates
                            && events.send(Event::Duplicate { conversation, message_id }).await.is_err()
                        {
                            break Ended::Closed;
                        }
                    } else if events.send(Event::Notify { conversation, message_id }).await.is_err() {
                        break Ended::Closed;
                    }
                }
                Some(Delivery::ReadMarker { conversation, message_id, .. }) => {
                    if !read_marker(inner, conversation, message_id, events).await {
                        break Ended::Closed;
                    }
                }
                Some(Delivery::Drain { reconnect_after_ms, reason }) => {
                    tracing::debug!(%reason, reconnect_after_ms, "edge draining");
                    flush_acks(inner, client).await;
                    client.close();
                    break Ended::Drain(Duration::from_millis(u64::from(reconnect_after_ms)));
                }
                None if inner.closing() => break Ended::Closed,
                None => {
                    let why = tokio::time::timeout(Duration::from_secs(2), client.closed())
                        .await
                        .unwrap_or(ClientError::Closed {
                            code: ErrorCode::Unspecified,
                            reason: "delivery stream ended".into(),
                        });
                    break Ended::Lost(why);
                }
            },
            () = hold_until(inner.reorder(|r| r.next_due())) => {
                let ready = inner.reorder(|r| r.due(Instant::now()));
                if !deliver_all(inner, ready, events).await {
                    break Ended::Closed;
                }
            }
            _ = ack_tick.tick() => flush_acks(inner, client).await,
            () = inner.close.notified() => {
                flush_acks(inner, client).await;
                client.close();
                break Ended::Closed;
            }
        }
    };
    resync.abort();
    // Whatever the window still holds goes out now (in order).
    let held = inner.reorder(Reorder::flush);
    if !deliver_all(inner, held, events).await {
        return Ended::Closed;
    }
    ended
}

/// Sleeps until `at`; never, for None.
async fn hold_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn deliver_all(inner: &Inner, ms: Vec<Message>, events: &mpsc::Sender<Event>) -> bool {
    for m in ms {
        if !deliver(inner, m, events).await {
            return false;
        }
    }
    true
}

/// Hands a message to the app once; queues its ack (tier 1 only: tiers 2
/// and 3 keep no inbox).
async fn deliver(inner: &Inner, m: Message, events: &mpsc::Sender<Event>) -> bool {
    inner.stats.received.fetch_add(1, Ordering::Relaxed);
    let (fresh, ack) = {
        let mut st = inner.state.lock().expect("state lock");
        let fresh = st.accept(&m, inner.window_ids());
        let tier = st.tiers.get(&m.conversation).copied().unwrap_or(1);
        (fresh, tier == 1)
    };
    if ack {
        // Acked even when a duplicate: the first ack may have been lost
        // with a connection.
        inner.acks.lock().expect("acks lock").push(m.id);
    }
    if !fresh {
        inner.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return !inner.cfg.report_duplicates
            || events
                .send(Event::Duplicate {
                    conversation: m.conversation,
                    message_id: m.id,
                })
                .await
                .is_ok();
    }
    events.send(Event::Message(m)).await.is_ok()
}

async fn read_marker(
    inner: &Inner,
    conversation: u64,
    message_id: u64,
    events: &mpsc::Sender<Event>,
) -> bool {
    let newer = advance(
        &mut inner.state.lock().expect("state lock").read,
        conversation,
        message_id,
    );
    !newer
        || events
            .send(Event::ReadMarker {
                conversation,
                message_id,
            })
            .await
            .is_ok()
}

async fn flush_acks(inner: &Inner, client: &Client) {
    let ids = std::mem::take(&mut *inner.acks.lock().expect("acks lock"));
    if ids.is_empty() {
        return;
    }
    for chunk in ids.chunks(1_000) {
        match client.ack(chunk).await {
            Ok(n) => {
                inner.stats.acked.fetch_add(u64::from(n), Ordering::Relaxed);
            }
            // Unacked entries come again on the next connect.
            Err(e) => tracing::debug!(error = %e, "ack failed"),
        }
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
fn resume_snapshot(
    resume_from: &mut Option<HashMap<u64, u64>>,
    now: HashMap<u64, u64>,
) -> HashMap<u64, u64> {
    let pinned = resume_from.get_or_insert_with(HashMap::new);
    for (conversation, id) in now {
        let c = pinned.entry(conversation).or_insert(id);
        *c = (*c).min(id);
    }
    pinned.clone()
}

/// After (re)connecting: list the user's conversations, then sync every
/// cursor from a little before it, page by page. The cursors are those the
/// previous connection ended with (taken before any live message of this
/// one). A failed sync (the store unavailable, rate limited) is retried
/// with backoff for as long as the connection lives, from those same
/// cursors: live traffic meanwhile moves the cursors on, and a retry from
/// those would leave the gap before them unfilled.
async fn resume(
    inner: Arc<Inner>,
    client: Client,
    events: mpsc::Sender<Event>,
    cursors: HashMap<u64, u64>,
) {
    let mut pinned = Pinned {
        listing: None,
        cursors: Some(cursors),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match resume_inner(&inner, &client, &events, &mut pinned).await {
            Ok(()) => {
                inner.state.lock().expect("state lock").resume_from = None;
                inner.stats.resumes.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                let wait = match &e {
                    ClientError::RateLimited { retry_after, .. } => (*retry_after).max(backoff),
                    _ => backoff,
                };
                tracing::debug!(error = %e, ?wait, "resume sync failed; retrying");
                inner.stats.resume_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What a resume's retries start from: the listing and the cursors as they
/// were at its first attempt.
#[derive(Default)]
struct Pinned {
    listing: Option<Vec<SyncEntry>>,
    cursors: Option<HashMap<u64, u64>>,
}

/// Where a resume takes up one listed conversation.
#[derive(Debug, PartialEq, Eq)]
enum ResumeStart {
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
fn resume_start(
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

async fn resume_inner(
    inner: &Inner,
    client: &Client,
    events: &mpsc::Sender<Event>,
    pinned: &mut Pinned,
) -> Result<(), ClientError> {
    let cfg = &inner.cfg;
    let window = inner.window_ids();
    let listing = match &pinned.listing {
        Some(l) => l.clone(),
        None => {
            let l = client.sync(&[], cfg.sync_limit).await?;
            inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
            pinned.listing = Some(l.clone());
            l
        }
    };
    let mut markers = Vec::new();
    let mut cursors = Vec::new();
    {
        let mut st = inner.state.lock().expect("state lock");
        // A conversation without a cursor: on the first connection it
        // starts at the connection's start (see `resume_start`). On a later
        // one it syncs from the start of the connection whose listing last
        // completed (the device joined it after that listing, and the live
        // path may have been carrying its messages since), or from the
        // first connection's start if no listing ever completed (then every
        // conversation is new, and the live path has been reaching the
        // device since then). Not from the last disconnect: messages in
        // flight when that connection ended were sent before it.
        let since = st.new_conversation_since(cfg.resync_window.as_millis() as u64);
        st.listed_from_ms = st.connected_at_ms;
        // The cursors as they were when this resume began (see `resume`).
        let snapshot = pinned
            .cursors
            .get_or_insert_with(|| st.cursors.clone())
            .clone();
        for e in &listing {
            st.tiers.insert(e.conversation, e.tier);
            if e.read_id > st.read.get(&e.conversation).copied().unwrap_or(0) {
                markers.push((e.conversation, e.read_id));
            }
            // Not the cursor as live traffic on this connection has moved
            // it (see `resume_snapshot`): a conversation without one in
            // the snapshot is new to the device.
            let current = snapshot.get(&e.conversation).copied();
            let cursor = match resume_start(current, since, e, window, st.connected_at_ms) {
                ResumeStart::SyncFrom(id) => id,
                ResumeStart::StartAt(id) => {
                    // Live traffic may have moved it on already: kept.
                    let c = st.cursors.entry(e.conversation).or_insert(id);
                    *c = (*c).max(id);
                    continue;
                }
            };
            st.synced_from.insert(e.conversation, cursor);
            cursors.push(Cursor {
                conversation: e.conversation,
                last_id: cursor,
            });
        }
    }
    for (conversation, id) in markers {
        read_marker(inner, conversation, id, events).await;
    }
    while !cursors.is_empty() {
        let batch: Vec<Cursor> = cursors.drain(..cursors.len().min(64)).collect();
        let entries = client.sync(&batch, cfg.sync_limit).await?;
        inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
        for SyncEntry {
            conversation,
            tier,
            messages,
            latest_id,
            more,
            ..
        } in entries
        {
            let from = batch
                .iter()
                .find(|c| c.conversation == conversation)
                .map_or(0, |c| c.last_id);
            inner
                .state
                .lock()
                .expect("state lock")
                .tiers
                .insert(conversation, tier);
            if tier == 3 {
                let newer = advance(
                    &mut inner.state.lock().expect("state lock").cursors,
                    conversation,
                    latest_id,
                );
                if newer {
                    let _ = events
                        .send(Event::Notify {
                            conversation,
                            message_id: latest_id,
                        })
                        .await;
                }
                continue;
            }
            let last = messages.last().map_or(from, |m| m.id);
            for m in messages {
                if !deliver(inner, m, events).await {
                    return Ok(());
                }
            }
            if more {
                cursors.push(Cursor {
                    conversation,
                    last_id: last,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut resume_from = Some(HashMap::new());
        let ended = HashMap::from([(1, 50)]);
        let s = resume_snapshot(&mut resume_from, ended);
        assert_eq!(
            s,
            HashMap::from([(1, 50)]),
            "from where the connection ended"
        );
        // That resume fails too; meanwhile live traffic on the second
        // connection took 1 to 90 and met conversation 2 at 70. The third
        // connection still starts conversation 1 at 50 (51 is in the gap)
        // and conversation 2 at 70.
        let s = resume_snapshot(&mut resume_from, HashMap::from([(1, 90), (2, 70)]));
        assert_eq!(s, HashMap::from([(1, 50), (2, 70)]));
        // A finished resume clears it: the next starts where the last
        // connection ended.
        let mut done = None;
        assert_eq!(
            resume_snapshot(&mut done, HashMap::from([(1, 95)])),
            HashMap::from([(1, 95)])
        );
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
        let mut marks = HashMap::new();
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
}
