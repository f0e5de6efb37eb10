//! The embedded store: one redb file (docs/adr/0001-embedded-store.md says
//! why redb).
//!
//! Writes go through one writer thread that commits them in groups: it takes
//! every write waiting, applies them in one transaction and fsyncs once, then
//! answers each. A message and its inbox rows still commit together or not at
//! all, and nothing is acknowledged before it is on disk (redb's
//! `Durability::Immediate`), but concurrent senders share an fsync instead of
//! queueing for one each. Reads run on tokio's blocking pool against MVCC
//! snapshots and never wait for the writer.
//!
//! Invariant of every write job: it returns a logical error (a conversation
//! that exists, a device limit) before it writes anything, so a refused job
//! never leaves half a change in the shared transaction.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tiercast_schemas::wire::Message;
use tokio::sync::oneshot;

use super::{
    ClientRecord, Conversation, Device, NewMessage, Page, Persisted, ReadMark, Registered, Store,
    StoreError,
};

const CONVERSATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("conversations");
/// (conversation, user)
const MEMBERS: TableDefinition<(u64, u64), ()> = TableDefinition::new("members");
/// (user, conversation)
const USER_CONVERSATIONS: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("user_conversations");
/// (user, client) -> ClientRecord as JSON
const CLIENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("clients");
/// (conversation, message id) -> sender, sender client, body
const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");
/// (user, client, message id) -> conversation. Keyed by the owner too: a
/// device id alone reaches nothing.
const INBOX: TableDefinition<(u64, u64, u64), u64> = TableDefinition::new("device_inbox");
/// (user, conversation) -> id of the newest message read.
const READS: TableDefinition<(u64, u64), u64> = TableDefinition::new("reads");
/// (scope, conversation, client message id) -> (message id, expires at ms)
const DEDUPE: TableDefinition<(&str, u64, u64), (u64, u64)> = TableDefinition::new("dedupe");
/// (expires at ms, message id) -> the DEDUPE key, for the expiry sweep.
const DEDUPE_EXPIRY: TableDefinition<(u64, u64), (&str, u64, u64)> =
    TableDefinition::new("dedupe_expiry");

/// Most writes one group commit takes. Bounds the latency a commit adds to
/// the first write of the group, and the size of the transaction.
const MAX_GROUP: usize = 512;

/// Groups of only lazy writes (acks, last-seen times) committed without an
/// fsync before one is made durable anyway.
const LAZY_GROUPS: u32 = 64;

/// A write job's answer, called once the group's commit is known.
type Completion = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A write job: applies itself to the group's transaction (or answers the
/// error that kept one from being begun). The flag says the transaction may
/// be damaged (a backend error mid-write): the group aborts.
type Job = Box<dyn FnOnce(Result<&WriteTransaction, &StoreError>) -> (Completion, bool) + Send>;

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: Arc<Writer>,
}

/// The writer thread's handle. When the last store handle goes, the job
/// queue closes, the thread commits what it has and ends, and the drop waits
/// for it, so the file is free to open again (a restart in one process).
struct Writer {
    /// Jobs, each with whether it must be on disk before it is answered.
    jobs: Option<crossbeam_channel::Sender<(Job, bool)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode_message(m: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + m.body.len());
    v.extend_from_slice(&m.sender.to_le_bytes());
    v.extend_from_slice(&m.sender_client.to_le_bytes());
    v.extend_from_slice(&m.body);
    v
}

fn decode_message(conv: u64, id: u64, v: &[u8]) -> Result<Message, StoreError> {
    if v.len() < 16 {
        return Err(StoreError::Corrupt(format!("message {conv}/{id}")));
    }
    let word = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
    Ok(Message {
        id,
        conversation: conv,
        sender: word(0),
        sender_client: word(8),
        body: Bytes::copy_from_slice(&v[16..]),
    })
}

fn json<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain struct serializes")
}

impl EmbeddedStore {
    /// Opens (or creates) the database file and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(CONVERSATIONS).map_err(backend)?;
            txn.open_table(MEMBERS).map_err(backend)?;
            txn.open_table(USER_CONVERSATIONS).map_err(backend)?;
            txn.open_table(CLIENTS).map_err(backend)?;
            txn.open_table(MESSAGES).map_err(backend)?;
            txn.open_table(INBOX).map_err(backend)?;
            txn.open_table(DEDUPE).map_err(backend)?;
            txn.open_table(DEDUPE_EXPIRY).map_err(backend)?;
            txn.open_table(READS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        let db = Arc::new(db);
        let (sender, jobs) = crossbeam_channel::unbounded::<(Job, bool)>();
        let writer_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("tiercast-store-writer".into())
            .spawn(move || group_commit_loop(&writer_db, &jobs))
            .map_err(backend)?;
        Ok(Self {
            db,
            writer: Arc::new(Writer {
                jobs: Some(sender),
                thread: Some(thread),
            }),
        })
    }

    /// Runs `f` in the next group commit; answers after the commit is on
    /// disk.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_with(true, f).await
    }

    /// Like [`Self::write`], for writes whose loss in a crash is harmless
    /// (an ack lost means one redelivery; a last-seen time, a slightly older
    /// one): a group of only such writes commits without an fsync, and the
    /// next durable commit (at most [`LAZY_GROUPS`] groups later) persists
    /// it.
    async fn write_lazy<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_with(false, f).await
    }

    async fn write_with<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |txn| {
            let result = match txn {
                Ok(txn) => f(txn),
                Err(e) => Err(StoreError::Backend(e.to_string())),
            };
            let poisoned = matches!(result, Err(StoreError::Backend(_)));
            let done: Completion = Box::new(move |commit_error| {
                let answer = match (result, commit_error) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Some(e)) => Err(StoreError::Backend(e.to_string())),
                    (Ok(v), None) => Ok(v),
                };
                let _ = tx.send(answer);
            });
            (done, poisoned)
        });
        self.writer
            .jobs
            .as_ref()
            .expect("jobs sender lives until drop")
            .send((job, durable))
            .map_err(|_| StoreError::Backend("store writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Backend("store writer stopped".into()))?
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(backend)?
    }
}

/// The writer thread: one transaction and one fsync per group of waiting
/// jobs. Ends when every store handle is dropped.
fn group_commit_loop(db: &Database, jobs: &crossbeam_channel::Receiver<(Job, bool)>) {
    let mut lazy_in_a_row = 0;
    while let Ok((first, first_durable)) = jobs.recv() {
        let mut group = vec![first];
        let mut durable = first_durable;
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok((j, d)) => {
                    group.push(j);
                    durable |= d;
                }
                Err(_) => break,
            }
        }
        if !durable {
            lazy_in_a_row += 1;
            // Freed pages are reused only after a durable commit: do one
            // now and then even when nothing asks for it.
            durable = lazy_in_a_row >= LAZY_GROUPS;
        }
        if durable {
            lazy_in_a_row = 0;
        }
        let mut txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let e = backend(e);
                tracing::error!(error = %e, "cannot begin a write transaction");
                for job in group {
                    let (done, _) = job(Err(&e));
                    done(None);
                }
                continue;
            }
        };
        if !durable && let Err(e) = txn.set_durability(Durability::None) {
            tracing::debug!(error = %e, "non-durable commit refused; committing durably");
        }
        let mut done = Vec::with_capacity(group.len());
        let mut poisoned = false;
        for job in group {
            let (completion, bad) = job(Ok(&txn));
            poisoned |= bad;
            done.push(completion);
        }
        let outcome = if poisoned {
            drop(txn);
            Err(StoreError::Backend(
                "write group aborted after a storage error".into(),
            ))
        } else {
            txn.commit().map_err(backend)
        };
        for d in done {
            d(outcome.as_ref().err());
        }
    }
    // Shutting down: make the last lazy commits durable.
    if lazy_in_a_row > 0
        && let Err(e) = db
            .begin_write()
            .map_err(backend)
            .and_then(|t| t.commit().map_err(backend))
    {
        tracing::error!(error = %e, "final commit failed");
    }
}

/// Removes a device's whole pending inbox.
fn clear_inbox(txn: &WriteTransaction, user: u64, client: u64) -> Result<(), StoreError> {
    txn.open_table(INBOX)
        .map_err(backend)?
        .retain_in((user, client, 0)..=(user, client, u64::MAX), |_, _| false)
        .map_err(backend)
}

/// Reads, changes and writes back one conversation record.
fn update_conversation(
    txn: &WriteTransaction,
    id: u64,
    change: impl FnOnce(&mut Conversation),
) -> Result<(), StoreError> {
    let mut t = txn.open_table(CONVERSATIONS).map_err(backend)?;
    let mut conv: Conversation = match t.get(id).map_err(backend)? {
        Some(v) => json(v.value())?,
        None => return Err(StoreError::NoSuchConversation(id)),
    };
    change(&mut conv);
    t.insert(id, to_json(&conv).as_slice()).map_err(backend)?;
    Ok(())
}

fn read_message(
    table: &impl ReadableTable<(u64, u64), &'static [u8]>,
    conv: u64,
    id: u64,
) -> Result<Option<Message>, StoreError> {
    match table.get((conv, id)).map_err(backend)? {
        Some(v) => decode_message(conv, id, v.value()).map(Some),
        None => Ok(None),
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create_conversation(&self, conv: &Conversation) -> Result<(), StoreError> {
        let conv = conv.clone();
        self.write(move |txn| {
            {
                let mut t = txn.open_table(CONVERSATIONS).map_err(backend)?;
                if t.get(conv.id).map_err(backend)?.is_some() {
                    return Err(StoreError::ConversationExists(conv.id));
                }
                t.insert(conv.id, to_json(&conv).as_slice())
                    .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn conversation(&self, id: u64) -> Result<Option<Conversation>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(CONVERSATIONS).map_err(backend)?;
            t.get(id)
                .map_err(backend)?
                .map(|v| json(v.value()))
                .transpose()
        })
        .await
    }

    async fn set_pinned_tier(&self, id: u64, tier: Option<u8>) -> Result<(), StoreError> {
        self.write(move |txn| update_conversation(txn, id, |c| c.pinned_tier = tier))
            .await
    }

    async fn set_tier(&self, id: u64, tier: u8) -> Result<(), StoreError> {
        self.write(move |txn| update_conversation(txn, id, |c| c.tier = tier))
            .await
    }

    async fn add_members(&self, conv: u64, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        let users = users.to_vec();
        self.write(move |txn| {
            let mut added = Vec::new();
            {
                let mut m = txn.open_table(MEMBERS).map_err(backend)?;
                if txn
                    .open_table(CONVERSATIONS)
                    .map_err(backend)?
                    .get(conv)
                    .map_err(backend)?
                    .is_none()
                {
                    return Err(StoreError::NoSuchConversation(conv));
                }
                let mut u = txn.open_table(USER_CONVERSATIONS).map_err(backend)?;
                for user in users {
                    if m.insert((conv, user), ()).map_err(backend)?.is_none() {
                        added.push(user);
                    }
                    u.insert((user, conv), ()).map_err(backend)?;
                }
            }
            let n = added.len() as u64;
            update_conversation(txn, conv, |c| c.member_count += n)?;
            Ok(added)
        })
        .await
    }

    async fn remove_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let was = {
                let mut m = txn.open_table(MEMBERS).map_err(backend)?;
                let mut u = txn.open_table(USER_CONVERSATIONS).map_err(backend)?;
                let was = m.remove((conv, user)).map_err(backend)?.is_some();
                u.remove((user, conv)).map_err(backend)?;
                was
            };
            if was {
                update_conversation(txn, conv, |c| {
                    c.member_count = c.member_count.saturating_sub(1)
                })?;
            }
            Ok(was)
        })
        .await
    }

    async fn members(&self, conv: u64) -> Result<Vec<u64>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(MEMBERS).map_err(backend)?;
            let mut out = Vec::new();
            for row in t.range((conv, 0)..=(conv, u64::MAX)).map_err(backend)? {
                out.push(row.map_err(backend)?.0.value().1);
            }
            Ok(out)
        })
        .await
    }

    async fn members_page(
        &self,
        conv: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(MEMBERS).map_err(backend)?;
            let mut out = Vec::with_capacity(limit.min(1024));
            for row in t
                .range((conv, after + 1)..=(conv, u64::MAX))
                .map_err(backend)?
                .take(limit)
            {
                out.push(row.map_err(backend)?.0.value().1);
            }
            Ok(out)
        })
        .await
    }

    async fn is_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(MEMBERS).map_err(backend)?;
            Ok(t.get((conv, user)).map_err(backend)?.is_some())
        })
        .await
    }

    async fn conversations_of(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(USER_CONVERSATIONS).map_err(backend)?;
            let mut out = Vec::new();
            for row in t.range((user, 0)..=(user, u64::MAX)).map_err(backend)? {
                out.push(row.map_err(backend)?.0.value().1);
            }
            Ok(out)
        })
        .await
    }

    async fn register_client(
        &self,
        client: &ClientRecord,
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Registered, StoreError> {
        let client = client.clone();
        self.write(move |txn| {
            let outcome = {
                let mut t = txn.open_table(CLIENTS).map_err(backend)?;
                let mut existing: Vec<ClientRecord> = Vec::new();
                for row in t
                    .range((client.user, 0)..=(client.user, u64::MAX))
                    .map_err(backend)?
                {
                    existing.push(json(row.map_err(backend)?.1.value())?);
                }
                let outcome = super::registration(&existing, &client, max_devices, evict_oldest)?;
                if let Registered::Evicted(oldest) = outcome {
                    t.remove((client.user, oldest)).map_err(backend)?;
                    clear_inbox(txn, client.user, oldest)?;
                }
                t.insert((client.user, client.client_id), to_json(&client).as_slice())
                    .map_err(backend)?;
                outcome
            };
            Ok(outcome)
        })
        .await
    }

    async fn clients_of(&self, user: u64) -> Result<Vec<ClientRecord>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(CLIENTS).map_err(backend)?;
            let mut out = Vec::new();
            for row in t.range((user, 0)..=(user, u64::MAX)).map_err(backend)? {
                out.push(json(row.map_err(backend)?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn devices_of(&self, users: &[u64]) -> Result<Vec<Device>, StoreError> {
        let users = users.to_vec();
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(CLIENTS).map_err(backend)?;
            let mut out = Vec::new();
            for user in users {
                for row in t.range((user, 0)..=(user, u64::MAX)).map_err(backend)? {
                    let client = row.map_err(backend)?.0.value().1;
                    out.push(Device { user, client });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn touch_clients(&self, clients: &[(u64, u64)], now_ms: u64) -> Result<(), StoreError> {
        let clients = clients.to_vec();
        self.write_lazy(move |txn| {
            let mut t = txn.open_table(CLIENTS).map_err(backend)?;
            for key in clients {
                let rec = match t.get(key).map_err(backend)? {
                    Some(v) => json::<ClientRecord>(v.value())?,
                    None => continue,
                };
                if rec.last_seen_ms < now_ms {
                    let rec = ClientRecord {
                        last_seen_ms: now_ms,
                        ..rec
                    };
                    t.insert(key, to_json(&rec).as_slice()).map_err(backend)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn expire_clients(
        &self,
        unseen_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ClientRecord>, StoreError> {
        self.write(move |txn| {
            let mut t = txn.open_table(CLIENTS).map_err(backend)?;
            let mut stale = Vec::new();
            for row in t.iter().map_err(backend)? {
                let rec: ClientRecord = json(row.map_err(backend)?.1.value())?;
                if rec.last_seen_ms < unseen_before_ms {
                    stale.push(rec);
                    if stale.len() >= limit {
                        break;
                    }
                }
            }
            for rec in &stale {
                t.remove((rec.user, rec.client_id)).map_err(backend)?;
                clear_inbox(txn, rec.user, rec.client_id)?;
            }
            Ok(stale)
        })
        .await
    }

    async fn set_read_marks(&self, marks: &[ReadMark]) -> Result<(), StoreError> {
        let marks = marks.to_vec();
        self.write(move |txn| {
            let mut t = txn.open_table(READS).map_err(backend)?;
            for m in marks {
                let key = (m.user, m.conversation);
                let current = t.get(key).map_err(backend)?.map(|v| v.value());
                if current.is_none_or(|c| c < m.message_id) {
                    t.insert(key, m.message_id).map_err(backend)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn read_marks(&self, user: u64, convs: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        let convs = convs.to_vec();
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(READS).map_err(backend)?;
            let mut out = Vec::new();
            for conv in convs {
                if let Some(v) = t.get((user, conv)).map_err(backend)? {
                    out.push((conv, v.value()));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn insert_message(&self, msg: &NewMessage) -> Result<Persisted, StoreError> {
        let msg = msg.clone();
        self.write(move |txn| {
            let m = &msg.message;
            {
                if let Some(d) = &msg.dedupe {
                    let mut idem = txn.open_table(DEDUPE).map_err(backend)?;
                    let key = (d.scope.as_str(), m.conversation, d.client_msg_id);
                    if let Some(earlier) = idem.get(key).map_err(backend)? {
                        let (id, expires) = earlier.value();
                        if expires > d.now_ms {
                            return Ok(Persisted::Duplicate(id));
                        }
                    }
                    let expires = d.now_ms.saturating_add(d.ttl_ms);
                    if let Some(old) = idem.insert(key, (m.id, expires)).map_err(backend)? {
                        let (old_id, old_expires) = old.value();
                        txn.open_table(DEDUPE_EXPIRY)
                            .map_err(backend)?
                            .remove((old_expires, old_id))
                            .map_err(backend)?;
                    }
                    txn.open_table(DEDUPE_EXPIRY)
                        .map_err(backend)?
                        .insert((expires, m.id), key)
                        .map_err(backend)?;
                }
                let mut t = txn.open_table(MESSAGES).map_err(backend)?;
                t.insert((m.conversation, m.id), encode_message(m).as_slice())
                    .map_err(backend)?;
                let mut inbox = txn.open_table(INBOX).map_err(backend)?;
                for d in &msg.inbox {
                    inbox
                        .insert((d.user, d.client, m.id), m.conversation)
                        .map_err(backend)?;
                }
            }
            Ok(Persisted::Stored)
        })
        .await
    }

    async fn message(&self, conv: u64, id: u64) -> Result<Option<Message>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            read_message(&txn.open_table(MESSAGES).map_err(backend)?, conv, id)
        })
        .await
    }

    async fn since(&self, conv: u64, after: u64, limit: usize) -> Result<Vec<Message>, StoreError> {
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(MESSAGES).map_err(backend)?;
            let mut out = Vec::with_capacity(limit.min(256));
            for row in t
                .range((conv, after + 1)..=(conv, u64::MAX))
                .map_err(backend)?
                .take(limit)
            {
                let (k, v) = row.map_err(backend)?;
                out.push(decode_message(conv, k.value().1, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn history(&self, conv: u64, page: Page) -> Result<Vec<Message>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(MESSAGES).map_err(backend)?;
            let hi = if page.before == 0 {
                u64::MAX
            } else {
                page.before - 1
            };
            if page.after >= hi {
                return Ok(Vec::new());
            }
            let mut out = Vec::with_capacity(page.limit.min(256));
            for row in t
                .range((conv, page.after + 1)..=(conv, hi))
                .map_err(backend)?
                .rev()
                .take(page.limit)
            {
                let (k, v) = row.map_err(backend)?;
                out.push(decode_message(conv, k.value().1, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn expire_dedupe(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.write_lazy(move |txn| {
            let mut by_time = txn.open_table(DEDUPE_EXPIRY).map_err(backend)?;
            let mut idem = txn.open_table(DEDUPE).map_err(backend)?;
            let mut due = Vec::new();
            for row in by_time
                .range((0, 0)..(now_ms, 0))
                .map_err(backend)?
                .take(limit)
            {
                let (k, v) = row.map_err(backend)?;
                let (scope, conv, cmid) = v.value();
                due.push((k.value(), scope.to_owned(), conv, cmid));
            }
            for (k, scope, conv, cmid) in &due {
                by_time.remove(*k).map_err(backend)?;
                idem.remove((scope.as_str(), *conv, *cmid))
                    .map_err(backend)?;
            }
            Ok(due.len())
        })
        .await
    }

    async fn inbox(
        &self,
        device: Device,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let Device { user, client } = device;
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        self.run(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let inbox = txn.open_table(INBOX).map_err(backend)?;
            let messages = txn.open_table(MESSAGES).map_err(backend)?;
            let mut out = Vec::new();
            for row in inbox
                .range((user, client, after + 1)..=(user, client, u64::MAX))
                .map_err(backend)?
                .take(limit)
            {
                let (k, conv) = row.map_err(backend)?;
                if let Some(m) = read_message(&messages, conv.value(), k.value().2)? {
                    out.push(m);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ack(&self, device: Device, ids: &[u64]) -> Result<u32, StoreError> {
        let Device { user, client } = device;
        let ids = ids.to_vec();
        self.write_lazy(move |txn| {
            let mut removed = 0;
            {
                let mut inbox = txn.open_table(INBOX).map_err(backend)?;
                for id in ids {
                    if inbox.remove((user, client, id)).map_err(backend)?.is_some() {
                        removed += 1;
                    }
                }
            }
            Ok(removed)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::Dedupe;
    use super::*;

    const DEV9: Device = Device { user: 2, client: 9 };

    #[tokio::test]
    async fn conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("t.redb")).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    /// Concurrent writes share group commits and keep every rule: each
    /// message stored once, retries answered with the first id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_group_commit_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("t.redb")).unwrap();
        super::super::conformance::seed_history(&store, 5, 0).await;
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let m = NewMessage {
                    message: Message {
                        id: 10_000 + i,
                        conversation: 5,
                        sender: 1,
                        sender_client: 1,
                        body: Bytes::from_static(b"x"),
                    },
                    // Every pair of sends shares a client message id.
                    dedupe: Some(Dedupe {
                        scope: Dedupe::device_scope(1, 1),
                        client_msg_id: i / 2 + 1,
                        now_ms: 1,
                        ttl_ms: 60_000,
                    }),
                    inbox: vec![DEV9],
                };
                store.insert_message(&m).await.unwrap()
            }));
        }
        let mut stored = 0;
        for t in tasks {
            if t.await.unwrap() == Persisted::Stored {
                stored += 1;
            }
        }
        assert_eq!(stored, 200);
        let page = Page {
            before: 0,
            after: 0,
            limit: 1000,
        };
        assert_eq!(store.history(5, page).await.unwrap().len(), 200);
        assert_eq!(store.inbox(DEV9, 0, 1000).await.unwrap().len(), 200);
    }

    /// The sweep removes expired idempotency keys, and only those.
    #[tokio::test]
    async fn dedupe_sweep_removes_expired_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("t.redb")).unwrap();
        super::super::conformance::seed_history(&store, 5, 0).await;
        for (id, now_ms) in [(1, 1_000), (2, 5_000)] {
            let m = NewMessage {
                message: Message {
                    id,
                    conversation: 5,
                    sender: 1,
                    sender_client: 1,
                    body: Bytes::from_static(b"x"),
                },
                dedupe: Some(Dedupe {
                    scope: Dedupe::publisher_scope("backend"),
                    client_msg_id: id,
                    now_ms,
                    ttl_ms: 1_000,
                }),
                inbox: vec![],
            };
            store.insert_message(&m).await.unwrap();
        }
        assert_eq!(store.expire_dedupe(3_000, 100).await.unwrap(), 1);
        assert_eq!(store.expire_dedupe(3_000, 100).await.unwrap(), 0);
        assert_eq!(store.expire_dedupe(7_000, 100).await.unwrap(), 1);
    }

    /// What was committed is there after the database is closed and opened
    /// again: nothing stored is lost by a restart.
    #[tokio::test]
    async fn lazy_acks_are_on_disk_after_a_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store
                .create_conversation(&Conversation {
                    id: 5,
                    name: "c".into(),
                    created_ms: 1,
                    pinned_tier: None,
                    tier: 1,
                    member_count: 0,
                })
                .await
                .unwrap();
            for id in 1..=3u64 {
                let m = NewMessage {
                    message: Message {
                        id,
                        conversation: 5,
                        sender: 1,
                        sender_client: 1,
                        body: Bytes::from_static(b"m"),
                    },
                    dedupe: None,
                    inbox: vec![DEV9],
                };
                store.insert_message(&m).await.unwrap();
            }
            // Acks commit without an fsync; closing the store makes them
            // durable.
            assert_eq!(store.ack(DEV9, &[1, 2]).await.unwrap(), 2);
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let left: Vec<u64> = store
            .inbox(DEV9, 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(left, vec![3]);
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let ids = {
            let store = EmbeddedStore::open(&path).unwrap();
            super::super::conformance::seed_history(&store, 42, 50).await
        };
        let store = EmbeddedStore::open(&path).unwrap();
        let got = store
            .history(
                42,
                Page {
                    before: 0,
                    after: 0,
                    limit: 100,
                },
            )
            .await
            .unwrap();
        let mut want = ids;
        want.reverse();
        assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), want);
    }
}
