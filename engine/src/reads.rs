//! Read markers' write-behind queue. A `Read` is answered once its marker is
//! accepted by the queue; a flusher then writes markers to the store in
//! batches, keeping only the newest per (user, conversation), so a device
//! scrolling through a thousand messages costs one row write, not a thousand.
//!
//! - [`LocalReadQueue`] (single node): an in-process map, flushed every
//!   [`FLUSH_INTERVAL`] and on shutdown. A crash of the process loses the
//!   markers of the last interval that were not written yet (the other
//!   devices saw them live; the store has the ones before).
//! - [`RedisReadQueue`] (cluster): `XADD` to one of [`STREAMS`] Redis Streams
//!   (by user); every engine process runs a flusher in the consumer group
//!   [`GROUP`]. Entries are acknowledged (`XACK`, then `XDEL`) only after the
//!   store write, so a flusher that dies between reading and writing leaves
//!   them pending: it re-reads its own pending entries when it starts, and
//!   other flushers claim entries idle longer than `claim_idle` (`XAUTOCLAIM`).
//!   An accepted marker is lost only if Redis loses the stream entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use crate::store::{ReadMark, Store};

/// How long markers gather before a flush.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Redis Streams the markers are spread over (by user): each lives on one
/// shard, so several spread the load.
pub const STREAMS: u64 = 4;
/// The consumer group of the flushers.
pub const GROUP: &str = "tiercast-flushers";
/// Entries read per flusher round.
const BATCH: usize = 512;

#[derive(Clone, Debug, Default)]
pub struct ReadMetrics {
    /// Markers accepted from devices.
    pub accepted: Counter,
    /// Marker rows written to the store (after coalescing).
    pub written: Counter,
    /// Store writes (batches).
    pub flushes: Counter,
    /// Pending entries taken over from a stopped flusher, or re-read.
    pub recovered: Counter,
}

impl ReadMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tiercast_reads");
        r.register("accepted", "Read markers accepted", m.accepted.clone());
        r.register(
            "written",
            "Read marker rows written to the store after coalescing",
            m.written.clone(),
        );
        r.register(
            "flushes",
            "Store writes of marker batches",
            m.flushes.clone(),
        );
        r.register(
            "recovered",
            "Queued markers re-read or claimed after a flusher stopped",
            m.recovered.clone(),
        );
        m
    }
}

#[derive(Debug, thiserror::Error)]
#[error("read marker not accepted: {0}")]
pub struct QueueError(pub String);

#[async_trait]
pub trait ReadQueue: Send + Sync + 'static {
    /// Accepts a marker; once this returns Ok the marker reaches the store.
    async fn push(&self, mark: ReadMark) -> Result<(), QueueError>;
    /// Writes what has been accepted so far and stops the flusher (on
    /// shutdown).
    async fn close(&self);
}

/// Keeps the newest marker per (user, conversation).
fn coalesce(into: &mut HashMap<(u64, u64), u64>, mark: ReadMark) {
    let e = into.entry((mark.user, mark.conversation)).or_insert(0);
    *e = (*e).max(mark.message_id);
}

fn to_marks(map: HashMap<(u64, u64), u64>) -> Vec<ReadMark> {
    map.into_iter()
        .map(|((user, conversation), message_id)| ReadMark {
            user,
            conversation,
            message_id,
        })
        .collect()
}

/// The single-node queue.
pub struct LocalReadQueue {
    pending: std::sync::Mutex<HashMap<(u64, u64), u64>>,
    wake: Arc<Notify>,
    stopped: AtomicBool,
    store: Arc<dyn Store>,
    metrics: ReadMetrics,
}

impl LocalReadQueue {
    /// The queue and its flusher task.
    pub fn start(store: Arc<dyn Store>, metrics: ReadMetrics) -> Arc<Self> {
        let q = Arc::new(Self {
            pending: std::sync::Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            stopped: AtomicBool::new(false),
            store,
            metrics,
        });
        // The flusher holds the queue weakly: it ends with the queue.
        let weak = Arc::downgrade(&q);
        let wake = q.wake.clone();
        tokio::spawn(async move {
            loop {
                match weak.upgrade() {
                    Some(q) if !q.stopped.load(Ordering::Acquire) => {}
                    _ => return,
                }
                // Wake up now and then to notice a dropped queue.
                let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
                // Let a burst gather into one write.
                tokio::time::sleep(FLUSH_INTERVAL).await;
                let Some(q) = weak.upgrade() else { return };
                if let Err(e) = q.flush().await {
                    tracing::warn!(error = %e, "read markers not written yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        q
    }

    async fn flush(&self) -> Result<(), crate::store::StoreError> {
        let batch = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        if batch.is_empty() {
            return Ok(());
        }
        let marks = to_marks(batch);
        match self.store.set_read_marks(&marks).await {
            Ok(()) => {
                self.metrics.flushes.inc();
                self.metrics.written.inc_by(marks.len() as u64);
                Ok(())
            }
            Err(e) => {
                // Put them back (a newer marker may have arrived meanwhile).
                let mut p = self.pending.lock().expect("pending lock");
                for m in marks {
                    coalesce(&mut p, m);
                }
                Err(e)
            }
        }
    }
}

#[async_trait]
impl ReadQueue for LocalReadQueue {
    async fn push(&self, mark: ReadMark) -> Result<(), QueueError> {
        coalesce(&mut self.pending.lock().expect("pending lock"), mark);
        self.metrics.accepted.inc();
        self.wake.notify_one();
        Ok(())
    }

    async fn close(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "read markers lost at shutdown: the store refused them");
        }
    }
}

/// The stream a user's markers go to. The hash tag keeps each stream in one
/// slot.
pub fn stream_key(user: u64) -> String {
    format!("tiercast:reads:{{{}}}", user % STREAMS)
}

/// The cluster queue: Redis Streams with a consumer group.
pub struct RedisReadQueue {
    client: Client,
    stopped: Arc<AtomicBool>,
    metrics: ReadMetrics,
    flushers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How the Redis queue's flushers behave.
#[derive(Debug, Clone)]
pub struct FlusherConfig {
    /// This flusher's consumer name: stable across restarts of the same node
    /// so it re-reads its own pending entries.
    pub consumer: String,
    /// Entries pending this long with a stopped consumer are claimed.
    pub claim_idle: Duration,
    /// Whether to run flushers at all (a process may only produce).
    pub run: bool,
}

impl RedisReadQueue {
    /// Creates the consumer group (if missing) and starts one flusher per
    /// stream.
    pub async fn start(
        client: Client,
        store: Arc<dyn Store>,
        cfg: FlusherConfig,
        metrics: ReadMetrics,
    ) -> Result<Arc<Self>, QueueError> {
        let stopped = Arc::new(AtomicBool::new(false));
        let mut flushers = Vec::new();
        for s in 0..STREAMS {
            let key = stream_key(s);
            create_group(&client, &key)
                .await
                .map_err(|e| QueueError(format!("cannot create consumer group: {e}")))?;
            if cfg.run {
                let flusher = Flusher {
                    client: client.clone(),
                    store: store.clone(),
                    key,
                    cfg: cfg.clone(),
                    metrics: metrics.clone(),
                    stopped: stopped.clone(),
                };
                flushers.push(tokio::spawn(flusher.run()));
            }
        }
        Ok(Arc::new(Self {
            client,
            stopped,
            metrics,
            flushers: std::sync::Mutex::new(flushers),
        }))
    }
}

#[async_trait]
impl ReadQueue for RedisReadQueue {
    async fn push(&self, mark: ReadMark) -> Result<(), QueueError> {
        let _: Value = self
            .client
            .custom(
                cmd("XADD", 0),
                vec![
                    stream_key(mark.user),
                    "*".into(),
                    "u".into(),
                    mark.user.to_string(),
                    "c".into(),
                    mark.conversation.to_string(),
                    "m".into(),
                    mark.message_id.to_string(),
                ],
            )
            .await
            .map_err(|e| QueueError(e.to_string()))?;
        self.metrics.accepted.inc();
        Ok(())
    }

    async fn close(&self) {
        // Entries stay in the streams; the flushers stop after their round
        // (a store write that hangs is cut off: its entries stay pending).
        self.stopped.store(true, Ordering::Release);
        let flushers = std::mem::take(&mut *self.flushers.lock().expect("flushers lock"));
        for f in flushers {
            if tokio::time::timeout(Duration::from_secs(5), f)
                .await
                .is_err()
            {
                tracing::warn!("a read-marker flusher did not stop in time");
            }
        }
    }
}

/// Creates the flushers' consumer group on `key` (and the stream), reading
/// from the stream's start; one that exists already is left as it is.
async fn create_group(client: &Client, key: &str) -> Result<(), fred::error::Error> {
    let created: Result<Value, _> = client
        .custom(
            cmd("XGROUP", 1),
            vec![
                Value::from("CREATE"),
                key.into(),
                GROUP.into(),
                "0".into(),
                "MKSTREAM".into(),
            ],
        )
        .await;
    match created {
        Err(e) if !e.details().contains("BUSYGROUP") => Err(e),
        _ => Ok(()),
    }
}

/// A custom command whose key is argument `key_at` (for the cluster slot).
fn cmd(name: &'static str, key_at: usize) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::Offset(key_at), false)
}

struct Flusher {
    client: Client,
    store: Arc<dyn Store>,
    key: String,
    cfg: FlusherConfig,
    metrics: ReadMetrics,
    stopped: Arc<AtomicBool>,
}

/// One stream entry: its id and, unless it was deleted meanwhile, a marker.
type Entry = (String, Option<ReadMark>);

impl Flusher {
    async fn run(self) {
        // First what this consumer read before it stopped, then new entries;
        // now and then, entries a stopped consumer left behind.
        let mut own_pending = true;
        let mut last_claim = tokio::time::Instant::now();
        while !self.stopped.load(Ordering::Acquire) {
            let claim_due = last_claim.elapsed() >= self.cfg.claim_idle / 2;
            let round = if own_pending {
                self.read("0").await
            } else if claim_due {
                last_claim = tokio::time::Instant::now();
                self.claim().await
            } else {
                self.read(">").await
            };
            match round {
                Ok(entries) if entries.is_empty() => {
                    own_pending = false;
                    if !claim_due {
                        tokio::time::sleep(FLUSH_INTERVAL).await;
                    }
                }
                Ok(entries) => {
                    if own_pending || claim_due {
                        self.metrics.recovered.inc_by(entries.len() as u64);
                    }
                    if let Err(e) = self.write(entries).await {
                        tracing::warn!(stream = %self.key, error = %e, "read markers not written; they stay pending");
                        own_pending = true;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Err(e) if e.details().contains("NOGROUP") => {
                    // The stream or its group is gone (a failover lost it, or
                    // someone deleted it); entries added since are in a new
                    // stream without the group. Recreate it from the start.
                    tracing::warn!(stream = %self.key, "read-marker consumer group missing; recreating it");
                    if let Err(e) = create_group(&self.client, &self.key).await {
                        tracing::warn!(stream = %self.key, error = %e, "consumer group not recreated");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    own_pending = true;
                }
                Err(e) => {
                    tracing::warn!(stream = %self.key, error = %e, "read-marker stream unavailable");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn read(&self, from: &str) -> Result<Vec<Entry>, fred::error::Error> {
        let v: Value = self
            .client
            .custom(
                cmd("XREADGROUP", 6),
                vec![
                    "GROUP".into(),
                    GROUP.into(),
                    self.cfg.consumer.clone(),
                    "COUNT".into(),
                    BATCH.to_string(),
                    "STREAMS".into(),
                    self.key.clone(),
                    from.into(),
                ],
            )
            .await?;
        Ok(parse_read(v))
    }

    async fn claim(&self) -> Result<Vec<Entry>, fred::error::Error> {
        let v: Value = self
            .client
            .custom(
                cmd("XAUTOCLAIM", 0),
                vec![
                    self.key.clone(),
                    GROUP.into(),
                    self.cfg.consumer.clone(),
                    self.cfg.claim_idle.as_millis().to_string(),
                    "0".into(),
                    "COUNT".into(),
                    BATCH.to_string(),
                ],
            )
            .await?;
        // [next cursor, [entries], [deleted ids]]
        let mut parts = v.into_array().into_iter();
        let _cursor = parts.next();
        let mut out = parts.next().map(parse_entries).unwrap_or_default();
        if let Some(deleted) = parts.next() {
            out.extend(
                deleted
                    .into_array()
                    .into_iter()
                    .filter_map(|id| id.as_string())
                    .map(|id| (id, None)),
            );
        }
        Ok(out)
    }

    /// Writes the batch's newest markers, then acknowledges and deletes the
    /// entries.
    async fn write(&self, entries: Vec<Entry>) -> Result<(), String> {
        let mut newest = HashMap::new();
        for (_, m) in &entries {
            if let Some(m) = m {
                coalesce(&mut newest, *m);
            }
        }
        let marks = to_marks(newest);
        if !marks.is_empty() {
            self.store
                .set_read_marks(&marks)
                .await
                .map_err(|e| e.to_string())?;
            self.metrics.flushes.inc();
            self.metrics.written.inc_by(marks.len() as u64);
        }
        let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
        let mut ack = vec![self.key.clone(), GROUP.to_owned()];
        ack.extend(ids.iter().cloned());
        let _: Value = self
            .client
            .custom(cmd("XACK", 0), ack)
            .await
            .map_err(|e| e.to_string())?;
        let mut del = vec![self.key.clone()];
        del.extend(ids);
        let _: Value = self
            .client
            .custom(cmd("XDEL", 0), del)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// XREADGROUP's answer: per stream (a map in RESP3, pairs in RESP2) a list
/// of entries.
fn parse_read(v: Value) -> Vec<Entry> {
    match v {
        Value::Map(m) => m.inner().into_values().flat_map(parse_entries).collect(),
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| {
                let mut kv = s.into_array().into_iter();
                let _key = kv.next();
                kv.next().map(parse_entries).unwrap_or_default()
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `[[id, [field, value, ...] | nil], ...]`
fn parse_entries(v: Value) -> Vec<Entry> {
    v.into_array()
        .into_iter()
        .filter_map(|e| {
            let mut parts = e.into_array().into_iter();
            let id = parts.next()?.as_string()?;
            let fields = parts.next().map(Value::into_array).unwrap_or_default();
            Some((id, parse_mark(&fields)))
        })
        .collect()
}

fn parse_mark(fields: &[Value]) -> Option<ReadMark> {
    let mut user = None;
    let mut conversation = None;
    let mut message_id = None;
    for pair in fields.chunks(2) {
        let [k, v] = pair else { continue };
        let v = v.as_string()?.parse().ok()?;
        match k.as_string()?.as_str() {
            "u" => user = Some(v),
            "c" => conversation = Some(v),
            "m" => message_id = Some(v),
            _ => {}
        }
    }
    Some(ReadMark {
        user: user?,
        conversation: conversation?,
        message_id: message_id?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_keeps_the_newest_marker() {
        let mut m = HashMap::new();
        for (u, c, id) in [(1, 1, 5), (1, 1, 9), (1, 1, 7), (2, 1, 3), (1, 2, 1)] {
            coalesce(
                &mut m,
                ReadMark {
                    user: u,
                    conversation: c,
                    message_id: id,
                },
            );
        }
        assert_eq!(m.len(), 3);
        assert_eq!(m[&(1, 1)], 9);
    }

    #[test]
    fn entries_parse_and_deleted_entries_have_no_marker() {
        let s = |x: &str| Value::String(x.into());
        let v = Value::Array(vec![
            Value::Array(vec![
                s("1-0"),
                Value::Array(vec![s("u"), s("4"), s("c"), s("5"), s("m"), s("6")]),
            ]),
            Value::Array(vec![s("2-0"), Value::Null]),
        ]);
        let e = parse_entries(v);
        assert_eq!(
            e[0],
            (
                "1-0".to_string(),
                Some(ReadMark {
                    user: 4,
                    conversation: 5,
                    message_id: 6
                })
            )
        );
        assert_eq!(e[1], ("2-0".to_string(), None));
    }

    #[tokio::test]
    async fn local_queue_coalesces_and_flushes_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::EmbeddedStore::open(&dir.path().join("db")).unwrap());
        let q = LocalReadQueue::start(store.clone(), ReadMetrics::default());
        for id in 1..=100 {
            q.push(ReadMark {
                user: 1,
                conversation: 2,
                message_id: id,
            })
            .await
            .unwrap();
        }
        q.close().await;
        assert_eq!(store.read_marks(1, &[2]).await.unwrap(), vec![(2, 100)]);
        let written = q.metrics.written.get();
        assert!(
            written < 100,
            "100 markers of one conversation coalesce ({written} rows written)"
        );
    }
}
