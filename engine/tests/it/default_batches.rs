//! The `Store` trait's own batch calls (`register_clients`,
//! `conversations_of_users`, `inboxes`, `conversation_states`,
//! `since_many`, `send_context`), which the ScyllaDB backend uses as they
//! are: a store that implements only the single calls (here by handing them
//! to an embedded store) must pass the same conformance rules as one with
//! its own batches.
//! No ScyllaDB server runs here, so this is where those defaults are
//! checked.

use async_trait::async_trait;
use tiercast_engine::store::{
    ClientRecord, Conversation, Device, EmbeddedStore, NewMessage, Page, Persisted, ReadMark,
    Registered, Store, StoreError, conformance,
};
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::Message;

/// Every single call handed to `0`; every batch call the trait's default.
struct SingleCallsOnly(EmbeddedStore);

#[async_trait]
impl Store for SingleCallsOnly {
    async fn create_conversation(&self, conv: &Conversation) -> Result<(), StoreError> {
        self.0.create_conversation(conv).await
    }
    async fn conversation(&self, id: u64) -> Result<Option<Conversation>, StoreError> {
        self.0.conversation(id).await
    }
    async fn set_pinned_tier(&self, id: u64, tier: Option<Tier>) -> Result<(), StoreError> {
        self.0.set_pinned_tier(id, tier).await
    }
    async fn set_tier(&self, id: u64, tier: Tier) -> Result<(), StoreError> {
        self.0.set_tier(id, tier).await
    }
    async fn add_members(&self, conv: u64, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        self.0.add_members(conv, users).await
    }
    async fn remove_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        self.0.remove_member(conv, user).await
    }
    async fn members(&self, conv: u64) -> Result<Vec<u64>, StoreError> {
        self.0.members(conv).await
    }
    async fn members_page(
        &self,
        conv: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        self.0.members_page(conv, after, limit).await
    }
    async fn is_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        self.0.is_member(conv, user).await
    }
    async fn conversations_of(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        self.0.conversations_of(user).await
    }
    async fn register_client(
        &self,
        client: &ClientRecord,
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Registered, StoreError> {
        self.0
            .register_client(client, max_devices, evict_oldest)
            .await
    }
    async fn clients_of(&self, user: u64) -> Result<Vec<ClientRecord>, StoreError> {
        self.0.clients_of(user).await
    }
    async fn devices_of(&self, users: &[u64]) -> Result<Vec<Device>, StoreError> {
        self.0.devices_of(users).await
    }
    async fn touch_clients(&self, clients: &[(u64, u64)], now_ms: u64) -> Result<(), StoreError> {
        self.0.touch_clients(clients, now_ms).await
    }
    async fn expire_clients(
        &self,
        unseen_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ClientRecord>, StoreError> {
        self.0.expire_clients(unseen_before_ms, limit).await
    }
    async fn set_read_marks(&self, marks: &[ReadMark]) -> Result<(), StoreError> {
        self.0.set_read_marks(marks).await
    }
    async fn read_marks(&self, user: u64, convs: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        self.0.read_marks(user, convs).await
    }
    async fn insert_message(&self, msg: &NewMessage) -> Result<Persisted, StoreError> {
        self.0.insert_message(msg).await
    }
    async fn expire_dedupe(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.0.expire_dedupe(now_ms, limit).await
    }
    async fn message(&self, conv: u64, id: u64) -> Result<Option<Message>, StoreError> {
        self.0.message(conv, id).await
    }
    async fn history(&self, conv: u64, page: Page) -> Result<Vec<Message>, StoreError> {
        self.0.history(conv, page).await
    }
    async fn since(&self, conv: u64, after: u64, limit: usize) -> Result<Vec<Message>, StoreError> {
        self.0.since(conv, after, limit).await
    }
    async fn inbox(
        &self,
        device: Device,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.0.inbox(device, after, limit).await
    }
    async fn ack(&self, device: Device, ids: &[u64]) -> Result<u32, StoreError> {
        self.0.ack(device, ids).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traits_own_batch_calls_conform() {
    let dir = tempfile::tempdir().unwrap();
    let store = SingleCallsOnly(EmbeddedStore::open(&dir.path().join("t.redb")).unwrap());
    conformance::run_all(&store).await;
}
