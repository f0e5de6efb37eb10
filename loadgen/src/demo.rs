//! `tiercast demo`: a whole single node in this process, simulated devices
//! over real QUIC on loopback, a few small chats, and an exact report of
//! what was delivered.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use tiercast_client::{Client, ClientConfig, Deliveries, Delivery};
use tiercast_edge::{Config, Node};
use tokio::sync::{Notify, watch};

use crate::report::Figures;
use crate::tracker::{DeviceLog, tally};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub users: u64,
    pub devices: u64,
    pub chats: u64,
    pub chat_size: u64,
    pub messages: u64,
    pub payload: usize,
    /// Gap between one sender's messages.
    pub interval: Duration,
    /// How long to wait for the last deliveries.
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
            interval: Duration::from_millis(5),
            settle: Duration::from_secs(10),
        }
    }
}

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
}

/// One simulated device: user, its place among the user's devices
/// (1-based), and the id the edge issued it.
#[derive(Debug, Clone, Copy)]
struct Device {
    user: u64,
    slot: u64,
    client_id: u64,
}

fn body(base: Instant, seq: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len);
    b.put_u64_le(base.elapsed().as_nanos() as u64);
    b.put_u64_le(seq);
    b.resize(len, b'.');
    b.freeze()
}

fn sent_at(base: Instant, body: &[u8]) -> Option<Instant> {
    let nanos = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    Some(base + Duration::from_nanos(nanos))
}

pub struct DemoRun {
    pub figures: Figures,
    pub options: DemoOptions,
}

/// Runs the demo against a node started here on loopback.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoRun> {
    let dir = tempfile::tempdir().context("temporary data directory")?;
    let secret: String = (0..32)
        .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
        .collect();
    let cfg = Config::load(
        None,
        [],
        &[
            ("edge.listen".into(), "127.0.0.1:0".into()),
            ("node.http_listen".into(), "127.0.0.1:0".into()),
            ("node.data_dir".into(), dir.path().display().to_string()),
            ("node.token_secret".into(), secret),
            // The demo's senders are bots (one message per 5 ms each by
            // default), above the per-device send limit meant for people.
            ("edge.rates.send.per_s".into(), "100000".into()),
            ("edge.rates.send.burst".into(), "100000".into()),
        ],
    )?;
    let node = Node::start(cfg).await?;
    let result = drive(&node, &opts).await;
    node.shutdown().await;
    Ok(DemoRun {
        figures: result?,
        options: opts,
    })
}

async fn drive(node: &Node, opts: &DemoOptions) -> anyhow::Result<Figures> {
    let base = Instant::now();
    for c in 0..opts.chats {
        node.engine
            .create_conversation(Some(c + 1), format!("chat {}", c + 1), &opts.members(c))
            .await?;
    }
    let mut devices: Vec<Device> = (1..=opts.users)
        .flat_map(|user| {
            (1..=opts.devices).map(move |slot| Device {
                user,
                slot,
                client_id: 0,
            })
        })
        .collect();

    let mut clients = Vec::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = Arc::new((AtomicU64::new(0), Notify::new()));
    let mut receivers = Vec::new();
    for d in &mut devices {
        let now = tiercast_engine::auth::now_unix();
        let cfg = ClientConfig {
            device: format!("demo-{}-{}", d.user, d.slot),
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
        d.client_id = client.client_id;
        receivers.push(tokio::spawn(receive(
            client.clone(),
            rx,
            base,
            stop_rx.clone(),
            progress.clone(),
        )));
        clients.push(client);
    }

    // Each user's first device sends `messages` into every chat it is in.
    let mut senders = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        if d.slot != 1 {
            continue;
        }
        let chats: Vec<u64> = (0..opts.chats)
            .filter(|&c| opts.members(c).contains(&d.user))
            .map(|c| c + 1)
            .collect();
        let client = clients[i].clone();
        let (n, payload, interval) = (opts.messages, opts.payload, opts.interval);
        senders.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut tick = tokio::time::interval(interval);
            // client_msg_id is unique per sending device across all its
            // conversations: that is the idempotency key.
            let mut client_msg_id = 0;
            for seq in 0..n {
                for &chat in &chats {
                    tick.tick().await;
                    client_msg_id += 1;
                    let ok = client
                        .send(chat, client_msg_id, body(base, seq, payload))
                        .await?;
                    anyhow::ensure!(!ok.duplicate, "message {client_msg_id} taken for a retry");
                    sent.push((chat, ok.message_id));
                }
            }
            anyhow::Ok((client.client_id, sent))
        }));
    }

    let mut expected: Vec<HashSet<u64>> = vec![HashSet::new(); devices.len()];
    let mut messages_sent = 0u64;
    for s in senders {
        let (sender_client, sent) = s.await??;
        messages_sent += sent.len() as u64;
        for (chat, id) in sent {
            let members = opts.members(chat - 1);
            for (j, d) in devices.iter().enumerate() {
                if d.client_id != sender_client && members.contains(&d.user) {
                    expected[j].insert(id);
                }
            }
        }
    }
    let total: u64 = expected.iter().map(|e| e.len() as u64).sum();

    // Wait (bounded) until every expected delivery has arrived.
    let deadline = tokio::time::Instant::now() + opts.settle;
    while progress.0.load(Ordering::Acquire) < total {
        let notified = progress.1.notified();
        if progress.0.load(Ordering::Acquire) >= total {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    let _ = stop_tx.send(true);
    let mut logs = Vec::new();
    for r in receivers {
        logs.push(r.await?);
    }
    for c in &clients {
        c.close();
    }
    Ok(Figures::new(messages_sent, &tally(&expected, &logs)))
}

async fn receive(
    client: Client,
    mut rx: Deliveries,
    base: Instant,
    mut stop: watch::Receiver<bool>,
    progress: Arc<(AtomicU64, Notify)>,
) -> DeviceLog {
    let mut log = DeviceLog::default();
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
            let Delivery::Message(m) = d else { continue };
            let latency = sent_at(base, &m.body)
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if log.record(m.id, latency) {
                progress.0.fetch_add(1, Ordering::AcqRel);
                progress.1.notify_waiters();
            }
            ids.push(m.id);
        }
        // An ack failing here only means redelivery on reconnect.
        if !ids.is_empty() {
            let _ = client.ack(&ids).await;
        }
    }
    log
}
