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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tiercast_schemas::wire::{Cursor, ErrorCode, Message};
use tokio::sync::{Notify, mpsc, watch};

use crate::connection::{Client, ClientConfig, ClientError, Delivery, SendOk};
use crate::reconnect::Reconnect;
use crate::reorder::Reorder;
use crate::resume::{
    Pinned, ResumePlan, SYNC_BATCH, State, advance, ends_session, is_fatal, is_retryable, is_shed,
    resume_snapshot,
};

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
    /// The backoff after an edge shed load (it refused the connect:
    /// `unavailable`), the same full jitter with its own base and cap
    /// (defaults 1 s and 60 s, [`crate::reconnect::SHED_BACKOFF_BASE`]).
    pub shed_backoff_base: Duration,
    pub shed_backoff_cap: Duration,
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
            shed_backoff_base: crate::reconnect::SHED_BACKOFF_BASE,
            shed_backoff_cap: crate::reconnect::SHED_BACKOFF_CAP,
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
    /// Connects the edge shed (refused for load), each followed by the
    /// shed backoff.
    pub shed: AtomicU64,
    /// Of those, refusals that said when to come back (the edge's turn,
    /// waited for instead of the shed backoff).
    pub paced: AtomicU64,
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

impl SessionStats {
    /// A connect the edge shed (`e`, refused for load): counted as shed,
    /// and as paced when it carried the edge's turn, which it returns for
    /// [`Reconnect::refused`](crate::reconnect::Reconnect::refused).
    pub fn count_shed(&self, e: &ClientError) -> Option<Duration> {
        self.shed.fetch_add(1, Ordering::Relaxed);
        let turn = e.turn();
        if turn.is_some() {
            self.paced.fetch_add(1, Ordering::Relaxed);
        }
        turn
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
        crate::resume::window_ids(self.cfg.resync_window)
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
    let mut policy = Reconnect::new(cfg.edges.clone(), cfg.backoff_base, cfg.backoff_cap)
        .with_shed_backoff(cfg.shed_backoff_base, cfg.shed_backoff_cap);
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
            Err(e) if is_shed(&e) => {
                tracing::debug!(%addr, error = %e, "edge shed load; backing off longer");
                let turn = inner.stats.count_shed(&e);
                (addr, delay) = policy.refused(&mut rand::rng(), turn);
                continue;
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
    cursors: crate::resume::IdMap<u64>,
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

async fn resume_inner(
    inner: &Inner,
    client: &Client,
    events: &mpsc::Sender<Event>,
    pinned: &mut Pinned,
) -> Result<(), ClientError> {
    let cfg = &inner.cfg;
    let listing = match &pinned.listing {
        Some(l) => l.clone(),
        None => {
            let l = client.sync(&[], cfg.sync_limit).await?;
            inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
            pinned.listing = Some(l.clone());
            l
        }
    };
    let ResumePlan {
        markers,
        mut cursors,
    } = inner.state.lock().expect("state lock").plan_resume(
        &listing,
        pinned,
        inner.window_ids(),
        cfg.resync_window.as_millis() as u64,
    );
    for (conversation, id) in markers {
        read_marker(inner, conversation, id, events).await;
    }
    while !cursors.is_empty() {
        let batch: Vec<Cursor> = cursors.drain(..cursors.len().min(SYNC_BATCH)).collect();
        let entries = client.sync(&batch, cfg.sync_limit).await?;
        inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
        for entry in entries {
            let from = batch
                .iter()
                .find(|c| c.conversation == entry.conversation)
                .map_or(0, |c| c.last_id);
            let out = inner
                .state
                .lock()
                .expect("state lock")
                .take_entry(entry, from);
            if let Some((conversation, message_id)) = out.notify {
                let _ = events
                    .send(Event::Notify {
                        conversation,
                        message_id,
                    })
                    .await;
            }
            for m in out.messages {
                if !deliver(inner, m, events).await {
                    return Ok(());
                }
            }
            cursors.extend(out.more);
        }
    }
    Ok(())
}
