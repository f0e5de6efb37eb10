//! The ScyllaDB backend (`scylla` crate), for deployments past one machine.
//! Schema: `scylla.cql` beside this file (applied by [`ScyllaStore::connect`]).
//! Every statement is prepared once, at LOCAL_QUORUM (LOCAL_SERIAL for the
//! lightweight transactions).
//!
//! How the `Store` rules map onto a wide-column store:
//! - conversations and devices are created with `IF NOT EXISTS`; membership
//!   changes use `IF NOT EXISTS` / `IF EXISTS` so the member counter moves
//!   only on real changes;
//! - a message and its inbox rows go in one logged batch; the idempotency
//!   key is claimed first with `IF NOT EXISTS`, and a retry that finds the
//!   key but not the message (the first attempt died between the two)
//!   writes the message under the first id, so nothing is lost or doubled;
//! - read markers are written `USING TIMESTAMP <message id>`: the newest
//!   marker wins, whatever order writes arrive in, without a read;
//! - history pages walk the day buckets of the conversation's messages from
//!   the newest needed, and stop at the conversation's creation day.
//!
//! Not tested on the development machines (no ScyllaDB server can run
//! there): the conformance suite runs against a cluster named by
//! `TIERCAST_SCYLLA_NODES` (`cargo test -p tiercast-engine --test it
//! scylla_store -- --ignored`).
//!
//! Known gap: the device limit is a read-then-write, so two new devices of
//! one user registering in the same instant can both pass it.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{Counter, CqlValue, Row};
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::ids::unix_ms_of;
use tiercast_schemas::wire::Message;

use super::{
    ClientRecord, Conversation, Device, NewMessage, Page, Persisted, ReadMark, Registered, Store,
    StoreError,
};

/// The schema, with `{keyspace}` and `{replication}` to fill in.
pub const SCHEMA: &str = include_str!("scylla.cql");

const DAY_MS: u64 = 86_400_000;

fn bucket(id: u64) -> i32 {
    (unix_ms_of(id) / DAY_MS) as i32
}

fn i(v: u64) -> i64 {
    v as i64
}

/// A stored tier number as a [`Tier`].
fn tier_of(t: i8) -> Result<Tier, StoreError> {
    Tier::try_from(t as u8).map_err(|n| StoreError::Corrupt(format!("tier {n} is not 1, 2 or 3")))
}

fn u(v: i64) -> u64 {
    v as u64
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// How to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The keyspace's replication, CQL map syntax.
    pub replication: String,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "tiercast".into(),
            replication: "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into(),
        }
    }
}

impl ScyllaConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("at least one node is needed".into());
        }
        let ok = !self.keyspace.is_empty()
            && self.keyspace.len() <= 48
            && self
                .keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err("keyspace must be 1-48 letters, digits or _".into());
        }
        Ok(())
    }
}

struct Statements {
    insert_conversation: PreparedStatement,
    select_conversation: PreparedStatement,
    select_member_count: PreparedStatement,
    set_pinned: PreparedStatement,
    set_tier: PreparedStatement,
    add_member: PreparedStatement,
    add_user_conversation: PreparedStatement,
    count_members: PreparedStatement,
    remove_member: PreparedStatement,
    remove_user_conversation: PreparedStatement,
    select_members: PreparedStatement,
    members_page: PreparedStatement,
    select_member: PreparedStatement,
    select_user_conversations: PreparedStatement,
    select_clients: PreparedStatement,
    select_client: PreparedStatement,
    upsert_client: PreparedStatement,
    delete_client: PreparedStatement,
    touch_client: PreparedStatement,
    scan_clients: PreparedStatement,
    claim_dedupe: PreparedStatement,
    retake_dedupe: PreparedStatement,
    insert_message: PreparedStatement,
    insert_inbox: PreparedStatement,
    touch_latest: PreparedStatement,
    select_latest: PreparedStatement,
    select_message: PreparedStatement,
    history_page: PreparedStatement,
    since_page: PreparedStatement,
    select_inbox: PreparedStatement,
    select_inbox_ids: PreparedStatement,
    delete_inbox_row: PreparedStatement,
    delete_inbox: PreparedStatement,
    write_read: PreparedStatement,
    select_reads: PreparedStatement,
}

pub struct ScyllaStore {
    session: Arc<Session>,
    st: Statements,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScyllaStore")
    }
}

impl ScyllaStore {
    /// Connects, applies the schema (idempotent) and prepares the statements.
    pub async fn connect(cfg: &ScyllaConfig) -> Result<Self, StoreError> {
        cfg.validate().map_err(StoreError::Backend)?;
        let profile = ExecutionProfile::builder()
            .consistency(Consistency::LocalQuorum)
            .serial_consistency(Some(SerialConsistency::LocalSerial))
            .build();
        let session = SessionBuilder::new()
            .known_nodes(&cfg.nodes)
            .default_execution_profile_handle(profile.into_handle())
            .build()
            .await
            .map_err(|e| StoreError::Backend(format!("cannot reach ScyllaDB: {e}")))?;
        let schema = SCHEMA
            .replace("{keyspace}", &cfg.keyspace)
            .replace("{replication}", &cfg.replication);
        for stmt in schema
            .split(';')
            .map(|s| {
                s.lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .filter(|s| !s.trim().is_empty())
        {
            session.query_unpaged(stmt, ()).await.map_err(backend)?;
        }
        session.await_schema_agreement().await.map_err(backend)?;
        let ks = &cfg.keyspace;
        let p = |q: String| {
            let session = &session;
            async move { session.prepare(q).await.map_err(backend) }
        };
        let st = Statements {
            insert_conversation: p(format!("INSERT INTO {ks}.conversations (id, name, created_ms, pinned_tier, tier) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS")).await?,
            select_conversation: p(format!("SELECT id, name, created_ms, pinned_tier, tier FROM {ks}.conversations WHERE id = ?")).await?,
            select_member_count: p(format!("SELECT members FROM {ks}.member_counts WHERE conversation = ?")).await?,
            set_pinned: p(format!("UPDATE {ks}.conversations SET pinned_tier = ? WHERE id = ? IF EXISTS")).await?,
            set_tier: p(format!("UPDATE {ks}.conversations SET tier = ? WHERE id = ? IF EXISTS")).await?,
            add_member: p(format!("INSERT INTO {ks}.members (conversation, user_id) VALUES (?, ?) IF NOT EXISTS")).await?,
            add_user_conversation: p(format!("INSERT INTO {ks}.user_conversations (user_id, conversation) VALUES (?, ?)")).await?,
            count_members: p(format!("UPDATE {ks}.member_counts SET members = members + ? WHERE conversation = ?")).await?,
            remove_member: p(format!("DELETE FROM {ks}.members WHERE conversation = ? AND user_id = ? IF EXISTS")).await?,
            remove_user_conversation: p(format!("DELETE FROM {ks}.user_conversations WHERE user_id = ? AND conversation = ?")).await?,
            select_members: p(format!("SELECT user_id FROM {ks}.members WHERE conversation = ?")).await?,
            members_page: p(format!("SELECT user_id FROM {ks}.members WHERE conversation = ? AND user_id > ? LIMIT ?")).await?,
            select_member: p(format!("SELECT user_id FROM {ks}.members WHERE conversation = ? AND user_id = ?")).await?,
            select_user_conversations: p(format!("SELECT conversation FROM {ks}.user_conversations WHERE user_id = ?")).await?,
            select_clients: p(format!("SELECT client_id, user_id, device, last_seen_ms FROM {ks}.clients WHERE user_id = ?")).await?,
            select_client: p(format!("SELECT client_id, user_id, device, last_seen_ms FROM {ks}.clients WHERE user_id = ? AND client_id = ?")).await?,
            upsert_client: p(format!("INSERT INTO {ks}.clients (user_id, client_id, device, last_seen_ms) VALUES (?, ?, ?, ?)")).await?,
            delete_client: p(format!("DELETE FROM {ks}.clients WHERE user_id = ? AND client_id = ?")).await?,
            touch_client: p(format!("UPDATE {ks}.clients SET last_seen_ms = ? WHERE user_id = ? AND client_id = ?")).await?,
            scan_clients: p(format!("SELECT client_id, user_id, device, last_seen_ms FROM {ks}.clients")).await?,
            claim_dedupe: p(format!("INSERT INTO {ks}.dedupe (scope, conversation, client_msg_id, id, expires_ms) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?")).await?,
            retake_dedupe: p(format!("UPDATE {ks}.dedupe USING TTL ? SET id = ?, expires_ms = ? WHERE scope = ? AND conversation = ? AND client_msg_id = ? IF expires_ms = ?")).await?,
            insert_message: p(format!("INSERT INTO {ks}.messages (conversation, bucket, id, sender, sender_client, body) VALUES (?, ?, ?, ?, ?, ?)")).await?,
            insert_inbox: p(format!("INSERT INTO {ks}.device_inbox (user_id, client_id, id, conversation) VALUES (?, ?, ?, ?)")).await?,
            touch_latest: p(format!("UPDATE {ks}.conversations USING TIMESTAMP ? SET latest_id = ? WHERE id = ?")).await?,
            select_latest: p(format!("SELECT created_ms, latest_id FROM {ks}.conversations WHERE id = ?")).await?,
            select_message: p(format!("SELECT id, sender, sender_client, body FROM {ks}.messages WHERE conversation = ? AND bucket = ? AND id = ?")).await?,
            history_page: p(format!("SELECT id, sender, sender_client, body FROM {ks}.messages WHERE conversation = ? AND bucket = ? AND id < ? AND id > ? ORDER BY id DESC LIMIT ?")).await?,
            since_page: p(format!("SELECT id, sender, sender_client, body FROM {ks}.messages WHERE conversation = ? AND bucket = ? AND id > ? ORDER BY id ASC LIMIT ?")).await?,
            select_inbox: p(format!("SELECT id, conversation FROM {ks}.device_inbox WHERE user_id = ? AND client_id = ? AND id > ? LIMIT ?")).await?,
            select_inbox_ids: p(format!("SELECT id FROM {ks}.device_inbox WHERE user_id = ? AND client_id = ? AND id IN ?")).await?,
            delete_inbox_row: p(format!("DELETE FROM {ks}.device_inbox WHERE user_id = ? AND client_id = ? AND id = ?")).await?,
            delete_inbox: p(format!("DELETE FROM {ks}.device_inbox WHERE user_id = ? AND client_id = ?")).await?,
            write_read: p(format!("INSERT INTO {ks}.reads (user_id, conversation, message_id) VALUES (?, ?, ?) USING TIMESTAMP ?")).await?,
            select_reads: p(format!("SELECT conversation, message_id FROM {ks}.reads WHERE user_id = ? AND conversation IN ?")).await?,
        };
        Ok(Self {
            session: Arc::new(session),
            st,
        })
    }

    /// The driver session (for tools and tests).
    pub fn session(&self) -> &Session {
        &self.session
    }

    async fn exec(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<QueryResult, StoreError> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(backend)
    }

    /// Typed rows of a bounded query.
    async fn rows<R>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let rows = self
            .exec(st, values)
            .await?
            .into_rows_result()
            .map_err(backend)?;
        rows.rows::<R>()
            .map_err(backend)?
            .collect::<Result<Vec<R>, _>>()
            .map_err(backend)
    }

    /// Every row of a partition, page by page.
    async fn all_rows<R>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        self.session
            .execute_iter(st.clone(), values)
            .await
            .map_err(backend)?
            .rows_stream::<R>()
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)
    }

    /// A lightweight transaction: whether it applied, and the row it found.
    async fn lwt(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<(bool, Option<(Row, Vec<String>)>), StoreError> {
        let rows = self
            .exec(st, values)
            .await?
            .into_rows_result()
            .map_err(backend)?;
        let names: Vec<String> = rows
            .column_specs()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        let row: Row = rows.first_row().map_err(backend)?;
        let applied = matches!(row.columns.first(), Some(Some(CqlValue::Boolean(true))));
        Ok((applied, Some((row, names))))
    }

    async fn message_row(&self, conv: u64, id: u64) -> Result<Option<Message>, StoreError> {
        let rows: Vec<(i64, i64, i64, Vec<u8>)> = self
            .rows(&self.st.select_message, (i(conv), bucket(id), i(id)))
            .await?;
        Ok(rows.into_iter().next().map(|r| to_message(conv, r)))
    }

    async fn write_message(&self, msg: &NewMessage) -> Result<(), StoreError> {
        let m = &msg.message;
        let mut batch = Batch::new(BatchType::Logged);
        let mut values: Vec<Vec<CqlValue>> = Vec::with_capacity(msg.inbox.len() + 1);
        batch.append_statement(self.st.insert_message.clone());
        values.push(vec![
            CqlValue::BigInt(i(m.conversation)),
            CqlValue::Int(bucket(m.id)),
            CqlValue::BigInt(i(m.id)),
            CqlValue::BigInt(i(m.sender)),
            CqlValue::BigInt(i(m.sender_client)),
            CqlValue::Blob(m.body.to_vec()),
        ]);
        batch.append_statement(self.st.touch_latest.clone());
        values.push(vec![
            CqlValue::BigInt(i(m.id)),
            CqlValue::BigInt(i(m.id)),
            CqlValue::BigInt(i(m.conversation)),
        ]);
        for d in &msg.inbox {
            batch.append_statement(self.st.insert_inbox.clone());
            values.push(vec![
                CqlValue::BigInt(i(d.user)),
                CqlValue::BigInt(i(d.client)),
                CqlValue::BigInt(i(m.id)),
                CqlValue::BigInt(i(m.conversation)),
            ]);
        }
        self.session.batch(&batch, values).await.map_err(backend)?;
        Ok(())
    }

    /// The day buckets a conversation's messages can be in: from its
    /// creation (or the id epoch) to its newest message. `None`: no
    /// messages.
    async fn bucket_range(&self, conv: u64) -> Result<Option<(i32, i32)>, StoreError> {
        let rows: Vec<(Option<i64>, Option<i64>)> =
            self.rows(&self.st.select_latest, (i(conv),)).await?;
        let Some((created, Some(latest))) = rows.into_iter().next() else {
            return Ok(None);
        };
        let first = (u(created.unwrap_or(0)).max(tiercast_schemas::ids::EPOCH_MS) / DAY_MS) as i32;
        Ok(Some((first, bucket(u(latest)))))
    }
}

fn to_message(conv: u64, (id, sender, sender_client, body): (i64, i64, i64, Vec<u8>)) -> Message {
    Message {
        id: u(id),
        conversation: conv,
        sender: u(sender),
        sender_client: u(sender_client),
        body: Bytes::from(body),
    }
}

fn to_client(
    (client_id, user, device, last_seen): (i64, i64, Option<String>, Option<i64>),
) -> ClientRecord {
    ClientRecord {
        client_id: u(client_id),
        user: u(user),
        device: device.unwrap_or_default(),
        last_seen_ms: u(last_seen.unwrap_or(0)),
    }
}

fn column(row: &Row, names: &[String], name: &str) -> Option<CqlValue> {
    let k = names.iter().position(|n| n == name)?;
    row.columns.get(k).cloned().flatten()
}

#[async_trait]
impl Store for ScyllaStore {
    async fn create_conversation(&self, conv: &Conversation) -> Result<(), StoreError> {
        let (applied, _) = self
            .lwt(
                &self.st.insert_conversation,
                (
                    i(conv.id),
                    conv.name.as_str(),
                    i(conv.created_ms),
                    conv.pinned_tier.map(|t| u8::from(t) as i8),
                    u8::from(conv.tier) as i8,
                ),
            )
            .await?;
        if applied {
            Ok(())
        } else {
            Err(StoreError::ConversationExists(conv.id))
        }
    }

    async fn conversation(&self, id: u64) -> Result<Option<Conversation>, StoreError> {
        let rows: Vec<(i64, Option<String>, Option<i64>, Option<i8>, Option<i8>)> =
            self.rows(&self.st.select_conversation, (i(id),)).await?;
        let Some((_, name, created, pinned, tier)) = rows.into_iter().next() else {
            return Ok(None);
        };
        let count: Vec<(Option<Counter>,)> =
            self.rows(&self.st.select_member_count, (i(id),)).await?;
        let member_count = count
            .first()
            .and_then(|(c,)| c.map(|c| c.0.max(0) as u64))
            .unwrap_or(0);
        Ok(Some(Conversation {
            id,
            name: name.unwrap_or_default(),
            created_ms: u(created.unwrap_or(0)),
            pinned_tier: pinned.map(tier_of).transpose()?,
            tier: tier.map_or(Ok(Tier::Direct), tier_of)?,
            member_count,
        }))
    }

    async fn set_pinned_tier(&self, id: u64, tier: Option<Tier>) -> Result<(), StoreError> {
        let (applied, _) = self
            .lwt(
                &self.st.set_pinned,
                (tier.map(|t| u8::from(t) as i8), i(id)),
            )
            .await?;
        if applied {
            Ok(())
        } else {
            Err(StoreError::NoSuchConversation(id))
        }
    }

    async fn set_tier(&self, id: u64, tier: Tier) -> Result<(), StoreError> {
        let (applied, _) = self
            .lwt(&self.st.set_tier, (u8::from(tier) as i8, i(id)))
            .await?;
        if applied {
            Ok(())
        } else {
            Err(StoreError::NoSuchConversation(id))
        }
    }

    async fn add_members(&self, conv: u64, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        if self.conversation(conv).await?.is_none() {
            return Err(StoreError::NoSuchConversation(conv));
        }
        let mut added = Vec::new();
        for &user in users {
            if added.contains(&user) {
                continue;
            }
            let (applied, _) = self.lwt(&self.st.add_member, (i(conv), i(user))).await?;
            // The reverse index is written either way: a crash after the
            // member row is repaired by adding the member again.
            self.exec(&self.st.add_user_conversation, (i(user), i(conv)))
                .await?;
            if applied {
                self.exec(&self.st.count_members, (Counter(1), i(conv)))
                    .await?;
                added.push(user);
            }
        }
        Ok(added)
    }

    async fn remove_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        let (applied, _) = self.lwt(&self.st.remove_member, (i(conv), i(user))).await?;
        self.exec(&self.st.remove_user_conversation, (i(user), i(conv)))
            .await?;
        if applied {
            self.exec(&self.st.count_members, (Counter(-1), i(conv)))
                .await?;
        }
        Ok(applied)
    }

    async fn members(&self, conv: u64) -> Result<Vec<u64>, StoreError> {
        let rows: Vec<(i64,)> = self.all_rows(&self.st.select_members, (i(conv),)).await?;
        Ok(rows.into_iter().map(|(m,)| u(m)).collect())
    }

    async fn members_page(
        &self,
        conv: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        // User ids are stored bit for bit in a signed column: ids below 2^63
        // (every id Tiercast issues) page in order.
        if after >= i64::MAX as u64 {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64,)> = self
            .rows(
                &self.st.members_page,
                (i(conv), i(after), limit.min(i32::MAX as usize) as i32),
            )
            .await?;
        Ok(rows.into_iter().map(|(m,)| u(m)).collect())
    }

    async fn is_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        let rows: Vec<(i64,)> = self
            .rows(&self.st.select_member, (i(conv), i(user)))
            .await?;
        Ok(!rows.is_empty())
    }

    async fn conversations_of(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        let rows: Vec<(i64,)> = self
            .all_rows(&self.st.select_user_conversations, (i(user),))
            .await?;
        Ok(rows.into_iter().map(|(c,)| u(c)).collect())
    }

    async fn register_client(
        &self,
        client: &ClientRecord,
        max_devices: usize,
        evict_oldest: bool,
    ) -> Result<Registered, StoreError> {
        let existing = self.clients_of(client.user).await?;
        let outcome = super::registration(&existing, client, max_devices, evict_oldest)?;
        if let Registered::Evicted(oldest) = outcome {
            self.exec(&self.st.delete_client, (i(client.user), i(oldest)))
                .await?;
            self.exec(&self.st.delete_inbox, (i(client.user), i(oldest)))
                .await?;
        }
        self.exec(
            &self.st.upsert_client,
            (
                i(client.user),
                i(client.client_id),
                client.device.as_str(),
                i(client.last_seen_ms),
            ),
        )
        .await?;
        Ok(outcome)
    }

    async fn clients_of(&self, user: u64) -> Result<Vec<ClientRecord>, StoreError> {
        let rows: Vec<(i64, i64, Option<String>, Option<i64>)> =
            self.all_rows(&self.st.select_clients, (i(user),)).await?;
        Ok(rows.into_iter().map(to_client).collect())
    }

    async fn devices_of(&self, users: &[u64]) -> Result<Vec<Device>, StoreError> {
        let per_user = futures::stream::iter(users.iter().copied())
            .map(|user| self.clients_of(user))
            .buffered(32)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(per_user
            .into_iter()
            .flatten()
            .map(|c| Device {
                user: c.user,
                client: c.client_id,
            })
            .collect())
    }

    async fn touch_clients(&self, clients: &[(u64, u64)], now_ms: u64) -> Result<(), StoreError> {
        for &(user, client) in clients {
            // Read first: an UPDATE alone would create a row for a device
            // that was removed meanwhile.
            let rows: Vec<(i64, i64, Option<String>, Option<i64>)> = self
                .rows(&self.st.select_client, (i(user), i(client)))
                .await?;
            if let Some(r) = rows.into_iter().next()
                && u(r.3.unwrap_or(0)) < now_ms
            {
                self.exec(&self.st.touch_client, (i(now_ms), i(user), i(client)))
                    .await?;
            }
        }
        Ok(())
    }

    async fn expire_clients(
        &self,
        unseen_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ClientRecord>, StoreError> {
        // A full scan, paged: this runs once per sweep, not per message.
        let mut stream = self
            .session
            .execute_iter(self.st.scan_clients.clone(), ())
            .await
            .map_err(backend)?
            .rows_stream::<(i64, i64, Option<String>, Option<i64>)>()
            .map_err(backend)?;
        let mut stale = Vec::new();
        while let Some(row) = stream.next().await {
            let c = to_client(row.map_err(backend)?);
            if c.last_seen_ms < unseen_before_ms {
                stale.push(c);
                if stale.len() >= limit {
                    break;
                }
            }
        }
        for c in &stale {
            self.exec(&self.st.delete_client, (i(c.user), i(c.client_id)))
                .await?;
            self.exec(&self.st.delete_inbox, (i(c.user), i(c.client_id)))
                .await?;
        }
        Ok(stale)
    }

    async fn set_read_marks(&self, marks: &[ReadMark]) -> Result<(), StoreError> {
        for m in marks {
            self.exec(
                &self.st.write_read,
                (
                    i(m.user),
                    i(m.conversation),
                    i(m.message_id),
                    i(m.message_id),
                ),
            )
            .await?;
        }
        Ok(())
    }

    async fn read_marks(&self, user: u64, convs: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = convs.iter().map(|&c| i(c)).collect();
        let rows: Vec<(i64, Option<i64>)> =
            self.rows(&self.st.select_reads, (i(user), ids)).await?;
        let found: std::collections::HashMap<u64, u64> = rows
            .into_iter()
            .filter_map(|(c, m)| Some((u(c), u(m?))))
            .collect();
        // In the order asked.
        Ok(convs
            .iter()
            .filter_map(|c| found.get(c).map(|&m| (*c, m)))
            .collect())
    }

    async fn insert_message(&self, msg: &NewMessage) -> Result<Persisted, StoreError> {
        let m = &msg.message;
        if let Some(d) = &msg.dedupe {
            let expires = d.now_ms.saturating_add(d.ttl_ms);
            // The row outlives the engine's expiry by a little; it is the
            // `expires_ms` column that decides.
            let ttl = (d.ttl_ms.div_ceil(1000) + 1).min(i32::MAX as u64) as i32;
            let (applied, row) = self
                .lwt(
                    &self.st.claim_dedupe,
                    (
                        d.scope.as_str(),
                        i(m.conversation),
                        i(d.client_msg_id),
                        i(m.id),
                        i(expires),
                        ttl,
                    ),
                )
                .await?;
            let bigint = |row: &Option<(Row, Vec<String>)>, name: &str| {
                row.as_ref()
                    .and_then(|(r, names)| column(r, names, name))
                    .and_then(|v| v.as_bigint())
                    .map(u)
            };
            let mut applied = applied;
            if !applied
                && let Some(old_expires) = bigint(&row, "expires_ms")
                && old_expires <= d.now_ms
            {
                // Expired but not yet cleaned up: take the key over, unless
                // another retry took it first.
                let (retaken, _) = self
                    .lwt(
                        &self.st.retake_dedupe,
                        (
                            ttl,
                            i(m.id),
                            i(expires),
                            d.scope.as_str(),
                            i(m.conversation),
                            i(d.client_msg_id),
                            i(old_expires),
                        ),
                    )
                    .await?;
                applied = retaken;
            }
            if !applied {
                let earlier = bigint(&row, "id")
                    .ok_or_else(|| StoreError::Corrupt("idempotency row without an id".into()))?;
                // The first attempt may have died between the claim and the
                // batch: finish it under the first id.
                if self.message_row(m.conversation, earlier).await?.is_none() {
                    let mut again = msg.clone();
                    again.message.id = earlier;
                    self.write_message(&again).await?;
                }
                return Ok(Persisted::Duplicate(earlier));
            }
        }
        self.write_message(msg).await?;
        Ok(Persisted::Stored)
    }

    async fn message(&self, conv: u64, id: u64) -> Result<Option<Message>, StoreError> {
        self.message_row(conv, id).await
    }

    async fn history(&self, conv: u64, page: Page) -> Result<Vec<Message>, StoreError> {
        let Some((first, last)) = self.bucket_range(conv).await? else {
            return Ok(Vec::new());
        };
        let hi = if page.before == 0 {
            i64::MAX
        } else {
            i(page.before)
        };
        let lowest = first.max(if page.after == 0 {
            0
        } else {
            bucket(page.after)
        });
        let mut b = if page.before == 0 {
            last
        } else {
            last.min(bucket(page.before))
        };
        let mut out = Vec::new();
        while b >= lowest && out.len() < page.limit {
            let want = (page.limit - out.len()).min(i32::MAX as usize) as i32;
            let rows: Vec<(i64, i64, i64, Vec<u8>)> = self
                .rows(&self.st.history_page, (i(conv), b, hi, i(page.after), want))
                .await?;
            out.extend(rows.into_iter().map(|r| to_message(conv, r)));
            b -= 1;
        }
        Ok(out)
    }

    async fn since(&self, conv: u64, after: u64, limit: usize) -> Result<Vec<Message>, StoreError> {
        if after >= i64::MAX as u64 {
            return Ok(Vec::new());
        }
        let Some((first, last)) = self.bucket_range(conv).await? else {
            return Ok(Vec::new());
        };
        let mut b = if after == 0 {
            first
        } else {
            first.max(bucket(after))
        };
        let mut out = Vec::new();
        while b <= last && out.len() < limit {
            let want = (limit - out.len()).min(i32::MAX as usize) as i32;
            let rows: Vec<(i64, i64, i64, Vec<u8>)> = self
                .rows(&self.st.since_page, (i(conv), b, i(after), want))
                .await?;
            out.extend(rows.into_iter().map(|r| to_message(conv, r)));
            b += 1;
        }
        Ok(out)
    }

    async fn expire_dedupe(&self, _now_ms: u64, _limit: usize) -> Result<usize, StoreError> {
        // Rows carry a TTL: ScyllaDB removes them by itself.
        Ok(0)
    }

    async fn inbox(
        &self,
        device: Device,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        if after >= i64::MAX as u64 {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, i64)> = self
            .rows(
                &self.st.select_inbox,
                (
                    i(device.user),
                    i(device.client),
                    i(after),
                    limit.min(i32::MAX as usize) as i32,
                ),
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, conv) in rows {
            if let Some(m) = self.message_row(u(conv), u(id)).await? {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn ack(&self, device: Device, ids: &[u64]) -> Result<u32, StoreError> {
        let (user, client) = (i(device.user), i(device.client));
        if ids.is_empty() {
            return Ok(0);
        }
        let wanted: Vec<i64> = ids.iter().map(|&id| i(id)).collect();
        let pending: Vec<(i64,)> = self
            .rows(&self.st.select_inbox_ids, (user, client, wanted))
            .await?;
        for (id,) in &pending {
            self.exec(&self.st.delete_inbox_row, (user, client, *id))
                .await?;
        }
        Ok(pending.len() as u32)
    }
}
