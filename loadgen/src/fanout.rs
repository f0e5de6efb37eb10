//! `tiercast bench-fanout`: what each tier costs Redis and the store per
//! message, counted by Redis itself. E edges (in this process, each with its
//! own leased node id) on a Redis Cluster; for each group size, one device
//! per member online over QUIC, spread evenly over the edges; a publisher
//! sends messages under the planner's tier and then with the conversation
//! pinned to tier 1; Redis's `INFO commandstats` / `INFO stats` on every
//! master and the engines' and edges' own counters are read before and
//! after each run.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fred::prelude::*;
use fred::types::InfoKind;
use serde::Serialize;
use tiercast_client::{Client, ClientConfig, Delivery, client_endpoint};
use tiercast_edge::{Config, Node};
use tiercast_engine::Outgoing;
use tiercast_schemas::envelope::Tier;
use tokio::sync::{Notify, Semaphore};

#[derive(Debug, Clone)]
pub struct FanoutOptions {
    pub redis: Vec<String>,
    pub edges: usize,
    pub sizes: Vec<u64>,
    pub messages: u64,
    pub body: usize,
    /// Share of devices that read (pull) each tier-3 message; the rest only
    /// get the notification, as most members of a huge channel do.
    pub pull_fraction: f64,
}

/// One (size, mode) run, per message.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub members: u64,
    pub mode: &'static str,
    pub tier: u8,
    pub messages: u64,
    pub body_bytes: usize,
    /// SPUBLISH calls Redis counted, per message.
    pub spublish_per_msg: f64,
    /// Every other command Redis counted (routing reads, heartbeats...).
    pub other_cmds_per_msg: f64,
    /// Payload bytes the engine handed to SPUBLISH, per message.
    pub published_bytes_per_msg: f64,
    /// Bytes Redis received / sent on the network, per message (commands,
    /// framing and pub/sub deliveries to edges included).
    pub redis_net_in_per_msg: f64,
    pub redis_net_out_per_msg: f64,
    /// Store reads by the edges' pull path, per message.
    pub pull_store_reads_per_msg: f64,
    /// Deliveries: full messages (tiers 1, 2) or notifications (tier 3).
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Tier 3: bodies pulled, and pulls that failed.
    pub pulls: u64,
    pub pull_errors: u64,
    /// From the first publish to the last delivery (and pull).
    pub seconds: f64,
}

/// Counters that only grow, summed over every Redis master and node.
#[derive(Debug, Default, Clone)]
struct Counters {
    cmds: BTreeMap<String, u64>,
    net_in: u64,
    net_out: u64,
    published_bytes: u64,
    pull_reads: u64,
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn read_counters(
    masters: &[fred::clients::Client],
    nodes: &[Node],
) -> anyhow::Result<Counters> {
    let mut c = Counters::default();
    for m in masters {
        let stats: String = m.info(Some(InfoKind::CommandStats)).await?;
        for line in stats.lines() {
            if let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
                && let Some(calls) = field(rest, "calls")
            {
                *c.cmds.entry(name.to_owned()).or_default() += calls;
            }
        }
        let stats: String = m.info(Some(InfoKind::Stats)).await?;
        for line in stats.lines() {
            if let Some(v) = line.strip_prefix("total_net_input_bytes:") {
                c.net_in += v.trim().parse::<u64>().unwrap_or(0);
            }
            if let Some(v) = line.strip_prefix("total_net_output_bytes:") {
                c.net_out += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    for n in nodes {
        let text = n.metrics();
        c.published_bytes += metric_sum(&text, "tiercast_engine_publish_bytes_total");
        c.pull_reads += metric_sum(&text, "tiercast_edge_pull_store_reads_total");
    }
    Ok(c)
}

fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// What the devices of one group have received in the current round: only
/// ids at or above `round_start` count (Snowflake ids grow with time), so a
/// late delivery of an earlier round is never mistaken for this one's.
#[derive(Default)]
struct Receipts {
    round_start: AtomicU64,
    first: AtomicU64,
    duplicates: AtomicU64,
    pulls: AtomicU64,
    pull_errors: AtomicU64,
    progress: Notify,
}

impl Receipts {
    fn start_round(&self, min_id: u64) {
        self.first.store(0, Ordering::Release);
        self.duplicates.store(0, Ordering::Release);
        self.pulls.store(0, Ordering::Release);
        self.pull_errors.store(0, Ordering::Release);
        self.round_start.store(min_id, Ordering::Release);
    }

    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::AcqRel);
        self.progress.notify_waiters();
    }
}

async fn device_loop(
    client: Client,
    mut rx: tiercast_client::Deliveries,
    receipts: Arc<Receipts>,
    reads: bool,
) {
    let mut seen = HashSet::new();
    while let Some(d) = rx.recv().await {
        let (id, conversation, notify) = match d {
            Delivery::Message(m) => (m.id, m.conversation, false),
            Delivery::Notify {
                conversation,
                message_id,
            } => (message_id, conversation, true),
            _ => continue,
        };
        if id < receipts.round_start.load(Ordering::Acquire) {
            continue;
        }
        if !seen.insert(id) {
            receipts.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        receipts.bump(&receipts.first);
        if notify && reads {
            // Pull without holding up the next delivery.
            let (client, receipts) = (client.clone(), receipts.clone());
            tokio::spawn(async move {
                match client.pull(conversation, id).await {
                    Ok(Some(_)) => receipts.bump(&receipts.pulls),
                    _ => receipts.bump(&receipts.pull_errors),
                }
            });
        }
    }
}

pub async fn run(opts: FanoutOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let nodes_list = format!(
        "[{}]",
        opts.redis
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let cfg = Config::load(
        None,
        [],
        &[
            ("node.data_dir".into(), dir.path().display().to_string()),
            (
                "node.token_secret".into(),
                "fanout-bench-secret-0123456789abcdef".into(),
            ),
            ("edge.listen".into(), "127.0.0.1:0".into()),
            ("node.http_listen".into(), "127.0.0.1:0".into()),
            ("backplane.kind".into(), "redis".into()),
            ("backplane.redis.nodes".into(), nodes_list),
        ],
    )?;
    let nodes = Node::start_many(&cfg, opts.edges).await?;
    let mut masters = Vec::new();
    for addr in &opts.redis {
        let (h, p) = addr.rsplit_once(':').context("redis address host:port")?;
        let c = Builder::from_config(fred::prelude::Config {
            server: ServerConfig::new_centralized(h, p.parse()?),
            ..Default::default()
        })
        .build()?;
        c.init().await?;
        masters.push(c);
    }
    let endpoints: Vec<quinn::Endpoint> = (0..8)
        .map(|_| {
            client_endpoint(
                "127.0.0.1:0".parse::<SocketAddr>().expect("literal"),
                4 << 20,
            )
        })
        .collect::<Result<_, _>>()?;

    let mut rows = Vec::new();
    for (si, &size) in opts.sizes.iter().enumerate() {
        let conv = 1_000 + si as u64;
        let users: Vec<u64> = (1..=size)
            .map(|i| (si as u64 + 1) * 1_000_000 + i)
            .collect();
        let engine = nodes[0].engine.clone();
        engine
            .create_conversation(Some(conv), format!("fanout {size}"), &users)
            .await?;
        let planned = engine.conversation(conv).await?.tier;

        progress(&format!(
            "{size} members: connecting {size} devices over {} edges",
            opts.edges
        ));
        let started = Instant::now();
        let receipts = Arc::new(Receipts::default());
        // Every n-th device reads tier-3 messages.
        let read_every = if opts.pull_fraction > 0.0 {
            (1.0 / opts.pull_fraction).round().max(1.0) as usize
        } else {
            usize::MAX
        };
        let readers = users.len().div_ceil(read_every.min(users.len()).max(1)) as u64;
        let gate = Arc::new(Semaphore::new(256));
        let mut connects = Vec::new();
        for (i, &user) in users.iter().enumerate() {
            let node = &nodes[i % nodes.len()];
            let token = node
                .keys
                .mint_user(user, tiercast_engine::auth::now_unix(), 3600);
            let cfg = ClientConfig::new(node.quic_addr, node.cert_pem.clone(), token, user);
            let endpoint = endpoints[i % endpoints.len()].clone();
            let gate = gate.clone();
            let receipts = receipts.clone();
            let reads = read_every != usize::MAX && i % read_every == 0;
            connects.push(tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("gate open");
                let (client, rx) = Client::connect_on(&endpoint, cfg).await?;
                tokio::spawn(device_loop(client.clone(), rx, receipts, reads));
                anyhow::Ok(client)
            }));
        }
        let mut clients = Vec::new();
        for c in connects {
            clients.push(c.await??);
        }
        progress(&format!(
            "{size} members: {} devices connected in {:.1} s",
            clients.len(),
            started.elapsed().as_secs_f64()
        ));

        for (mode, pin) in [("planner", None), ("forced tier 1", Some(Tier::Direct))] {
            let tier = match pin {
                Some(t) => u8::from(engine.pin_tier(conv, Some(t)).await?),
                None => u8::from(planned),
            };
            let before = read_counters(&masters, &nodes).await?;
            receipts.start_round(tiercast_engine::snowflake::min_id_at(
                tiercast_engine::snowflake::now_unix_ms(),
            ));
            let t0 = Instant::now();
            for i in 0..opts.messages {
                let mut body = vec![b'x'; opts.body];
                body[..8].copy_from_slice(&i.to_le_bytes());
                engine
                    .send(Outgoing::system(conv, Bytes::from(body)))
                    .await?;
            }
            let expected = opts.messages * size;
            let expected_pulls = if tier == Tier::IdOnly as u8 {
                opts.messages * readers
            } else {
                0
            };
            // Wait (bounded) for every device to have every message, and the
            // readers their pulls.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
            loop {
                let notified = receipts.progress.notified();
                let pulled = receipts.pulls.load(Ordering::Acquire)
                    + receipts.pull_errors.load(Ordering::Acquire);
                if receipts.first.load(Ordering::Acquire) >= expected && pulled >= expected_pulls {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
            let seconds = t0.elapsed().as_secs_f64();
            let after = read_counters(&masters, &nodes).await?;
            let delivered = receipts.first.load(Ordering::Acquire);
            let m = opts.messages as f64;
            let spublish = after.cmds.get("spublish").copied().unwrap_or(0)
                - before.cmds.get("spublish").copied().unwrap_or(0);
            let all_after: u64 = after.cmds.values().sum();
            let all_before: u64 = before.cmds.values().sum();
            // INFO itself is counted: 2 calls per master per read.
            let info_calls = 2 * masters.len() as u64;
            let other = (all_after - all_before - spublish).saturating_sub(info_calls);
            rows.push(Row {
                members: size,
                mode,
                tier,
                messages: opts.messages,
                body_bytes: opts.body,
                spublish_per_msg: spublish as f64 / m,
                other_cmds_per_msg: other as f64 / m,
                published_bytes_per_msg: (after.published_bytes - before.published_bytes) as f64
                    / m,
                redis_net_in_per_msg: (after.net_in - before.net_in) as f64 / m,
                redis_net_out_per_msg: (after.net_out - before.net_out) as f64 / m,
                pull_store_reads_per_msg: (after.pull_reads - before.pull_reads) as f64 / m,
                expected_deliveries: expected,
                deliveries: delivered.min(expected),
                lost: expected.saturating_sub(delivered),
                duplicates: receipts.duplicates.load(Ordering::Relaxed),
                pulls: receipts.pulls.load(Ordering::Relaxed),
                pull_errors: receipts.pull_errors.load(Ordering::Relaxed),
                seconds,
            });
            progress(&format!(
                "{size} members, {mode} (tier {tier}): {:.1} SPUBLISH/msg, {delivered}/{expected} delivered in {seconds:.1} s",
                spublish as f64 / m
            ));
        }
        for c in clients {
            c.close();
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| members | mode | tier | SPUBLISH / msg | other Redis cmds / msg | payload bytes / msg | Redis net in / msg | Redis net out / msg | pulls / msg | pull store reads / msg | delivered / expected | lost | dups | seconds |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {}/{} | {} | {} | {:.1} |\n",
            r.members,
            r.mode,
            r.tier,
            r.spublish_per_msg,
            r.other_cmds_per_msg,
            r.published_bytes_per_msg,
            r.redis_net_in_per_msg,
            r.redis_net_out_per_msg,
            r.pulls as f64 / r.messages as f64,
            r.pull_store_reads_per_msg,
            r.deliveries,
            r.expected_deliveries,
            r.lost,
            r.duplicates,
            r.seconds
        );
    }
    out
}
