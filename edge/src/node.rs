//! A node in one process: engine, HTTP API and QUIC edge over a store and a
//! backplane (in-process on a single node, Redis in a cluster). `tiercast
//! dev`, `tiercast demo`, `tiercast edge` and the integration tests all start
//! it through [`Node::start`] or [`Node::start_with_store`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tiercast_engine::Engine;
use tiercast_engine::auth::TokenKeys;
use tiercast_engine::backplane::redis::{self, RedisBackplane, RedisRoutes};
use tiercast_engine::backplane::{Backplane, LocalBackplane, LocalRoutes, Routes};
use tiercast_engine::http::{self, HttpState};
use tiercast_engine::lease::NodeLease;
use tiercast_engine::metrics::EngineMetrics;
use tiercast_engine::reads::{
    FlusherConfig, LocalReadQueue, ReadMetrics, ReadQueue, RedisReadQueue,
};
use tiercast_engine::store::{EmbeddedStore, RemoteStore, ScyllaStore, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{BackplaneKind, Config, EdgeConfig, StoreKind};
use crate::core::Listener;
use crate::metrics::EdgeMetrics;
use crate::server::Edge;
use crate::tls::{self, Identity};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error("cannot open the store: {0}")]
    Store(#[from] tiercast_engine::store::StoreError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind {what} on {addr}: {reason}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("engine: {0}")]
    Engine(String),
    #[error("backplane: {0}")]
    Backplane(#[from] tiercast_engine::backplane::BackplaneError),
}

/// The engine service (`tiercast engine`): the HTTP API for publishers, the
/// store for edge processes (`/internal/store`), and the engine, without a
/// QUIC edge.
#[derive(Debug)]
pub struct EngineService {
    pub http_addr: SocketAddr,
    pub engine: Arc<Engine>,
    pub keys: TokenKeys,
    lease: Option<NodeLease>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl EngineService {
    pub async fn start(mut cfg: Config) -> Result<Self, StartError> {
        let store = open_store(&cfg).await?;
        let Core {
            engine,
            lease,
            registry,
            keys,
            ..
        } = core(&mut cfg, store).await?;
        let (stop, stopped) = watch::channel(false);
        let (http_addr, task) = serve_http(
            &cfg,
            engine.clone(),
            keys.clone(),
            Arc::new(registry),
            stopped.clone(),
            stopped,
        )
        .await?;
        tracing::info!(%http_addr, node_id = engine.node_id(), "engine service started");
        Ok(Self {
            http_addr,
            engine,
            keys,
            lease,
            stop,
            task,
        })
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.engine.read_queue().close().await;
        if let Some(lease) = self.lease {
            lease.release().await;
        }
    }
}

/// How long a node-id lease lasts unrenewed. Renewed every sixth; a
/// crashed process frees its id after this.
const LEASE_TTL: Duration = Duration::from_secs(15);

/// A running node. Dropping it does not stop it: call [`Node::shutdown`].
#[derive(Debug)]
pub struct Node {
    pub quic_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The certificate chain clients must trust (PEM).
    pub cert_pem: String,
    /// Where the development certificate was written, if it was generated.
    pub cert_path: Option<PathBuf>,
    pub keys: TokenKeys,
    pub engine: Arc<Engine>,
    /// The in-process backplane (a single node without Redis): its
    /// publish counters are what each tier costs per message.
    pub local_backplane: Option<LocalBackplane>,
    /// The node-id lease (cluster mode).
    lease: Option<NodeLease>,
    registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The quinn transport settings of a client-facing endpoint.
pub fn transport_config(cfg: &EdgeConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(cfg.idle_timeout_ms))
            .expect("validated idle timeout fits"),
    ));
    // One control stream per connection (a reconnect opens a new
    // connection); clients open no unidirectional streams.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    // What a client may have in flight towards the edge: two of the largest
    // frames on its one stream, and nothing more on the connection (quinn's
    // defaults, 1.25 MB per stream and an unbounded connection window, let
    // one client park megabytes in the edge's memory).
    let window = u32::try_from(2 * (cfg.max_frame_bytes + 4)).expect("frame limit is small");
    t.stream_receive_window(window.into());
    t.receive_window(window.into());
    // Connection ids beyond the handshake's: one spare (patch 8 of ADR 0015).
    t.max_issued_connection_ids(cfg.connection_ids);
    if cfg.ack_every > 0 {
        let mut ack = quinn::AckFrequencyConfig::default();
        // The threshold is the packets a receiver may take without acking.
        ack.ack_eliciting_threshold((cfg.ack_every - 1).into());
        // Asked as configured even above the RTT (a loopback or LAN path's
        // RTT is far below a broadcast's frame interval): the patch of ADR
        // 0015, without which quinn-proto asks max(RTT, 25 ms) at most.
        ack.max_ack_delay(Some(Duration::from_millis(cfg.ack_delay_ms)));
        ack.max_ack_delay_above_rtt(true);
        t.ack_frequency_config(Some(ack));
    }
    t
}

/// UDP socket buffer size of the QUIC listener. With Linux's default 208
/// KiB, a burst of handshakes (a reconnect storm, 10k clients at once)
/// overflows the receive buffer and handshakes are dropped; 4 MiB absorbs
/// it. The kernel caps it at `net.core.rmem_max`/`wmem_max`.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds the QUIC listener of an edge: one UDP socket per I/O shard on
/// the listen address. `fleet_secret` (the fleet's `node.token_secret`)
/// keys the session tickets, when `edge.ticket_rotation_s` asks for them,
/// and the stateless resets (a restarted edge's resets are verifiable).
pub fn bind_listener(
    cfg: &EdgeConfig,
    id: Identity,
    fleet_secret: &[u8],
    counts: &crate::fleet::TicketCounts,
) -> Result<Listener, StartError> {
    let tickets = (cfg.ticket_rotation_s > 0).then(|| {
        Arc::new(crate::fleet::FleetTicketer::new(
            fleet_secret,
            cfg.ticket_rotation_s,
            counts.clone(),
        )) as Arc<dyn rustls::server::ProducesTickets>
    });
    let mut server = quinn::ServerConfig::with_crypto(tls::server_crypto_with_tickets(
        id,
        tickets,
        cfg.tickets_per_handshake,
    )?);
    server.transport_config(Arc::new(transport_config(cfg)));
    // Address validation across restarts: each device gets tokens for its
    // next connect, which skip the Retry the edge asks for above
    // `edge.retry_above_per_s`; a token is good for a day, once (the
    // Bloom-filter log refuses a replay).
    server.token_key(crate::fleet::address_token_key(fleet_secret));
    let mut tokens = quinn::ValidationTokenConfig::default();
    tokens
        .sent(cfg.address_tokens)
        .lifetime(std::time::Duration::from_secs(24 * 3600));
    server.validation_token_config(tokens);
    let bind_err = |e: std::io::Error| StartError::Bind {
        what: "the QUIC listener",
        addr: cfg.listen,
        reason: e.to_string(),
    };
    let sockets = crate::core::bind_sockets(cfg.listen, cfg.shard_count(), UDP_BUFFER_BYTES)
        .map_err(bind_err)?;
    let endpoint = crate::fleet::endpoint_config(fleet_secret);
    Listener::new(sockets, server, endpoint).map_err(bind_err)
}

/// What every process builds the same way: the store, the backplane and
/// node-id lease, the engine, the metrics registry.
struct Core {
    engine: Arc<Engine>,
    /// The in-process backplane, when there is no Redis.
    local: Option<LocalBackplane>,
    lease: Option<NodeLease>,
    registry: Registry,
    keys: TokenKeys,
}

fn data_dir_error(path: &std::path::Path, e: std::io::Error) -> StartError {
    StartError::DataDir {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The store a configuration names: an engine service's, a ScyllaDB
/// cluster, or an embedded one in `node.data_dir`.
pub async fn open_store(cfg: &Config) -> Result<Arc<dyn Store>, StartError> {
    if let Some(url) = &cfg.node.store_url {
        let keys = cfg
            .internal_keys()
            .expect("validated: auth.internal_secret is set with node.store_url");
        let ca = match &cfg.node.store_ca_path {
            Some(p) => Some(std::fs::read(p).map_err(|e| data_dir_error(p, e))?),
            None => None,
        };
        return Ok(Arc::new(RemoteStore::with_ca(url, keys, ca.as_deref())?));
    }
    if cfg.node.store == StoreKind::Scylla {
        return Ok(Arc::new(ScyllaStore::connect(&cfg.scylla).await?));
    }
    let dir = &cfg.node.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| data_dir_error(dir, e))?;
    Ok(Arc::new(EmbeddedStore::open(&dir.join("tiercast.redb"))?))
}

async fn core(cfg: &mut Config, store: Arc<dyn Store>) -> Result<Core, StartError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(tiercast_engine::metrics::ProcessCollector));
    let mut local_backplane = None;
    let (backplane, routes, lease, redis): (Arc<dyn Backplane>, Arc<dyn Routes>, _, _) = match cfg
        .backplane
        .kind
    {
        BackplaneKind::Local => {
            let local = LocalBackplane::new();
            registry.register(
                    "tiercast_backplane_local_dropped",
                    "Payloads the in-process backplane dropped (a subscriber's queue full); devices catch up from the store",
                    local.dropped_counter(),
                );
            let (publishes, bytes) = local.published_counters();
            registry.register(
                "tiercast_backplane_local_publishes",
                "Publishes on the in-process backplane (one per channel per message: what a tier costs)",
                publishes,
            );
            registry.register(
                "tiercast_backplane_local_publish_bytes",
                "Payload bytes published on the in-process backplane",
                bytes,
            );
            local_backplane = Some(local.clone());
            (
                Arc::new(local),
                Arc::new(LocalRoutes::default()),
                None,
                None,
            )
        }
        BackplaneKind::Redis => {
            let bp = RedisBackplane::connect(cfg.backplane.redis.clone()).await?;
            // The node-id lease and the read-marker streams each get a
            // client (connections) of their own: every send depends on
            // the lease, and stream commands meet ASK redirections while
            // a slot migrates, which once left a shared client's
            // connections answering the wrong commands (all renewals
            // and publishes hung for 30 s while Redis was healthy).
            let lease_client = redis::connect(&cfg.backplane.redis).await?;
            let lease = NodeLease::acquire(&lease_client, LEASE_TTL).await?;
            cfg.engine.node_id = lease.node;
            registry.register(
                "tiercast_clock_skew_ms",
                "This node's wall clock minus the Redis server's, measured at each node-id lease renewal; ids stop beyond engine.max_clock_skew_ms",
                lease.gate().skew_gauge(),
            );
            let routes = RedisRoutes::new(bp.client().clone());
            let reads_client = redis::connect(&cfg.backplane.redis).await?;
            (
                Arc::new(bp),
                Arc::new(routes),
                Some(lease),
                Some(reads_client),
            )
        }
    };
    let engine_metrics = EngineMetrics::register(&mut registry);
    let read_metrics = ReadMetrics::register(&mut registry);
    let engine = Engine::new(
        cfg.engine.clone(),
        store.clone(),
        backplane,
        routes,
        engine_metrics,
        lease.as_ref().map(NodeLease::gate),
    )
    .map_err(|e| StartError::Engine(e.to_string()))?;
    // Read markers: through Redis Streams in a cluster (any engine's
    // flusher writes them), in process on a single node.
    let reads: Arc<dyn ReadQueue> = match redis {
        Some(client) => RedisReadQueue::start(
            client,
            store,
            FlusherConfig {
                consumer: format!("node-{}", cfg.engine.node_id),
                claim_idle: Duration::from_millis(cfg.engine.read_claim_idle_ms),
                run: true,
            },
            read_metrics,
        )
        .await
        .map_err(|e| StartError::Engine(e.to_string()))?,
        None => LocalReadQueue::start(store, read_metrics),
    };
    engine.set_read_queue(reads);
    let engine = Arc::new(engine);
    engine.spawn_device_reaper();
    Ok(Core {
        engine,
        local: local_backplane,
        lease,
        registry,
        keys: cfg.token_keys(),
    })
}

type Stopped = watch::Receiver<bool>;

async fn until_stopped(mut rx: Stopped) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Binds and serves the HTTP API; returns its address and task.
/// `/readyz` says `draining` from `stopping`; the server itself stops at
/// `stopped` (on an edge, after the drain, so that the load balancer sees
/// the drain and `/metrics` shows it).
async fn serve_http(
    cfg: &Config,
    engine: Arc<Engine>,
    keys: TokenKeys,
    registry: Arc<Registry>,
    stopping: Stopped,
    stopped: Stopped,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    let bind_err = |e: std::io::Error| StartError::Bind {
        what: "the HTTP API",
        addr: cfg.node.http_listen,
        reason: e.to_string(),
    };
    let listener = tokio::net::TcpListener::bind(cfg.node.http_listen)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let state = HttpState {
        engine,
        keys,
        internal: cfg.internal_keys(),
        registry,
        limits: cfg.http.clone(),
        ready: http::ReadyProbe::new(stopping),
    };
    let task = tokio::spawn(async move {
        if let Err(e) = http::serve(listener, state, until_stopped(stopped)).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((addr, task))
}

impl Node {
    /// A node on the store its configuration names (`node.store_url`, or
    /// an embedded store in `node.data_dir`).
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        let store = open_store(&cfg).await?;
        Self::start_with_store(cfg, store).await
    }

    /// A node (engine, edge, HTTP API) on `store`. Several nodes in one
    /// process can share a store; with the Redis backplane each takes its
    /// own node id.
    pub async fn start_with_store(
        mut cfg: Config,
        store: Arc<dyn Store>,
    ) -> Result<Self, StartError> {
        let data_dir = cfg.node.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|e| data_dir_error(&data_dir, e))?;
        let Core {
            engine,
            local,
            lease,
            mut registry,
            keys,
        } = core(&mut cfg, store).await?;
        let edge_metrics = EdgeMetrics::register(&mut registry);
        let (identity, cert_path) = match (&cfg.edge.cert_path, &cfg.edge.key_path) {
            (Some(cert), Some(key)) => (Identity::from_pem_files(cert, key)?, None),
            _ => {
                // The development certificate and its key live in the data
                // directory: a node restarted on it keeps the certificate
                // its clients were given.
                let path = data_dir.join("dev-cert.pem");
                let key_path = data_dir.join("dev-key.pem");
                let id = match Identity::from_pem_files(&path, &key_path) {
                    Ok(id) => id,
                    Err(_) => {
                        let (id, key_pem) =
                            Identity::self_signed_with_key(&cfg.edge.dev_cert_names)?;
                        write_private(&key_path, key_pem.as_bytes())
                            .map_err(|e| data_dir_error(&key_path, e))?;
                        std::fs::write(&path, &id.chain_pem)
                            .map_err(|e| data_dir_error(&path, e))?;
                        id
                    }
                };
                (id, Some(path))
            }
        };
        let cert_pem = identity.chain_pem.clone();
        let listener = bind_listener(
            &cfg.edge,
            identity,
            cfg.node.token_secret.as_bytes(),
            &edge_metrics.tickets,
        )?;
        let quic_addr = listener.local_addr;
        let edge = Edge::new(engine.clone(), keys.clone(), cfg.edge.clone(), edge_metrics)
            .await
            .map_err(|e| StartError::Engine(e.to_string()))?;
        let (stop, stopped) = watch::channel(false);
        let registry = Arc::new(registry);
        // The HTTP server outlives the drain: it stops when the edge has.
        let (drained_tx, drained) = watch::channel(false);
        let (http_addr, http_task) = serve_http(
            &cfg,
            engine.clone(),
            keys.clone(),
            registry.clone(),
            stopped.clone(),
            drained,
        )
        .await?;
        let edge_task = tokio::spawn(async move {
            edge.run(listener, until_stopped(stopped)).await;
            let _ = drained_tx.send(true);
        });
        tracing::info!(%quic_addr, %http_addr, node_id = engine.node_id(), "node started");
        Ok(Self {
            quic_addr,
            http_addr,
            cert_pem,
            cert_path,
            keys,
            engine,
            local_backplane: local,
            lease,
            registry,
            stop,
            tasks: vec![edge_task, http_task],
        })
    }

    /// Stops accepting, closes connections, and waits for the tasks, and
    /// (bounded) for the last task still holding the engine, so that the
    /// store is closed when this returns (a node restarted in the same
    /// process opens it again).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.engine.read_queue().close().await;
        if let Some(lease) = self.lease {
            lease.release().await;
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&self.engine) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The node's metrics in Prometheus text format (what `/metrics` serves).
    pub fn metrics(&self) -> String {
        tiercast_engine::metrics::render(&self.registry)
    }

    /// A handle that renders the metrics, for a task that outlives a borrow
    /// of the node.
    pub fn metrics_source(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let registry = self.registry.clone();
        move || tiercast_engine::metrics::render(&registry)
    }

    /// `n` nodes in this process sharing one store (in `cfg.node.data_dir`),
    /// each with its own data directory below it, QUIC and HTTP port 0.
    /// With the Redis backplane each leases its own node id: a whole
    /// multi-edge deployment on one machine.
    pub async fn start_many(cfg: &Config, n: usize) -> Result<Vec<Self>, StartError> {
        let data_dir = &cfg.node.data_dir;
        let store = open_store(cfg).await?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mut c = cfg.clone();
            c.node.data_dir = data_dir.join(format!("edge-{i}"));
            c.edge.listen.set_port(0);
            c.node.http_listen.set_port(0);
            nodes.push(Self::start_with_store(c, store.clone()).await?);
        }
        Ok(nodes)
    }

    /// The node id this node's engine issues ids (and its edge routes) under.
    pub fn node_id(&self) -> u16 {
        self.engine.node_id()
    }
}

/// Writes a file only its owner can read (a private key, a secret, a
/// device id), also when it existed with wider permissions.
pub fn write_private(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(contents)
}
