//! The Redis backplane (fred 10, RESP3): sharded pub/sub on a Redis Cluster
//! or a single Redis 7 server, and the routing table (the node-id lease is
//! in `lease.rs`).
//!
//! Channels carry hash tags (`client+user:{42}`, `node:{7:3}`), so a publish
//! touches one shard. One channel per SSUBSCRIBE: channels of different
//! slots cannot share a call.
//!
//! Keeping subscriptions alive: fred resubscribes after a reconnect, but
//! after a failover or a slot migration Redis drops shard subscriptions with
//! an unsolicited `sunsubscribe` that fred swallows. So each subscriber also
//! runs a watchdog that re-reads the cluster's slot map every
//! `topology_check_ms` and resubscribes every tracked channel when the owner
//! of any slot changed. Payloads published in between are lost to the live
//! path only: the messages are stored, and each reconnect or resubscribe is
//! counted in [`Subscriber::interruptions`], on which the edge repairs the
//! gap from the store for the devices connected to it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::RespVersion;
use fred::types::sorted_sets::Ordering as ZOrdering;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::routes::Routes;
use super::{Backplane, BackplaneError, Inbound, Subscriber};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Seed addresses, `host:port`.
    pub nodes: Vec<String>,
    /// A Redis Cluster (true) or a single server (false).
    pub cluster: bool,
    /// How often a subscriber re-reads the slot map to notice failovers and
    /// migrations. One CLUSTER SLOTS per subscriber per period: 1 s keeps the
    /// live path's gap after a failover short at negligible cost.
    pub topology_check_ms: u64,
    /// ACL user (Redis 6+); unset: `default`.
    pub username: Option<String>,
    /// Password (`requirepass` or the ACL user's).
    pub password: Option<String>,
    /// Connect over TLS (Redis `tls-port`).
    pub tls: bool,
    /// PEM file of the CA(s) that sign the servers' certificates; unset:
    /// the system's roots.
    pub tls_ca_path: Option<std::path::PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:6379".into()],
            cluster: true,
            topology_check_ms: 1_000,
            username: None,
            password: None,
            tls: false,
            tls_ca_path: None,
        }
    }
}

impl RedisConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("at least one node is needed".into());
        }
        for n in &self.nodes {
            parse_host_port(n)?;
        }
        if !(100..=60_000).contains(&self.topology_check_ms) {
            return Err("topology_check_ms must be 100..=60000".into());
        }
        if self.username.is_some() && self.password.is_none() {
            return Err("username needs a password".into());
        }
        if self.tls_ca_path.is_some() && !self.tls {
            return Err("tls_ca_path is set but tls is off".into());
        }
        if self.tls {
            self.tls_connector()?;
        }
        Ok(())
    }

    /// The rustls client configuration for `tls = true`.
    fn tls_connector(&self) -> Result<fred::types::config::TlsConnector, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let Some(path) = &self.tls_ca_path else {
            return fred::types::config::TlsConnector::default_rustls()
                .map_err(|e| format!("system CA roots: {e}"));
        };
        let pem =
            std::fs::read(path).map_err(|e| format!("tls_ca_path {}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("tls_ca_path {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("tls_ca_path {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("tls_ca_path {}: no certificate", path.display()));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(config.into())
    }

    fn builder(&self) -> Result<Builder, BackplaneError> {
        let hosts = self
            .nodes
            .iter()
            .map(|n| parse_host_port(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BackplaneError::Unavailable)?;
        let server = if self.cluster {
            ServerConfig::new_clustered(hosts)
        } else {
            let (h, p) = hosts.into_iter().next().expect("validated non-empty");
            ServerConfig::new_centralized(h, p)
        };
        let tls = if self.tls {
            Some(
                self.tls_connector()
                    .map_err(BackplaneError::Unavailable)?
                    .into(),
            )
        } else {
            None
        };
        let config = Config {
            version: RespVersion::RESP3,
            server,
            username: self.username.clone(),
            password: self.password.clone(),
            tls,
            ..Config::default()
        };
        let mut b = Builder::from_config(config);
        b.with_performance_config(|p| {
            // The subscriber's broadcast buffer: a burst of fan-out must not
            // overflow it before the forwarder drains it.
            p.broadcast_channel_capacity = 65_536;
            p.default_command_timeout = Duration::from_secs(5);
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(5);
        })
        // Retry forever, 50 ms doubling to 2 s: a failover takes seconds.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        Ok(b)
    }
}

fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` is not host:port"))?;
    let port = p.parse().map_err(|_| format!("`{s}` has no valid port"))?;
    Ok((h.trim_matches(['[', ']']).to_owned(), port))
}

fn err(e: fred::error::Error) -> BackplaneError {
    BackplaneError::Command(e.to_string())
}

/// Connects a command client.
pub async fn connect(cfg: &RedisConfig) -> Result<Client, BackplaneError> {
    let client = cfg.builder()?.build().map_err(err)?;
    client
        .init()
        .await
        .map_err(|e| BackplaneError::Unavailable(e.to_string()))?;
    Ok(client)
}

#[derive(Clone)]
pub struct RedisBackplane {
    cfg: RedisConfig,
    client: Client,
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("nodes", &self.cfg.nodes)
            .finish()
    }
}

impl RedisBackplane {
    pub async fn connect(cfg: RedisConfig) -> Result<Self, BackplaneError> {
        let client = connect(&cfg).await?;
        Ok(Self { cfg, client })
    }

    /// The command client: publishes and routes share its connections (the
    /// node-id lease and the read-marker streams connect their own).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BackplaneError> {
        self.client
            .spublish::<i64, _, _>(channel, payload)
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn subscriber(
        &self,
        capacity: usize,
    ) -> Result<(Arc<dyn Subscriber>, mpsc::Receiver<Inbound>), BackplaneError> {
        let sub = self.cfg.builder()?.build_subscriber_client().map_err(err)?;
        sub.init()
            .await
            .map_err(|e| BackplaneError::Unavailable(e.to_string()))?;
        let _reconnects = sub.manage_subscriptions();
        let (tx, rx) = mpsc::channel(capacity);
        let mut messages = sub.message_rx();
        tokio::spawn(async move {
            // The kinds of channel a lag may have dropped from: all.
            let mut gap = 0u8;
            loop {
                match messages.recv().await {
                    Ok(m) => {
                        let Some(payload) = m.value.as_bytes().map(Bytes::copy_from_slice) else {
                            continue;
                        };
                        let inbound = Inbound {
                            channel: Arc::from(&*m.channel),
                            payload,
                            gap_before: std::mem::take(&mut gap),
                        };
                        if tx.send(inbound).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        gap = super::GAP_USER_CHANNELS | super::GAP_NODE_CHANNELS;
                        tracing::warn!(
                            dropped = n,
                            "subscriber lagged; the gap is repaired from the store"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let (interrupted, interruptions) = tokio::sync::watch::channel(0u64);
        let interrupted = Arc::new(interrupted);
        // fred resubscribes by itself after a reconnect; count it once the
        // client is connected again.
        let mut reconnects = sub.reconnect_rx();
        let on_reconnect = interrupted.clone();
        tokio::spawn(async move {
            while reconnects.recv().await.is_ok() {
                on_reconnect.send_modify(|n| *n += 1);
            }
        });
        if self.cfg.cluster {
            tokio::spawn(topology_watchdog(
                sub.clone(),
                Duration::from_millis(self.cfg.topology_check_ms),
                interrupted.clone(),
            ));
        }
        Ok((
            Arc::new(RedisSubscriber {
                client: sub,
                interruptions,
            }),
            rx,
        ))
    }
}

/// Which primary owns which slots.
fn slot_owners(client: &SubscriberClient) -> BTreeMap<(u16, u16), String> {
    client
        .cached_cluster_state()
        .map(|state| {
            state
                .slots()
                .iter()
                .map(|r| ((r.start, r.end), r.primary.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn topology_watchdog(
    client: SubscriberClient,
    every: Duration,
    interrupted: Arc<tokio::sync::watch::Sender<u64>>,
) {
    let mut known = slot_owners(&client);
    // After a change, one more resubscribe on the next tick: a change seen
    // mid-way (a slot migration's owners switch one node at a time) can
    // leave a subscription on a node that drops it a moment later, with no
    // further change in the slot map to notice.
    let mut settle = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !client.is_connected() && client.state() == ClientState::Disconnected {
            // Quit by its owner.
            if client.tracked_shard_channels().is_empty() {
                return;
            }
        }
        if let Err(e) = client.sync_cluster().await {
            tracing::debug!(error = %e, "cluster sync failed; retrying");
            continue;
        }
        let now = slot_owners(&client);
        let changed = now != known;
        if changed || settle {
            tracing::info!(
                channels = client.tracked_shard_channels().len(),
                changed,
                "slot owners changed; resubscribing"
            );
            match client.resubscribe_all().await {
                Ok(()) => {
                    known = now;
                    settle = changed;
                    interrupted.send_modify(|n| *n += 1);
                }
                Err(e) => tracing::warn!(error = %e, "resubscribe failed; retrying"),
            }
        }
    }
}

struct RedisSubscriber {
    client: SubscriberClient,
    interruptions: tokio::sync::watch::Receiver<u64>,
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    fn interruptions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.interruptions.clone()
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        self.client.ssubscribe(channel).await.map_err(err)
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        self.client.sunsubscribe(channel).await.map_err(err)
    }
}

impl Drop for RedisSubscriber {
    fn drop(&mut self) {
        let client = self.client.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.unsubscribe_all().await;
                let _ = client.quit().await;
            });
        }
    }
}

/// The routing table in Redis: `tiercast:route:{<conversation>}` is the set
/// of edges hosting a member; `tiercast:edges` scores each edge with the
/// expiry of its liveness lease.
#[derive(Clone)]
pub struct RedisRoutes {
    client: Client,
    live: Arc<tokio::sync::Mutex<(std::time::Instant, Vec<u16>)>>,
}

impl std::fmt::Debug for RedisRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisRoutes")
    }
}

const EDGES_KEY: &str = "tiercast:edges";
/// How long the live-edge list is reused. Edges join and leave on the scale
/// of seconds; re-reading it on every send would double the commands per
/// message.
const LIVE_CACHE: Duration = Duration::from_millis(250);

fn route_key(conversation: u64) -> String {
    format!("tiercast:route:{{{conversation}}}")
}

impl RedisRoutes {
    pub fn new(client: Client) -> Self {
        let stale = std::time::Instant::now() - LIVE_CACHE * 2;
        Self {
            client,
            live: Arc::new(tokio::sync::Mutex::new((stale, Vec::new()))),
        }
    }

    async fn live_edges(&self) -> Result<Vec<u16>, BackplaneError> {
        let mut cache = self.live.lock().await;
        if cache.0.elapsed() < LIVE_CACHE {
            return Ok(cache.1.clone());
        }
        let now = crate::snowflake::now_unix_ms() as f64;
        let edges: Vec<u16> = self
            .client
            .zrangebyscore(EDGES_KEY, now, "+inf", false, None)
            .await
            .map_err(err)?;
        *cache = (std::time::Instant::now(), edges.clone());
        Ok(edges)
    }
}

#[async_trait]
impl Routes for RedisRoutes {
    async fn heartbeat(&self, edge: u16, ttl_ms: u64) -> Result<(), BackplaneError> {
        let expiry = (crate::snowflake::now_unix_ms() + ttl_ms) as f64;
        self.client
            .zadd::<i64, _, _>(
                EDGES_KEY,
                None,
                None::<ZOrdering>,
                false,
                false,
                (expiry, edge.to_string()),
            )
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn add(&self, conversation: u64, edge: u16) -> Result<(), BackplaneError> {
        self.client
            .sadd::<i64, _, _>(route_key(conversation), edge.to_string())
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn remove(&self, conversation: u64, edge: u16) -> Result<(), BackplaneError> {
        self.client
            .srem::<i64, _, _>(route_key(conversation), edge.to_string())
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn hosting_edges(&self, conversation: u64) -> Result<Vec<u16>, BackplaneError> {
        let members: Vec<u16> = self
            .client
            .smembers(route_key(conversation))
            .await
            .map_err(err)?;
        if members.is_empty() {
            return Ok(members);
        }
        let live = self.live_edges().await?;
        let mut edges: Vec<u16> = members.into_iter().filter(|e| live.contains(e)).collect();
        edges.sort_unstable();
        Ok(edges)
    }
}
