//! The edge server: the QUIC accept loop, the backplane fan-out loop, and
//! shutdown. [`Edge::run`] is the one entry point that `tiercast` and the
//! tests both call.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::collections::{HashMap, HashSet};
use tiercast_engine::Engine;
use tiercast_engine::auth::TokenKeys;

use tiercast_engine::backplane::{
    Inbound, Subscriber, node_channel, parse_node_channel, parse_user_channel,
};
use tiercast_engine::store::Device;
use tiercast_schemas::envelope::{Envelope, Payload, Tier};
use tiercast_schemas::wire::{ErrorCode, Message, ServerBody, ServerFrame};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::core::pacer::Pacer;
use crate::core::{Cmd, ConnRef, Limits, Listener, Shard, Shards};

use crate::config::EdgeConfig;
use crate::conversations::LocalConversations;
use crate::metrics::EdgeMetrics;
use crate::sessions::Sessions;

/// Locks that serialise route changes per conversation, striped so that
/// unrelated ones do not wait on each other.
const STRIPES: usize = 64;

/// Locks that serialise subscribe/unsubscribe per user, striped likewise.
/// A connect holds its stripe across a batched store read (the user's
/// conversations), so a stripe shared by many connecting users makes them
/// take turns at that read: with 64 stripes a reconnect storm's 2,000
/// Hellos in flight queued some 30 deep behind each (p90 of
/// `tiercast_edge_hello_attach_seconds` 3.3 s, docs/benchmarks.md).
/// 4,096 stripes cost about 160 KiB per edge.
const USER_STRIPES: usize = 4096;

/// The edge's liveness lease in the routing table. Renewed every third of
/// it: a dead edge stops receiving tier 2/3 traffic within 6 s.
const LIVENESS_TTL: Duration = Duration::from_secs(6);

/// Messages the pull path keeps: a tier-3 wave is read by many devices
/// within seconds, then rarely again.
const PULL_CACHE_ENTRIES: u64 = 100_000;
const PULL_CACHE_TTL: Duration = Duration::from_secs(120);
/// How far ahead of this edge's clock a pulled id may be before it is
/// refused without a store read: the clock skew between engine nodes and
/// edges that is tolerated.
const PULL_FUTURE_SLACK_MS: u64 = 2_000;

/// How long an idle (user, conversation) read marker is remembered to keep
/// markers from moving back. Two Reads' publishes cross within
/// milliseconds; an hour is far beyond that.
const READ_HIGH_TTI: Duration = Duration::from_secs(3_600);

/// State shared by the edge's tasks.
pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub keys: TokenKeys,
    pub cfg: EdgeConfig,
    pub sessions: Sessions<ConnRef>,
    pub subscriber: Arc<dyn Subscriber>,
    pub subscription_locks: Vec<tokio::sync::Mutex<()>>,
    pub metrics: EdgeMetrics,
    /// Conversations of the users connected here (tiers 2 and 3).
    pub conversations: LocalConversations,
    /// Conversations this edge has announced in the routing table.
    announced: std::sync::Mutex<HashSet<u64>>,
    /// Conversations whose route update failed; the heartbeat retries them.
    route_retry: std::sync::Mutex<HashSet<u64>>,
    route_locks: Vec<tokio::sync::Mutex<()>>,
    /// Tier-3 bodies by (conversation, id); loads are single-flight.
    pull_cache: moka::future::Cache<(u64, u64), Message>,
    /// The newest id this edge has fanned out per conversation (tiers 2
    /// and 3): a device learns of a tier-3 id from a Notify that passed
    /// here first, so a pull above it is for a message that does not exist
    /// (yet), answered without a store read.
    newest_seen: moka::sync::Cache<u64, u64>,
    /// Gaps the backplane reported (dropped payloads) that the repairer
    /// has not taken yet, merged; `gap_wake` wakes it.
    gaps: std::sync::Mutex<Option<Gap>>,
    gap_wake: tokio::sync::Notify,
    /// The largest read marker sent from here per (user, conversation): a
    /// marker never moves back on the wire, even when two Reads' publishes
    /// cross (the engine also drops a Read below the stored marker).
    read_high: moka::sync::Cache<(u64, u64), u64>,
    next_conn: AtomicU64,
    /// Request buckets per user (each connection has its own as well).
    pub user_limits: crate::limits::UserLimits,
}

impl Shared {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn subscription_lock(&self, user: u64) -> &tokio::sync::Mutex<()> {
        &self.subscription_locks[(user % USER_STRIPES as u64) as usize]
    }

    /// This edge's id in the routing table and node channels: its engine's
    /// (leased) node id.
    pub fn edge_id(&self) -> u16 {
        self.engine.node_id()
    }

    /// Brings the routing table's entry for (conversation, this edge) in
    /// line with whether a local user is in the conversation now. Applying
    /// the current state under a per-conversation lock makes concurrent
    /// joins and leaves converge, whatever order they run in.
    pub async fn sync_route(&self, conv: u64) {
        let _guard = self.route_locks[(conv % STRIPES as u64) as usize]
            .lock()
            .await;
        let want = self.conversations.hosts(conv);
        let have = self
            .announced
            .lock()
            .expect("announced lock")
            .contains(&conv);
        if want == have {
            self.route_retry
                .lock()
                .expect("route_retry lock")
                .remove(&conv);
            return;
        }
        let routes = self.engine.routes();
        let result = if want {
            routes.add(conv, self.edge_id()).await
        } else {
            routes.remove(conv, self.edge_id()).await
        };
        match result {
            Ok(()) => {
                let mut a = self.announced.lock().expect("announced lock");
                if want {
                    a.insert(conv);
                } else {
                    a.remove(&conv);
                }
                self.route_retry
                    .lock()
                    .expect("route_retry lock")
                    .remove(&conv);
            }
            Err(e) => {
                tracing::warn!(conv, error = %e, "route update failed; retried with the next heartbeat");
                self.route_retry
                    .lock()
                    .expect("route_retry lock")
                    .insert(conv);
            }
        }
    }

    /// Records a gap the backplane reported before the payload about to be
    /// handled: every conversation's newest id fanned out so far is where
    /// its repair starts (each dropped message is newer than those), and
    /// the repairer is woken.
    fn note_gap(&self, kinds: u8) {
        self.metrics.backplane_gaps.inc();
        let marks: HashMap<u64, u64> = self.newest_seen.iter().map(|(k, v)| (*k, v)).collect();
        let mut gaps = self.gaps.lock().expect("gaps lock");
        match gaps.as_mut() {
            None => {
                *gaps = Some(Gap {
                    kinds,
                    marks,
                    at_ms: tiercast_engine::snowflake::now_unix_ms(),
                })
            }
            Some(g) => g.merge(kinds, &marks),
        }
        drop(gaps);
        self.gap_wake.notify_one();
    }

    /// Remembers the newest id fanned out in a conversation.
    fn saw(&self, conv: u64, id: u64) {
        self.newest_seen
            .entry(conv)
            .and_upsert_with(|old| old.map_or(id, |o| o.into_value().max(id)));
    }

    /// A tier-3 body for a member, read from the store at most once per
    /// edge however many devices ask at once. A miss is not cached (ids are
    /// predictable: a cached miss for the next id would hide that message
    /// from this edge's devices for the cache's lifetime), and an id from
    /// the future is answered without a store read.
    pub async fn pull(&self, conv: u64, id: u64) -> Result<Option<Message>, String> {
        self.metrics.pull_requests.inc();
        let horizon = tiercast_engine::snowflake::min_id_at(
            tiercast_engine::snowflake::now_unix_ms() + PULL_FUTURE_SLACK_MS,
        );
        if id >= horizon {
            return Ok(None);
        }
        // Above the newest id fanned out here: not a message (yet). (An
        // edge that has fanned out nothing in the conversation since it
        // started asks the store.)
        if self
            .newest_seen
            .get(&conv)
            .is_some_and(|newest| id > newest)
        {
            return Ok(None);
        }
        let engine = self.engine.clone();
        let reads = self.metrics.pull_store_reads.clone();
        let found = self
            .pull_cache
            .try_get_with((conv, id), async move {
                reads.inc();
                match engine.store().message(conv, id).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(None),
                    Err(e) => Err(Some(e.to_string())),
                }
            })
            .await;
        match found {
            Ok(m) => Ok(Some(m)),
            Err(e) => match e.as_ref() {
                None => Ok(None),
                Some(e) => Err(e.clone()),
            },
        }
    }
}

pub struct Edge {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<Inbound>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Edge")
    }
}

impl Edge {
    /// An edge serving `engine`'s conversations, subscribed through its own
    /// backplane subscriber.
    pub async fn new(
        engine: Arc<Engine>,
        keys: TokenKeys,
        cfg: EdgeConfig,
        metrics: EdgeMetrics,
    ) -> Result<Self, tiercast_engine::backplane::BackplaneError> {
        let (subscriber, inbound) = engine.backplane().subscriber(cfg.inbound_queue).await?;
        // The node channels are fixed for the edge's life: no subscription
        // churn as groups come and go.
        for k in 0..engine.config().node_channels {
            subscriber
                .subscribe(&node_channel(engine.node_id(), k))
                .await?;
        }
        let stripes = |n| (0..n).map(|_| tokio::sync::Mutex::new(())).collect();
        let user_limits = crate::limits::UserLimits::new(&cfg.rates);
        Ok(Self {
            shared: Arc::new(Shared {
                engine,
                keys,
                cfg,
                sessions: Sessions::new(),
                subscriber,
                subscription_locks: stripes(USER_STRIPES),
                metrics,
                conversations: LocalConversations::new(),
                announced: std::sync::Mutex::new(HashSet::new()),
                route_retry: std::sync::Mutex::new(HashSet::new()),
                route_locks: stripes(STRIPES),
                pull_cache: moka::future::Cache::builder()
                    .max_capacity(PULL_CACHE_ENTRIES)
                    .time_to_live(PULL_CACHE_TTL)
                    .build(),
                next_conn: AtomicU64::new(1),
                gaps: std::sync::Mutex::new(None),
                gap_wake: tokio::sync::Notify::new(),
                newest_seen: moka::sync::Cache::builder()
                    .max_capacity(PULL_CACHE_ENTRIES)
                    .time_to_idle(PULL_CACHE_TTL)
                    .build(),
                read_high: moka::sync::Cache::builder()
                    .max_capacity(PULL_CACHE_ENTRIES)
                    .time_to_idle(READ_HIGH_TTI)
                    .build(),
                user_limits,
            }),
            inbound,
        })
    }

    /// Serves `listener` (one shard per socket) until `shutdown`
    /// completes, then drains: no new connections, every device told to
    /// reconnect elsewhere after a jittered delay, waited for up to the
    /// drain deadline; then whoever is left is closed.
    pub async fn run(self, listener: Listener, shutdown: impl Future<Output = ()>) {
        let Edge { shared, inbound } = self;
        let limits = Limits {
            slots: Arc::new(Semaphore::new(shared.cfg.max_connections)),
            handshakes: Arc::new(Semaphore::new(shared.cfg.max_handshakes_in_flight)),
            pacer: Arc::new(Pacer::new(
                shared.cfg.max_handshakes_in_flight,
                crate::core::pacer::HORIZON,
            )),
            // New connections per second before addresses must be
            // validated (a stateless Retry, no crypto spent).
            unvalidated: (shared.cfg.retry_above_per_s > 0).then(|| {
                let per_s = std::num::NonZeroU32::new(shared.cfg.retry_above_per_s).expect(">0");
                Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                    per_s,
                )))
            }),
        };
        let mut txs = Vec::new();
        let mut shard_tasks = Vec::new();
        for socket in listener.sockets {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE);
            match Shard::new(
                socket,
                listener.endpoint.clone(),
                listener.server.clone(),
                shared.clone(),
                limits.clone(),
                tx.clone(),
                rx,
            ) {
                Ok(shard) => {
                    shard_tasks.push(tokio::spawn(shard.run()));
                    txs.push(tx);
                }
                Err(e) => tracing::error!(error = %e, "an I/O shard could not start"),
            }
        }
        let shards = Shards::new(txs);
        let fanout = tokio::spawn(fan_out_loop(shared.clone(), inbound, shards.clone()));
        let heartbeat = tokio::spawn(heartbeat(shared.clone()));
        let toucher = tokio::spawn(touch_devices(shared.clone()));
        let repairer = tokio::spawn(repair_gaps(shared.clone(), shards.clone()));
        shutdown.await;
        shared
            .metrics
            .drained
            .inc_by(shared.sessions.connections() as u64);
        let mut done = Vec::new();
        for tx in shards.senders() {
            let (d, r) = oneshot::channel();
            let _ = tx
                .send(Cmd::Drain {
                    spread_ms: shared.cfg.drain_spread_ms,
                    done: d,
                })
                .await;
            done.push(r);
        }
        let deadline = Duration::from_millis(shared.cfg.drain_deadline_ms);
        let _ = tokio::time::timeout(deadline, async {
            for r in done {
                let _ = r.await;
            }
        })
        .await;
        for tx in shards.senders() {
            let _ = tx.send(Cmd::Stop).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(4), async {
            for t in shard_tasks {
                let _ = t.await;
            }
        })
        .await;
        fanout.abort();
        heartbeat.abort();
        toucher.abort();
        repairer.abort();
    }
}

/// Commands queued per shard before the fan-out waits for it.
const SHARD_QUEUE: usize = 8_192;

/// A tier-3 notification frame.
pub(crate) fn notify_frame(conversation: u64, message_id: u64) -> bytes::Bytes {
    ServerFrame::new(
        0,
        ServerBody::Notify {
            conversation,
            message_id,
        },
    )
    .encode()
}

/// How far before the newest id seen here a tier-2 gap repair reads (ids
/// of several engine nodes interleave by their clock skew, bounded below
/// this by `engine.max_clock_skew_ms`).
const REPAIR_WINDOW_MS: u64 = 3_000;

/// Messages read per conversation by one gap repair (the rest reach the
/// devices on their next connect or sync).
const REPAIR_MAX_PER_CONVERSATION: usize = 1_000;

/// Payloads the backplane dropped before this edge could take them, as
/// reported in-stream ([`Inbound::gap_before`]).
#[derive(Debug)]
struct Gap {
    /// [`tiercast_engine::backplane::GAP_USER_CHANNELS`] and/or
    /// [`tiercast_engine::backplane::GAP_NODE_CHANNELS`].
    kinds: u8,
    /// Per conversation, the newest id fanned out here before the gap:
    /// every dropped message of that conversation is newer (tier-2 and 3
    /// payloads of a conversation are published in id order).
    marks: HashMap<u64, u64>,
    /// When the first gap was noted (Unix ms): a conversation without a
    /// mark (none fanned out here for [`PULL_CACHE_TTL`]) is repaired from
    /// that long before it.
    at_ms: u64,
}

impl Gap {
    /// Folds a later gap in: the union of the kinds, and per conversation
    /// the older mark (a conversation marked in only one of the two gets
    /// none, and is repaired from the time bound).
    fn merge(&mut self, kinds: u8, marks: &HashMap<u64, u64>) {
        self.kinds |= kinds;
        self.marks.retain(|conv, mark| match marks.get(conv) {
            Some(&m) => {
                *mark = (*mark).min(m);
                true
            }
            None => false,
        });
    }

    /// Where the repair of `conv` starts.
    fn mark(&self, conv: u64) -> u64 {
        self.marks.get(&conv).copied().unwrap_or_else(|| {
            tiercast_engine::snowflake::min_id_at(
                self.at_ms.saturating_sub(PULL_CACHE_TTL.as_millis() as u64),
            )
        })
    }
}

/// Repairs the gap each time the backplane subscriptions were interrupted
/// and are whole again (a Redis failover, a reconnect, a moved slot), and
/// each time the backplane dropped payloads for this edge (its queue full,
/// its Redis client lagging): payloads meanwhile never reached this edge,
/// and the devices connected here, which stay connected, would not look
/// for them (a later message moves their cursors past the gap). So the
/// edge looks for them: each connected device's pending inbox again
/// (tier 1), each hosted conversation's messages since a little before the
/// newest id fanned out here before the gap (tier 2), and each tier-3
/// conversation's latest id. Devices drop what they already had by id.
/// Repairs run one at a time; gaps reported during one are merged into
/// the next.
async fn repair_gaps(shared: Arc<Shared>, shards: Shards) {
    use tiercast_engine::backplane::{GAP_NODE_CHANNELS, GAP_USER_CHANNELS};
    let mut interruptions = shared.subscriber.interruptions();
    // A backend that is never interrupted has no sender: its watch ends at
    // once, and only reported gaps are left to wait for.
    let mut interruptible = true;
    loop {
        let gap = tokio::select! {
            changed = interruptions.changed(), if interruptible => {
                if changed.is_err() {
                    interruptible = false;
                    continue;
                }
                None
            }
            () = shared.gap_wake.notified() => {
                match shared.gaps.lock().expect("gaps lock").take() {
                    Some(g) => Some(g),
                    None => continue,
                }
            }
        };
        let started = std::time::Instant::now();
        let kinds = gap
            .as_ref()
            .map_or(GAP_USER_CHANNELS | GAP_NODE_CHANNELS, |g| g.kinds);
        let repaired = repair(&shared, &shards, gap.as_ref(), kinds).await;
        shared.metrics.gap_repairs.inc();
        shared.metrics.gap_repair_frames.inc_by(repaired);
        tracing::info!(
            frames = repaired,
            elapsed_ms = started.elapsed().as_millis() as u64,
            dropped_payloads = gap.is_some(),
            "backplane gap repaired from the store"
        );
    }
}

/// Returns the frames handed to the shards (one per device for the inbox,
/// one per local user for the conversations). `gap`: where each
/// conversation's repair starts (without one, at the newest id fanned out
/// here now); `kinds`: which channels' payloads may be missing.
async fn repair(shared: &Shared, shards: &Shards, gap: Option<&Gap>, kinds: u8) -> u64 {
    use tiercast_engine::backplane::{GAP_NODE_CHANNELS, GAP_USER_CHANNELS};
    let engine = &shared.engine;
    let mut frames = 0u64;
    let devices = if kinds & GAP_USER_CHANNELS != 0 {
        shared.sessions.devices()
    } else {
        Vec::new()
    };
    for (user, client) in devices {
        match engine.pending(Device { user, client }, 0).await {
            Ok(page) => {
                for m in page {
                    let frame = ServerFrame::new(0, ServerBody::Message(m)).encode();
                    shards.send_to(user, client, frame).await;
                    frames += 1;
                }
            }
            Err(e) => tracing::warn!(user, error = %e, "gap repair: inbox not read"),
        }
    }
    if kinds & GAP_NODE_CHANNELS == 0 {
        return frames;
    }
    let window = tiercast_engine::snowflake::min_id_at(
        tiercast_engine::snowflake::EPOCH_MS + REPAIR_WINDOW_MS,
    );
    for conv in shared.conversations.all() {
        let tier = match engine.store().conversation(conv).await {
            Ok(Some(c)) => c.tier,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(conv, error = %e, "gap repair: conversation not read");
                continue;
            }
        };
        let newest = shared.newest_seen.get(&conv).unwrap_or(0);
        if tier == Tier::IdOnly {
            // Only the latest id matters: sent unless it went out already.
            let latest = engine
                .store()
                .history(
                    conv,
                    tiercast_engine::store::Page {
                        before: 0,
                        after: 0,
                        limit: 1,
                    },
                )
                .await;
            if let Ok(Some(m)) = latest.map(|p| p.into_iter().next())
                && m.id > newest
            {
                shared.saw(conv, m.id);
                let frame = notify_frame(conv, m.id);
                let users: Arc<[u64]> = shared.conversations.users(conv).into();
                frames += users.len() as u64;
                shards
                    .deliver(users, 0, frame, None, Some((conv, m.id)))
                    .await;
            }
            continue;
        }
        if tier != Tier::Sharded {
            continue;
        }
        let from = gap.map_or(newest, |g| g.mark(conv));
        let mut after = from.saturating_sub(window);
        let mut read = 0;
        while read < REPAIR_MAX_PER_CONVERSATION {
            let page = match engine.store().since(conv, after, 200).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(conv, error = %e, "gap repair: messages not read");
                    break;
                }
            };
            let Some(last) = page.last().map(|m| m.id) else {
                break;
            };
            read += page.len();
            after = last;
            let users: Arc<[u64]> = shared.conversations.users(conv).into();
            for m in page {
                shared.saw(conv, m.id);
                let (except, id) = (m.sender_client, m.id);
                let frame = ServerFrame::new(0, ServerBody::Message(m)).encode();
                frames += users.len() as u64;
                shards
                    .deliver(users.clone(), except, frame, Some(id), None)
                    .await;
            }
        }
    }
    frames
}

/// Refreshes the last-seen time of the devices connected here four times
/// per device TTL, so the device reaper never takes a connected one.
async fn touch_devices(shared: Arc<Shared>) {
    let every = (shared.engine.config().device_ttl_ms / 4).clamp(250, 3_600_000);
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let devices = shared.sessions.devices();
        for chunk in devices.chunks(1_000) {
            if let Err(e) = shared.engine.touch_devices(chunk).await {
                tracing::warn!(error = %e, "last-seen refresh failed");
            }
        }
    }
}

/// Keeps this edge's liveness lease in the routing table, and retries the
/// route updates that failed (a Redis outage): without them tier-2 and
/// tier-3 traffic would not reach this edge's members until the next join
/// or leave in those conversations.
async fn heartbeat(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(LIVENESS_TTL / 3);
    loop {
        tick.tick().await;
        let ttl = LIVENESS_TTL.as_millis() as u64;
        if let Err(e) = shared
            .engine
            .routes()
            .heartbeat(shared.edge_id(), ttl)
            .await
        {
            tracing::warn!(error = %e, "liveness heartbeat failed");
        }
        shared.user_limits.shrink();
        let failed: Vec<u64> = shared
            .route_retry
            .lock()
            .expect("route_retry lock")
            .iter()
            .copied()
            .collect();
        for conv in failed {
            shared.sync_route(conv).await;
        }
    }
}

/// Receives backplane payloads and hands each to the local connections it is
/// for, encoding each client frame once: on a user channel, that user's
/// devices; on a node channel, the local members of the conversation.
async fn fan_out_loop(shared: Arc<Shared>, mut inbound: mpsc::Receiver<Inbound>, shards: Shards) {
    while let Some(msg) = inbound.recv().await {
        shared.metrics.backplane_inbound.inc();
        if msg.gap_before != 0 {
            // Before this payload is handled: the marks are those from
            // before the gap.
            shared.note_gap(msg.gap_before);
        }
        let envelope = match Envelope::decode(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                shared.metrics.backplane_malformed.inc();
                tracing::warn!(channel = %msg.channel, error = %e, "dropping malformed envelope");
                continue;
            }
        };
        let recipients: Vec<u64> = if let Some(user) = parse_user_channel(&msg.channel) {
            vec![user]
        } else if parse_node_channel(&msg.channel).is_some() {
            match &envelope.payload {
                Payload::Deliver { message, .. } => {
                    shared.saw(message.conversation, message.id);
                    shared.conversations.users(message.conversation)
                }
                Payload::Notify {
                    conversation,
                    message_id,
                } => {
                    shared.saw(*conversation, *message_id);
                    shared.conversations.users(*conversation)
                }
                _ => Vec::new(),
            }
        } else {
            tracing::debug!(channel = %msg.channel, "payload on a channel this edge does not serve");
            continue;
        };
        let mut notify = None;
        let mut message_id = None;
        let (frame, except_client) = match envelope.payload {
            Payload::Deliver {
                message,
                except_client,
                ..
            } => {
                message_id = Some(message.id);
                (
                    ServerFrame::new(0, ServerBody::Message(message)).encode(),
                    except_client,
                )
            }
            Payload::Notify {
                conversation,
                message_id,
            } => {
                notify = Some((conversation, message_id));
                (notify_frame(conversation, message_id), 0)
            }
            Payload::ReadMarker {
                user,
                conversation,
                message_id,
                origin_client,
            } => {
                // One task runs this loop: the check and the update do not
                // race.
                let key = (user, conversation);
                if shared.read_high.get(&key).is_some_and(|h| h >= message_id) {
                    shared.metrics.stale_read_markers.inc();
                    continue;
                }
                shared.read_high.insert(key, message_id);
                (
                    ServerFrame::new(
                        0,
                        ServerBody::ReadMarker {
                            user,
                            conversation,
                            message_id,
                        },
                    )
                    .encode(),
                    origin_client,
                )
            }
            Payload::DeviceConnected {
                user,
                client_id,
                since_ms,
                edge,
                conn_id,
            } => {
                // One live connection per device across edges: the newer
                // wins, wherever it is.
                let older = shared.sessions.older_than(
                    user,
                    client_id,
                    (since_ms, edge, conn_id),
                    shared.edge_id(),
                );
                for conn in older {
                    shared.metrics.error(ErrorCode::ConnectionReplaced);
                    conn.close(
                        ErrorCode::ConnectionReplaced,
                        "a newer connection of this device took over",
                    );
                }
                continue;
            }
            Payload::Membership {
                user,
                conversation,
                joined,
            } => {
                let changed = if joined {
                    shared.conversations.join(user, conversation)
                } else {
                    shared.conversations.leave(user, conversation)
                };
                if changed {
                    let shared = shared.clone();
                    tokio::spawn(async move { shared.sync_route(conversation).await });
                }
                continue;
            }
        };
        // From the send's acceptance (its id's time, on the engine's
        // clock) to this edge handing the frame to its shards.
        if let Some(id) = message_id.or(notify.map(|(_, id)| id)) {
            let accepted_ms = tiercast_engine::snowflake::parts(id).unix_ms;
            let delay_ms = tiercast_engine::snowflake::now_unix_ms().saturating_sub(accepted_ms);
            shared
                .metrics
                .fanout_delay_seconds
                .observe(delay_ms as f64 / 1e3);
        }
        shards
            .deliver(recipients.into(), except_client, frame, message_id, notify)
            .await;
    }
}
