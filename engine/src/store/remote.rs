//! A `Store` served by another process: the engine service (`tiercast
//! engine`) owns the embedded store and serves it at `POST /internal/store`,
//! and edge processes (`tiercast edge --set node.store_url=...`) use it
//! through this client. It lets several edge processes share one embedded
//! store on one machine or a small deployment; a large deployment uses
//! ScyllaDB, which every process reaches directly.
//!
//! One call, one HTTP request (keep-alive, JSON). The same conformance rules
//! as every backend run against it in the tests.

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::Message;

use super::{
    ClientRecord, Conversation, ConversationState, Dedupe, Device, NewMessage, Page, Persisted,
    ReadMark, Registered, Registration, SendContext, Store, StoreError,
};

/// A message as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageJson {
    pub id: u64,
    pub conversation: u64,
    pub sender: u64,
    pub sender_client: u64,
    pub body: Vec<u8>,
}

impl From<&Message> for MessageJson {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id,
            conversation: m.conversation,
            sender: m.sender,
            sender_client: m.sender_client,
            body: m.body.to_vec(),
        }
    }
}

impl From<MessageJson> for Message {
    fn from(m: MessageJson) -> Self {
        Self {
            id: m.id,
            conversation: m.conversation,
            sender: m.sender,
            sender_client: m.sender_client,
            body: Bytes::from(m.body),
        }
    }
}

/// One store call.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    CreateConversation {
        conv: Conversation,
    },
    Conversation {
        id: u64,
    },
    SetPinnedTier {
        id: u64,
        #[serde(with = "super::tier_number::optional")]
        tier: Option<Tier>,
    },
    SetTier {
        id: u64,
        #[serde(with = "super::tier_number")]
        tier: Tier,
    },
    AddMembers {
        conv: u64,
        users: Vec<u64>,
    },
    RemoveMember {
        conv: u64,
        user: u64,
    },
    Members {
        conv: u64,
    },
    MembersPage {
        conv: u64,
        after: u64,
        limit: usize,
    },
    IsMember {
        conv: u64,
        user: u64,
    },
    ConversationsOf {
        user: u64,
    },
    RegisterClient {
        client: ClientRecord,
        max_devices: usize,
        evict_oldest: bool,
    },
    ClientsOf {
        user: u64,
    },
    RegisterClients {
        regs: Vec<Registration>,
        max_devices: usize,
        evict_oldest: bool,
    },
    ConversationsOfUsers {
        users: Vec<u64>,
    },
    DevicesOf {
        users: Vec<u64>,
    },
    InsertMessage {
        message: MessageJson,
        dedupe: Option<Dedupe>,
        inbox: Vec<Device>,
    },
    ExpireDedupe {
        now_ms: u64,
        limit: usize,
    },
    Message {
        conv: u64,
        id: u64,
    },
    Since {
        conv: u64,
        after: u64,
        limit: usize,
    },
    History {
        conv: u64,
        before: u64,
        after: u64,
        limit: usize,
    },
    Inbox {
        device: Device,
        after: u64,
        limit: usize,
    },
    Ack {
        device: Device,
        ids: Vec<u64>,
    },
    Inboxes {
        devices: Vec<(Device, u64)>,
        limit: usize,
    },
    ConversationStates {
        user: u64,
        convs: Vec<u64>,
    },
    SendContext {
        conv: u64,
        sender: u64,
    },
    SinceMany {
        reads: Vec<(u64, u64)>,
        limit: usize,
    },
    TouchClients {
        clients: Vec<(u64, u64)>,
        now_ms: u64,
    },
    ExpireClients {
        unseen_before_ms: u64,
        limit: usize,
    },
    SetReadMarks {
        marks: Vec<ReadMark>,
    },
    ReadMarks {
        user: u64,
        convs: Vec<u64>,
    },
}

impl Call {
    /// The call's `op`, as on the wire (a metric's label).
    pub fn op(&self) -> &'static str {
        match self {
            Call::CreateConversation { .. } => "create_conversation",
            Call::Conversation { .. } => "conversation",
            Call::SetPinnedTier { .. } => "set_pinned_tier",
            Call::SetTier { .. } => "set_tier",
            Call::AddMembers { .. } => "add_members",
            Call::RemoveMember { .. } => "remove_member",
            Call::Members { .. } => "members",
            Call::MembersPage { .. } => "members_page",
            Call::IsMember { .. } => "is_member",
            Call::ConversationsOf { .. } => "conversations_of",
            Call::RegisterClient { .. } => "register_client",
            Call::ClientsOf { .. } => "clients_of",
            Call::RegisterClients { .. } => "register_clients",
            Call::ConversationsOfUsers { .. } => "conversations_of_users",
            Call::DevicesOf { .. } => "devices_of",
            Call::InsertMessage { .. } => "insert_message",
            Call::ExpireDedupe { .. } => "expire_dedupe",
            Call::Message { .. } => "message",
            Call::Since { .. } => "since",
            Call::History { .. } => "history",
            Call::Inbox { .. } => "inbox",
            Call::Ack { .. } => "ack",
            Call::Inboxes { .. } => "inboxes",
            Call::ConversationStates { .. } => "conversation_states",
            Call::SendContext { .. } => "send_context",
            Call::SinceMany { .. } => "since_many",
            Call::TouchClients { .. } => "touch_clients",
            Call::ExpireClients { .. } => "expire_clients",
            Call::SetReadMarks { .. } => "set_read_marks",
            Call::ReadMarks { .. } => "read_marks",
        }
    }
}

/// A store error as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum ErrorJson {
    ConversationExists { id: u64 },
    NoSuchConversation { id: u64 },
    TooManyDevices { user: u64, max: usize },
    UnknownDevice { user: u64, client: u64 },
    Corrupt { reason: String },
    Backend { reason: String },
}

impl From<StoreError> for ErrorJson {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ConversationExists(id) => Self::ConversationExists { id },
            StoreError::NoSuchConversation(id) => Self::NoSuchConversation { id },
            StoreError::TooManyDevices { user, max } => Self::TooManyDevices { user, max },
            StoreError::UnknownDevice { user, client } => Self::UnknownDevice { user, client },
            StoreError::Corrupt(reason) => Self::Corrupt { reason },
            StoreError::Backend(reason) => Self::Backend { reason },
        }
    }
}

impl From<ErrorJson> for StoreError {
    fn from(e: ErrorJson) -> Self {
        match e {
            ErrorJson::ConversationExists { id } => Self::ConversationExists(id),
            ErrorJson::NoSuchConversation { id } => Self::NoSuchConversation(id),
            ErrorJson::TooManyDevices { user, max } => Self::TooManyDevices { user, max },
            ErrorJson::UnknownDevice { user, client } => Self::UnknownDevice { user, client },
            ErrorJson::Corrupt { reason } => Self::Corrupt(reason),
            ErrorJson::Backend { reason } => Self::Backend(reason),
        }
    }
}

fn to_value<T: Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).expect("plain data serializes")
}

/// Serves one call against `store` (the engine service's side).
pub async fn serve(store: &dyn Store, call: Call) -> Result<serde_json::Value, ErrorJson> {
    Ok(match call {
        Call::CreateConversation { conv } => to_value(store.create_conversation(&conv).await?),
        Call::Conversation { id } => to_value(store.conversation(id).await?),
        Call::SetPinnedTier { id, tier } => to_value(store.set_pinned_tier(id, tier).await?),
        Call::SetTier { id, tier } => to_value(store.set_tier(id, tier).await?),
        Call::AddMembers { conv, users } => to_value(store.add_members(conv, &users).await?),
        Call::RemoveMember { conv, user } => to_value(store.remove_member(conv, user).await?),
        Call::Members { conv } => to_value(store.members(conv).await?),
        Call::MembersPage { conv, after, limit } => {
            to_value(store.members_page(conv, after, limit).await?)
        }
        Call::IsMember { conv, user } => to_value(store.is_member(conv, user).await?),
        Call::ConversationsOf { user } => to_value(store.conversations_of(user).await?),
        Call::RegisterClient {
            client,
            max_devices,
            evict_oldest,
        } => to_value(
            match store
                .register_client(&client, max_devices, evict_oldest)
                .await?
            {
                Registered::Known => serde_json::json!({"known": true}),
                Registered::New => serde_json::json!({"new": true}),
                Registered::Evicted(c) => serde_json::json!({"evicted": c}),
            },
        ),
        Call::ClientsOf { user } => to_value(store.clients_of(user).await?),
        Call::RegisterClients {
            regs,
            max_devices,
            evict_oldest,
        } => to_value(
            store
                .register_clients(&regs, max_devices, evict_oldest)
                .await?
                .into_iter()
                .map(|o| o.map_err(ErrorJson::from))
                .collect::<Vec<_>>(),
        ),
        Call::ConversationsOfUsers { users } => {
            to_value(store.conversations_of_users(&users).await?)
        }
        Call::DevicesOf { users } => to_value(store.devices_of(&users).await?),
        Call::ExpireDedupe { now_ms, limit } => to_value(store.expire_dedupe(now_ms, limit).await?),
        Call::InsertMessage {
            message,
            dedupe,
            inbox,
        } => {
            let msg = NewMessage {
                message: message.into(),
                dedupe,
                inbox,
            };
            match store.insert_message(&msg).await? {
                Persisted::Stored => serde_json::json!({"stored": true}),
                Persisted::Duplicate(id) => serde_json::json!({"duplicate": id}),
            }
        }
        Call::Message { conv, id } => to_value(
            store
                .message(conv, id)
                .await?
                .as_ref()
                .map(MessageJson::from),
        ),
        Call::History {
            conv,
            before,
            after,
            limit,
        } => to_value(
            store
                .history(
                    conv,
                    Page {
                        before,
                        after,
                        limit,
                    },
                )
                .await?
                .iter()
                .map(MessageJson::from)
                .collect::<Vec<_>>(),
        ),
        Call::Inbox {
            device,
            after,
            limit,
        } => to_value(
            store
                .inbox(device, after, limit)
                .await?
                .iter()
                .map(MessageJson::from)
                .collect::<Vec<_>>(),
        ),
        Call::Ack { device, ids } => to_value(store.ack(device, &ids).await?),
        Call::ConversationStates { user, convs } => {
            to_value(store.conversation_states(user, &convs).await?)
        }
        Call::SendContext { conv, sender } => to_value(store.send_context(conv, sender).await?),
        Call::SinceMany { reads, limit } => to_value(
            store
                .since_many(&reads, limit)
                .await?
                .iter()
                .map(|page| page.iter().map(MessageJson::from).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        ),
        Call::Inboxes { devices, limit } => to_value(
            store
                .inboxes(&devices, limit)
                .await?
                .iter()
                .map(|page| page.iter().map(MessageJson::from).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        ),
        Call::Since { conv, after, limit } => to_value(
            store
                .since(conv, after, limit)
                .await?
                .iter()
                .map(MessageJson::from)
                .collect::<Vec<_>>(),
        ),
        Call::TouchClients { clients, now_ms } => {
            to_value(store.touch_clients(&clients, now_ms).await?)
        }
        Call::ExpireClients {
            unseen_before_ms,
            limit,
        } => to_value(store.expire_clients(unseen_before_ms, limit).await?),
        Call::SetReadMarks { marks } => to_value(store.set_read_marks(&marks).await?),
        Call::ReadMarks { user, convs } => to_value(store.read_marks(user, &convs).await?),
    })
}

/// The client side: a `Store` whose calls go to an engine service.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    url: String,
    keys: crate::auth::TokenKeys,
    http: reqwest::Client,
    /// The engine service predates `send_context` (a rolling upgrade that
    /// reached this edge first): sends read through the single calls.
    single_send_reads: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RemoteStore {
    /// `base` is the engine service's HTTP address (`http://host:port`);
    /// `keys` (the internal credential's) sign the short-lived internal
    /// token of each call.
    pub fn new(base: &str, keys: crate::auth::TokenKeys) -> Self {
        Self::with_ca(base, keys, None).expect("a client without a CA builds")
    }

    /// Like [`Self::new`]; an `https://` base is verified against the CA
    /// certificates in `ca_pem` (only those: no system roots).
    pub fn with_ca(
        base: &str,
        keys: crate::auth::TokenKeys,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, StoreError> {
        let mut b = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .tls_built_in_root_certs(false);
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| StoreError::Backend(format!("store CA: {e}")))?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
            b = b.https_only(true);
        }
        Ok(Self {
            url: format!("{}/internal/store", base.trim_end_matches('/')),
            keys,
            http: b
                .build()
                .map_err(|e| StoreError::Backend(format!("HTTP client: {e}")))?,
            single_send_reads: Default::default(),
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, call: Call) -> Result<T, StoreError> {
        let resp = self
            .http
            .post(&self.url)
            .bearer_auth(
                self.keys
                    .mint_internal("edge", crate::auth::now_unix(), 300),
            )
            .json(&call)
            .send()
            .await
            .map_err(|e| StoreError::Backend(format!("engine service unreachable: {e}")))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| StoreError::Backend(format!("bad answer from the engine service: {e}")))?;
        if status.is_success() {
            serde_json::from_value(body).map_err(|e| StoreError::Backend(e.to_string()))
        } else {
            match serde_json::from_value::<ErrorJson>(body.clone()) {
                Ok(e) => Err(e.into()),
                Err(_) => Err(StoreError::Backend(format!(
                    "engine service: {status}: {body}"
                ))),
            }
        }
    }
}

#[async_trait]
impl Store for RemoteStore {
    async fn create_conversation(&self, conv: &Conversation) -> Result<(), StoreError> {
        self.call(Call::CreateConversation { conv: conv.clone() })
            .await
    }
    async fn conversation(&self, id: u64) -> Result<Option<Conversation>, StoreError> {
        self.call(Call::Conversation { id }).await
    }
    async fn set_pinned_tier(&self, id: u64, tier: Option<Tier>) -> Result<(), StoreError> {
        self.call(Call::SetPinnedTier { id, tier }).await
    }
    async fn set_tier(&self, id: u64, tier: Tier) -> Result<(), StoreError> {
        self.call(Call::SetTier { id, tier }).await
    }
    async fn add_members(&self, conv: u64, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        self.call(Call::AddMembers {
            conv,
            users: users.to_vec(),
        })
        .await
    }
    async fn remove_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        self.call(Call::RemoveMember { conv, user }).await
    }
    async fn members(&self, conv: u64) -> Result<Vec<u64>, StoreError> {
        self.call(Call::Members { conv }).await
    }
    async fn members_page(
        &self,
        conv: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        self.call(Call::MembersPage { conv, after, limit }).await
    }
    async fn is_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        self.call(Call::IsMember { conv, user }).await
    }
    async fn conversations_of(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        self.call(Call::ConversationsOf { user }).await
    }
    async fn register_client(
        &self,
        client: &ClientRecord,
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Registered, StoreError> {
        let v: serde_json::Value = self
            .call(Call::RegisterClient {
                client: client.clone(),
                max_devices,
                evict_oldest,
            })
            .await?;
        Ok(if let Some(c) = v.get("evicted").and_then(|c| c.as_u64()) {
            Registered::Evicted(c)
        } else if v.get("new").is_some() {
            Registered::New
        } else {
            Registered::Known
        })
    }
    async fn clients_of(&self, user: u64) -> Result<Vec<ClientRecord>, StoreError> {
        self.call(Call::ClientsOf { user }).await
    }
    async fn register_clients(
        &self,
        regs: &[Registration],
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Vec<Result<Registered, StoreError>>, StoreError> {
        let out: Vec<Result<Registered, ErrorJson>> = self
            .call(Call::RegisterClients {
                regs: regs.to_vec(),
                max_devices,
                evict_oldest,
            })
            .await?;
        let out = super::one_each(out, regs.len(), ("outcomes", "registrations"))?;
        Ok(out
            .into_iter()
            .map(|o| o.map_err(StoreError::from))
            .collect())
    }
    async fn conversations_of_users(&self, users: &[u64]) -> Result<Vec<Vec<u64>>, StoreError> {
        let out: Vec<Vec<u64>> = self
            .call(Call::ConversationsOfUsers {
                users: users.to_vec(),
            })
            .await?;
        super::one_each(out, users.len(), ("lists", "users"))
    }
    async fn devices_of(&self, users: &[u64]) -> Result<Vec<Device>, StoreError> {
        self.call(Call::DevicesOf {
            users: users.to_vec(),
        })
        .await
    }
    async fn insert_message(&self, msg: &NewMessage) -> Result<Persisted, StoreError> {
        let v: serde_json::Value = self
            .call(Call::InsertMessage {
                message: MessageJson::from(&msg.message),
                dedupe: msg.dedupe.clone(),
                inbox: msg.inbox.clone(),
            })
            .await?;
        Ok(match v.get("duplicate").and_then(|d| d.as_u64()) {
            Some(id) => Persisted::Duplicate(id),
            None => Persisted::Stored,
        })
    }
    async fn message(&self, conv: u64, id: u64) -> Result<Option<Message>, StoreError> {
        let m: Option<MessageJson> = self.call(Call::Message { conv, id }).await?;
        Ok(m.map(Message::from))
    }
    async fn history(&self, conv: u64, page: Page) -> Result<Vec<Message>, StoreError> {
        let ms: Vec<MessageJson> = self
            .call(Call::History {
                conv,
                before: page.before,
                after: page.after,
                limit: page.limit,
            })
            .await?;
        Ok(ms.into_iter().map(Message::from).collect())
    }
    async fn expire_dedupe(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.call(Call::ExpireDedupe { now_ms, limit }).await
    }
    async fn inbox(
        &self,
        device: Device,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let ms: Vec<MessageJson> = self
            .call(Call::Inbox {
                device,
                after,
                limit,
            })
            .await?;
        Ok(ms.into_iter().map(Message::from).collect())
    }
    async fn conversation_states(
        &self,
        user: u64,
        convs: &[u64],
    ) -> Result<Vec<ConversationState>, StoreError> {
        let out: Vec<ConversationState> = self
            .call(Call::ConversationStates {
                user,
                convs: convs.to_vec(),
            })
            .await?;
        super::one_each(out, convs.len(), ("states", "conversations"))
    }
    /// One request instead of four. An engine service that does not know
    /// the call (older than this edge, mid-upgrade) refuses it as an
    /// unknown variant; from then on this store reads a send's context
    /// through the single calls, as before the call existed.
    async fn send_context(&self, conv: u64, sender: u64) -> Result<SendContext, StoreError> {
        use std::sync::atomic::Ordering;
        if !self.single_send_reads.load(Ordering::Relaxed) {
            match self.call(Call::SendContext { conv, sender }).await {
                Err(StoreError::Backend(reason))
                    if reason.contains("unknown variant `send_context`") =>
                {
                    if !self.single_send_reads.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "the engine service does not know send_context (older than this edge): sends read the store in four calls until it is upgraded and this edge restarts"
                        );
                    }
                }
                answer => return answer,
            }
        }
        super::send_context_by_single_reads(self, conv, sender).await
    }
    async fn since_many(
        &self,
        reads: &[(u64, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<Message>>, StoreError> {
        let pages: Vec<Vec<MessageJson>> = self
            .call(Call::SinceMany {
                reads: reads.to_vec(),
                limit,
            })
            .await?;
        let pages = super::one_each(pages, reads.len(), ("pages", "reads"))?;
        Ok(pages
            .into_iter()
            .map(|p| p.into_iter().map(Message::from).collect())
            .collect())
    }
    async fn inboxes(
        &self,
        devices: &[(Device, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<Message>>, StoreError> {
        let pages: Vec<Vec<MessageJson>> = self
            .call(Call::Inboxes {
                devices: devices.to_vec(),
                limit,
            })
            .await?;
        let pages = super::one_each(pages, devices.len(), ("inboxes", "devices"))?;
        Ok(pages
            .into_iter()
            .map(|p| p.into_iter().map(Message::from).collect())
            .collect())
    }
    async fn ack(&self, device: Device, ids: &[u64]) -> Result<u32, StoreError> {
        self.call(Call::Ack {
            device,
            ids: ids.to_vec(),
        })
        .await
    }
    async fn since(&self, conv: u64, after: u64, limit: usize) -> Result<Vec<Message>, StoreError> {
        let ms: Vec<MessageJson> = self.call(Call::Since { conv, after, limit }).await?;
        Ok(ms.into_iter().map(Message::from).collect())
    }
    async fn touch_clients(&self, clients: &[(u64, u64)], now_ms: u64) -> Result<(), StoreError> {
        self.call(Call::TouchClients {
            clients: clients.to_vec(),
            now_ms,
        })
        .await
    }
    async fn expire_clients(
        &self,
        unseen_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ClientRecord>, StoreError> {
        self.call(Call::ExpireClients {
            unseen_before_ms,
            limit,
        })
        .await
    }
    async fn set_read_marks(&self, marks: &[ReadMark]) -> Result<(), StoreError> {
        self.call(Call::SetReadMarks {
            marks: marks.to_vec(),
        })
        .await
    }
    async fn read_marks(&self, user: u64, convs: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        self.call(Call::ReadMarks {
            user,
            convs: convs.to_vec(),
        })
        .await
    }
}
