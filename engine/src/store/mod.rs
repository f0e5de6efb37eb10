//! The `Store`: everything Tiercast persists. A message is stored (with its
//! tier-1 inbox rows) before anything about it is published, so the store is
//! the source of truth every device catches up from.
//!
//! The trait is shaped for a wide-column backend as well as an embedded one:
//! every read names its partition (a conversation, a user, a client), pages
//! are bounded, and multi-row writes that must be atomic come as one call.
//!
//! - [`embedded`]: redb, the single-node default (docs/adr/0001).
//! - [`remote`]: an engine service's store, used by edge processes.
//! - [`scylla`]: ScyllaDB, for clusters (untested here: no server).
//! - [`conformance`]: the behaviour every backend must show, run against each.

pub mod conformance;
pub mod embedded;
pub mod remote;
pub mod scylla;

use async_trait::async_trait;
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::Message;

pub use self::scylla::{ScyllaConfig, ScyllaStore};
pub use embedded::EmbeddedStore;
pub use remote::RemoteStore;

/// A conversation's metadata (members are kept apart, by conversation and by
/// user).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conversation {
    pub id: u64,
    pub name: String,
    pub created_ms: u64,
    /// A tier the operator pinned this conversation to, if any.
    #[serde(with = "tier_number::optional")]
    pub pinned_tier: Option<Tier>,
    /// The tier the planner chose last.
    #[serde(default = "tier_one", with = "tier_number")]
    pub tier: Tier,
    /// Kept with the members, so a send never counts them.
    #[serde(default)]
    pub member_count: u64,
}

fn tier_one() -> Tier {
    Tier::Direct
}

/// A tier stored as its number (1..=3), as records written before the
/// field was typed have it; another number is a corrupt record.
mod tier_number {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use tiercast_schemas::envelope::Tier;

    pub fn serialize<S: Serializer>(t: &Tier, s: S) -> Result<S::Ok, S::Error> {
        u8::from(*t).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tier, D::Error> {
        let n = u8::deserialize(d)?;
        Tier::try_from(n)
            .map_err(|n| serde::de::Error::custom(format!("tier {n} is not 1, 2 or 3")))
    }

    pub mod optional {
        use super::*;

        pub fn serialize<S: Serializer>(t: &Option<Tier>, s: S) -> Result<S::Ok, S::Error> {
            t.map(u8::from).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tier>, D::Error> {
            Option::<u8>::deserialize(d)?
                .map(|n| {
                    Tier::try_from(n)
                        .map_err(|n| serde::de::Error::custom(format!("tier {n} is not 1, 2 or 3")))
                })
                .transpose()
        }
    }
}

/// A registered device of a user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientRecord {
    pub client_id: u64,
    pub user: u64,
    pub device: String,
    pub last_seen_ms: u64,
}

/// `out` if it holds one answer per request (`n` of them), else a backend
/// error: a batch answer that cannot be matched to its requests. `what`
/// names the answers and the requests ("states for conversations").
pub(crate) fn one_each<T>(out: Vec<T>, n: usize, what: (&str, &str)) -> Result<Vec<T>, StoreError> {
    if out.len() == n {
        Ok(out)
    } else {
        Err(StoreError::Backend(format!(
            "{} {} for {n} {}",
            out.len(),
            what.0,
            what.1
        )))
    }
}

/// What a Sync needs of one conversation for one user
/// ([`Store::conversation_states`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConversationState {
    pub conversation: Option<Conversation>,
    /// Whether the user is a member (false without the conversation).
    pub member: bool,
    /// The newest message id (0 without messages or conversation).
    pub latest_id: u64,
}

/// What a send reads before it stores ([`Store::send_context`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SendContext {
    /// Whether the sender may send: a member, or the backend (user 0).
    /// Nothing else is returned for a sender that may not.
    pub allowed: bool,
    /// The conversation (`None`: unknown, or not read because `!allowed`).
    pub conversation: Option<Conversation>,
    /// Tier 1 only: the members, ascending, and every device of theirs
    /// (the sender's own included). Empty for tiers 2 and 3, whose member
    /// lists are never read on the write path.
    pub members: Vec<u64>,
    pub devices: Vec<Device>,
}

/// One device registration of a batch ([`Store::register_clients`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    pub client: ClientRecord,
    /// A returning device (its Hello named an id): it must be registered to
    /// `client.user` already, or the entry fails with
    /// [`StoreError::UnknownDevice`] and writes nothing. The check and the
    /// refresh are one step, so a device expired meanwhile is not revived.
    pub returning: bool,
}

/// What registering a device did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Registered {
    /// Already registered: its last-seen time was refreshed.
    Known,
    New,
    /// New, and the least recently seen device was removed (with its inbox)
    /// to make room.
    Evicted(u64),
}

/// How far a user has read a conversation (the id of the newest message
/// read). Markers only move forward: a store keeps the largest it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ReadMark {
    pub user: u64,
    pub conversation: u64,
    pub message_id: u64,
}

/// What registering `client` does, given the user's `existing` devices: the
/// rule every backend applies (the backend then removes an evicted device
/// and its inbox).
pub(crate) fn registration(
    existing: &[ClientRecord],
    client: &ClientRecord,
    max_devices: usize,
    evict_oldest: bool,
) -> Result<Registered, StoreError> {
    registration_of(existing, client, false, max_devices, evict_oldest)
}

/// [`registration`], where a `returning` device must be among `existing`.
pub(crate) fn registration_of(
    existing: &[ClientRecord],
    client: &ClientRecord,
    returning: bool,
    max_devices: usize,
    evict_oldest: bool,
) -> Result<Registered, StoreError> {
    if existing.iter().any(|c| c.client_id == client.client_id) {
        Ok(Registered::Known)
    } else if returning {
        Err(StoreError::UnknownDevice {
            user: client.user,
            client: client.client_id,
        })
    } else if existing.len() < max_devices {
        Ok(Registered::New)
    } else if let (true, Some(oldest)) =
        (evict_oldest, existing.iter().min_by_key(|c| c.last_seen_ms))
    {
        Ok(Registered::Evicted(oldest.client_id))
    } else {
        Err(StoreError::TooManyDevices {
            user: client.user,
            max: max_devices,
        })
    }
}

/// A registered device: the user that owns it and its issued id. Every
/// per-device row (inbox, acks) is keyed by both, so naming another user's
/// device id reaches nothing.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Device {
    pub user: u64,
    pub client: u64,
}

/// The idempotency key of a send: retries with the same
/// `(scope, conversation, client_msg_id)` within `ttl_ms` return the first
/// message id. The scope is who sends: `d:{user}:{client}` for a device,
/// `p:{subject}` for a publisher, so two senders (or one sender in two
/// conversations) never share a key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dedupe {
    pub scope: String,
    pub client_msg_id: u64,
    /// When the key is written (it expires `ttl_ms` after).
    pub now_ms: u64,
    pub ttl_ms: u64,
}

impl Dedupe {
    pub fn device_scope(user: u64, client: u64) -> String {
        format!("d:{user}:{client}")
    }

    pub fn publisher_scope(subject: &str) -> String {
        format!("p:{subject}")
    }
}

/// A message to persist with what must be written beside it atomically.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub message: Message,
    /// The idempotency key, if the sender gave a client message id.
    pub dedupe: Option<Dedupe>,
    /// Devices that get an inbox-pending row (tier 1).
    pub inbox: Vec<Device>,
}

/// What persisting a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persisted {
    Stored,
    /// The same (client, client_msg_id) was stored before as this id;
    /// nothing new was written.
    Duplicate(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conversation {0} already exists")]
    ConversationExists(u64),
    #[error("conversation {0} does not exist")]
    NoSuchConversation(u64),
    #[error("user {user} already has {max} devices")]
    TooManyDevices { user: u64, max: usize },
    #[error("device {client} is not registered to user {user}")]
    UnknownDevice { user: u64, client: u64 },
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("storage backend failed: {0}")]
    Backend(String),
}

/// One page of a conversation's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Only ids below this (0 = no upper bound).
    pub before: u64,
    /// Only ids above this.
    pub after: u64,
    pub limit: usize,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Counts this store's own work in the engine's metrics (the embedded
    /// store: its group commits, `store_commit` in the store batch
    /// counters). Called once, by the engine that uses the store.
    fn count_in(&self, _metrics: &crate::metrics::EngineMetrics) {}

    async fn create_conversation(&self, conv: &Conversation) -> Result<(), StoreError>;
    async fn conversation(&self, id: u64) -> Result<Option<Conversation>, StoreError>;
    async fn set_pinned_tier(&self, id: u64, tier: Option<Tier>) -> Result<(), StoreError>;
    async fn set_tier(&self, id: u64, tier: Tier) -> Result<(), StoreError>;

    /// Adds members (keeping `member_count`); returns those that were not
    /// members before. Adding a member twice is a no-op.
    async fn add_members(&self, conv: u64, users: &[u64]) -> Result<Vec<u64>, StoreError>;
    /// Whether the user was a member (keeping `member_count`).
    async fn remove_member(&self, conv: u64, user: u64) -> Result<bool, StoreError>;
    async fn members(&self, conv: u64) -> Result<Vec<u64>, StoreError>;
    /// Up to `limit` members with ids above `after`, ascending: a page of a
    /// member list that may hold millions.
    async fn members_page(
        &self,
        conv: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError>;
    async fn is_member(&self, conv: u64, user: u64) -> Result<bool, StoreError>;
    async fn conversations_of(&self, user: u64) -> Result<Vec<u64>, StoreError>;

    /// Registers (or refreshes) a device. A user holds at most `max_devices`;
    /// past that the call fails, or with `evict_oldest` removes the least
    /// recently seen device and its inbox.
    async fn register_client(
        &self,
        client: &ClientRecord,
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Registered, StoreError>;
    async fn clients_of(&self, user: u64) -> Result<Vec<ClientRecord>, StoreError>;

    /// Registers several devices in one call, in order (an entry sees the
    /// ones before it): one outcome per entry, as [`Self::register_client`]
    /// would give it, or [`StoreError::UnknownDevice`] for a returning
    /// device that is not the user's. The call fails as a whole only when
    /// the backend does. What a reconnect storm's registrations cost: one
    /// call for many devices (a backend without batches runs the users
    /// concurrently, each user's entries in order).
    async fn register_clients(
        &self,
        regs: &[Registration],
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Vec<Result<Registered, StoreError>>, StoreError> {
        use futures::StreamExt;
        let mut by_user: Vec<(u64, Vec<usize>)> = Vec::new();
        for (i, r) in regs.iter().enumerate() {
            match by_user.iter_mut().find(|(u, _)| *u == r.client.user) {
                Some((_, idx)) => idx.push(i),
                None => by_user.push((r.client.user, vec![i])),
            }
        }
        let groups = futures::stream::iter(by_user)
            .map(|(user, idx)| async move {
                let mut out = Vec::with_capacity(idx.len());
                for i in idx {
                    let r = &regs[i];
                    let outcome = if r.returning {
                        let known = self
                            .clients_of(user)
                            .await?
                            .iter()
                            .any(|c| c.client_id == r.client.client_id);
                        if known {
                            self.register_client(&r.client, max_devices, evict_oldest)
                                .await
                        } else {
                            Err(StoreError::UnknownDevice {
                                user,
                                client: r.client.client_id,
                            })
                        }
                    } else {
                        self.register_client(&r.client, max_devices, evict_oldest)
                            .await
                    };
                    match outcome {
                        Err(e @ StoreError::Backend(_)) => return Err(e),
                        o => out.push((i, o)),
                    }
                }
                Ok::<_, StoreError>(out)
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let mut slots: Vec<Option<Result<Registered, StoreError>>> =
            (0..regs.len()).map(|_| None).collect();
        for g in groups {
            for (i, o) in g? {
                slots[i] = Some(o);
            }
        }
        Ok(slots
            .into_iter()
            .map(|o| o.expect("every entry answered"))
            .collect())
    }

    /// The conversations of several users in one call: one list per user,
    /// in the order given.
    async fn conversations_of_users(&self, users: &[u64]) -> Result<Vec<Vec<u64>>, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(users.iter().copied())
            .map(|u| self.conversations_of(u))
            .buffered(32)
            .try_collect()
            .await
    }
    /// The registered devices of several users, in one read.
    async fn devices_of(&self, users: &[u64]) -> Result<Vec<Device>, StoreError>;

    /// Refreshes the last-seen time of registered devices `(user, client)`;
    /// unknown ones are skipped.
    async fn touch_clients(&self, clients: &[(u64, u64)], now_ms: u64) -> Result<(), StoreError>;
    /// Removes up to `limit` devices last seen before `unseen_before_ms`,
    /// each with its pending inbox; returns them.
    async fn expire_clients(
        &self,
        unseen_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ClientRecord>, StoreError>;

    /// Stores read markers, keeping per (user, conversation) the largest id
    /// ever given (a marker never moves back).
    async fn set_read_marks(&self, marks: &[ReadMark]) -> Result<(), StoreError>;
    /// The user's read markers for `convs`, as `(conversation, id)`, for
    /// those that have one.
    async fn read_marks(&self, user: u64, convs: &[u64]) -> Result<Vec<(u64, u64)>, StoreError>;

    /// Stores a message, its inbox rows and its idempotency key atomically.
    /// A key older than its TTL counts as absent.
    async fn insert_message(&self, msg: &NewMessage) -> Result<Persisted, StoreError>;
    /// Removes up to `limit` idempotency keys that expired before `now_ms`;
    /// returns how many. (A backend whose keys expire by themselves returns
    /// 0.)
    async fn expire_dedupe(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError>;
    async fn message(&self, conv: u64, id: u64) -> Result<Option<Message>, StoreError>;
    /// History newest first within `page`.
    async fn history(&self, conv: u64, page: Page) -> Result<Vec<Message>, StoreError>;
    /// The oldest `limit` messages with ids above `after`, oldest first (a
    /// device catching up from its cursor).
    async fn since(&self, conv: u64, after: u64, limit: usize) -> Result<Vec<Message>, StoreError>;

    /// Everything a send by `sender` (0: the backend) to `conv` reads
    /// before it stores, in one call: one read snapshot in the embedded
    /// store, one request to a remote one. A backend without snapshots
    /// reads the conversation and the membership concurrently, then the
    /// members and their devices.
    async fn send_context(&self, conv: u64, sender: u64) -> Result<SendContext, StoreError> {
        send_context_by_single_reads(self, conv, sender).await
    }

    /// For each of `convs`: the conversation, whether `user` is a member
    /// and its newest message id, in one call (a Sync's cursors; a backend
    /// without batches reads them concurrently).
    async fn conversation_states(
        &self,
        user: u64,
        convs: &[u64],
    ) -> Result<Vec<ConversationState>, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(convs.iter().copied())
            .map(|c| async move {
                let conversation = self.conversation(c).await?;
                if conversation.is_none() {
                    return Ok(ConversationState {
                        conversation,
                        member: false,
                        latest_id: 0,
                    });
                }
                let member = self.is_member(c, user).await?;
                let latest_id = self
                    .history(
                        c,
                        Page {
                            before: 0,
                            after: 0,
                            limit: 1,
                        },
                    )
                    .await?
                    .first()
                    .map_or(0, |m| m.id);
                Ok(ConversationState {
                    conversation,
                    member,
                    latest_id,
                })
            })
            .buffered(16)
            .try_collect()
            .await
    }
    /// [`Self::since`] for several `(conversation, after)`, one list per
    /// entry, in one call: a Sync's pages.
    async fn since_many(
        &self,
        reads: &[(u64, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<Message>>, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(reads.iter().copied())
            .map(|(c, after)| self.since(c, after, limit))
            .buffered(16)
            .try_collect()
            .await
    }

    /// Pending inbox of a device, oldest first, ids above `after`.
    async fn inbox(
        &self,
        device: Device,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;
    /// The pending inboxes of several devices in one call (each as
    /// [`Self::inbox`] with its own `after`), one list per entry, in order:
    /// the inbox checks of many devices connecting at once.
    async fn inboxes(
        &self,
        devices: &[(Device, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<Message>>, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(devices.iter().copied())
            .map(|(d, after)| self.inbox(d, after, limit))
            .buffered(32)
            .try_collect()
            .await
    }
    /// Removes acked ids from a device's inbox; returns how many were
    /// pending.
    async fn ack(&self, device: Device, ids: &[u64]) -> Result<u32, StoreError>;
}

/// [`Store::send_context`] from the single reads: the conversation and the
/// membership concurrently, then (tier 1, a sender who may send) the
/// members and their devices. The trait's default, and what a remote store
/// falls back to against an engine service that predates the call.
pub async fn send_context_by_single_reads<S: Store + ?Sized>(
    store: &S,
    conv: u64,
    sender: u64,
) -> Result<SendContext, StoreError> {
    let (conversation, allowed) = futures::try_join!(store.conversation(conv), async {
        if sender == 0 {
            Ok(true)
        } else {
            store.is_member(conv, sender).await
        }
    })?;
    if !allowed {
        return Ok(SendContext::default());
    }
    let (members, devices) = match &conversation {
        Some(c) if c.tier == Tier::Direct => {
            let members = store.members(conv).await?;
            let devices = store.devices_of(&members).await?;
            (members, devices)
        }
        _ => (Vec::new(), Vec::new()),
    };
    Ok(SendContext {
        allowed,
        conversation,
        members,
        devices,
    })
}
