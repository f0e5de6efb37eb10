//! The engine: the write path (authorise, deduplicate, id, persist, publish)
//! and the reads devices catch up with. Edges and the HTTP service both call
//! it; it owns no sockets.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tiercast_schemas::budget::FrameBudget;
use tiercast_schemas::envelope::{Envelope, Payload, Tier};
use tiercast_schemas::wire::{Cursor, ErrorCode, Message, SyncEntry};

use crate::backplane::{Backplane, Routes, node_channel, user_channel};
use crate::batch::Batcher;
use crate::config::EngineConfig;
use crate::metrics::{CodeLabel, EngineMetrics, TierLabel};
use crate::planner;
use crate::reads::{LocalReadQueue, ReadQueue};
use crate::sequencer::Sequencer;
use crate::snowflake::{IdError, IdGenerator, IdPoll, now_unix_ms};
use crate::store::{
    ClientRecord, Conversation, Dedupe, Device, NewMessage, Page, Persisted, ReadMark, Registered,
    Registration, SendContext, Store, StoreError,
};

/// Everything the engine refuses, each with its wire code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge { len: usize, max: usize },
    #[error("conversation {0} does not exist")]
    UnknownConversation(u64),
    #[error("user {user} is not a member of conversation {conversation}")]
    Forbidden { user: u64, conversation: u64 },
    #[error("user {user} already has {max} devices")]
    TooManyDevices { user: u64, max: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("conversation {0} already exists")]
    ConversationExists(u64),
    #[error("no id can be issued: {0}")]
    Clock(#[from] IdError),
    #[error("storage unavailable: {0}")]
    Store(StoreError),
    #[error("{0}")]
    Unavailable(String),
    #[error("device {0} is not one of this user's devices")]
    UnknownDevice(u64),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSuchConversation(c) => Self::UnknownConversation(c),
            StoreError::ConversationExists(c) => Self::ConversationExists(c),
            StoreError::TooManyDevices { user, max } => Self::TooManyDevices { user, max },
            StoreError::UnknownDevice { client, .. } => Self::UnknownDevice(client),
            e => Self::Store(e),
        }
    }
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BodyTooLarge { .. } => ErrorCode::BodyTooLarge,
            Self::UnknownConversation(_) => ErrorCode::UnknownConversation,
            Self::Forbidden { .. } => ErrorCode::Forbidden,
            Self::TooManyDevices { .. } => ErrorCode::TooManyDevices,
            Self::Invalid(_) | Self::ConversationExists(_) => ErrorCode::InvalidRequest,
            Self::Clock(_) | Self::Store(_) | Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::UnknownDevice(_) => ErrorCode::UnknownDevice,
        }
    }
}

/// Who sends a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A member's device (its membership is checked; it gets no copy of its
    /// own message).
    Device { user: u64, client: u64 },
    /// A backend with a publisher token, by the token's subject: a system
    /// message (`as_user` 0, no membership needed) or one on behalf of a
    /// member (`as_user`, whose membership is checked).
    Publisher { subject: String, as_user: u64 },
}

impl Sender {
    /// The (user, client) a stored message names as its sender.
    fn ids(&self) -> (u64, u64) {
        match self {
            Self::Device { user, client } => (*user, *client),
            Self::Publisher { as_user, .. } => (*as_user, 0),
        }
    }

    /// The idempotency scope: retries are matched per sender.
    fn dedupe_scope(&self) -> String {
        match self {
            Self::Device { user, client } => Dedupe::device_scope(*user, *client),
            Self::Publisher { subject, .. } => Dedupe::publisher_scope(subject),
        }
    }
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub conversation: u64,
    pub from: Sender,
    /// Retries with the same (sender, conversation, client_msg_id) within
    /// `engine.dedupe_ttl_ms` return the first id; 0 disables
    /// deduplication.
    pub client_msg_id: u64,
    pub body: Bytes,
}

impl Outgoing {
    /// A system message from the engine's own tools (no sender, no
    /// deduplication).
    pub fn system(conversation: u64, body: impl Into<Bytes>) -> Self {
        Self {
            conversation,
            from: Sender::Publisher {
                subject: "system".into(),
                as_user: 0,
            },
            client_msg_id: 0,
            body: body.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    pub message_id: u64,
    /// A retry: nothing new was stored or published.
    pub duplicate: bool,
}

pub struct Engine {
    cfg: EngineConfig,
    ids: IdGenerator,
    store: Arc<dyn Store>,
    backplane: Arc<dyn Backplane>,
    routes: Arc<dyn Routes>,
    metrics: EngineMetrics,
    /// Read markers' write-behind queue; an in-process one unless a
    /// deployment sets another before the first Read.
    reads: OnceLock<Arc<dyn ReadQueue>>,
    /// Publish order per conversation.
    sequencer: Sequencer<PublishJob>,
    /// Failed publishes waiting to go out late (see `publish_late`).
    late_waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// Device registrations at connect, coalesced into store batches.
    registrations: StoreBatcher<Registration, Registered>,
    /// Conversation listings at connect, coalesced likewise.
    listings: StoreBatcher<u64, Vec<u64>>,
    /// Inbox pages (the check at connect, and the drain), likewise.
    inbox_pages: StoreBatcher<(Device, u64), Vec<Message>>,
}

/// Pages a Sync reads from the store in one call.
const SYNC_PAGES_PER_READ: usize = 8;

/// Calls one coalesced store batch carries at most.
const MAX_STORE_BATCH: usize = 256;
/// Coalesced store batches of one kind in flight at once.
const STORE_BATCHES_IN_FLIGHT: usize = 4;

/// Store calls of one kind, coalesced (see `crate::batch`), each answered
/// with its own outcome.
type StoreBatcher<Req, T> = Batcher<Req, Result<T, StoreError>>;

/// A [`StoreBatcher`] whose `call` makes one store call for a batch and
/// gives one outcome per request, in order. It holds the store weakly: the
/// store closes when the engine goes, not when a worker task notices. A
/// batch whose call fails (or that finds the store closed) fails every one
/// of its requests with that error.
fn store_batcher<Req, T, F, Fut>(
    store: &Arc<dyn Store>,
    counters: crate::batch::BatchCounters,
    call: F,
) -> StoreBatcher<Req, T>
where
    Req: Send + 'static,
    T: Send + 'static,
    F: Fn(Arc<dyn Store>, Vec<Req>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Vec<Result<T, StoreError>>, StoreError>>
        + Send
        + 'static,
{
    let store = Arc::downgrade(store);
    Batcher::new(
        MAX_STORE_BATCH,
        STORE_BATCHES_IN_FLIGHT,
        counters,
        move |reqs: Vec<Req>| {
            let n = reqs.len();
            let pending = store.upgrade().map(|store| call(store, reqs));
            Box::pin(async move {
                let outcome = match pending {
                    Some(pending) => pending.await,
                    None => Err(StoreError::Backend("the store is closed".into())),
                };
                outcome.unwrap_or_else(|e| {
                    (0..n)
                        .map(|_| Err(StoreError::Backend(e.to_string())))
                        .collect()
                })
            })
        },
    )
}

/// `req`'s outcome from `batcher`; `what` names the batch if it was lost
/// (its task panicked, or the runtime is stopping).
async fn batched<Req: Send + 'static, T: Send + 'static>(
    batcher: &StoreBatcher<Req, T>,
    req: Req,
    what: &str,
) -> Result<T, StoreError> {
    batcher
        .call(req)
        .await
        .unwrap_or_else(|| Err(StoreError::Backend(format!("{what} batch lost"))))
}

/// A stored message waiting for its turn to be published.
struct PublishJob {
    tier: Tier,
    message: Message,
    except_client: u64,
    members: Vec<u64>,
    /// Told once the message is published (or its publish failed).
    done: tokio::sync::oneshot::Sender<()>,
}

/// An id in flight in its conversation's sequencer. Completed with the
/// send's outcome; one dropped uncompleted (a panic in the store path)
/// completes as "nothing to publish" so that the sends behind it go on.
struct Ticket {
    engine: Arc<Engine>,
    conversation: u64,
    id: u64,
    armed: bool,
}

impl Ticket {
    fn complete(&mut self, job: Option<PublishJob>) -> Option<Vec<PublishJob>> {
        self.armed = false;
        self.engine
            .sequencer
            .complete(self.conversation, self.id, job)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let conversation = self.conversation;
        if let Some(run) = self.complete(None)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let engine = self.engine.clone();
            rt.spawn(async move { engine.publish_in_order(conversation, run).await });
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg).finish()
    }
}

/// Publishes of one message in flight at once. Enough to keep a pipeline
/// to every shard busy; bounded so a 20,000-member tier-1 group does not
/// queue 20,000 futures at once.
const PUBLISH_CONCURRENCY: usize = 64;

/// Where a failed publish goes when it is tried again.
#[derive(Debug)]
enum Late {
    Channel(String),
    /// Node channel `k` of every edge hosting the conversation (the routing
    /// table did not answer).
    HostingEdges {
        conversation: u64,
        k: u16,
    },
}

/// How long a failed publish is tried again in the background.
const LATE_PUBLISH_FOR: Duration = Duration::from_secs(600);

/// Failed publishes waiting in the background at most (their payloads are
/// held in memory: ~100 MB at 1 KiB).
const LATE_PUBLISHES_MAX: usize = 100_000;

impl Engine {
    /// An engine with node id `cfg.node_id`; in a cluster pass the gate of
    /// the node-id lease it holds, so that it stops issuing ids without it.
    pub fn new(
        cfg: EngineConfig,
        store: Arc<dyn Store>,
        backplane: Arc<dyn Backplane>,
        routes: Arc<dyn Routes>,
        metrics: EngineMetrics,
        lease: Option<Arc<crate::snowflake::LeaseGate>>,
    ) -> Result<Self, IdError> {
        store.count_in(&metrics);
        let mut ids = IdGenerator::try_new(
            cfg.node_id,
            Duration::from_millis(cfg.max_clock_backstep_ms),
        )?;
        if let Some(gate) = lease {
            gate.set_max_skew(cfg.max_clock_skew_ms);
            ids = ids.with_lease(gate);
        }
        Ok(Self {
            reads: OnceLock::new(),
            sequencer: Sequencer::default(),
            late_waiting: Arc::default(),
            registrations: {
                let (max, evict) = (cfg.max_devices, cfg.evict_oldest_device);
                store_batcher(
                    &store,
                    metrics.batch_counters("register_clients"),
                    move |store, regs: Vec<Registration>| async move {
                        store.register_clients(&regs, max, evict).await
                    },
                )
            },
            listings: store_batcher(
                &store,
                metrics.batch_counters("conversations_of_users"),
                |store, users: Vec<u64>| async move {
                    let lists = store.conversations_of_users(&users).await?;
                    Ok(lists.into_iter().map(Ok).collect())
                },
            ),
            inbox_pages: {
                let limit = cfg.max_page;
                store_batcher(
                    &store,
                    metrics.batch_counters("inboxes"),
                    move |store, devices: Vec<(Device, u64)>| async move {
                        let pages = store.inboxes(&devices, limit).await?;
                        Ok(pages.into_iter().map(Ok).collect())
                    },
                )
            },
            cfg,
            ids,
            store,
            backplane,
            routes,
            metrics,
        })
    }

    /// Sets the read-marker queue (before the first Read); false if one was
    /// set already.
    pub fn set_read_queue(&self, queue: Arc<dyn ReadQueue>) -> bool {
        self.reads.set(queue).is_ok()
    }

    pub fn read_queue(&self) -> &Arc<dyn ReadQueue> {
        self.reads.get_or_init(|| {
            LocalReadQueue::start(self.store.clone(), crate::reads::ReadMetrics::default())
        })
    }

    pub fn routes(&self) -> &Arc<dyn Routes> {
        &self.routes
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn node_id(&self) -> u16 {
        self.cfg.node_id
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.backplane
    }

    /// The write path. The message (and its inbox rows) is stored before
    /// anything is published; once stored, a failed publish is logged and
    /// counted but not an error: devices catch up from their inbox.
    ///
    /// Order: the id is issued through the conversation's sequencer, the
    /// store runs concurrently with other sends, and publishing follows id
    /// order within the conversation (see [`crate::sequencer`]). The
    /// returned future may be dropped at any point (a publisher hung up):
    /// from the id on, the work runs in a task of its own, so a dropped
    /// send neither loses a stored message nor stalls the conversation.
    pub async fn send(self: &Arc<Self>, out: Outgoing) -> Result<SendReceipt, EngineError> {
        let result = self.send_inner(out).await;
        if let Err(e) = &result {
            self.metrics
                .send_errors
                .get_or_create(&CodeLabel {
                    code: e.code().name(),
                })
                .inc();
        }
        result
    }

    async fn send_inner(self: &Arc<Self>, out: Outgoing) -> Result<SendReceipt, EngineError> {
        if out.body.len() > self.cfg.max_body_bytes {
            return Err(EngineError::BodyTooLarge {
                len: out.body.len(),
                max: self.cfg.max_body_bytes,
            });
        }
        let (sender, _) = out.from.ids();
        // Membership, the conversation and (tier 1) who gets a pending row,
        // in one store call. Membership first: to a non-member an unknown
        // conversation and a forbidden one answer the same.
        let ctx = self.store.send_context(out.conversation, sender).await?;
        if !ctx.allowed {
            return Err(EngineError::Forbidden {
                user: sender,
                conversation: out.conversation,
            });
        }
        let tier = ctx
            .conversation
            .as_ref()
            .ok_or(EngineError::UnknownConversation(out.conversation))?
            .tier;
        let id = self.issue_id(out.conversation).await?;
        let ticket = Ticket {
            engine: self.clone(),
            conversation: out.conversation,
            id,
            armed: true,
        };
        let engine = self.clone();
        tokio::spawn(async move { engine.persist_and_publish(ticket, tier, ctx, out).await })
            .await
            .map_err(|e| EngineError::Unavailable(format!("send failed: {e}")))?
    }

    /// Issues the next id through the conversation's sequencer, waiting
    /// out (outside its lock) a clock that is slightly behind.
    async fn issue_id(&self, conversation: u64) -> Result<u64, EngineError> {
        enum Attempt {
            Wait(Duration),
            Fail(IdError),
        }
        let mut waited = Duration::ZERO;
        loop {
            let attempt = self.sequencer.enter(conversation, || {
                match self.ids.poll_id(now_unix_ms(), &mut waited) {
                    Ok(IdPoll::Ready(id)) => Ok(id),
                    Ok(IdPoll::Wait(d)) => Err(Attempt::Wait(d)),
                    Err(e) => Err(Attempt::Fail(e)),
                }
            });
            match attempt {
                Ok(id) => return Ok(id),
                Err(Attempt::Wait(d)) => tokio::time::sleep(d).await,
                Err(Attempt::Fail(e)) => return Err(e.into()),
            }
        }
    }

    /// Stores the message with id `ticket.id`, then publishes it in its
    /// conversation's id order (this task publishes the ready run when it
    /// finds nobody else doing so) and returns once it is published.
    async fn persist_and_publish(
        self: Arc<Self>,
        mut ticket: Ticket,
        tier: Tier,
        ctx: SendContext,
        out: Outgoing,
    ) -> Result<SendReceipt, EngineError> {
        let id = ticket.id;
        let (job, published, receipt) = match self.persist(id, ctx, out).await {
            Ok((Persisted::Stored, record, members)) => {
                self.metrics.messages_stored.inc();
                let (done, published) = tokio::sync::oneshot::channel();
                let job = PublishJob {
                    tier,
                    except_client: record.message.sender_client,
                    message: record.message,
                    members,
                    done,
                };
                let receipt = SendReceipt {
                    message_id: id,
                    duplicate: false,
                };
                (Some(job), Some(published), Ok(receipt))
            }
            Ok((Persisted::Duplicate(earlier), record, members)) => {
                self.metrics.duplicate_sends.inc();
                let receipt = SendReceipt {
                    message_id: earlier,
                    duplicate: true,
                };
                // A retry: the first attempt stored the message but its
                // sender never heard back, and it may have died before
                // publishing (an edge killed between the two). Publish the
                // stored message again: devices that had it drop the copy
                // by id; devices that did not would otherwise not see it
                // until they reconnect.
                match self
                    .store
                    .message(record.message.conversation, earlier)
                    .await
                {
                    Ok(Some(message)) => {
                        self.metrics.republished.inc();
                        let (done, published) = tokio::sync::oneshot::channel();
                        let job = PublishJob {
                            tier,
                            except_client: message.sender_client,
                            message,
                            members,
                            done,
                        };
                        (Some(job), Some(published), Ok(receipt))
                    }
                    Ok(None) => (None, None, Ok(receipt)),
                    Err(e) => {
                        tracing::warn!(error = %e, id = earlier, "retried message not re-published");
                        (None, None, Ok(receipt))
                    }
                }
            }
            Err(e) => (None, None, Err(e)),
        };
        if let Some(run) = ticket.complete(job) {
            self.publish_in_order(ticket.conversation, run).await;
        }
        if let Some(published) = published {
            // Published by this task or by the conversation's publisher.
            let _ = published.await;
        }
        receipt
    }

    /// The store step of a send: the inbox rows (tier 1 keeps a pending
    /// row per device but the sender's own; `ctx` holds them), the
    /// deduplication key, and the insert. Returns the members to publish
    /// to (tier 1).
    async fn persist(
        &self,
        id: u64,
        ctx: SendContext,
        out: Outgoing,
    ) -> Result<(Persisted, NewMessage, Vec<u64>), EngineError> {
        let (sender, sender_client) = out.from.ids();
        let SendContext {
            members, devices, ..
        } = ctx;
        let inbox: Vec<Device> = devices
            .into_iter()
            .filter(|d| (d.user, d.client) != (sender, sender_client))
            .collect();
        let dedupe = (out.client_msg_id != 0).then(|| Dedupe {
            scope: out.from.dedupe_scope(),
            client_msg_id: out.client_msg_id,
            now_ms: now_unix_ms(),
            ttl_ms: self.cfg.dedupe_ttl_ms,
        });
        let record = NewMessage {
            message: Message {
                id,
                conversation: out.conversation,
                sender,
                sender_client,
                body: out.body,
            },
            dedupe,
            inbox,
        };
        let started = std::time::Instant::now();
        let persisted = self.store.insert_message(&record).await?;
        self.metrics
            .store_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok((persisted, record, members))
    }

    /// Publishes runs of one conversation's finished sends, oldest first,
    /// until the sequencer has none ready.
    async fn publish_in_order(&self, conversation: u64, mut run: Vec<PublishJob>) {
        loop {
            for job in run {
                self.publish(job.tier, job.message, job.except_client, &job.members)
                    .await;
                let _ = job.done.send(());
            }
            match self.sequencer.next(conversation) {
                Some(more) => run = more,
                None => return,
            }
        }
    }

    /// Publishes a stored message by its tier: tier 1 on every member's
    /// user channel, tiers 2 and 3 once per hosting edge. The payload is
    /// encoded once. A failure is counted and logged, never returned (the
    /// message is stored), and the publish is tried again in the
    /// background (`publish_late`).
    async fn publish(&self, tier: Tier, message: Message, except_client: u64, members: &[u64]) {
        let conversation = message.conversation;
        let accepted_ms = crate::snowflake::parts(message.id).unix_ms;
        let payload = match tier {
            Tier::Direct | Tier::Sharded => Payload::Deliver {
                tier,
                message,
                except_client,
            },
            Tier::IdOnly => Payload::Notify {
                conversation,
                message_id: message.id,
            },
        };
        let payload = Envelope {
            origin_node: self.node_id(),
            payload,
        }
        .encode();
        let channels: Vec<String> = match tier {
            Tier::Direct => members.iter().map(|&u| user_channel(u)).collect(),
            Tier::Sharded | Tier::IdOnly => match self.routes.hosting_edges(conversation).await {
                Ok(edges) => {
                    let k = (conversation % u64::from(self.cfg.node_channels)) as u16;
                    edges.into_iter().map(|e| node_channel(e, k)).collect()
                }
                Err(e) => {
                    self.metrics.publish_failures.inc();
                    tracing::warn!(conversation, error = %e, "routing table unavailable; publishing in the background");
                    let k = (conversation % u64::from(self.cfg.node_channels)) as u16;
                    self.publish_late(Late::HostingEdges { conversation, k }, payload);
                    return;
                }
            },
        };
        let label = TierLabel { tier: tier as u8 };
        let retry_for = Duration::from_millis(self.cfg.publish_retry_ms);
        // Publishes go out concurrently (the Redis client pipelines them on
        // its connections) instead of one round trip after another.
        let results = futures::stream::iter(channels)
            .map(|channel| {
                let payload = payload.clone();
                async move {
                    let r = self.publish_retrying(&channel, payload, retry_for).await;
                    (channel, r)
                }
            })
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (channel, result) in results {
            match result {
                Ok(()) => {
                    self.metrics.publishes.get_or_create(&label).inc();
                    self.metrics
                        .publish_bytes
                        .get_or_create(&label)
                        .inc_by(payload.len() as u64);
                }
                Err(e) => {
                    self.metrics.publish_failures.inc();
                    tracing::warn!(%channel, error = %e, "publish failed; tried again in the background");
                    self.publish_late(Late::Channel(channel), payload.clone());
                }
            }
        }
        // Milliseconds of the id against this node's clock (the id came from
        // it): a clock step back reads as 0.
        let delay_ms = crate::snowflake::now_unix_ms().saturating_sub(accepted_ms);
        self.metrics
            .publish_delay_seconds
            .observe(delay_ms as f64 / 1e3);
    }

    /// A publish that failed for `engine.publish_retry_ms`, tried again in
    /// the background (1 s doubling to 10 s, for up to
    /// [`LATE_PUBLISH_FOR`]) without holding up the conversation's later
    /// messages. Given up, the message would sit below the cursors those
    /// later messages move on devices that stay connected, and no resume
    /// would look for it; published late, they get it late (the SDK takes
    /// it by id). At most [`LATE_PUBLISHES_MAX`] wait at once; the task
    /// holds the backplane weakly, so it ends with the engine.
    fn publish_late(&self, target: Late, payload: Bytes) {
        let waiting = self.late_waiting.clone();
        if waiting.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= LATE_PUBLISHES_MAX {
            waiting.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            self.metrics.late_publishes_dropped.inc();
            return;
        }
        let backplane = Arc::downgrade(&self.backplane);
        let routes = Arc::downgrade(&self.routes);
        let (done, dropped) = (
            self.metrics.late_publishes.clone(),
            self.metrics.late_publishes_dropped.clone(),
        );
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + LATE_PUBLISH_FOR;
            let mut backoff = Duration::from_secs(1);
            // The channels still to publish on (a routing failure: unknown
            // until the routing table answers).
            let mut channels: Option<Vec<String>> = match &target {
                Late::Channel(c) => Some(vec![c.clone()]),
                Late::HostingEdges { .. } => None,
            };
            let published = loop {
                tokio::time::sleep(backoff).await;
                let (Some(bp), Some(routes)) = (backplane.upgrade(), routes.upgrade()) else {
                    break false;
                };
                if channels.is_none()
                    && let Late::HostingEdges { conversation, k } = &target
                    && let Ok(edges) = routes.hosting_edges(*conversation).await
                {
                    channels = Some(edges.into_iter().map(|e| node_channel(e, *k)).collect());
                }
                if let Some(list) = channels.as_mut() {
                    let mut left = Vec::new();
                    for c in list.drain(..) {
                        if bp.publish(&c, payload.clone()).await.is_err() {
                            left.push(c);
                        }
                    }
                    if left.is_empty() {
                        break true;
                    }
                    *list = left;
                }
                if tokio::time::Instant::now() + backoff > deadline {
                    break false;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            };
            if published {
                done.inc();
            } else {
                dropped.inc();
                tracing::warn!(
                    ?target,
                    "publish given up; devices catch up on their next resume"
                );
            }
            waiting.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }

    /// One publish, tried again with backoff (50 ms doubling to 1 s) while
    /// it fails, for at most `retry_for`: a Redis failover leaves a shard's
    /// slots without a master for a few seconds, and a message published
    /// then would reach nobody live. The conversation's later messages
    /// wait behind it (they are published in id order).
    async fn publish_retrying(
        &self,
        channel: &str,
        payload: Bytes,
        retry_for: Duration,
    ) -> Result<(), crate::backplane::BackplaneError> {
        let deadline = tokio::time::Instant::now() + retry_for;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.backplane.publish(channel, payload.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() + backoff > deadline => return Err(e),
                Err(e) => {
                    self.metrics.publish_retries.inc();
                    tracing::debug!(%channel, error = %e, ?backoff, "publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Tells the edges hosting `users` that they joined or left
    /// `conversation` (on the users' channels, which exactly those edges
    /// subscribe to).
    async fn announce_membership(&self, conversation: u64, users: &[u64], joined: bool) {
        for &user in users {
            let payload = Envelope {
                origin_node: self.node_id(),
                payload: Payload::Membership {
                    user,
                    conversation,
                    joined,
                },
            }
            .encode();
            if let Err(e) = self.backplane.publish(&user_channel(user), payload).await {
                tracing::warn!(user, conversation, error = %e, "membership change not announced; it applies on reconnect");
            }
        }
    }

    /// Tells every edge hosting `conversation` that `user` left it, on the
    /// node channel that carries the conversation's tier 2/3 traffic. Done
    /// before the removal is answered: a channel delivers in publish order,
    /// so every message published after the answer reaches each edge after
    /// the removal, and none reaches the removed user. (The announcement on
    /// the user's channel alone could be overtaken: it travels on another
    /// shard.)
    async fn announce_removal_to_hosts(&self, conversation: u64, user: u64) {
        let edges = match self.routes.hosting_edges(conversation).await {
            Ok(edges) => edges,
            Err(e) => {
                tracing::warn!(conversation, user, error = %e, "removal not announced to hosting edges; it applies on reconnect");
                return;
            }
        };
        let payload = Envelope {
            origin_node: self.node_id(),
            payload: Payload::Membership {
                user,
                conversation,
                joined: false,
            },
        }
        .encode();
        let k = (conversation % u64::from(self.cfg.node_channels)) as u16;
        for edge in edges {
            let channel = node_channel(edge, k);
            if let Err(e) = self.backplane.publish(&channel, payload.clone()).await {
                tracing::warn!(%channel, conversation, user, error = %e, "removal not announced to an edge");
            }
        }
    }

    /// Re-plans the tier of a conversation after its size or pin changed.
    async fn replan(&self, conversation: u64) -> Result<Tier, EngineError> {
        let conv = self
            .store
            .conversation(conversation)
            .await?
            .ok_or(EngineError::UnknownConversation(conversation))?;
        let current = conv.tier;
        let next = planner::plan(
            current,
            conv.member_count,
            conv.pinned_tier,
            &self.cfg.tiers,
        );
        if next != current {
            self.store.set_tier(conversation, next).await?;
            tracing::info!(
                conversation,
                from = current as u8,
                to = next as u8,
                members = conv.member_count,
                "tier changed"
            );
        }
        Ok(next)
    }

    /// Pins a conversation to a tier (or unpins it with `None`); returns the
    /// tier it is now served by.
    pub async fn pin_tier(
        &self,
        conversation: u64,
        tier: Option<Tier>,
    ) -> Result<Tier, EngineError> {
        self.store.set_pinned_tier(conversation, tier).await?;
        self.replan(conversation).await
    }

    /// A device's user must be a member. Non-members get `Forbidden`
    /// whether or not the conversation exists: which ids exist is not
    /// theirs to learn.
    pub async fn check_member(&self, conversation: u64, user: u64) -> Result<(), EngineError> {
        if self.store.is_member(conversation, user).await? {
            return Ok(());
        }
        Err(EngineError::Forbidden { user, conversation })
    }

    /// Names and member lists as the limits allow.
    fn check_name(&self, name: &str) -> Result<(), EngineError> {
        if name.len() > self.cfg.max_name_bytes {
            return Err(EngineError::Invalid(format!(
                "name of {} bytes exceeds the limit of {} (engine.max_name_bytes)",
                name.len(),
                self.cfg.max_name_bytes
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(EngineError::Invalid(
                "name contains control characters".into(),
            ));
        }
        Ok(())
    }

    fn check_users(&self, users: &[u64]) -> Result<(), EngineError> {
        if users.len() > self.cfg.max_members_per_call {
            return Err(EngineError::Invalid(format!(
                "{} users in one call exceeds the limit of {} (engine.max_members_per_call); add them in several calls",
                users.len(),
                self.cfg.max_members_per_call
            )));
        }
        if users.contains(&0) {
            return Err(EngineError::Invalid("user id 0 is reserved".into()));
        }
        Ok(())
    }

    /// A page of history for a member, newest first, cut to fit one frame.
    /// Returns the page and whether older messages remain.
    pub async fn fetch(
        &self,
        user: u64,
        conversation: u64,
        before: u64,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Message>, bool), EngineError> {
        self.check_member(conversation, user).await?;
        self.history(conversation, before, after, limit).await
    }

    /// [`Self::fetch`] without the membership check, for trusted callers.
    pub async fn history(
        &self,
        conversation: u64,
        before: u64,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Message>, bool), EngineError> {
        let limit = (limit as usize).clamp(1, self.cfg.max_page);
        // One more than asked says whether there is more.
        let mut page = self
            .store
            .history(
                conversation,
                Page {
                    before,
                    after,
                    limit: limit + 1,
                },
            )
            .await?;
        let mut more = page.len() > limit;
        page.truncate(limit);
        more |= fit_to_frame(&mut page);
        Ok((page, more))
    }

    /// A device connecting. `client_id` 0: a new device, issued a random,
    /// unguessable id bound to `user`. Otherwise the id must be one of
    /// `user`'s registered devices (refused with `UnknownDevice`, nothing
    /// registered, if not); its last-seen time is refreshed. Returns the
    /// device's id.
    pub async fn register_device(
        &self,
        user: u64,
        client_id: u64,
        device: &str,
    ) -> Result<u64, EngineError> {
        if user == 0 {
            return Err(EngineError::Invalid("user id 0 is reserved".into()));
        }
        // A returning device must be the user's: checked and refreshed in
        // one step of the store, coalesced with the other connects.
        let (client_id, returning) = if client_id == 0 {
            (issue_device_id(), false)
        } else {
            (client_id, true)
        };
        let reg = Registration {
            client: ClientRecord {
                client_id,
                user,
                device: device.to_owned(),
                last_seen_ms: now_unix_ms(),
            },
            returning,
        };
        batched(&self.registrations, reg, "registration").await?;
        Ok(client_id)
    }

    /// The conversations `user` is a member of, read with the other
    /// connects' (a store call per batch, not per device).
    pub async fn conversations_of(&self, user: u64) -> Result<Vec<u64>, EngineError> {
        Ok(batched(&self.listings, user, "listing").await?)
    }

    /// The oldest pending inbox entries of a device above `after`, cut to
    /// fit one frame.
    pub async fn pending(&self, device: Device, after: u64) -> Result<Vec<Message>, EngineError> {
        let mut page = batched(&self.inbox_pages, (device, after), "inbox").await?;
        fit_to_frame(&mut page);
        Ok(page)
    }

    /// Removes acked ids from a device's inbox; returns how many were
    /// pending. An id that was not pending for this device (a tier-2 or
    /// tier-3 message, which keep no inbox; one acked before; another
    /// device's or user's) removes nothing and is not an error, so a
    /// client may ack every message it shows, whatever its tier.
    pub async fn ack(&self, device: Device, ids: &[u64]) -> Result<u32, EngineError> {
        if ids.len() > self.cfg.max_page * 8 {
            return Err(EngineError::Invalid(format!(
                "at most {} ids per ack",
                self.cfg.max_page * 8
            )));
        }
        let mut unique = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        Ok(self.store.ack(device, &unique).await?)
    }

    /// Refreshes the last-seen time of connected devices `(user, client)`.
    pub async fn touch_devices(&self, devices: &[(u64, u64)]) -> Result<(), EngineError> {
        Ok(self.store.touch_clients(devices, now_unix_ms()).await?)
    }

    /// Removes devices unseen for `engine.device_ttl_ms`, with their pending
    /// inbox; returns them.
    pub async fn expire_devices(&self) -> Result<Vec<ClientRecord>, EngineError> {
        let cutoff = now_unix_ms().saturating_sub(self.cfg.device_ttl_ms);
        let mut gone = Vec::new();
        loop {
            let batch = self.store.expire_clients(cutoff, 1_000).await?;
            let n = batch.len();
            gone.extend(batch);
            if n < 1_000 {
                return Ok(gone);
            }
        }
    }

    /// Runs [`Self::expire_devices`] every `engine.device_sweep_ms` until the
    /// engine is dropped.
    pub fn spawn_device_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        let every = Duration::from_millis(self.cfg.device_sweep_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                match engine.expire_devices().await {
                    Ok(gone) if !gone.is_empty() => {
                        tracing::info!(devices = gone.len(), "removed devices past their TTL");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "device reaper failed; retried next sweep")
                    }
                }
                if let Err(e) = engine.store.expire_dedupe(now_unix_ms(), 10_000).await {
                    tracing::warn!(error = %e, "idempotency sweep failed; retried next sweep");
                }
            }
        })
    }

    /// A device read `conversation` up to `message_id`: the user's other
    /// devices hear it at once (on the user's channel, every edge), and the
    /// marker is queued for the store.
    pub async fn read(
        &self,
        user: u64,
        client_id: u64,
        conversation: u64,
        message_id: u64,
    ) -> Result<(), EngineError> {
        // An id from the future could mark messages not yet sent as read.
        let horizon = crate::snowflake::min_id_at(now_unix_ms() + 60_000);
        if message_id == 0 || message_id >= horizon {
            return Err(EngineError::Invalid(format!(
                "message id {message_id} is not an id this cluster issued"
            )));
        }
        self.check_member(conversation, user).await?;
        // A marker never moves back: one at or below the stored maximum is
        // accepted and changes nothing (a device marking from an older
        // page, or a retry). The stored marker trails the queue by its
        // flush interval; edges drop the rest of what crosses on the wire.
        let stored = self.store.read_marks(user, &[conversation]).await?;
        if stored.first().is_some_and(|&(_, id)| id >= message_id) {
            return Ok(());
        }
        self.read_queue()
            .push(ReadMark {
                user,
                conversation,
                message_id,
            })
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        let payload = Envelope {
            origin_node: self.node_id(),
            payload: Payload::ReadMarker {
                user,
                conversation,
                message_id,
                origin_client: client_id,
            },
        }
        .encode();
        if let Err(e) = self.backplane.publish(&user_channel(user), payload).await {
            // Stored (queued) already: other devices see it on their next sync.
            self.metrics.publish_failures.inc();
            tracing::warn!(user, conversation, error = %e, "read marker not published");
        }
        Ok(())
    }

    /// What a device missed, per cursor (see `SyncEntry` in the schema):
    /// tiers 1 and 2 the messages after the cursor, oldest first, at most
    /// `limit` per conversation and one frame in all; tier 3 only the
    /// latest id. No cursors: every conversation of the user, latest and
    /// read ids only.
    pub async fn sync(
        &self,
        user: u64,
        cursors: &[Cursor],
        limit: u32,
    ) -> Result<Vec<SyncEntry>, EngineError> {
        if cursors.len() > self.cfg.max_sync_cursors {
            return Err(EngineError::Invalid(format!(
                "at most {} cursors per Sync",
                self.cfg.max_sync_cursors
            )));
        }
        let listing = cursors.is_empty();
        let cursors: Vec<Cursor> = if listing {
            self.conversations_of(user)
                .await?
                .into_iter()
                .take(self.cfg.max_sync_cursors)
                .map(|conversation| Cursor {
                    conversation,
                    last_id: 0,
                })
                .collect()
        } else {
            cursors.to_vec()
        };
        let convs: Vec<u64> = cursors.iter().map(|c| c.conversation).collect();
        // What the store says of every cursor's conversation (whether it
        // exists, whether the user may see it, its newest id) and the
        // user's read markers: two calls for the whole Sync.
        self.metrics.syncs.inc();
        self.metrics.sync_store_calls.inc_by(2);
        let (reads, states) = futures::try_join!(
            self.store.read_marks(user, &convs),
            self.store.conversation_states(user, &convs),
        )?;
        let reads: std::collections::HashMap<u64, u64> = reads.into_iter().collect();
        let states = crate::store::one_each(states, cursors.len(), ("states", "conversations"))?;
        let limit = (limit as usize).clamp(1, self.cfg.max_page);
        let mut planned = Vec::with_capacity(cursors.len());
        for (c, st) in cursors.iter().zip(states) {
            let visible = match &st.conversation {
                Some(_) if listing => true,
                Some(_) => st.member,
                None => false,
            };
            let tier = st.conversation.as_ref().map_or(Tier::Direct, |c| c.tier);
            let mut entry = SyncEntry {
                conversation: c.conversation,
                tier: 0,
                messages: Vec::new(),
                latest_id: 0,
                read_id: 0,
                more: false,
            };
            if visible {
                entry.tier = tier.into();
                entry.read_id = reads.get(&c.conversation).copied().unwrap_or(0);
                entry.latest_id = st.latest_id;
            }
            planned.push((entry, visible, tier, c.last_id));
        }
        // The entries that would read a page with the frame still empty;
        // the budget only shrinks, so every page read below is one of them.
        // They are read a few at a time, in order, so that a frame that
        // fills up early leaves the rest unread.
        let fresh = FrameBudget::sync(cursors.len());
        let candidates: Vec<usize> = planned
            .iter()
            .enumerate()
            .filter(|(_, (e, visible, tier, last))| {
                plan_entry(listing, *visible, *tier, e.latest_id, *last, &fresh) == EntryPlan::Page
            })
            .map(|(i, _)| i)
            .collect();
        let mut fetched: std::collections::HashMap<usize, Vec<Message>> =
            std::collections::HashMap::new();
        let mut next_candidate = 0;
        let mut budget = FrameBudget::sync(cursors.len());
        let mut out = Vec::with_capacity(cursors.len());
        for (i, (mut entry, visible, tier, last)) in planned.into_iter().enumerate() {
            match plan_entry(listing, visible, tier, entry.latest_id, last, &budget) {
                EntryPlan::Refused | EntryPlan::Summary => {}
                EntryPlan::OutOfFrame => entry.more = true,
                EntryPlan::Page => {
                    if !fetched.contains_key(&i) {
                        while next_candidate < candidates.len() && candidates[next_candidate] < i {
                            next_candidate += 1;
                        }
                        let chunk: Vec<usize> = candidates[next_candidate..]
                            .iter()
                            .copied()
                            .take(SYNC_PAGES_PER_READ)
                            .collect();
                        next_candidate += chunk.len();
                        let reads: Vec<(u64, u64)> = chunk
                            .iter()
                            .map(|&j| (convs[j], cursors[j].last_id))
                            .collect();
                        self.metrics.sync_store_calls.inc();
                        let pages = self.store.since_many(&reads, limit).await?;
                        fetched.extend(chunk.into_iter().zip(pages));
                    }
                    let mut page = fetched.remove(&i).unwrap_or_default();
                    let newest = page.last().map_or(0, |m| m.id);
                    let n = budget.take(page.iter().map(|m| m.body.len()));
                    entry.more = n < page.len() || newest < entry.latest_id;
                    page.truncate(n);
                    entry.messages = page;
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    pub async fn create_conversation(
        &self,
        id: Option<u64>,
        name: String,
        members: &[u64],
    ) -> Result<Conversation, EngineError> {
        let id = match id {
            Some(0) => {
                return Err(EngineError::Invalid(
                    "conversation id must be non-zero".into(),
                ));
            }
            Some(id) => id,
            None => self.ids.next_id().await?,
        };
        self.check_name(&name)?;
        self.check_users(members)?;
        let conv = Conversation {
            id,
            name,
            created_ms: now_unix_ms(),
            pinned_tier: None,
            tier: Tier::Direct,
            member_count: 0,
        };
        self.store.create_conversation(&conv).await?;
        self.add_members(id, members).await?;
        self.conversation(id).await
    }

    pub async fn conversation(&self, id: u64) -> Result<Conversation, EngineError> {
        self.store
            .conversation(id)
            .await?
            .ok_or(EngineError::UnknownConversation(id))
    }

    /// Up to `limit` (capped at `engine.max_page`) members above `after`,
    /// ascending, and whether more follow.
    pub async fn members_page(
        &self,
        conversation: u64,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), EngineError> {
        let limit = limit.clamp(1, self.cfg.max_page);
        let mut page = self
            .store
            .members_page(conversation, after, limit + 1)
            .await?;
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    pub async fn add_members(&self, conversation: u64, users: &[u64]) -> Result<(), EngineError> {
        self.check_users(users)?;
        let conv = self.conversation(conversation).await?;
        if conv.member_count + users.len() as u64 > self.cfg.max_conversation_members {
            return Err(EngineError::Invalid(format!(
                "conversation {conversation} would exceed {} members (engine.max_conversation_members)",
                self.cfg.max_conversation_members
            )));
        }
        let added = self.store.add_members(conversation, users).await?;
        self.replan(conversation).await?;
        self.announce_membership(conversation, &added, true).await;
        Ok(())
    }

    pub async fn remove_member(&self, conversation: u64, user: u64) -> Result<bool, EngineError> {
        self.conversation(conversation).await?;
        let was = self.store.remove_member(conversation, user).await?;
        if was {
            self.replan(conversation).await?;
            self.announce_membership(conversation, &[user], false).await;
            self.announce_removal_to_hosts(conversation, user).await;
        }
        Ok(was)
    }
}

/// A new device id: 63 random bits (so it stays exact as a signed 64-bit
/// column), never 0. Unguessable: 2^63 values from a CSPRNG seeded by the OS.
fn issue_device_id() -> u64 {
    loop {
        let id = rand::random::<u64>() >> 1;
        if id != 0 {
            return id;
        }
    }
}

/// Drops messages from the end of `page` until the rest fits in one frame
/// ([`FrameBudget::page`]); returns whether any were dropped. The first
/// message is always kept (a body is far below the frame limit).
fn fit_to_frame(page: &mut Vec<Message>) -> bool {
    let n = FrameBudget::page().fit_page(page.iter().map(|m| m.body.len()));
    let dropped = n < page.len();
    page.truncate(n);
    dropped
}

/// What a Sync entry carries, decided from what the store said about its
/// conversation (pure: the reads are the caller's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryPlan {
    /// No such conversation, or the user is not a member: an empty entry
    /// that tells nothing (read id 0), the same whichever it is.
    Refused,
    /// Tier and latest id only: a listing (no cursors), a tier-3 channel
    /// (devices pull), or nothing newer than the cursor.
    Summary,
    /// Newer messages, but the frame is full: the device syncs this
    /// conversation again (`more`).
    OutOfFrame,
    /// Read the messages after the cursor and fit them to the frame.
    Page,
}

fn plan_entry(
    listing: bool,
    visible: bool,
    tier: Tier,
    latest_id: u64,
    cursor: u64,
    budget: &FrameBudget,
) -> EntryPlan {
    if !visible {
        EntryPlan::Refused
    } else if listing || tier == Tier::IdOnly || latest_id <= cursor {
        EntryPlan::Summary
    } else if !budget.can_start_page() {
        EntryPlan::OutOfFrame
    } else {
        EntryPlan::Page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64, len: usize) -> Message {
        Message {
            id,
            conversation: 1,
            sender: 1,
            sender_client: 1,
            body: Bytes::from(vec![0; len]),
        }
    }

    #[test]
    fn pages_are_cut_to_the_frame() {
        let mut page: Vec<_> = (0..100).map(|i| msg(i, 1000)).collect();
        assert!(fit_to_frame(&mut page));
        assert_eq!(
            page.len(),
            FrameBudget::page().left() / FrameBudget::cost(1000)
        );
        let mut small: Vec<_> = (0..3).map(|i| msg(i, 10)).collect();
        assert!(!fit_to_frame(&mut small));
        assert_eq!(small.len(), 3);
        let mut big = vec![msg(0, 100_000)];
        assert!(!fit_to_frame(&mut big));
        assert_eq!(big.len(), 1);
    }

    #[test]
    fn a_sync_entry_reads_a_page_only_when_it_has_news_and_room() {
        let room = FrameBudget::sync(1);
        let full = FrameBudget::sync(100_000);
        let plan = |listing, visible, tier, latest, cursor, b: &FrameBudget| {
            plan_entry(listing, visible, tier, latest, cursor, b)
        };
        assert_eq!(
            plan(false, false, Tier::Direct, 9, 1, &room),
            EntryPlan::Refused
        );
        assert_eq!(
            plan(true, true, Tier::Direct, 9, 0, &room),
            EntryPlan::Summary
        );
        assert_eq!(
            plan(false, true, Tier::IdOnly, 9, 1, &room),
            EntryPlan::Summary
        );
        assert_eq!(
            plan(false, true, Tier::Sharded, 9, 9, &room),
            EntryPlan::Summary
        );
        assert_eq!(
            plan(false, true, Tier::Sharded, 9, 1, &room),
            EntryPlan::Page
        );
        assert_eq!(
            plan(false, true, Tier::Direct, 9, 1, &full),
            EntryPlan::OutOfFrame
        );
    }
}
