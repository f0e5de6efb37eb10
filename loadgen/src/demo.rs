//! `tiercast demo`: a whole single node in this process, simulated devices
//! over real QUIC on loopback, and an exact report of what was delivered in
//! each tier: a few chats (tier 1), a group (tier 2) and a channel (tier 3,
//! mostly offline subscribers; its devices pull each body after the
//! ID-only notification). The tier thresholds are lowered to the demo's
//! sizes, so the planner puts each conversation in its tier by its member
//! count, as it would at 100 and 5,000 members.
//!
//! The tiers run one after the other, each until every delivery arrived (or
//! the settle bound), so the in-process backplane's publish counter read
//! before and after a tier is what that tier cost: publishes per message,
//! counted where they are paid, as docs/fanout.md counts `SPUBLISH` on
//! Redis.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tiercast_client::{Client, ClientConfig, Deliveries, Delivery, Message};
use tiercast_edge::{Config, Node};
use tiercast_schemas::envelope::Tier;
use tokio::sync::{Notify, watch};

use crate::report::Figures;
use crate::sim::{SimDevice, publish, stamp_of, stamped_body};
use crate::tracker::{DeviceLog, Tally, tally};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub users: u64,
    pub devices: u64,
    pub chats: u64,
    pub chat_size: u64,
    pub messages: u64,
    pub payload: usize,
    /// The tiers to show, in order (each of 1, 2, 3 at most once).
    pub tiers: Vec<u8>,
    /// Members of the channel (tier 3), all but `users` of them offline;
    /// 0: four times the group.
    pub channel_size: u64,
    /// Gap between one sender's messages.
    pub interval: Duration,
    /// How long to wait for the last deliveries of a tier.
    pub settle: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            users: 8,
            devices: 2,
            chats: 4,
            chat_size: 3,
            messages: 20,
            payload: 64,
            tiers: vec![1, 2, 3],
            channel_size: 0,
            interval: Duration::from_millis(5),
            settle: Duration::from_secs(10),
        }
    }
}

/// Ids of the channel's and group's offline members (no devices): far
/// above any simulated user.
const OFFLINE_USERS: u64 = 1_000_000;

/// The engine's default cap on members added in one call: the demo creates
/// each conversation in one.
const MAX_MEMBERS: u64 = tiercast_engine::config::DEFAULT_MAX_MEMBERS_PER_CALL as u64;

impl DemoOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.users < 2 {
            return Err("--users must be at least 2".into());
        }
        if !(1..=3).contains(&self.devices) {
            return Err("--devices must be 1..=3 (the per-user device limit)".into());
        }
        if self.chats == 0 || !(2..=self.users).contains(&self.chat_size) {
            return Err("--chats must be positive and --chat-size 2..=users".into());
        }
        if !(16..=16 * 1024).contains(&self.payload) {
            return Err("--payload must be 16..=16384 bytes".into());
        }
        let mut seen = HashSet::new();
        if self.tiers.is_empty()
            || !self
                .tiers
                .iter()
                .all(|t| (1..=3).contains(t) && seen.insert(*t))
        {
            return Err("--tiers must list some of 1, 2, 3, each once".into());
        }
        if self.channel_size != 0
            && !(self.group_size() + 1..=MAX_MEMBERS).contains(&self.channel_size)
        {
            return Err(format!(
                "--channel-size must be {}..={MAX_MEMBERS} (above the group's {} members)",
                self.group_size() + 1,
                self.group_size()
            ));
        }
        if self.users > MAX_MEMBERS {
            return Err(format!("--users must be at most {MAX_MEMBERS}"));
        }
        Ok(())
    }

    /// Members of chat `c`: `chat_size` consecutive users starting at
    /// `c * chat_size` (wrapping), so chats overlap when there are more
    /// chats than fit.
    pub fn members(&self, c: u64) -> Vec<u64> {
        (0..self.chat_size)
            .map(|i| (c * self.chat_size + i) % self.users + 1)
            .collect()
    }

    /// The group (tier 2): every user, and offline members when needed to
    /// be larger than a chat.
    pub fn group_size(&self) -> u64 {
        self.users.max(self.chat_size + 1)
    }

    /// The channel (tier 3): every user online, the rest offline.
    pub fn channel_size(&self) -> u64 {
        if self.channel_size == 0 {
            (4 * self.group_size()).min(MAX_MEMBERS)
        } else {
            self.channel_size
        }
    }

    /// The tier thresholds that put chats in tier 1, the group in tier 2
    /// and the channel in tier 3 (`engine.tiers.sharded_above`,
    /// `engine.tiers.id_only_above`).
    pub fn thresholds(&self) -> (u64, u64) {
        (self.chat_size, self.group_size())
    }

    /// Members of a conversation of `size`: users 1..=users first, then
    /// offline ones.
    fn everyone(&self, size: u64) -> Vec<u64> {
        (1..=self.users)
            .chain((1..).map(|i| OFFLINE_USERS + i))
            .take(size as usize)
            .collect()
    }
}

/// One tier's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TierFigures {
    pub tier: u8,
    /// What was sent into this tier, e.g. "4 chats of 3".
    pub conversations: String,
    /// The tier the planner chose for each conversation (all equal `tier`).
    pub planned_tiers: Vec<u8>,
    #[serde(flatten)]
    pub figures: Figures,
    /// Publishes on the in-process backplane while this tier ran.
    pub publishes: u64,
    pub publish_bytes: u64,
    pub publishes_per_message: f64,
}

/// The demo's report: the totals (the keys the demo always wrote) and a
/// section per tier.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    #[serde(flatten)]
    pub total: Figures,
    pub tiers: BTreeMap<String, TierFigures>,
}

impl DemoReport {
    /// A table per tier, then the totals.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<10} {:<30} {:>8} {:>9} {:>10} {:>5} {:>5} {:>8} {:>8} {:>13}\n",
            "tier",
            "conversations",
            "messages",
            "expected",
            "delivered",
            "lost",
            "dup",
            "p50 ms",
            "p99 ms",
            "publishes/msg"
        );
        for t in self.tiers.values() {
            let name = match t.tier {
                1 => "1 direct",
                2 => "2 sharded",
                _ => "3 ID-only",
            };
            let f = &t.figures;
            out += &format!(
                "{:<10} {:<30} {:>8} {:>9} {:>10} {:>5} {:>5} {:>8.2} {:>8.2} {:>13.2}\n",
                name,
                t.conversations,
                f.messages_sent,
                f.expected_deliveries,
                f.deliveries,
                f.lost,
                f.duplicates,
                f.p50_us as f64 / 1000.0,
                f.p99_us as f64 / 1000.0,
                t.publishes_per_message
            );
        }
        out += "publishes/msg: counted by the in-process backplane; tier 1 publishes once per member,\n\
                tiers 2 and 3 once per edge hosting a member (here one edge). Tier 3 is delivered when\n\
                a device has pulled the body after its notification.\n\n";
        out += &self.total.render();
        out
    }

    pub fn ok(&self) -> bool {
        self.total.lost == 0 && self.total.unexpected == 0
    }
}

pub struct DemoRun {
    pub report: DemoReport,
}

/// Runs the demo against a node started here on loopback.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoRun> {
    let dir = tempfile::tempdir().context("temporary data directory")?;
    let secret: String = (0..32)
        .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
        .collect();
    let (sharded_above, id_only_above) = opts.thresholds();
    let mut settings: Vec<(String, String)> = vec![
        ("edge.listen".into(), "127.0.0.1:0".into()),
        ("node.http_listen".into(), "127.0.0.1:0".into()),
        ("node.data_dir".into(), dir.path().display().to_string()),
        ("node.token_secret".into(), secret),
        (
            "engine.tiers.sharded_above".into(),
            sharded_above.to_string(),
        ),
        (
            "engine.tiers.id_only_above".into(),
            id_only_above.to_string(),
        ),
    ];
    // The demo's devices are bots (one message per 5 ms each by default,
    // a pull per notification), above the per-device limits meant for
    // people.
    for kind in ["send", "fetch"] {
        for (k, v) in [("per_s", "100000"), ("burst", "100000")] {
            settings.push((format!("edge.rates.{kind}.{k}"), v.into()));
        }
    }
    let cfg = Config::load(None, [], &settings)?;
    let node = Node::start(cfg).await?;
    let result = Demo::start(&node, &opts).await;
    let report = match result {
        Ok(demo) => demo.run().await,
        Err(e) => Err(e),
    };
    node.shutdown().await;
    Ok(DemoRun { report: report? })
}

/// The conversations of one tier, and who sends into them.
struct Phase {
    tier: u8,
    conversations: Vec<u64>,
    description: String,
    /// Members by conversation.
    members: HashMap<u64, Vec<u64>>,
    /// The backend publishes (over HTTP) instead of the members' devices.
    backend: bool,
}

/// A message sent: where, its id, and which device sent it (none: the
/// backend).
struct Sent {
    conversation: u64,
    id: u64,
    sender: Option<usize>,
}

/// First receipts so far, over every device and tier; a waiter is woken at
/// each.
#[derive(Default)]
struct Progress {
    received: AtomicU64,
    changed: Notify,
}

struct Demo<'a> {
    node: &'a Node,
    opts: &'a DemoOptions,
    base: Instant,
    devices: Vec<SimDevice>,
    clients: Vec<Client>,
    receivers: Vec<tokio::task::JoinHandle<HashMap<u8, DeviceLog>>>,
    stop: watch::Sender<bool>,
    progress: Arc<Progress>,
    phases: Vec<Phase>,
}

impl<'a> Demo<'a> {
    /// Creates the conversations and connects every device.
    async fn start(node: &'a Node, opts: &'a DemoOptions) -> anyhow::Result<Self> {
        let mut phases = Vec::new();
        let mut tier_of = HashMap::new();
        for &tier in &opts.tiers {
            let phase = match tier {
                1 => Phase {
                    tier,
                    conversations: (1..=opts.chats).collect(),
                    description: format!("{} chats of {}", opts.chats, opts.chat_size),
                    members: (1..=opts.chats).map(|c| (c, opts.members(c - 1))).collect(),
                    backend: false,
                },
                2 => {
                    let id = opts.chats + 1;
                    Phase {
                        tier,
                        conversations: vec![id],
                        description: format!("1 group of {}", opts.group_size()),
                        members: HashMap::from([(id, opts.everyone(opts.group_size()))]),
                        backend: false,
                    }
                }
                _ => {
                    let id = opts.chats + 2;
                    Phase {
                        tier,
                        conversations: vec![id],
                        description: format!(
                            "1 channel of {} ({} online)",
                            opts.channel_size(),
                            opts.users
                        ),
                        members: HashMap::from([(id, opts.everyone(opts.channel_size()))]),
                        backend: true,
                    }
                }
            };
            for (&id, members) in &phase.members {
                node.engine
                    .create_conversation(Some(id), format!("demo {id}"), members)
                    .await?;
                tier_of.insert(id, tier);
            }
            phases.push(phase);
        }
        let tier_of = Arc::new(tier_of);

        let base = Instant::now();
        let devices: Vec<SimDevice> = SimDevice::all(opts.users, opts.devices).collect();
        let (stop, stop_rx) = watch::channel(false);
        let progress = Arc::new(Progress::default());
        let mut clients = Vec::new();
        let mut receivers = Vec::new();
        for d in &devices {
            let now = tiercast_engine::auth::now_unix();
            let cfg = ClientConfig {
                device: d.label("demo"),
                ..ClientConfig::new(
                    node.quic_addr,
                    node.cert_pem.clone(),
                    node.keys.mint_user(d.user, now, 3600),
                    0,
                )
            };
            let (client, rx) = Client::connect(cfg)
                .await
                .with_context(|| format!("device {} of user {} connects", d.slot, d.user))?;
            receivers.push(tokio::spawn(receive(
                client.clone(),
                rx,
                base,
                tier_of.clone(),
                stop_rx.clone(),
                progress.clone(),
            )));
            clients.push(client);
        }
        Ok(Self {
            node,
            opts,
            base,
            devices,
            clients,
            receivers,
            stop,
            progress,
            phases,
        })
    }

    /// Runs each tier in turn, then tallies.
    async fn run(mut self) -> anyhow::Result<DemoReport> {
        let backplane = self
            .node
            .local_backplane
            .clone()
            .context("the demo's node runs the in-process backplane")?;
        let mut expected_so_far = 0u64;
        // Per tier: expected ids per device, messages, publishes, bytes.
        let mut results = Vec::new();
        for phase in std::mem::take(&mut self.phases) {
            let (publishes0, bytes0) = (backplane.published(), backplane.published_bytes());
            let sent = if phase.backend {
                self.publish(&phase).await?
            } else {
                self.send(&phase).await?
            };
            let mut expected: Vec<HashSet<u64>> = vec![HashSet::new(); self.devices.len()];
            for m in &sent {
                let members = &phase.members[&m.conversation];
                for (j, d) in self.devices.iter().enumerate() {
                    if Some(j) != m.sender && members.contains(&d.user) {
                        expected[j].insert(m.id);
                    }
                }
            }
            expected_so_far += expected.iter().map(|e| e.len() as u64).sum::<u64>();
            self.settle(expected_so_far).await;
            let mut planned = Vec::new();
            for &c in &phase.conversations {
                planned.push(u8::from(self.node.engine.conversation(c).await?.tier));
            }
            results.push((
                phase,
                sent.len() as u64,
                expected,
                backplane.published() - publishes0,
                backplane.published_bytes() - bytes0,
                planned,
            ));
        }
        let _ = self.stop.send(true);
        let mut logs: Vec<HashMap<u8, DeviceLog>> = Vec::new();
        for r in self.receivers {
            logs.push(r.await?);
        }
        for c in &self.clients {
            c.close();
        }

        let mut total: Option<(u64, Tally)> = None;
        let mut tiers = BTreeMap::new();
        for (phase, messages, expected, publishes, publish_bytes, planned_tiers) in results {
            let tier_logs: Vec<DeviceLog> = logs
                .iter()
                .map(|l| l.get(&phase.tier).cloned().unwrap_or_default())
                .collect();
            let t = tally(&expected, &tier_logs);
            let figures = Figures::new(messages, &t);
            total = Some(match total {
                None => (messages, t),
                Some((m, mut sum)) => {
                    sum.merge(&t);
                    (m + messages, sum)
                }
            });
            tiers.insert(
                phase.tier.to_string(),
                TierFigures {
                    tier: phase.tier,
                    conversations: phase.description,
                    planned_tiers,
                    figures,
                    publishes,
                    publish_bytes,
                    publishes_per_message: if messages == 0 {
                        0.0
                    } else {
                        publishes as f64 / messages as f64
                    },
                },
            );
        }
        let (messages, t) = total.context("at least one tier ran")?;
        Ok(DemoReport {
            total: Figures::new(messages, &t),
            tiers,
        })
    }

    /// Each user's first device sends `messages` into every conversation
    /// of the phase it is in.
    async fn send(&self, phase: &Phase) -> anyhow::Result<Vec<Sent>> {
        let mut senders = Vec::new();
        for (i, d) in self.devices.iter().enumerate() {
            if !d.sends() {
                continue;
            }
            let convs: Vec<u64> = phase
                .conversations
                .iter()
                .copied()
                .filter(|c| phase.members[c].contains(&d.user))
                .collect();
            let client = self.clients[i].clone();
            let (n, payload, interval, base) = (
                self.opts.messages,
                self.opts.payload,
                self.opts.interval,
                self.base,
            );
            // client_msg_id is unique per sending device across all its
            // conversations and phases: that is the idempotency key.
            let first_msg_id = u64::from(phase.tier) << 32;
            senders.push(tokio::spawn(async move {
                let mut sent = Vec::new();
                let mut tick = tokio::time::interval(interval);
                let mut client_msg_id = first_msg_id;
                for _ in 0..n {
                    for &conversation in &convs {
                        tick.tick().await;
                        client_msg_id += 1;
                        let at = base.elapsed().as_micros() as u64;
                        let ok = client
                            .send(conversation, client_msg_id, stamped_body(at, payload))
                            .await?;
                        anyhow::ensure!(!ok.duplicate, "message {client_msg_id} taken for a retry");
                        sent.push(Sent {
                            conversation,
                            id: ok.message_id,
                            sender: Some(i),
                        });
                    }
                }
                anyhow::Ok(sent)
            }));
        }
        let mut all = Vec::new();
        for s in senders {
            all.extend(s.await??);
        }
        Ok(all)
    }

    /// The backend publishes `messages` into each conversation of the
    /// phase over the HTTP API, with a publisher token.
    async fn publish(&self, phase: &Phase) -> anyhow::Result<Vec<Sent>> {
        let http = reqwest::Client::new();
        let token = self
            .node
            .keys
            .mint_publisher("demo", tiercast_engine::auth::now_unix(), 3600);
        let api = format!("http://{}", self.node.http_addr);
        let mut tick = tokio::time::interval(self.opts.interval);
        let mut sent = Vec::new();
        for _ in 0..self.opts.messages {
            for &conversation in &phase.conversations {
                tick.tick().await;
                let at = self.base.elapsed().as_micros() as u64;
                let body = stamped_body(at, self.opts.payload);
                let id = publish(&http, &api, &token, conversation, &body, at)
                    .await
                    .map_err(|code| {
                        anyhow::anyhow!("publish to conversation {conversation}: {code}")
                    })?;
                sent.push(Sent {
                    conversation,
                    id,
                    sender: None,
                });
            }
        }
        Ok(sent)
    }

    /// Waits (bounded by the settle time) until `total` first receipts
    /// have arrived.
    async fn settle(&self, total: u64) {
        let deadline = tokio::time::Instant::now() + self.opts.settle;
        loop {
            let changed = self.progress.changed.notified();
            if self.progress.received.load(Ordering::Acquire) >= total {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }
}

/// A device's receiving task: records each first receipt in its tier's
/// log, acks tier-1 messages (they wait in the device's inbox until acked),
/// and pulls the bodies a tier-3 notification stands for.
async fn receive(
    client: Client,
    mut rx: Deliveries,
    base: Instant,
    tier_of: Arc<HashMap<u64, u8>>,
    mut stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> HashMap<u8, DeviceLog> {
    let mut logs: HashMap<u8, DeviceLog> = HashMap::new();
    // Per channel: the newest id whose bodies this device has pulled.
    let mut pulled: HashMap<u64, u64> = HashMap::new();
    let record = |logs: &mut HashMap<u8, DeviceLog>, m: &Message| {
        let tier = tier_of
            .get(&m.conversation)
            .copied()
            .unwrap_or(Tier::Direct as u8);
        let now_us = base.elapsed().as_micros() as u64;
        let latency = stamp_of(&m.body)
            .map(|at| Duration::from_micros(now_us.saturating_sub(at)))
            .unwrap_or_default();
        if logs.entry(tier).or_default().record(m.id, latency) {
            progress.received.fetch_add(1, Ordering::AcqRel);
            progress.changed.notify_waiters();
        }
    };
    loop {
        let first = tokio::select! {
            d = rx.recv() => d,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(first) = first else { break };
        // Take whatever else is already here, and ack it in one request.
        let mut batch = vec![first];
        while let Ok(d) = rx.try_recv() {
            batch.push(d);
        }
        let mut ids = Vec::with_capacity(batch.len());
        for d in batch {
            match d {
                Delivery::Message(m) => {
                    record(&mut logs, &m);
                    ids.push(m.id);
                }
                Delivery::Notify {
                    conversation,
                    message_id,
                } => {
                    let shown = pulled.get(&conversation).copied().unwrap_or(0);
                    if message_id <= shown {
                        continue;
                    }
                    // One notification may stand for several messages (the
                    // edge coalesces them): pull every body since the last.
                    match client.pull_since(conversation, shown, message_id).await {
                        Ok(new) => {
                            for m in &new {
                                record(&mut logs, m);
                            }
                            pulled.insert(conversation, message_id);
                        }
                        Err(e) => tracing::warn!("demo: pull failed: {e}"),
                    }
                }
                _ => {}
            }
        }
        // An ack failing here only means redelivery on reconnect.
        if !ids.is_empty() {
            let _ = client.ack(&ids).await;
        }
    }
    logs
}
