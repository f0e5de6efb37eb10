//! Loadgen's devices on an I/O core: many SDK sessions on one socket, all
//! driven by one loop, with no task, channel or timer per device.
//!
//! The edge holds its connections as state in a shard (`tiercast_edge::
//! core`); this is the same design on the client side, so that one loadgen
//! process can drive as many devices as an edge holds and spend less CPU
//! per delivery than the server it measures. A shard owns one UDP socket
//! (batched `recvmmsg`/`sendmmsg` through the edge's own socket code), a
//! client `quinn-proto` endpoint, the QUIC state of its devices'
//! connections in a table by connection handle, one timer wheel, and the
//! devices' session state. `--sockets` shards run as tasks on the
//! runtime's worker threads (one per core).
//!
//! Each device still behaves as an SDK session
//! ([`tiercast_client::Session`]), with the same rules from
//! [`tiercast_client::resume`]: Hello with its device id, reconnect with
//! exponential backoff and full jitter over the edges, a drain honoured
//! after the edge's delay, a resume by cursor (a listing, then cursor
//! syncs page by page, retried with backoff from the same cursors),
//! deduplication by id, the reorder window, acks of tier-1 messages every
//! 25 ms, sends retried across reconnects with the same client message id.
//! What the device sees goes to a [`Sink`] as the session's [`Event`]s.
//! The session's public API (`Session`) stays what applications use.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionError, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, StreamEvent, StreamId,
    VarInt,
};
use rand::Rng;
use tiercast_client::reconnect::Reconnect;
use tiercast_client::reorder::Reorder;
use tiercast_client::resume::{
    self, Pinned, ResumePlan, SYNC_BATCH, State, advance, ends_session, is_fatal, is_retryable,
    is_shed, resume_snapshot,
};
use tiercast_client::{ClientError, Event, SendOk, SessionStats};
use tiercast_edge::core::io::{Batch, FrameReader, Socket, Wheel};
use tiercast_schemas::wire::{
    ClientBody, ClientFrame, Cursor, ErrorCode, Message, ServerBody, ServerFrame,
};
use tiercast_schemas::{MAX_FRAME_BYTES, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

/// How the devices of a swarm connect and behave (the SDK's defaults).
#[derive(Clone)]
pub struct SwarmConfig {
    /// Trust roots and ALPN; each device gets its own ticket store.
    pub tls: rustls::ClientConfig,
    pub server_name: String,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// The backoff after an edge shed load (the SDK's
    /// `SessionConfig::shed_backoff_base` and `_cap`).
    pub shed_backoff_base: Duration,
    pub shed_backoff_cap: Duration,
    pub sync_limit: u32,
    pub resync_window: Duration,
    pub reorder_window: Duration,
    /// Also report each dropped duplicate ([`Event::Duplicate`]).
    pub report_duplicates: bool,
    /// Share (0..1) of the datagrams from the edges that a device's socket
    /// drops on purpose (loss recovery on loopback).
    pub loss: f64,
    /// Counts the datagrams dropped on purpose (`loss`).
    pub dropped: Arc<AtomicU64>,
    /// Kernel buffer of each socket, bytes.
    pub socket_buffer: usize,
}

impl SwarmConfig {
    pub fn new(tls: rustls::ClientConfig) -> Self {
        Self {
            tls,
            server_name: "localhost".into(),
            idle_timeout: Duration::from_secs(4),
            request_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            shed_backoff_base: tiercast_client::reconnect::SHED_BACKOFF_BASE,
            shed_backoff_cap: tiercast_client::reconnect::SHED_BACKOFF_CAP,
            sync_limit: 200,
            resync_window: Duration::from_secs(3),
            reorder_window: Duration::from_millis(20),
            report_duplicates: false,
            loss: 0.0,
            dropped: Arc::default(),
            socket_buffer: 4 << 20,
        }
    }
}

/// One device to run.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Edges in the order this device tries them.
    pub edges: Vec<SocketAddr>,
    pub token: String,
    pub device: String,
    /// The id an edge issued to this device before, or 0 for a new one.
    pub client_id: u64,
}

/// What the app does about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    Nothing,
    /// Pull the body of a tier-3 notification (`Event::Notify`).
    Pull,
}

/// Where a swarm's devices report, from the shard's loop: keep it short.
pub trait Sink: Send + Sync + 'static {
    fn event(&self, device: usize, event: Event) -> Reaction;
    /// A pull asked for by [`Reaction::Pull`] got its message.
    fn pulled(&self, device: usize);
}

enum Cmd {
    Add {
        index: usize,
        spec: DeviceSpec,
        stats: Arc<SessionStats>,
    },
    Send {
        index: usize,
        conversation: u64,
        client_msg_id: u64,
        body: Bytes,
        deadline: Instant,
        reply: oneshot::Sender<Result<SendOk, ClientError>>,
    },
    Reconnect {
        index: usize,
    },
    ResumedFrom {
        index: usize,
        conversation: u64,
        reply: oneshot::Sender<(Option<u64>, Option<u64>)>,
    },
    Close,
}

/// The devices, spread over shards (device `i` on shard `i % shards`).
pub struct Swarm {
    shards: Vec<mpsc::UnboundedSender<Cmd>>,
    stats: std::sync::Mutex<Vec<Arc<SessionStats>>>,
    ports: Vec<u16>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Swarm {
    /// Binds `shards` sockets on 127.0.0.1 (or `[::1]` for IPv6 edges) and
    /// starts their loops.
    pub fn start(
        cfg: SwarmConfig,
        shards: usize,
        ipv6: bool,
        sink: Arc<dyn Sink>,
    ) -> std::io::Result<Self> {
        let cfg = Arc::new(cfg);
        let mut txs = Vec::new();
        let mut ports = Vec::new();
        let mut tasks = Vec::new();
        for n in 0..shards.max(1) {
            let bind: SocketAddr = if ipv6 {
                "[::1]:0".parse().expect("literal")
            } else {
                "127.0.0.1:0".parse().expect("literal")
            };
            let socket = bound(bind, cfg.socket_buffer)?;
            ports.push(socket.local_addr()?.port());
            let (tx, rx) = mpsc::unbounded_channel();
            let shard = Shard::new(n, shards.max(1), socket, cfg.clone(), sink.clone(), rx)?;
            tasks.push(tokio::spawn(shard.run()));
            txs.push(tx);
        }
        Ok(Self {
            shards: txs,
            stats: std::sync::Mutex::new(Vec::new()),
            ports,
            tasks,
        })
    }

    /// The local ports of the swarm's sockets.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Adds the next device (index = devices added so far); it connects at
    /// once.
    pub fn add(&self, spec: DeviceSpec) -> usize {
        let mut all = self.stats.lock().expect("stats");
        let index = all.len();
        let stats = Arc::new(SessionStats::default());
        all.push(stats.clone());
        let _ = self.shard(index).send(Cmd::Add { index, spec, stats });
        index
    }

    fn shard(&self, index: usize) -> &mpsc::UnboundedSender<Cmd> {
        &self.shards[index % self.shards.len()]
    }

    pub fn stats(&self, index: usize) -> Arc<SessionStats> {
        self.stats.lock().expect("stats")[index].clone()
    }

    /// Sends as device `index`, retrying across reconnects until `within`
    /// passes (as `Session::send`).
    pub async fn send(
        &self,
        index: usize,
        conversation: u64,
        client_msg_id: u64,
        body: Bytes,
        within: Duration,
    ) -> Result<SendOk, ClientError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Send {
            index,
            conversation,
            client_msg_id,
            body,
            deadline: Instant::now() + within,
            reply,
        };
        if self.shard(index).send(cmd).is_err() {
            return Err(ClientError::Connect("swarm stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(ClientError::Connect("swarm stopped".into())))
    }

    /// Drops device `index`'s connection as a network blip would.
    pub fn reconnect(&self, index: usize) {
        let _ = self.shard(index).send(Cmd::Reconnect { index });
    }

    /// As `Session::resumed_from`.
    pub async fn resumed_from(
        &self,
        index: usize,
        conversation: u64,
    ) -> (Option<u64>, Option<u64>) {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::ResumedFrom {
            index,
            conversation,
            reply,
        };
        if self.shard(index).send(cmd).is_err() {
            return (None, None);
        }
        rx.await.unwrap_or((None, None))
    }

    /// Closes every connection and ends the loops (waits up to 2 s for the
    /// closes to go out).
    pub async fn close(&self) {
        for tx in &self.shards {
            let _ = tx.send(Cmd::Close);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for t in &self.tasks {
            while !t.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bound(bind: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&bind.into())?;
    Ok(s.into())
}

// ---- the shard ----------------------------------------------------------

/// Transmits polled from one connection per flush round.
const TRANSMITS_PER_ROUND: usize = 16;
/// Transmits gathered before the batch goes to the socket.
const BATCH_FLUSH: usize = 256;
/// Receive calls per wake-up before the loop looks at its other work.
const RECV_ROUNDS: usize = 64;
/// Received datagrams are copied one after another into a buffer of this
/// size and split off it, so a batch's datagrams share one allocation and
/// one reference count instead of two allocations each (a fresh
/// `BytesMut` per datagram, then its shared header when quinn-proto splits
/// it). A datagram still referenced (unread stream data) keeps its whole
/// buffer alive; loadgen's peer is its own edge, whose data it reads at
/// once (with `--client-loss-pct`, data after a dropped datagram waits for
/// its retransmit, a round trip). The edge does not do this: a hostile
/// client's out-of-order stream data could pin 64 KiB per datagram there.
const RECV_ARENA: usize = 64 * 1024;
/// Acks go out this often while there are some.
const ACK_EVERY: Duration = Duration::from_millis(25);
/// Ids per Ack request.
const ACK_CHUNK: usize = 1_000;

/// Wheel keys: a connection's QUIC timer (even) or a device's own (odd).
fn conn_key(ch: usize) -> usize {
    ch * 2
}
fn dev_key(local: usize) -> usize {
    local * 2 + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    /// Hello sent, waiting for Welcome.
    Hello,
    Live,
}

/// A request in flight, by request id.
enum Req {
    Listing,
    Sync(Vec<Cursor>),
    Ack,
    Send(PendingSend),
    Pull,
}

struct PendingSend {
    conversation: u64,
    client_msg_id: u64,
    body: Bytes,
    deadline: Instant,
    /// Not before this (a pause after a retryable failure).
    not_before: Option<Instant>,
    reply: oneshot::Sender<Result<SendOk, ClientError>>,
}

enum ResumeStep {
    Idle,
    Listing,
    Syncing { queue: Vec<Cursor> },
    Wait(Instant),
}

/// The device's current connection (its QUIC state is in the shard's
/// table under `ch`).
struct Link {
    ch: ConnectionHandle,
    edge: SocketAddr,
    phase: Phase,
    /// Unix ms when the connect began (the device's clock).
    started_ms: u64,
    /// Connect (handshake and Welcome) must be done by then.
    connect_deadline: Instant,
    control: Option<StreamId>,
    ctl_in: FrameReader,
    ctl_out: BytesMut,
    delivery: Option<StreamId>,
    dlv_in: FrameReader,
    next_request: u64,
    pending: HashMap<u64, (Req, Instant)>,
    clock_offset_ms: i64,
    ack_at: Option<Instant>,
}

struct Dev {
    index: usize,
    token: String,
    label: String,
    /// The device's TLS tickets and QUIC address-validation tokens, kept
    /// across its connects as the SDK keeps them.
    tls: tiercast_client::tls::ClientTls,
    policy: Reconnect,
    addr: SocketAddr,
    client_id: u64,
    st: State,
    reorder: Reorder,
    acks: Vec<u64>,
    link: Option<Link>,
    connect_at: Option<Instant>,
    stopped: bool,
    sends: VecDeque<PendingSend>,
    resume: ResumeStep,
    pinned: Pinned,
    resume_backoff: Duration,
    stats: Arc<SessionStats>,
    armed: Option<Instant>,
}

/// A connection's QUIC state, and the device it belongs to while it is
/// that device's current connection (a closing one is driven until the
/// endpoint lets go of it).
struct Slot {
    proto: quinn_proto::Connection,
    dev: Option<usize>,
    dirty: bool,
    armed: Option<Instant>,
}

/// Why a device's connection ended.
enum Ended {
    Drain(Duration),
    Lost(ClientError),
    Closed,
}

struct Shard {
    n: usize,
    shards: usize,
    cfg: Arc<SwarmConfig>,
    sink: Arc<dyn Sink>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    socket: Socket,
    endpoint: quinn_proto::Endpoint,
    transport: Arc<quinn_proto::TransportConfig>,
    slots: Vec<Option<Slot>>,
    devs: Vec<Dev>,
    wheel: Wheel,
    due: Vec<usize>,
    dirty: Vec<usize>,
    dirty_devs: Vec<usize>,
    batch: Batch,
    received: Vec<(SocketAddr, Option<IpAddr>, Option<EcnCodepoint>, BytesMut)>,
    /// Where received datagrams are copied ([`RECV_ARENA`]).
    arena: BytesMut,
    /// What a device's reorder window releases, kept between deliveries.
    released: Vec<Message>,
    now: Instant,
    closing: bool,
    rng: rand::rngs::StdRng,
}

impl Shard {
    fn new(
        n: usize,
        shards: usize,
        socket: std::net::UdpSocket,
        cfg: Arc<SwarmConfig>,
        sink: Arc<dyn Sink>,
        rx: mpsc::UnboundedReceiver<Cmd>,
    ) -> std::io::Result<Self> {
        let socket = Socket::new(socket)?;
        let now = Instant::now();
        let mut transport = quinn_proto::TransportConfig::default();
        // As the SDK: pings well inside the idle timeout.
        transport.keep_alive_interval(Some(cfg.idle_timeout / 3));
        if let Ok(t) = quinn_proto::IdleTimeout::try_from(cfg.idle_timeout) {
            transport.max_idle_timeout(Some(t));
        }
        Ok(Self {
            n,
            shards,
            sink,
            rx,
            socket,
            endpoint: quinn_proto::Endpoint::new(
                Arc::new(quinn_proto::EndpointConfig::default()),
                None,
                false,
                None,
            ),
            transport: Arc::new(transport),
            slots: Vec::new(),
            devs: Vec::new(),
            wheel: Wheel::new(now),
            due: Vec::new(),
            dirty: Vec::new(),
            dirty_devs: Vec::new(),
            batch: Batch::default(),
            received: Vec::new(),
            arena: BytesMut::new(),
            released: Vec::new(),
            now,
            closing: false,
            rng: rand::SeedableRng::from_rng(&mut rand::rng()),
            cfg,
        })
    }

    async fn run(mut self) {
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far);
        tokio::pin!(sleep);
        loop {
            let next = self.wheel.next_deadline();
            if let Some(at) = next {
                sleep.as_mut().reset(at.into());
            }
            let blocked = !self.batch.is_empty();
            let more = !blocked && (!self.dirty.is_empty() || !self.dirty_devs.is_empty());
            tokio::select! {
                r = self.socket.io.readable() => {
                    if r.is_err() {
                        break;
                    }
                }
                cmd = self.rx.recv() => {
                    self.now = Instant::now();
                    match cmd {
                        Some(cmd) => self.command(cmd),
                        None => self.command(Cmd::Close),
                    }
                }
                () = &mut sleep, if next.is_some() => {}
                () = std::future::ready(()), if more => {}
                _ = self.socket.io.writable(), if blocked => {}
            }
            self.now = Instant::now();
            for _ in 0..4_096 {
                match self.rx.try_recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => break,
                }
            }
            self.receive();
            self.now = Instant::now();
            self.expire();
            self.work_devices();
            self.flush();
            if self.closing && self.slots.iter().all(Option::is_none) {
                break;
            }
        }
    }

    // ---- commands ------------------------------------------------------

    fn local(&self, index: usize) -> Option<usize> {
        let local = index / self.shards;
        (index % self.shards == self.n && local < self.devs.len()).then_some(local)
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Add { index, spec, stats } => {
                debug_assert_eq!(index / self.shards, self.devs.len());
                let tls = match tiercast_client::tls::with_own_tickets(&self.cfg.tls) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(error = %e, "device TLS");
                        return;
                    }
                };
                let policy = Reconnect::new(
                    spec.edges.clone(),
                    self.cfg.backoff_base,
                    self.cfg.backoff_cap,
                )
                .with_shed_backoff(self.cfg.shed_backoff_base, self.cfg.shed_backoff_cap);
                let addr = policy.edge();
                self.devs.push(Dev {
                    index,
                    token: spec.token,
                    label: spec.device,
                    tls: tiercast_client::tls::ClientTls::from_crypto(tls),
                    policy,
                    addr,
                    client_id: spec.client_id,
                    st: State::default(),
                    reorder: Reorder::new(self.cfg.reorder_window),
                    acks: Vec::new(),
                    link: None,
                    connect_at: Some(self.now),
                    stopped: false,
                    sends: VecDeque::new(),
                    resume: ResumeStep::Idle,
                    pinned: Pinned::default(),
                    resume_backoff: Duration::from_millis(100),
                    stats,
                    armed: None,
                });
                let local = self.devs.len() - 1;
                self.dirty_devs.push(local);
            }
            Cmd::Send {
                index,
                conversation,
                client_msg_id,
                body,
                deadline,
                reply,
            } => {
                let Some(local) = self.local(index) else {
                    let _ = reply.send(Err(ClientError::Connect("no such device".into())));
                    return;
                };
                let d = &mut self.devs[local];
                if d.stopped {
                    let _ = reply.send(Err(ClientError::Connect("session stopped".into())));
                    return;
                }
                d.sends.push_back(PendingSend {
                    conversation,
                    client_msg_id,
                    body,
                    deadline,
                    not_before: None,
                    reply,
                });
                self.dirty_devs.push(local);
            }
            Cmd::Reconnect { index } => {
                if let Some(local) = self.local(index) {
                    let code = ClientError::Closed {
                        code: ErrorCode::from_u16(0),
                        reason: "bye".into(),
                    };
                    if self.devs[local]
                        .link
                        .as_ref()
                        .is_some_and(|l| l.phase == Phase::Live)
                    {
                        self.end_link(local, Ended::Lost(code), Some((0, b"bye")));
                    }
                }
            }
            Cmd::ResumedFrom {
                index,
                conversation,
                reply,
            } => {
                let out = self.local(index).map_or((None, None), |l| {
                    let st = &self.devs[l].st;
                    (
                        st.synced_from.get(&conversation).copied(),
                        st.cursors.get(&conversation).copied(),
                    )
                });
                let _ = reply.send(out);
            }
            Cmd::Close => {
                self.closing = true;
                for local in 0..self.devs.len() {
                    self.devs[local].stopped = true;
                    if self.devs[local].link.is_some() {
                        self.end_link(local, Ended::Closed, Some((0, b"bye")));
                    }
                }
            }
        }
    }

    // ---- receive -------------------------------------------------------

    fn receive(&mut self) {
        let mut received = std::mem::take(&mut self.received);
        for _ in 0..RECV_ROUNDS {
            received.clear();
            let arena = &mut self.arena;
            let got = self.socket.recv(|from, local, ecn, data| {
                received.push((from, local, ecn, arena_copy(arena, data)));
            });
            match got {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "receive failed");
                    break;
                }
            }
            self.now = Instant::now();
            for (from, local, ecn, data) in received.drain(..) {
                if self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss) {
                    self.cfg.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let local = if self.socket.specific() { None } else { local };
                let event =
                    self.endpoint
                        .handle(self.now, from, local, ecn, data, self.batch.next_buf());
                match event {
                    Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                        if let Some(s) = self.slots.get_mut(ch.0).and_then(Option::as_mut) {
                            s.proto.handle_event(event);
                            mark(&mut self.dirty, ch.0, s);
                        }
                    }
                    Some(DatagramEvent::Response(t)) => self.batch.push(&t),
                    Some(DatagramEvent::NewConnection(incoming)) => {
                        self.endpoint.ignore(incoming);
                    }
                    None => {}
                }
            }
            if self.batch.len() >= BATCH_FLUSH {
                self.send_batch();
            }
        }
        self.received = received;
    }

    // ---- timers --------------------------------------------------------

    fn expire(&mut self) {
        let now = self.now;
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        self.wheel.expire(now, &mut due);
        for &key in &due {
            if key % 2 == 0 {
                let ch = key / 2;
                if let Some(s) = self.slots.get_mut(ch).and_then(Option::as_mut) {
                    s.armed = None;
                    match s.proto.poll_timeout() {
                        Some(t) if t <= now => {
                            s.proto.handle_timeout(now);
                            mark(&mut self.dirty, ch, s);
                        }
                        // Armed for a deadline that moved later (an ack
                        // sent early, the idle timer pushed back): nothing
                        // changed, so no drive, only the new deadline.
                        Some(t) => {
                            self.wheel.insert(t, conn_key(ch));
                            s.armed = Some(t);
                        }
                        None => {}
                    }
                }
            } else {
                let local = key / 2;
                if let Some(d) = self.devs.get_mut(local) {
                    d.armed = None;
                    self.dirty_devs.push(local);
                }
            }
        }
        self.due = due;
    }

    /// Each device marked since the last pass: its own deadlines, and the
    /// work they start (connects, acks, sends, resume steps).
    fn work_devices(&mut self) {
        let mut list = std::mem::take(&mut self.dirty_devs);
        list.sort_unstable();
        list.dedup();
        for &local in &list {
            self.dev_work(local);
        }
        list.clear();
        if self.dirty_devs.is_empty() {
            self.dirty_devs = list;
        }
    }

    fn dev_work(&mut self, local: usize) {
        let now = self.now;
        // A connect whose time came.
        {
            let d = &mut self.devs[local];
            if d.link.is_none() && !d.stopped && d.connect_at.is_some_and(|t| t <= now) {
                d.connect_at = None;
                self.connect(local);
            }
        }
        // A connect that took too long: a failed connect.
        if self.devs[local]
            .link
            .as_ref()
            .is_some_and(|l| l.phase != Phase::Live && l.connect_deadline <= now)
        {
            let t = self.cfg.request_timeout;
            self.end_link(local, Ended::Lost(ClientError::Timeout(t)), Some((0, b"")));
        }
        // Requests past their deadline.
        let timed_out: Vec<u64> = self.devs[local]
            .link
            .as_ref()
            .map(|l| {
                l.pending
                    .iter()
                    .filter(|(_, (_, at))| *at <= now)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for id in timed_out {
            let req = self.devs[local]
                .link
                .as_mut()
                .and_then(|l| l.pending.remove(&id));
            if let Some((req, _)) = req {
                let t = self.cfg.request_timeout;
                self.failed(local, req, ClientError::Timeout(t));
            }
        }
        // Sends past their deadline.
        {
            let d = &mut self.devs[local];
            let mut i = 0;
            while i < d.sends.len() {
                if d.sends[i].deadline <= now {
                    let s = d.sends.remove(i).expect("in range");
                    let left = Duration::ZERO;
                    let _ = s.reply.send(Err(ClientError::Timeout(left)));
                } else {
                    i += 1;
                }
            }
        }
        // The reorder window's due messages.
        if self.devs[local]
            .reorder
            .next_due()
            .is_some_and(|t| t <= now)
        {
            let ready = self.devs[local].reorder.due(now);
            self.reorder_stats(local);
            for m in ready {
                self.deliver(local, m);
            }
        }
        let live = self.devs[local]
            .link
            .as_ref()
            .is_some_and(|l| l.phase == Phase::Live);
        if live {
            // Acks every 25 ms.
            let d = &mut self.devs[local];
            let l = d.link.as_mut().expect("live");
            if d.acks.is_empty() {
                l.ack_at = None;
            } else if l.ack_at.is_none() {
                l.ack_at = Some(now + ACK_EVERY);
            } else if l.ack_at.is_some_and(|t| t <= now) {
                l.ack_at = None;
                self.flush_acks(local);
            }
            // Sends waiting for a connection or their pause.
            let mut ready = Vec::new();
            {
                let d = &mut self.devs[local];
                let mut i = 0;
                while i < d.sends.len() {
                    if d.sends[i].not_before.is_none_or(|t| t <= now) {
                        ready.push(d.sends.remove(i).expect("in range"));
                    } else {
                        i += 1;
                    }
                }
            }
            for s in ready {
                let body = ClientBody::Send {
                    conversation: s.conversation,
                    client_msg_id: s.client_msg_id,
                    body: s.body.clone(),
                };
                self.request(local, Req::Send(s), body);
            }
            // A resume retry whose time came.
            if matches!(self.devs[local].resume, ResumeStep::Wait(t) if t <= now) {
                self.resume_attempt(local);
            }
        }
        self.arm_dev(local);
    }

    fn arm_dev(&mut self, local: usize) {
        let d = &mut self.devs[local];
        let mut next: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        at(d.connect_at);
        at(d.reorder.next_due());
        at(d.sends.iter().map(|s| s.deadline).min());
        let live = d.link.as_ref().is_some_and(|l| l.phase == Phase::Live);
        if live {
            // Without a connection the Welcome brings the device back (a
            // pause long past must not spin the loop meanwhile).
            at(d.sends.iter().filter_map(|s| s.not_before).min());
        }
        if let Some(l) = &d.link {
            if l.phase != Phase::Live {
                at(Some(l.connect_deadline));
            }
            at(l.pending.values().map(|(_, t)| *t).min());
            at(l.ack_at);
        }
        if let ResumeStep::Wait(t) = d.resume {
            at(Some(t));
        }
        if let Some(t) = next
            && d.armed.is_none_or(|a| t < a)
        {
            self.wheel.insert(t, dev_key(local));
            d.armed = Some(t);
        }
    }

    // ---- connections ---------------------------------------------------

    fn connect(&mut self, local: usize) {
        let now = self.now;
        let d = &mut self.devs[local];
        let mut qcfg = quinn_proto::ClientConfig::new(d.tls.0.clone());
        qcfg.transport_config(self.transport.clone());
        qcfg.token_store(d.tls.tokens());
        let addr = d.addr;
        let started_ms = unix_ms();
        match self
            .endpoint
            .connect(now, qcfg, addr, &self.cfg.server_name)
        {
            Ok((ch, proto)) => {
                if self.slots.len() <= ch.0 {
                    self.slots.resize_with(ch.0 + 1, || None);
                }
                let mut slot = Slot {
                    proto,
                    dev: Some(local),
                    dirty: false,
                    armed: None,
                };
                mark(&mut self.dirty, ch.0, &mut slot);
                self.slots[ch.0] = Some(slot);
                d.link = Some(Link {
                    ch,
                    edge: addr,
                    phase: Phase::Handshaking,
                    started_ms,
                    connect_deadline: now + self.cfg.request_timeout,
                    control: None,
                    ctl_in: FrameReader::new(MAX_FRAME_BYTES),
                    ctl_out: BytesMut::new(),
                    delivery: None,
                    dlv_in: FrameReader::new(MAX_FRAME_BYTES),
                    next_request: 1,
                    pending: HashMap::new(),
                    clock_offset_ms: 0,
                    ack_at: None,
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "connect failed");
                let (addr, delay) = d.policy.connect_failed(&mut self.rng);
                d.addr = addr;
                d.connect_at = Some(now + delay);
            }
        }
    }

    /// The device's connection ends (closed here with `close`, or lost):
    /// what was in flight fails or waits for the next connection, and the
    /// device reconnects (or stops) as the session would.
    fn end_link(&mut self, local: usize, ended: Ended, close: Option<(u16, &[u8])>) {
        let now = self.now;
        let Some(link) = self.devs[local].link.take() else {
            return;
        };
        if let Some(s) = self.slots.get_mut(link.ch.0).and_then(Option::as_mut) {
            s.dev = None;
            if let Some((code, reason)) = close
                && !s.proto.is_closed()
            {
                s.proto
                    .close(now, VarInt::from(code), Bytes::copy_from_slice(reason));
            }
            mark(&mut self.dirty, link.ch.0, s);
        }
        let was_live = link.phase == Phase::Live;
        let error = match &ended {
            Ended::Lost(e) => Some(e.clone()),
            _ => None,
        };
        for (_, (req, _)) in link.pending {
            let e = error.clone().unwrap_or(ClientError::Closed {
                code: ErrorCode::Unspecified,
                reason: "connection ended".into(),
            });
            self.failed(local, req, e);
        }
        let d = &mut self.devs[local];
        d.resume = ResumeStep::Idle;
        if !was_live {
            // A failed connect: no event, the next edge after a backoff (the
            // longer one if the edge shed load); a refusal no reconnect can
            // help ends the session.
            match ended {
                Ended::Lost(e) if is_fatal(&e) => self.stop(local, e),
                Ended::Closed => {}
                ended => {
                    let d = &mut self.devs[local];
                    let (addr, delay) = match ended {
                        Ended::Lost(e) if is_shed(&e) => {
                            let turn = d.stats.count_shed(&e);
                            d.policy.refused(&mut self.rng, turn)
                        }
                        _ => d.policy.connect_failed(&mut self.rng),
                    };
                    d.addr = addr;
                    d.connect_at = Some(now + delay);
                }
            }
            self.dirty_devs.push(local);
            return;
        }
        // In the edge's time: the device's own clock may be off.
        let edge_now = unix_ms().saturating_add_signed(link.clock_offset_ms);
        d.st.disconnected_at_ms = Some(edge_now);
        // Whatever the window still holds goes out now (in order).
        let held = d.reorder.flush();
        self.reorder_stats(local);
        for m in held {
            self.deliver(local, m);
        }
        let d = &mut self.devs[local];
        match ended {
            Ended::Closed => {}
            Ended::Drain(after) => {
                let (addr, delay) = d.policy.drained(after);
                d.addr = addr;
                d.connect_at = Some(now + delay);
            }
            Ended::Lost(error) if ends_session(&error) => self.stop(local, error),
            Ended::Lost(error) => {
                let (addr, delay) = d.policy.lost(&mut self.rng);
                d.addr = addr;
                d.connect_at = Some(now + delay);
                let index = d.index;
                let _ = self.sink.event(index, Event::Disconnected { error });
            }
        }
        self.dirty_devs.push(local);
    }

    fn stop(&mut self, local: usize, error: ClientError) {
        let d = &mut self.devs[local];
        d.stopped = true;
        d.connect_at = None;
        for s in d.sends.drain(..) {
            let _ = s.reply.send(Err(error.clone()));
        }
        let index = d.index;
        let _ = self.sink.event(index, Event::Stopped { error });
    }

    /// A request that got no answer (`e`): sends wait for the next
    /// connection if it can help, a resume tries again after a backoff.
    fn failed(&mut self, local: usize, req: Req, e: ClientError) {
        let now = self.now;
        let d = &mut self.devs[local];
        match req {
            Req::Send(mut s) => {
                if is_retryable(&e) && now < s.deadline {
                    let pause = match &e {
                        ClientError::RateLimited { retry_after, .. } => *retry_after,
                        _ => Duration::from_millis(20),
                    };
                    s.not_before = Some(now + pause);
                    d.sends.push_back(s);
                } else {
                    let _ = s.reply.send(Err(e));
                }
            }
            Req::Listing | Req::Sync(_) => {
                if d.link.is_some() {
                    let wait = match &e {
                        ClientError::RateLimited { retry_after, .. } => {
                            (*retry_after).max(d.resume_backoff)
                        }
                        _ => d.resume_backoff,
                    };
                    d.stats.resume_retries.fetch_add(1, Ordering::Relaxed);
                    d.resume = ResumeStep::Wait(now + wait);
                    d.resume_backoff = (d.resume_backoff * 2).min(Duration::from_secs(5));
                }
            }
            // Unacked entries come again on the next connect.
            Req::Ack | Req::Pull => {}
        }
        self.dirty_devs.push(local);
    }

    /// The device's queued acks go out, up to `ACK_CHUNK` ids per request.
    fn flush_acks(&mut self, local: usize) {
        let ids = std::mem::take(&mut self.devs[local].acks);
        for chunk in ids.chunks(ACK_CHUNK) {
            let body = ClientBody::Ack {
                message_ids: chunk.to_vec(),
            };
            self.request(local, Req::Ack, body);
        }
    }

    /// Writes a request on the device's control stream.
    fn request(&mut self, local: usize, req: Req, body: ClientBody) {
        let now = self.now;
        let timeout = self.cfg.request_timeout;
        let Some(l) = self.devs[local].link.as_mut() else {
            let e = ClientError::Closed {
                code: ErrorCode::Unspecified,
                reason: "not connected".into(),
            };
            self.failed(local, req, e);
            return;
        };
        let id = l.next_request;
        l.next_request += 1;
        l.pending.insert(id, (req, now + timeout));
        // Its deadline goes into the wheel with the device's next pass.
        self.dirty_devs.push(local);
        let frame = ClientFrame::new(id, body).encode();
        l.ctl_out.extend_from_slice(&frame);
        let ch = l.ch.0;
        if let Some(s) = self.slots.get_mut(ch).and_then(Option::as_mut) {
            flush_ctl(&mut s.proto, l);
            mark(&mut self.dirty, ch, s);
        }
    }

    // ---- flush ---------------------------------------------------------

    fn flush(&mut self) {
        if !self.send_batch() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty).into_iter();
        while let Some(ch) = dirty.next() {
            self.drive(ch);
            if self.batch.len() >= BATCH_FLUSH && !self.send_batch() {
                self.dirty.extend(dirty);
                return;
            }
        }
        self.send_batch();
    }

    fn send_batch(&mut self) -> bool {
        self.socket.send(&mut self.batch)
    }

    /// One connection: its events into its device, its transmits into the
    /// batch, its endpoint events, its next deadline.
    fn drive(&mut self, ch: usize) {
        let now = self.now;
        // The connection stays marked while its events are handled: what
        // they write (a stream read, an answer) goes out in this drive's
        // transmits below, not in a second drive of the connection (that
        // was one more pass per delivery, its transmit poll empty).
        loop {
            let Some(s) = self.slots.get_mut(ch).and_then(Option::as_mut) else {
                return;
            };
            let Some(event) = s.proto.poll() else { break };
            self.on_event(ch, event);
        }
        let max_segments = self.socket.max_transmit_segments();
        let Some(s) = self.slots.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        s.dirty = false;
        let mut n = 0;
        loop {
            if n == TRANSMITS_PER_ROUND {
                mark(&mut self.dirty, ch, s);
                break;
            }
            match s
                .proto
                .poll_transmit(now, max_segments, self.batch.next_buf())
            {
                Some(t) => {
                    self.batch.push(&t);
                    n += 1;
                    if s.proto.transmits_exhausted() {
                        // Nothing more: the call that would say so is saved
                        // (quinn-proto patch 13).
                        break;
                    }
                }
                None => break,
            }
        }
        let mut drained = false;
        while let Some(event) = s.proto.poll_endpoint_events() {
            drained |= event.is_drained();
            if let Some(back) = self.endpoint.handle_event(ConnectionHandle(ch), event) {
                s.proto.handle_event(back);
                mark(&mut self.dirty, ch, s);
            }
        }
        if drained {
            let dev = s.dev;
            self.slots[ch] = None;
            if let Some(local) = dev {
                self.lost(local, None);
            }
            return;
        }
        if let Some(at) = s.proto.poll_timeout()
            && s.armed.is_none_or(|armed| at < armed)
        {
            self.wheel.insert(at, conn_key(ch));
            s.armed = Some(at);
        }
    }

    fn proto_of(&mut self, local: usize) -> Option<(&mut quinn_proto::Connection, &mut Link)> {
        let l = self.devs[local].link.as_mut()?;
        let s = self.slots.get_mut(l.ch.0).and_then(Option::as_mut)?;
        Some((&mut s.proto, l))
    }

    /// The connection of device `local` ended without this side closing
    /// it: with the edge's close code if it gave one.
    fn lost(&mut self, local: usize, reason: Option<ConnectionError>) {
        let error = reason.map_or(
            ClientError::Closed {
                code: ErrorCode::Unspecified,
                reason: "connection ended".into(),
            },
            |r| tiercast_client::connection::closed(&r),
        );
        self.end_link(local, Ended::Lost(error), None);
    }

    fn on_event(&mut self, ch: usize, event: quinn_proto::Event) {
        let Some(local) = self.slots[ch].as_ref().and_then(|s| s.dev) else {
            return;
        };
        match event {
            quinn_proto::Event::Connected => {
                let Some((proto, l)) = self.proto_of(local) else {
                    return;
                };
                let Some(id) = proto.streams().open(Dir::Bi) else {
                    self.end_link(
                        local,
                        Ended::Lost(ClientError::Connect("no stream allowed".into())),
                        Some((0, b"")),
                    );
                    return;
                };
                l.control = Some(id);
                l.phase = Phase::Hello;
                let d = &self.devs[local];
                let hello = ClientFrame::new(
                    0,
                    ClientBody::Hello {
                        token: d.token.clone(),
                        client_id: d.client_id,
                        device: d.label.clone(),
                        protocol_version: PROTOCOL_VERSION,
                    },
                )
                .encode();
                let Some((proto, l)) = self.proto_of(local) else {
                    return;
                };
                l.ctl_out.extend_from_slice(&hello);
                flush_ctl(proto, l);
            }
            quinn_proto::Event::ConnectionLost { reason } => self.lost(local, Some(reason)),
            quinn_proto::Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                let Some((proto, l)) = self.proto_of(local) else {
                    return;
                };
                if l.delivery.is_none() {
                    l.delivery = proto.streams().accept(Dir::Uni);
                }
                self.read_deliveries(local);
            }
            quinn_proto::Event::Stream(StreamEvent::Readable { id }) => {
                let Some((_, l)) = self.proto_of(local) else {
                    return;
                };
                if Some(id) == l.control {
                    self.read_control(local);
                } else if Some(id) == l.delivery {
                    self.read_deliveries(local);
                }
            }
            quinn_proto::Event::Stream(StreamEvent::Writable { id }) => {
                if let Some((proto, l)) = self.proto_of(local)
                    && Some(id) == l.control
                {
                    flush_ctl(proto, l);
                }
            }
            _ => {}
        }
    }

    /// Reads what the stream `id` has into `reader`. Its end (or a reset)
    /// needs nothing here: the connection's close follows.
    fn read_stream(proto: &mut quinn_proto::Connection, id: StreamId, reader: &mut FrameReader) {
        if let Ok(mut chunks) = proto.recv_stream(id).read(true) {
            while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
                reader.push(&chunk.bytes);
            }
            let _ = chunks.finalize();
        }
    }

    /// A bad frame from the edge: the connection closes with its code.
    fn bad_frame(&mut self, local: usize, code: ErrorCode, why: String) {
        let message = format!("the edge sent a bad frame ({}): {why}", code.name());
        let reason = message.as_bytes()[..message.len().min(200)].to_vec();
        self.end_link(
            local,
            Ended::Lost(ClientError::Protocol(message)),
            Some((code as u16, &reason)),
        );
    }

    fn next_frame(
        &mut self,
        local: usize,
        control: bool,
    ) -> Result<Option<ServerFrame>, (ErrorCode, String)> {
        let Some(l) = self.devs[local].link.as_mut() else {
            return Ok(None);
        };
        let reader = if control {
            &mut l.ctl_in
        } else {
            &mut l.dlv_in
        };
        match reader.next_frame() {
            Ok(Some(bytes)) => ServerFrame::decode(&bytes, MAX_FRAME_BYTES)
                .map(Some)
                .map_err(|e| (ErrorCode::MalformedFrame, e.to_string())),
            Ok(None) => Ok(None),
            Err(e @ tiercast_schemas::framing::FrameError::TooLarge { .. }) => {
                Err((ErrorCode::FrameTooLarge, e.to_string()))
            }
            Err(e) => Err((ErrorCode::MalformedFrame, e.to_string())),
        }
    }

    fn read_control(&mut self, local: usize) {
        self.read(local, true);
    }

    /// Reads the delivery stream, once the device is welcomed: the resume
    /// takes its cursors before the first live frame moves them (as the
    /// session does), so frames that come before the Welcome wait in the
    /// stream.
    fn read_deliveries(&mut self, local: usize) {
        self.read(local, false);
    }

    /// Reads the control stream (`control`) or the delivery stream and
    /// hands over each whole frame; a bad one closes the connection. An
    /// ended control stream needs nothing: the edge closes next, and its
    /// close code says why.
    fn read(&mut self, local: usize, control: bool) {
        let Some((proto, l)) = self.proto_of(local) else {
            return;
        };
        let (id, reader) = if control {
            (l.control, &mut l.ctl_in)
        } else if l.phase == Phase::Live {
            (l.delivery, &mut l.dlv_in)
        } else {
            return;
        };
        let Some(id) = id else { return };
        Self::read_stream(proto, id, reader);
        let ch = l.ch.0;
        if let Some(s) = self.slots[ch].as_mut() {
            mark(&mut self.dirty, ch, s);
        }
        loop {
            let frame = match self.next_frame(local, control) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err((code, why)) => {
                    self.bad_frame(local, code, why);
                    return;
                }
            };
            if control {
                self.answer(local, frame);
            } else {
                self.delivery(local, frame.body);
            }
            if self.devs[local].link.is_none() {
                return;
            }
        }
    }

    /// A frame on the control stream: the Welcome (or the refusal), or the
    /// answer to a request.
    fn answer(&mut self, local: usize, frame: ServerFrame) {
        let phase = self.devs[local].link.as_ref().map(|l| l.phase);
        if phase == Some(Phase::Hello) {
            match frame.body {
                ServerBody::Welcome {
                    client_id,
                    server_time_ms,
                    ..
                } => self.welcomed(local, client_id, server_time_ms),
                ServerBody::Error { code, message, .. } => {
                    self.end_link(
                        local,
                        Ended::Lost(ClientError::refused(code, message)),
                        Some((0, b"")),
                    );
                }
                other => {
                    let e = ClientError::Protocol(format!("expected Welcome, got {other:?}"));
                    self.end_link(local, Ended::Lost(e), Some((0, b"")));
                }
            }
            return;
        }
        if frame.request_id == 0 {
            // Connection-level: the edge closes next.
            return;
        }
        let Some((req, _)) = self.devs[local]
            .link
            .as_mut()
            .and_then(|l| l.pending.remove(&frame.request_id))
        else {
            return;
        };
        match frame.body {
            ServerBody::Error {
                code: ErrorCode::RateLimited,
                message,
                retry_after_ms,
            } => self.failed(
                local,
                req,
                ClientError::RateLimited {
                    retry_after: Duration::from_millis(u64::from(retry_after_ms)),
                    message,
                },
            ),
            ServerBody::Error { code, message, .. } => {
                self.failed(local, req, ClientError::refused(code, message));
            }
            body => self.answered(local, req, body),
        }
    }

    fn welcomed(&mut self, local: usize, client_id: u64, server_time_ms: u64) {
        let d = &mut self.devs[local];
        let Some(l) = d.link.as_mut() else { return };
        l.phase = Phase::Live;
        l.clock_offset_ms = server_time_ms as i64 - unix_ms() as i64;
        let at = l.started_ms.saturating_add_signed(l.clock_offset_ms);
        let edge = l.edge;
        d.policy.connected();
        d.st.connected_at_ms = Some(at);
        d.st.first_connected_ms.get_or_insert(at);
        d.stats.connects.fetch_add(1, Ordering::Relaxed);
        d.client_id = client_id;
        let index = d.index;
        let _ = self.sink.event(index, Event::Connected { edge, client_id });
        // The resume: from the cursors the last connection ended with.
        let d = &mut self.devs[local];
        let now_cursors = d.st.cursors.clone();
        let cursors = resume_snapshot(&mut d.st.resume_from, now_cursors);
        d.pinned = Pinned {
            listing: None,
            cursors: Some(cursors),
        };
        d.resume_backoff = Duration::from_millis(100);
        self.resume_attempt(local);
        self.dirty_devs.push(local);
        // What came on the delivery stream meanwhile.
        self.read_deliveries(local);
    }

    /// A resume's (next) attempt: the listing, or, once it is pinned, the
    /// cursor syncs planned from it.
    fn resume_attempt(&mut self, local: usize) {
        let d = &mut self.devs[local];
        match &d.pinned.listing {
            None => {
                d.resume = ResumeStep::Listing;
                let limit = self.cfg.sync_limit;
                self.request(
                    local,
                    Req::Listing,
                    ClientBody::Sync {
                        cursors: Vec::new(),
                        limit,
                    },
                );
            }
            Some(listing) => {
                let listing = listing.clone();
                let window = resume::window_ids(self.cfg.resync_window);
                let ms = self.cfg.resync_window.as_millis() as u64;
                let ResumePlan { markers, cursors } =
                    d.st.plan_resume(&listing, &mut d.pinned, window, ms);
                for (conversation, id) in markers {
                    self.read_marker(local, conversation, id);
                }
                self.devs[local].resume = ResumeStep::Syncing { queue: cursors };
                self.next_sync(local);
            }
        }
    }

    fn next_sync(&mut self, local: usize) {
        let d = &mut self.devs[local];
        let ResumeStep::Syncing { queue } = &mut d.resume else {
            return;
        };
        if queue.is_empty() {
            d.resume = ResumeStep::Idle;
            d.st.resume_from = None;
            d.stats.resumes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let batch: Vec<Cursor> = queue.drain(..queue.len().min(SYNC_BATCH)).collect();
        let limit = self.cfg.sync_limit;
        self.request(
            local,
            Req::Sync(batch.clone()),
            ClientBody::Sync {
                cursors: batch,
                limit,
            },
        );
    }

    fn answered(&mut self, local: usize, req: Req, body: ServerBody) {
        match (req, body) {
            (
                Req::Send(s),
                ServerBody::SendOk {
                    conversation,
                    message_id,
                    duplicate,
                },
            ) => {
                // Seen, but the cursor stays (see `Session::send`).
                self.devs[local].st.seen_own(conversation, message_id);
                let _ = s.reply.send(Ok(SendOk {
                    conversation,
                    message_id,
                    duplicate,
                }));
            }
            (Req::Ack, ServerBody::AckOk { removed }) => {
                self.devs[local]
                    .stats
                    .acked
                    .fetch_add(u64::from(removed), Ordering::Relaxed);
            }
            (Req::Listing, ServerBody::SyncResult { entries }) => {
                let d = &mut self.devs[local];
                d.stats.syncs.fetch_add(1, Ordering::Relaxed);
                d.pinned.listing = Some(entries);
                self.resume_attempt(local);
            }
            (Req::Sync(batch), ServerBody::SyncResult { entries }) => {
                self.devs[local].stats.syncs.fetch_add(1, Ordering::Relaxed);
                let mut more = Vec::new();
                for entry in entries {
                    let from = batch
                        .iter()
                        .find(|c| c.conversation == entry.conversation)
                        .map_or(0, |c| c.last_id);
                    let out = self.devs[local].st.take_entry(entry, from);
                    if let Some((conversation, message_id)) = out.notify {
                        self.notify_event(local, conversation, message_id);
                    }
                    for m in out.messages {
                        self.deliver(local, m);
                    }
                    more.extend(out.more);
                }
                if let ResumeStep::Syncing { queue } = &mut self.devs[local].resume {
                    queue.extend(more);
                }
                self.next_sync(local);
            }
            (Req::Pull, ServerBody::Messages { .. }) => {
                let index = self.devs[local].index;
                self.sink.pulled(index);
            }
            (req, other) => {
                let e = ClientError::Protocol(format!("unexpected answer {other:?}"));
                self.failed(local, req, e);
            }
        }
    }

    /// A frame on the delivery stream.
    fn delivery(&mut self, local: usize, body: ServerBody) {
        match body {
            ServerBody::Message(m) => {
                let d = &mut self.devs[local];
                let stats = d.reorder.stats;
                let mut ready = std::mem::take(&mut self.released);
                d.reorder.push_into(m, self.now, &mut ready);
                // A message held for the window is released by the
                // device's timer: armed in its next pass. Nothing held,
                // no pass (one per delivery showed in the core's CPU).
                if d.reorder.is_holding() {
                    self.dirty_devs.push(local);
                }
                if d.reorder.stats != stats {
                    self.reorder_stats(local);
                }
                for m in ready.drain(..) {
                    self.deliver(local, m);
                }
                self.released = ready;
            }
            ServerBody::Notify {
                conversation,
                message_id,
            } => {
                let d = &mut self.devs[local];
                if advance(&mut d.st.cursors, conversation, message_id) {
                    self.notify_event(local, conversation, message_id);
                } else {
                    d.stats.notifies_dropped.fetch_add(1, Ordering::Relaxed);
                    if self.cfg.report_duplicates {
                        let index = d.index;
                        let _ = self.sink.event(
                            index,
                            Event::Duplicate {
                                conversation,
                                message_id,
                            },
                        );
                    }
                }
            }
            ServerBody::ReadMarker {
                conversation,
                message_id,
                ..
            } => self.read_marker(local, conversation, message_id),
            ServerBody::Drain {
                reconnect_after_ms, ..
            } => {
                // Acks first, then away (the edge spreads its devices).
                self.flush_acks(local);
                let after = Duration::from_millis(u64::from(reconnect_after_ms));
                self.end_link(local, Ended::Drain(after), Some((0, b"bye")));
            }
            other => tracing::warn!(?other, "unexpected frame on the delivery stream"),
        }
    }

    fn notify_event(&mut self, local: usize, conversation: u64, message_id: u64) {
        let index = self.devs[local].index;
        let reaction = self.sink.event(
            index,
            Event::Notify {
                conversation,
                message_id,
            },
        );
        if reaction == Reaction::Pull {
            self.request(
                local,
                Req::Pull,
                ClientBody::Fetch {
                    conversation,
                    before: message_id.saturating_add(1),
                    after: message_id.saturating_sub(1),
                    limit: 1,
                },
            );
        }
    }

    fn read_marker(&mut self, local: usize, conversation: u64, message_id: u64) {
        let d = &mut self.devs[local];
        if advance(&mut d.st.read, conversation, message_id) {
            let index = d.index;
            let _ = self.sink.event(
                index,
                Event::ReadMarker {
                    conversation,
                    message_id,
                },
            );
        }
    }

    /// Hands a message to the app once; queues its ack (tier 1 only).
    fn deliver(&mut self, local: usize, m: Message) {
        let window = resume::window_ids(self.cfg.resync_window);
        let d = &mut self.devs[local];
        d.stats.received.fetch_add(1, Ordering::Relaxed);
        let fresh = d.st.accept(&m, window);
        if d.st.tier(m.conversation) == 1 {
            // Acked even when a duplicate: the first ack may have been
            // lost with a connection.
            d.acks.push(m.id);
            self.dirty_devs.push(local);
        }
        let index = d.index;
        if !fresh {
            d.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            if self.cfg.report_duplicates {
                let _ = self.sink.event(
                    index,
                    Event::Duplicate {
                        conversation: m.conversation,
                        message_id: m.id,
                    },
                );
            }
            return;
        }
        let _ = self.sink.event(index, Event::Message(m));
    }

    fn reorder_stats(&mut self, local: usize) {
        let d = &self.devs[local];
        let s = d.reorder.stats;
        d.stats.held.store(s.held, Ordering::Relaxed);
        d.stats.reordered.store(s.reordered, Ordering::Relaxed);
        d.stats.late.store(s.late, Ordering::Relaxed);
    }
}

/// `data` copied into `arena` and split off it (see [`RECV_ARENA`]).
fn arena_copy(arena: &mut BytesMut, data: &[u8]) -> BytesMut {
    if arena.capacity() < data.len() {
        *arena = BytesMut::with_capacity(RECV_ARENA.max(data.len()));
    }
    arena.extend_from_slice(data);
    arena.split()
}

fn mark(dirty: &mut Vec<usize>, ch: usize, s: &mut Slot) {
    if !s.dirty {
        s.dirty = true;
        dirty.push(ch);
    }
}

/// Writes what the control stream can take now; the rest on `Writable`.
fn flush_ctl(proto: &mut quinn_proto::Connection, l: &mut Link) {
    let Some(id) = l.control else { return };
    while !l.ctl_out.is_empty() {
        match proto.send_stream(id).write(&l.ctl_out) {
            Ok(0) => break,
            Ok(n) => {
                let _ = l.ctl_out.split_to(n);
            }
            Err(_) => break,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
