//! The embedded store: one redb file (docs/adr/0001-embedded-store-redb.md says
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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::Message;
use tokio::sync::oneshot;

use crate::batch::BatchCounters;
use crate::metrics::EngineMetrics;

use super::{
    ClientRecord, Conversation, ConversationState, Device, NewMessage, Page, Persisted, ReadMark,
    Registered, Registration, SendContext, Store, StoreError,
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

/// How long a group that begins with a lazy write waits for more writes
/// before it commits (a durable write ends the wait at once). A commit's
/// own work costs the writer thread more than the writes in it at the
/// rates seen on one node (docs/benchmarks.md, "Where a tier-1
/// message's CPU goes"), and a lazy write's answer can wait: nothing is
/// delivered later for it.
const LAZY_LINGER: Duration = Duration::from_millis(5);

/// A write job's answer, called once the group's commit is known.
type Completion = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// What applying a job to the group's transaction left.
struct Applied {
    /// Answers the job once the commit is known.
    answer: Completion,
    /// The transaction may be damaged (a backend error mid-write): the
    /// group aborts, and every job of it answers the error.
    damaged: bool,
}

/// A write job: applies itself to the group's transaction (or answers the
/// error that kept one from being begun).
type Job = Box<dyn FnOnce(Result<&WriteTransaction, &StoreError>) -> Applied + Send>;

/// When a group commit fsyncs. Pure: the writer thread asks it once per
/// group.
#[derive(Debug, Default)]
struct CommitPolicy {
    /// Groups of only lazy writes committed without an fsync since the
    /// last durable commit.
    lazy_in_a_row: u32,
}

impl CommitPolicy {
    /// Whether the group about to commit fsyncs: when any of its writes
    /// asks (`asked`), and at least every [`LAZY_GROUPS`]-th group anyway
    /// (redb reuses freed pages only after a durable commit).
    fn durable(&mut self, asked: bool) -> bool {
        let durable = asked || self.lazy_in_a_row + 1 >= LAZY_GROUPS;
        self.lazy_in_a_row = if durable { 0 } else { self.lazy_in_a_row + 1 };
        durable
    }

    /// Whether lazy commits since the last durable one are owed an fsync
    /// (at shutdown).
    fn owes_fsync(&self) -> bool {
        self.lazy_in_a_row > 0
    }
}

/// The group a commit takes: `first` and what `next` gives (told whether
/// the group holds a durable write so far), at most `max`, with whether any
/// of them must be durable.
fn gather<T>(
    first: (T, bool),
    mut next: impl FnMut(bool) -> Option<(T, bool)>,
    max: usize,
) -> (Vec<T>, bool) {
    let (job, mut durable) = first;
    let mut group = vec![job];
    while group.len() < max {
        let Some((job, d)) = next(durable) else {
            break;
        };
        group.push(job);
        durable |= d;
    }
    (group, durable)
}

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
    /// The engine's counters of commits (`batches`) and of the writes in
    /// them (`calls`), once an engine uses this store.
    counters: Arc<OnceLock<BatchCounters>>,
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

/// redb's errors are backend failures: `?` maps them.
macro_rules! backend_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                backend(e)
            }
        }
    )*};
}
backend_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Every key of a table keyed by `(k, _)`.
fn keys_of(k: u64) -> std::ops::RangeInclusive<(u64, u64)> {
    (k, 0)..=(k, u64::MAX)
}

/// Every key of a table keyed by `(a, b, _)`.
fn keys_of_pair(a: u64, b: u64) -> std::ops::RangeInclusive<(u64, u64, u64)> {
    (a, b, 0)..=(a, b, u64::MAX)
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
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(CONVERSATIONS)?;
            txn.open_table(MEMBERS)?;
            txn.open_table(USER_CONVERSATIONS)?;
            txn.open_table(CLIENTS)?;
            txn.open_table(MESSAGES)?;
            txn.open_table(INBOX)?;
            txn.open_table(DEDUPE)?;
            txn.open_table(DEDUPE_EXPIRY)?;
            txn.open_table(READS)?;
        }
        txn.commit()?;
        let db = Arc::new(db);
        let (sender, jobs) = crossbeam_channel::unbounded::<(Job, bool)>();
        let writer_db = db.clone();
        let counters = Arc::new(OnceLock::new());
        let writer_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("tiercast-store-writer".into())
            .spawn(move || group_commit_loop(&writer_db, &jobs, &writer_counters))
            .map_err(backend)?;
        Ok(Self {
            db,
            writer: Arc::new(Writer {
                jobs: Some(sender),
                counters,
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
            let damaged = matches!(result, Err(StoreError::Backend(_)));
            let answer: Completion = Box::new(move |commit_error| {
                let answer = match (result, commit_error) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Some(e)) => Err(StoreError::Backend(e.to_string())),
                    (Ok(v), None) => Ok(v),
                };
                let _ = tx.send(answer);
            });
            Applied { answer, damaged }
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

    /// Runs `f` on `table` in a read snapshot, on the blocking pool.
    async fn read<K, V, T>(
        &self,
        table: TableDefinition<'static, K, V>,
        f: impl FnOnce(&redb::ReadOnlyTable<K, V>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError>
    where
        K: redb::Key + Send + 'static,
        V: redb::Value + Send + 'static,
        T: Send + 'static,
    {
        self.run(move |db| f(&db.begin_read()?.open_table(table)?))
            .await
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
/// jobs; a group that begins with a lazy write waits [`LAZY_LINGER`] for
/// more. Ends when every store handle is dropped.
fn group_commit_loop(
    db: &Database,
    jobs: &crossbeam_channel::Receiver<(Job, bool)>,
    counters: &OnceLock<BatchCounters>,
) {
    let mut policy = CommitPolicy::default();
    while let Ok(first) = jobs.recv() {
        let linger_until = Instant::now() + LAZY_LINGER;
        let (group, asked) = gather(
            first,
            |durable| {
                if durable {
                    jobs.try_recv().ok()
                } else {
                    jobs.recv_deadline(linger_until).ok()
                }
            },
            MAX_GROUP,
        );
        if let Some(c) = counters.get() {
            c.batches.inc();
            c.calls.inc_by(group.len() as u64);
        }
        let durable = policy.durable(asked);
        let mut txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let e = backend(e);
                tracing::error!(error = %e, "cannot begin a write transaction");
                for job in group {
                    (job(Err(&e)).answer)(None);
                }
                continue;
            }
        };
        if !durable && let Err(e) = txn.set_durability(Durability::None) {
            tracing::debug!(error = %e, "non-durable commit refused; committing durably");
        }
        let mut answers = Vec::with_capacity(group.len());
        let mut damaged = false;
        for job in group {
            let applied = job(Ok(&txn));
            damaged |= applied.damaged;
            answers.push(applied.answer);
        }
        let outcome = if damaged {
            drop(txn);
            Err(StoreError::Backend(
                "write group aborted after a storage error".into(),
            ))
        } else {
            txn.commit().map_err(backend)
        };
        for answer in answers {
            answer(outcome.as_ref().err());
        }
    }
    // Shutting down: make the last lazy commits durable.
    if policy.owes_fsync()
        && let Err(e) = db
            .begin_write()
            .map_err(backend)
            .and_then(|t| t.commit().map_err(backend))
    {
        tracing::error!(error = %e, "final commit failed");
    }
}

/// The oldest `limit` messages of `conv` above `after`.
fn read_since(
    t: &redb::ReadOnlyTable<(u64, u64), &[u8]>,
    conv: u64,
    after: u64,
    limit: usize,
) -> Result<Vec<Message>, StoreError> {
    if after == u64::MAX {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(limit.min(256));
    for row in t.range((conv, after + 1)..=(conv, u64::MAX))?.take(limit) {
        let (k, v) = row?;
        out.push(decode_message(conv, k.value().1, v.value())?);
    }
    Ok(out)
}

/// A device's pending inbox above `after`, oldest first, in `txn`.
fn read_inbox(
    txn: &redb::ReadTransaction,
    device: Device,
    after: u64,
    limit: usize,
) -> Result<Vec<Message>, StoreError> {
    let Device { user, client } = device;
    if after == u64::MAX {
        return Ok(Vec::new());
    }
    let inbox = txn.open_table(INBOX)?;
    let messages = txn.open_table(MESSAGES)?;
    let mut out = Vec::new();
    for row in inbox
        .range((user, client, after + 1)..=(user, client, u64::MAX))?
        .take(limit)
    {
        let (k, conv) = row?;
        if let Some(m) = read_message(&messages, conv.value(), k.value().2)? {
            out.push(m);
        }
    }
    Ok(out)
}

/// Registers `client` inside `txn` (see [`super::registration_of`]); a
/// refused entry writes nothing.
fn register_in(
    txn: &WriteTransaction,
    client: &ClientRecord,
    returning: bool,
    max_devices: usize,
    evict_oldest: bool,
) -> Result<Registered, StoreError> {
    let mut t = txn.open_table(CLIENTS)?;
    let mut existing: Vec<ClientRecord> = Vec::new();
    for row in t.range(keys_of(client.user))? {
        existing.push(json(row?.1.value())?);
    }
    let outcome = super::registration_of(&existing, client, returning, max_devices, evict_oldest)?;
    if let Registered::Evicted(oldest) = outcome {
        t.remove((client.user, oldest))?;
        clear_inbox(txn, client.user, oldest)?;
    }
    t.insert((client.user, client.client_id), to_json(client).as_slice())?;
    Ok(outcome)
}

/// Removes a device's whole pending inbox.
fn clear_inbox(txn: &WriteTransaction, user: u64, client: u64) -> Result<(), StoreError> {
    Ok(txn
        .open_table(INBOX)?
        .retain_in(keys_of_pair(user, client), |_, _| false)?)
}

/// Reads, changes and writes back one conversation record.
fn update_conversation(
    txn: &WriteTransaction,
    id: u64,
    change: impl FnOnce(&mut Conversation),
) -> Result<(), StoreError> {
    let mut t = txn.open_table(CONVERSATIONS)?;
    let mut conv: Conversation = match t.get(id)? {
        Some(v) => json(v.value())?,
        None => return Err(StoreError::NoSuchConversation(id)),
    };
    change(&mut conv);
    t.insert(id, to_json(&conv).as_slice())?;
    Ok(())
}

fn read_message(
    table: &impl ReadableTable<(u64, u64), &'static [u8]>,
    conv: u64,
    id: u64,
) -> Result<Option<Message>, StoreError> {
    match table.get((conv, id))? {
        Some(v) => decode_message(conv, id, v.value()).map(Some),
        None => Ok(None),
    }
}

/// The second halves of the keys `(k, _)` of a pair-keyed table, in key
/// order: a conversation's members, a user's devices or conversations.
fn seconds_of<V: redb::Value + 'static>(
    table: &impl ReadableTable<(u64, u64), V>,
    k: u64,
) -> Result<Vec<u64>, StoreError> {
    let mut out = Vec::new();
    for row in table.range(keys_of(k))? {
        out.push(row?.0.value().1);
    }
    Ok(out)
}

/// Every registered device of `users`, user by user.
fn devices_in(
    clients: &impl ReadableTable<(u64, u64), &'static [u8]>,
    users: &[u64],
) -> Result<Vec<Device>, StoreError> {
    let mut out = Vec::new();
    for &user in users {
        for client in seconds_of(clients, user)? {
            out.push(Device { user, client });
        }
    }
    Ok(out)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn count_in(&self, metrics: &EngineMetrics) {
        // The writer's commits, as a batch op: `batches` commits holding
        // `calls` writes.
        let _ = self
            .writer
            .counters
            .set(metrics.batch_counters("store_commit"));
    }

    async fn create_conversation(&self, conv: &Conversation) -> Result<(), StoreError> {
        let conv = conv.clone();
        self.write(move |txn| {
            {
                let mut t = txn.open_table(CONVERSATIONS)?;
                if t.get(conv.id)?.is_some() {
                    return Err(StoreError::ConversationExists(conv.id));
                }
                t.insert(conv.id, to_json(&conv).as_slice())?;
            }
            Ok(())
        })
        .await
    }

    async fn conversation(&self, id: u64) -> Result<Option<Conversation>, StoreError> {
        self.read(CONVERSATIONS, move |t| {
            t.get(id)?.map(|v| json(v.value())).transpose()
        })
        .await
    }

    async fn set_pinned_tier(&self, id: u64, tier: Option<Tier>) -> Result<(), StoreError> {
        self.write(move |txn| update_conversation(txn, id, |c| c.pinned_tier = tier))
            .await
    }

    async fn set_tier(&self, id: u64, tier: Tier) -> Result<(), StoreError> {
        self.write(move |txn| update_conversation(txn, id, |c| c.tier = tier))
            .await
    }

    async fn add_members(&self, conv: u64, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        let users = users.to_vec();
        self.write(move |txn| {
            let mut added = Vec::new();
            {
                let mut m = txn.open_table(MEMBERS)?;
                if txn.open_table(CONVERSATIONS)?.get(conv)?.is_none() {
                    return Err(StoreError::NoSuchConversation(conv));
                }
                let mut u = txn.open_table(USER_CONVERSATIONS)?;
                for user in users {
                    if m.insert((conv, user), ())?.is_none() {
                        added.push(user);
                    }
                    u.insert((user, conv), ())?;
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
                let mut m = txn.open_table(MEMBERS)?;
                let mut u = txn.open_table(USER_CONVERSATIONS)?;
                let was = m.remove((conv, user))?.is_some();
                u.remove((user, conv))?;
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
        self.read(MEMBERS, move |t| seconds_of(t, conv)).await
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
        self.read(MEMBERS, move |t| {
            let mut out = Vec::with_capacity(limit.min(1024));
            for row in t.range((conv, after + 1)..=(conv, u64::MAX))?.take(limit) {
                out.push(row?.0.value().1);
            }
            Ok(out)
        })
        .await
    }

    async fn is_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        self.read(MEMBERS, move |t| Ok(t.get((conv, user))?.is_some()))
            .await
    }

    async fn conversations_of(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        self.read(USER_CONVERSATIONS, move |t| seconds_of(t, user))
            .await
    }

    async fn register_client(
        &self,
        client: &ClientRecord,
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Registered, StoreError> {
        let client = client.clone();
        self.write(move |txn| register_in(txn, &client, false, max_devices, evict_oldest))
            .await
    }

    /// One write transaction for the whole batch. Returning devices only
    /// refresh a row that exists (a last-seen time and a name, whose loss
    /// in a crash is harmless), so a batch of only those commits without
    /// an fsync, as acks do; a new device's id must survive a crash.
    async fn register_clients(
        &self,
        regs: &[Registration],
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Vec<Result<Registered, StoreError>>, StoreError> {
        let regs = regs.to_vec();
        let durable = regs.iter().any(|r| !r.returning);
        self.write_with(durable, move |txn| {
            let mut out = Vec::with_capacity(regs.len());
            for r in &regs {
                match register_in(txn, &r.client, r.returning, max_devices, evict_oldest) {
                    Err(e @ (StoreError::Backend(_) | StoreError::Corrupt(_))) => return Err(e),
                    o => out.push(o),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn conversations_of_users(&self, users: &[u64]) -> Result<Vec<Vec<u64>>, StoreError> {
        let users = users.to_vec();
        self.read(USER_CONVERSATIONS, move |t| {
            users.into_iter().map(|user| seconds_of(t, user)).collect()
        })
        .await
    }

    async fn clients_of(&self, user: u64) -> Result<Vec<ClientRecord>, StoreError> {
        self.read(CLIENTS, move |t| {
            let mut out = Vec::new();
            for row in t.range(keys_of(user))? {
                out.push(json(row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn devices_of(&self, users: &[u64]) -> Result<Vec<Device>, StoreError> {
        let users = users.to_vec();
        self.read(CLIENTS, move |t| devices_in(t, &users)).await
    }

    async fn touch_clients(&self, clients: &[(u64, u64)], now_ms: u64) -> Result<(), StoreError> {
        let clients = clients.to_vec();
        self.write_lazy(move |txn| {
            let mut t = txn.open_table(CLIENTS)?;
            for key in clients {
                let rec = match t.get(key)? {
                    Some(v) => json::<ClientRecord>(v.value())?,
                    None => continue,
                };
                if rec.last_seen_ms < now_ms {
                    let rec = ClientRecord {
                        last_seen_ms: now_ms,
                        ..rec
                    };
                    t.insert(key, to_json(&rec).as_slice())?;
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
            let mut t = txn.open_table(CLIENTS)?;
            let mut stale = Vec::new();
            for row in t.iter()? {
                let rec: ClientRecord = json(row?.1.value())?;
                if rec.last_seen_ms < unseen_before_ms {
                    stale.push(rec);
                    if stale.len() >= limit {
                        break;
                    }
                }
            }
            for rec in &stale {
                t.remove((rec.user, rec.client_id))?;
                clear_inbox(txn, rec.user, rec.client_id)?;
            }
            Ok(stale)
        })
        .await
    }

    async fn set_read_marks(&self, marks: &[ReadMark]) -> Result<(), StoreError> {
        let marks = marks.to_vec();
        self.write(move |txn| {
            let mut t = txn.open_table(READS)?;
            for m in marks {
                let key = (m.user, m.conversation);
                let current = t.get(key)?.map(|v| v.value());
                if current.is_none_or(|c| c < m.message_id) {
                    t.insert(key, m.message_id)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn read_marks(&self, user: u64, convs: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        let convs = convs.to_vec();
        self.read(READS, move |t| {
            let mut out = Vec::new();
            for conv in convs {
                if let Some(v) = t.get((user, conv))? {
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
                    let mut idem = txn.open_table(DEDUPE)?;
                    let key = (d.scope.as_str(), m.conversation, d.client_msg_id);
                    if let Some(earlier) = idem.get(key)? {
                        let (id, expires) = earlier.value();
                        if expires > d.now_ms {
                            return Ok(Persisted::Duplicate(id));
                        }
                    }
                    let expires = d.now_ms.saturating_add(d.ttl_ms);
                    if let Some(old) = idem.insert(key, (m.id, expires))? {
                        let (old_id, old_expires) = old.value();
                        txn.open_table(DEDUPE_EXPIRY)?
                            .remove((old_expires, old_id))?;
                    }
                    txn.open_table(DEDUPE_EXPIRY)?
                        .insert((expires, m.id), key)?;
                }
                let mut t = txn.open_table(MESSAGES)?;
                t.insert((m.conversation, m.id), encode_message(m).as_slice())?;
                let mut inbox = txn.open_table(INBOX)?;
                for d in &msg.inbox {
                    inbox.insert((d.user, d.client, m.id), m.conversation)?;
                }
            }
            Ok(Persisted::Stored)
        })
        .await
    }

    async fn message(&self, conv: u64, id: u64) -> Result<Option<Message>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read()?;
            read_message(&txn.open_table(MESSAGES)?, conv, id)
        })
        .await
    }

    async fn since(&self, conv: u64, after: u64, limit: usize) -> Result<Vec<Message>, StoreError> {
        self.read(MESSAGES, move |t| read_since(t, conv, after, limit))
            .await
    }

    /// One read snapshot for every page.
    async fn since_many(
        &self,
        reads: &[(u64, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<Message>>, StoreError> {
        let reads = reads.to_vec();
        self.read(MESSAGES, move |t| {
            reads
                .into_iter()
                .map(|(conv, after)| read_since(t, conv, after, limit))
                .collect()
        })
        .await
    }

    /// One read snapshot, one trip to the blocking pool: what were four
    /// reads (membership, conversation, members, their devices).
    async fn send_context(&self, conv: u64, sender: u64) -> Result<SendContext, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read()?;
            let members = txn.open_table(MEMBERS)?;
            if sender != 0 && members.get((conv, sender))?.is_none() {
                return Ok(SendContext::default());
            }
            let conversation: Option<Conversation> = txn
                .open_table(CONVERSATIONS)?
                .get(conv)?
                .map(|v| json(v.value()))
                .transpose()?;
            let (members, devices) = match &conversation {
                Some(c) if c.tier == Tier::Direct => {
                    let members = seconds_of(&members, conv)?;
                    let devices = devices_in(&txn.open_table(CLIENTS)?, &members)?;
                    (members, devices)
                }
                _ => (Vec::new(), Vec::new()),
            };
            Ok(SendContext {
                allowed: true,
                conversation,
                members,
                devices,
            })
        })
        .await
    }

    /// One read snapshot for every conversation.
    async fn conversation_states(
        &self,
        user: u64,
        convs: &[u64],
    ) -> Result<Vec<ConversationState>, StoreError> {
        let convs = convs.to_vec();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let conversations = txn.open_table(CONVERSATIONS)?;
            let members = txn.open_table(MEMBERS)?;
            let messages = txn.open_table(MESSAGES)?;
            convs
                .into_iter()
                .map(|c| {
                    let conversation: Option<Conversation> =
                        conversations.get(c)?.map(|v| json(v.value())).transpose()?;
                    if conversation.is_none() {
                        return Ok(ConversationState {
                            conversation,
                            member: false,
                            latest_id: 0,
                        });
                    }
                    let member = members.get((c, user))?.is_some();
                    let latest_id = match messages.range((c, 1)..=(c, u64::MAX))?.next_back() {
                        Some(row) => row?.0.value().1,
                        None => 0,
                    };
                    Ok(ConversationState {
                        conversation,
                        member,
                        latest_id,
                    })
                })
                .collect()
        })
        .await
    }

    async fn history(&self, conv: u64, page: Page) -> Result<Vec<Message>, StoreError> {
        self.read(MESSAGES, move |t| {
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
                .range((conv, page.after + 1)..=(conv, hi))?
                .rev()
                .take(page.limit)
            {
                let (k, v) = row?;
                out.push(decode_message(conv, k.value().1, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn expire_dedupe(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.write_lazy(move |txn| {
            let mut by_time = txn.open_table(DEDUPE_EXPIRY)?;
            let mut idem = txn.open_table(DEDUPE)?;
            let mut due = Vec::new();
            for row in by_time.range((0, 0)..(now_ms, 0))?.take(limit) {
                let (k, v) = row?;
                let (scope, conv, cmid) = v.value();
                due.push((k.value(), scope.to_owned(), conv, cmid));
            }
            for (k, scope, conv, cmid) in &due {
                by_time.remove(*k)?;
                idem.remove((scope.as_str(), *conv, *cmid))?;
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
        self.run(move |db| {
            let txn = db.begin_read()?;
            read_inbox(&txn, device, after, limit)
        })
        .await
    }

    /// One read transaction for every device of the batch.
    async fn inboxes(
        &self,
        devices: &[(Device, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<Message>>, StoreError> {
        let devices = devices.to_vec();
        self.run(move |db| {
            let txn = db.begin_read()?;
            devices
                .into_iter()
                .map(|(d, after)| read_inbox(&txn, d, after, limit))
                .collect()
        })
        .await
    }

    async fn ack(&self, device: Device, ids: &[u64]) -> Result<u32, StoreError> {
        let Device { user, client } = device;
        let ids = ids.to_vec();
        self.write_lazy(move |txn| {
            let mut removed = 0;
            {
                let mut inbox = txn.open_table(INBOX)?;
                for id in ids {
                    if inbox.remove((user, client, id))?.is_some() {
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

    #[test]
    fn lazy_groups_fsync_every_64th_and_a_durable_write_at_once() {
        let mut p = CommitPolicy::default();
        assert!(!p.owes_fsync());
        let lazy: Vec<bool> = (0..LAZY_GROUPS * 2).map(|_| p.durable(false)).collect();
        // The 64th and the 128th lazy group in a row fsync; no other.
        let fsyncs: Vec<usize> = (0..lazy.len()).filter(|&i| lazy[i]).collect();
        assert_eq!(
            fsyncs,
            [LAZY_GROUPS as usize - 1, 2 * LAZY_GROUPS as usize - 1]
        );
        assert!(!p.owes_fsync());
        assert!(!p.durable(false));
        assert!(p.owes_fsync());
        // A durable write fsyncs at once and clears what was owed.
        assert!(p.durable(true));
        assert!(!p.owes_fsync());
    }

    #[test]
    fn a_group_takes_what_waits_up_to_its_cap() {
        let mut waiting = vec![(2, false), (3, true), (4, false)].into_iter();
        let (group, durable) = gather((1, false), |_| waiting.next(), 10);
        assert_eq!((group, durable), (vec![1, 2, 3, 4], true));
        let mut waiting = vec![(2, false), (3, true)].into_iter();
        let (group, durable) = gather((1, false), |_| waiting.next(), 2);
        assert_eq!((group, durable), (vec![1, 2], false));
        // The rest waits for the next group.
        assert_eq!(waiting.next(), Some((3, true)));
    }

    /// A group told `false` may wait for more (the writer lingers); once a
    /// durable write is in, it is told `true` and takes only what waits.
    #[test]
    fn a_group_lingers_only_while_it_holds_lazy_writes() {
        let mut waiting = vec![(2, false), (3, true), (4, false)].into_iter();
        let mut told = Vec::new();
        let (group, durable) = gather(
            (1, false),
            |d| {
                told.push(d);
                waiting.next()
            },
            10,
        );
        assert_eq!((group, durable), (vec![1, 2, 3, 4], true));
        assert_eq!(told, [false, false, true, true]);
        let mut told = Vec::new();
        let (group, _) = gather(
            (1, true),
            |d| {
                told.push(d);
                None::<(i32, bool)>
            },
            10,
        );
        assert_eq!((group, told), (vec![1], vec![true]));
    }

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
                    tier: Tier::Direct,
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
