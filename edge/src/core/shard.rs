//! One shard: a UDP socket, a `quinn-proto` endpoint, the connections'
//! state in a table by connection handle, a timer wheel, and the loop that
//! drives them all. See the module above for the design.

use prometheus_client::metrics::histogram::Histogram;
use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Event, Incoming, ReadError, StreamEvent,
    StreamId, VarInt, WriteError,
};
use tiercast_schemas::framing::FrameError;
use tiercast_schemas::wire::{
    ClientBody, ClientFrame, ErrorCode, Message, ServerBody, ServerFrame,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::ConnRef;
use super::frames::FrameReader;
use super::outbox::{Offer, Outbox};
use super::pacer::Pacer;
use super::udp::{Batch, Socket};
use super::wheel::Wheel;
use crate::limits::ConnLimits;
use crate::server::{Shared, notify_frame};
use crate::session::{self, End, Peer, Seam};

/// Commands a shard takes, in order, from one queue: fan-out from the
/// backplane, and what the connections' tasks (Hello, requests, inbox
/// reads) and the rest of the edge send back. One queue keeps a device's
/// registration ahead of every frame published after it.
#[derive(Debug)]
pub(crate) enum Cmd {
    Deliver {
        users: Arc<[u64]>,
        except_client: u64,
        frame: Bytes,
        /// The id of the message a Message frame carries (for the seam).
        message: Option<u64>,
        notify: Option<(u64, u64)>,
    },
    SendTo {
        user: u64,
        client_id: u64,
        frame: Bytes,
    },
    /// The Hello's device: in the shard's index from now on (before the
    /// user's channel is subscribed).
    Registered {
        key: usize,
        conn_id: u64,
        user: u64,
        client_id: u64,
    },
    /// The device is attached: Welcome goes out, requests and the inbox
    /// start.
    Welcomed {
        key: usize,
        conn_id: u64,
        peer: Arc<Peer>,
        welcome: Bytes,
    },
    Reply {
        key: usize,
        conn_id: u64,
        reply: Result<Bytes, End>,
    },
    Page {
        key: usize,
        conn_id: u64,
        page: Vec<Message>,
    },
    Close {
        key: usize,
        conn_id: u64,
        code: ErrorCode,
        reason: &'static str,
    },
    /// Shutdown, first step: accept no one, tell every device to reconnect
    /// after a jittered delay; `done` fires when no connection is left.
    Drain {
        spread_ms: u64,
        done: oneshot::Sender<()>,
    },
    /// Shutdown, last step: close whoever is left, and end the loop once
    /// their closes are out.
    Stop,
}

/// What the shards of an edge share: the connection and handshake slots,
/// and the rate above which clients must prove their address.
#[derive(Clone)]
pub(crate) struct Limits {
    pub slots: Arc<Semaphore>,
    pub handshakes: Arc<Semaphore>,
    pub unvalidated: Option<Arc<governor::DefaultDirectRateLimiter>>,
    /// When a device refused for `handshakes` should come back.
    pub pacer: Arc<Pacer>,
}

/// How long an error frame may take to be acknowledged before the close.
const ERROR_FLUSH: Duration = Duration::from_millis(500);
/// Transmits polled from one connection per flush round (a connection
/// with more is polled again in the next round, after the others).
const TRANSMITS_PER_ROUND: usize = 16;
/// Transmits gathered before the batch goes to the socket.
const BATCH_FLUSH: usize = 256;
/// Receive calls per wake-up before the shard looks at its other work
/// (each takes up to `RECV_BATCH` datagrams).
const RECV_ROUNDS: usize = 64;
/// Work taken from the command queue per wake-up before the shard sends,
/// receives and runs its timers: a fan-out command costs one per recipient
/// it names, any other command one. Taking every queued command at once let
/// an overloaded shard spend seconds writing frames while it neither sent
/// nor read a packet, and devices timed out (room 4,000 x 100).
const WORK_PER_WAKE: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The QUIC handshake.
    Handshaking,
    /// Waiting for the client's control stream.
    AwaitStream,
    /// Waiting for the Hello frame.
    AwaitHello,
    /// The Hello is being checked and the device attached (a task).
    Attaching,
    Live,
    /// An error frame is going out; then the close.
    Ending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbox {
    /// Not before Welcome.
    Waiting,
    /// Next page: pending ids above this one.
    From(u64),
    Done,
}

struct Conn {
    proto: quinn_proto::Connection,
    ch: ConnectionHandle,
    conn_id: u64,
    phase: Phase,
    /// The edge's own deadline in this phase (handshake, control stream,
    /// Hello, token expiry, error flush).
    app_deadline: Option<Instant>,
    /// The earliest deadline filed in the wheel for this connection.
    armed: Option<Instant>,
    dirty: bool,
    /// Closed by the edge, or lost: torn down (index, slots, detach).
    closed: bool,
    ended: bool,
    control: Option<StreamId>,
    reader: FrameReader,
    recv_finished: bool,
    /// A request (or the Hello) is being answered.
    busy: bool,
    ctl_out: Outbox,
    fin_sent: bool,
    closing: Option<(ErrorCode, String)>,
    delivery: Option<StreamId>,
    outbox: Outbox,
    /// (user, device) once the Hello named them.
    registered: Option<(u64, u64)>,
    peer: Option<Arc<Peer>>,
    limits: Option<ConnLimits>,
    seam: Seam,
    inbox: Inbox,
    page_pending: bool,
    /// False once the connection ended: its inbox reads stop retrying.
    alive: Arc<AtomicBool>,
    handshake: Option<OwnedSemaphorePermit>,
    slot: Option<OwnedSemaphorePermit>,
    counted: bool,
    /// When the phase before Welcome began: accepted, TLS done, Hello
    /// read (`handshake_seconds`, `hello_wait_seconds`, `hello_seconds`).
    since: Instant,
}

impl Conn {
    fn client_id(&self) -> u64 {
        self.registered.map_or(0, |(_, c)| c)
    }

    /// A setup stage ended at `now`: its time since the last one into `h`.
    fn stage_done(&mut self, now: Instant, h: &Histogram) {
        h.observe(now.saturating_duration_since(self.since).as_secs_f64());
        self.since = now;
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        let proto = self.proto.poll_timeout();
        self.next_deadline_with(proto)
    }

    /// [`Self::next_deadline`], with quinn-proto's deadline already asked.
    fn next_deadline_with(&self, proto: Option<Instant>) -> Option<Instant> {
        [proto, self.app_deadline, self.seam.expires_at()]
            .into_iter()
            .flatten()
            .min()
    }
}

/// What the connection-level handlers share, apart from the connections.
struct Ctx {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
    dirty: Vec<usize>,
    now: Instant,
}

impl Ctx {
    fn mark(&mut self, key: usize, c: &mut Conn) {
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
    }

    fn conn_ref(&self, key: usize, c: &Conn) -> ConnRef {
        ConnRef {
            tx: self.tx.clone(),
            key,
            conn_id: c.conn_id,
        }
    }
}

pub(crate) struct Shard {
    ctx: Ctx,
    rx: mpsc::Receiver<Cmd>,
    socket: Socket,
    endpoint: quinn_proto::Endpoint,
    /// Connections by `ConnectionHandle.0` (the endpoint's own index).
    conns: Vec<Option<Conn>>,
    /// The local devices of each user, for fan-out.
    /// Hashed with FxHash, not SipHash: looked up once per delivery, and
    /// its keys are user ids from tokens the engine signed, not chosen by
    /// a client.
    users: FxHashMap<u64, Vec<usize>>,
    wheel: Wheel,
    due: Vec<usize>,
    batch: Batch,
    received: Vec<(SocketAddr, Option<IpAddr>, Option<EcnCodepoint>, BytesMut)>,
    limits: Limits,
    /// Connections not yet ended.
    live: usize,
    draining: Option<oneshot::Sender<()>>,
    refusing: bool,
    stopping: bool,
    detaches: JoinSet<()>,
}

impl Shard {
    pub fn new(
        socket: std::net::UdpSocket,
        endpoint: Arc<quinn_proto::EndpointConfig>,
        server: Arc<quinn_proto::ServerConfig>,
        shared: Arc<Shared>,
        limits: Limits,
        tx: mpsc::Sender<Cmd>,
        rx: mpsc::Receiver<Cmd>,
    ) -> std::io::Result<Self> {
        let socket = Socket::new(socket)?;
        let now = Instant::now();
        Ok(Self {
            ctx: Ctx {
                shared,
                tx,
                dirty: Vec::new(),
                now,
            },
            rx,
            endpoint: quinn_proto::Endpoint::new(endpoint, Some(server), false, None),
            socket,
            conns: Vec::new(),
            users: FxHashMap::default(),
            wheel: Wheel::new(now),
            due: Vec::new(),
            batch: Batch::default(),
            received: Vec::new(),
            limits,
            live: 0,
            draining: None,
            refusing: false,
            stopping: false,
            detaches: JoinSet::new(),
        })
    }

    /// The loop: wait for datagrams, commands, the next deadline or a
    /// writable socket; handle them; one flush pass. Ends after `Stop`,
    /// once every connection is gone.
    pub async fn run(mut self) {
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far);
        tokio::pin!(sleep);
        loop {
            let next = self.wheel.next_deadline();
            if let Some(at) = next {
                sleep.as_mut().reset(at.into());
            }
            let blocked = !self.batch.is_empty();
            // Connections left with packets to send: go round again at once.
            let more = !blocked && !self.ctx.dirty.is_empty();
            // Whatever woke the loop, every kind of work is taken each time
            // round (bounded): a stream of ACKs must not starve the
            // fan-out commands, whose queue backs up into the backplane's.
            tokio::select! {
                r = self.socket.io.readable() => {
                    if r.is_err() {
                        break;
                    }
                }
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.ctx.now = Instant::now();
                    self.handle(cmd);
                }
                () = &mut sleep, if next.is_some() => {}
                () = std::future::ready(()), if more => {}
                _ = self.socket.io.writable(), if blocked => {}
                Some(_) = self.detaches.join_next(), if !self.detaches.is_empty() => {}
            }
            self.ctx.now = Instant::now();
            let mut work = 0;
            while work < WORK_PER_WAKE {
                match self.rx.try_recv() {
                    Ok(cmd) => work += self.command(cmd),
                    Err(_) => break,
                }
            }
            self.receive();
            self.ctx.now = Instant::now();
            self.expire();
            self.flush();
            if self.stopping && self.live == 0 && self.conns.iter().all(Option::is_none) {
                break;
            }
        }
        // Detaches still running finish on their own; wait a little so a
        // shutdown leaves the routing table clean.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.detaches.join_next().await.is_some() {}
        })
        .await;
    }

    // ---- receive ------------------------------------------------------

    fn receive(&mut self) {
        let mut received = std::mem::take(&mut self.received);
        for _ in 0..RECV_ROUNDS {
            received.clear();
            let got = self.socket.recv(|from, local, ecn, data| {
                received.push((from, local, ecn, BytesMut::from(data)));
            });
            match got {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors surface here on some systems: not fatal.
                    tracing::debug!(error = %e, "receive failed");
                    break;
                }
            }
            self.ctx.now = Instant::now();
            let n = received.len() as u64;
            self.ctx.shared.metrics.datagrams_received.inc_by(n);
            for (from, local, ecn, data) in received.drain(..) {
                self.datagram(from, local, ecn, data);
            }
            if self.batch.len() >= BATCH_FLUSH {
                self.send_batch();
            }
        }
        self.received = received;
    }

    fn datagram(
        &mut self,
        from: SocketAddr,
        local: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    ) {
        let now = self.ctx.now;
        let local = if self.socket.specific() { None } else { local };
        let event = self
            .endpoint
            .handle(now, from, local, ecn, data, self.batch.next_buf());
        match event {
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(c) = self.conns.get_mut(ch.0).and_then(Option::as_mut) {
                    c.proto.handle_event(event);
                    self.ctx.mark(ch.0, c);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.incoming(incoming),
            Some(DatagramEvent::Response(t)) => self.batch.push(&t),
            None => {}
        }
    }

    /// A client's first packet: refused while draining, asked to prove its
    /// address above the rate, refused past the handshakes in flight, else
    /// accepted.
    fn incoming(&mut self, incoming: Incoming) {
        let metrics = &self.ctx.shared.metrics;
        if self.refusing {
            let t = self.endpoint.refuse(incoming, self.batch.next_buf());
            self.batch.push(&t);
            return;
        }
        let over_rate = self
            .limits
            .unvalidated
            .as_ref()
            .is_none_or(|l| l.check().is_err());
        if over_rate && !incoming.remote_address_validated() {
            metrics.retries_sent.inc();
            match self.endpoint.retry(incoming, self.batch.next_buf()) {
                Ok(t) => self.batch.push(&t),
                Err(e) => {
                    metrics.handshakes_refused.inc();
                    self.endpoint.ignore(e.into_incoming());
                }
            }
            return;
        }
        let Ok(permit) = self.limits.handshakes.clone().try_acquire_owned() else {
            metrics.handshakes_refused.inc();
            metrics.error(ErrorCode::Unavailable);
            // With the turn at which the slots will have room for it.
            let t = if self.ctx.shared.cfg.pace_refusals {
                let wait = self.limits.pacer.refused(self.ctx.now);
                self.endpoint.refuse_with_reason(
                    incoming,
                    &tiercast_schemas::wire::refusal_reason(wait),
                    self.batch.next_buf(),
                )
            } else {
                self.endpoint.refuse(incoming, self.batch.next_buf())
            };
            self.batch.push(&t);
            return;
        };
        let now = self.ctx.now;
        match self
            .endpoint
            .accept(incoming, now, self.batch.next_buf(), None)
        {
            Ok((ch, proto)) => {
                metrics.handshakes_in_flight.inc();
                let shared = &self.ctx.shared;
                let mut c = Conn {
                    proto,
                    ch,
                    conn_id: shared.next_conn_id(),
                    phase: Phase::Handshaking,
                    app_deadline: Some(now + Duration::from_millis(shared.cfg.hello_timeout_ms)),
                    armed: None,
                    dirty: false,
                    closed: false,
                    ended: false,
                    control: None,
                    reader: FrameReader::new(shared.cfg.max_frame_bytes),
                    recv_finished: false,
                    busy: false,
                    ctl_out: Outbox::new(usize::MAX),
                    fin_sent: false,
                    closing: None,
                    delivery: None,
                    outbox: Outbox::new(shared.cfg.outbound_queue),
                    registered: None,
                    peer: None,
                    limits: None,
                    seam: Seam::new(),
                    inbox: Inbox::Waiting,
                    page_pending: false,
                    alive: Arc::new(AtomicBool::new(true)),
                    handshake: Some(permit),
                    slot: None,
                    counted: false,
                    since: now,
                };
                self.live += 1;
                if self.conns.len() <= ch.0 {
                    self.conns.resize_with(ch.0 + 1, || None);
                }
                self.ctx.mark(ch.0, &mut c);
                self.conns[ch.0] = Some(c);
            }
            Err(e) => {
                if let Some(t) = e.response {
                    self.batch.push(&t);
                }
            }
        }
    }

    // ---- commands -----------------------------------------------------

    /// Handles one command; returns its cost (see [`WORK_PER_WAKE`]).
    fn command(&mut self, cmd: Cmd) -> usize {
        let cost = match &cmd {
            Cmd::Deliver { users, .. } => users.len().max(1),
            _ => 1,
        };
        self.handle(cmd);
        cost
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Deliver {
                users,
                except_client,
                frame,
                message,
                notify,
            } => self.deliver(&users, except_client, &frame, message, notify),
            Cmd::SendTo {
                user,
                client_id,
                frame,
            } => {
                let Self {
                    users, conns, ctx, ..
                } = self;
                for &key in users.get(&user).into_iter().flatten() {
                    let Some(c) = conns[key].as_mut() else {
                        continue;
                    };
                    // A full outbox skips it: the next connect catches up.
                    if c.client_id() == client_id
                        && c.outbox.offer(frame.clone(), None) == Offer::Queued
                    {
                        pump(ctx, key, c);
                    }
                }
            }
            Cmd::Registered {
                key,
                conn_id,
                user,
                client_id,
            } => {
                if let Some(c) = live(&mut self.conns, key, conn_id) {
                    c.registered = Some((user, client_id));
                    self.users.entry(user).or_default().push(key);
                }
            }
            Cmd::Welcomed {
                key,
                conn_id,
                peer,
                welcome,
            } => self.welcomed(key, conn_id, peer, welcome),
            Cmd::Reply {
                key,
                conn_id,
                reply,
            } => {
                let Self { conns, ctx, .. } = self;
                let Some(c) = live(conns, key, conn_id) else {
                    return;
                };
                c.busy = false;
                match reply {
                    Ok(frame) => {
                        write_ctl(ctx, key, c, frame);
                        read_requests(ctx, key, c);
                    }
                    Err(End::Fatal(code, msg)) => fatal(ctx, key, c, code, msg),
                }
            }
            Cmd::Page { key, conn_id, page } => self.page(key, conn_id, page),
            Cmd::Close {
                key,
                conn_id,
                code,
                reason,
            } => {
                let Self { conns, ctx, .. } = self;
                if let Some(c) = live(conns, key, conn_id) {
                    close(ctx, key, c, Some(code), reason);
                }
            }
            Cmd::Drain { spread_ms, done } => {
                self.refusing = true;
                self.endpoint.set_server_config(None);
                let Self { conns, ctx, .. } = self;
                for (key, c) in conns.iter_mut().enumerate() {
                    let Some(c) = c.as_mut().filter(|c| !c.closed && c.registered.is_some()) else {
                        continue;
                    };
                    let after = if spread_ms == 0 {
                        0
                    } else {
                        rand::random_range(0..=spread_ms)
                    };
                    let frame = ServerFrame::new(
                        0,
                        ServerBody::Drain {
                            reconnect_after_ms: after as u32,
                            reason: "edge shutting down".into(),
                        },
                    )
                    .encode();
                    if c.outbox.offer(frame, None) == Offer::Overflow {
                        close(ctx, key, c, Some(ErrorCode::Draining), "edge shutting down");
                    } else {
                        pump(ctx, key, c);
                    }
                }
                if self.live == 0 {
                    let _ = done.send(());
                } else {
                    self.draining = Some(done);
                }
            }
            Cmd::Stop => {
                self.refusing = true;
                self.stopping = true;
                self.endpoint.set_server_config(None);
                let Self { conns, ctx, .. } = self;
                for (key, c) in conns.iter_mut().enumerate() {
                    if let Some(c) = c.as_mut().filter(|c| !c.closed) {
                        close(ctx, key, c, Some(ErrorCode::Draining), "edge shutting down");
                    }
                }
            }
        }
    }

    /// One frame to the local devices of `users`.
    fn deliver(
        &mut self,
        users: &[u64],
        except_client: u64,
        frame: &Bytes,
        message: Option<u64>,
        notify: Option<(u64, u64)>,
    ) {
        let Self {
            users: index,
            conns,
            ctx,
            ..
        } = self;
        let (mut queued, mut coalesced, mut seam_dups) = (0u64, 0u64, 0u64);
        let mut slow = Vec::new();
        for user in users {
            for &key in index.get(user).into_iter().flatten() {
                let Some(c) = conns[key].as_mut() else {
                    continue;
                };
                if c.closed || c.client_id() == except_client {
                    continue;
                }
                // While the inbox drains (and a little after), a live copy
                // of a message the drain sent goes out once.
                if message.is_some_and(|id| !c.seam.first(id)) {
                    seam_dups += 1;
                    continue;
                }
                match c.outbox.offer(frame.clone(), notify) {
                    Offer::Queued => {
                        queued += 1;
                        pump(ctx, key, c);
                    }
                    Offer::Coalesced => coalesced += 1,
                    Offer::Overflow => slow.push(key),
                }
            }
        }
        let m = &ctx.shared.metrics;
        m.deliveries.inc_by(queued);
        m.coalesced_notifications.inc_by(coalesced);
        m.seam_duplicates.inc_by(seam_dups);
        for key in slow {
            let m = &ctx.shared.metrics;
            m.slow_consumers.inc();
            m.error(ErrorCode::SlowConsumer);
            if let Some(c) = conns[key].as_mut() {
                close(
                    ctx,
                    key,
                    c,
                    Some(ErrorCode::SlowConsumer),
                    "outbound queue full; reconnect and catch up",
                );
            }
        }
    }

    fn welcomed(&mut self, key: usize, conn_id: u64, peer: Arc<Peer>, welcome: Bytes) {
        let Self {
            conns,
            ctx,
            detaches,
            ..
        } = self;
        let Some(c) = live(conns, key, conn_id) else {
            // Gone while it was being attached: undo the attach.
            let shared = ctx.shared.clone();
            detaches.spawn(async move { session::detach(&shared, &peer, conn_id).await });
            return;
        };
        ctx.shared.metrics.handshakes.inc();
        c.stage_done(ctx.now, &ctx.shared.metrics.hello_seconds);
        c.phase = Phase::Live;
        c.busy = false;
        // The connection lives as long as its token: then it ends with
        // `token_expired` and the client reconnects with a fresh one.
        let expiry = std::time::UNIX_EPOCH + Duration::from_secs(peer.expires_unix);
        let left = expiry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        c.app_deadline = Some(ctx.now + left);
        c.limits = Some(ConnLimits::new(&ctx.shared.cfg.rates));
        c.peer = Some(peer);
        write_ctl(ctx, key, c, welcome);
        // Welcome is out: the inbox may follow.
        c.inbox = Inbox::From(0);
        pump(ctx, key, c);
        read_requests(ctx, key, c);
    }

    fn page(&mut self, key: usize, conn_id: u64, page: Vec<Message>) {
        let Self { conns, ctx, .. } = self;
        let Some(c) = live(conns, key, conn_id) else {
            return;
        };
        c.page_pending = false;
        c.inbox = page.last().map_or(Inbox::Done, |m| Inbox::From(m.id));
        if c.inbox == Inbox::Done {
            c.seam.drain_done();
        }
        let total = page.len();
        let frames: Vec<Bytes> = page
            .into_iter()
            .filter(|m| c.seam.first(m.id))
            .map(|m| ServerFrame::new(0, ServerBody::Message(m)).encode())
            .collect();
        let m = &ctx.shared.metrics;
        m.deliveries.inc_by(frames.len() as u64);
        m.seam_duplicates.inc_by((total - frames.len()) as u64);
        c.outbox.push_bulk(frames);
        pump(ctx, key, c);
    }

    // ---- timers and the flush pass ----------------------------------------

    fn expire(&mut self) {
        let now = self.ctx.now;
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        self.wheel.expire(now, &mut due);
        for &key in &due {
            let Self {
                conns, ctx, wheel, ..
            } = self;
            let Some(c) = conns.get_mut(key).and_then(Option::as_mut) else {
                continue;
            };
            c.armed = None;
            let mut fired = false;
            let proto_at = c.proto.poll_timeout();
            if proto_at.is_some_and(|t| t <= now) {
                c.proto.handle_timeout(now);
                fired = true;
            }
            if c.app_deadline.is_some_and(|t| t <= now) {
                c.app_deadline = None;
                app_timeout(ctx, key, c);
                fired = true;
            }
            c.seam.watching();
            if fired {
                ctx.mark(key, c);
            } else if let Some(at) = c.next_deadline_with(proto_at) {
                // Filed for a deadline that has moved later (a probe timer
                // pushed back by an ACK): nothing changed that a drive would
                // send, so only the new deadline is filed.
                wheel.insert(at, key);
                c.armed = Some(at);
            }
        }
        self.due = due;
    }

    /// Drives the connections dirty now (events, transmits, timers) and
    /// sends what they produced.
    fn flush(&mut self) {
        if !self.send_batch() {
            return;
        }
        // One pass over the connections dirty now; those that have more to
        // send mark themselves again and go in the next pass, after the
        // shard has read its socket (their ACKs) and its commands.
        let mut dirty = std::mem::take(&mut self.ctx.dirty).into_iter();
        while let Some(key) = dirty.next() {
            self.drive(key);
            if self.batch.len() >= BATCH_FLUSH && !self.send_batch() {
                // The socket is full: the connections not driven yet stay
                // marked and queued until it drains.
                self.ctx.dirty.extend(dirty);
                return;
            }
        }
        self.send_batch();
    }

    /// Sends the batch; false if the socket would block (the rest waits).
    fn send_batch(&mut self) -> bool {
        let before = self.batch.totals;
        let all_out = self.socket.send(&mut self.batch);
        let m = &self.ctx.shared.metrics;
        m.datagrams_sent
            .inc_by(self.batch.totals.datagrams - before.datagrams);
        m.send_calls
            .inc_by(self.batch.totals.syscalls - before.syscalls);
        all_out
    }

    fn drive(&mut self, key: usize) {
        let now = self.ctx.now;
        let max_segments = self.socket.max_transmit_segments();
        let Self {
            conns,
            ctx,
            endpoint,
            batch,
            wheel,
            users,
            detaches,
            live,
            draining,
            ..
        } = self;
        let Some(c) = conns.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        c.dirty = false;
        while let Some(event) = c.proto.poll() {
            on_event(ctx, &self.limits, key, c, event);
        }
        // Transmits: a bounded number per round, so one busy connection
        // does not hold up the others.
        let mut n = 0;
        loop {
            if n == TRANSMITS_PER_ROUND {
                ctx.mark(key, c);
                break;
            }
            match c.proto.poll_transmit(now, max_segments, batch.next_buf()) {
                Some(t) => {
                    batch.push(&t);
                    n += 1;
                    if c.proto.transmits_exhausted() {
                        // Nothing more: the call that would say so is saved
                        // (quinn-proto patch 13, ADR 0015).
                        break;
                    }
                }
                None => break,
            }
        }
        let mut drained = false;
        while let Some(event) = c.proto.poll_endpoint_events() {
            drained |= event.is_drained();
            if let Some(back) = endpoint.handle_event(c.ch, event) {
                c.proto.handle_event(back);
                ctx.mark(key, c);
            }
        }
        if (c.closed || c.proto.is_closed()) && !c.ended {
            c.closed = true;
            teardown(ctx, &self.limits, key, c, users, detaches);
            *live -= 1;
            if *live == 0
                && let Some(done) = draining.take()
            {
                let _ = done.send(());
            }
        }
        if drained {
            // The endpoint has let go of the handle: so does the shard.
            conns[key] = None;
            return;
        }
        if let Some(at) = c.next_deadline()
            && c.armed.is_none_or(|armed| at < armed)
        {
            wheel.insert(at, key);
            c.armed = Some(at);
        }
    }
}

/// Connection `key`, if it is still the one with `conn_id` (a handle is
/// reused once its connection is gone) and not closed: what a command from a
/// task may act on.
fn live(conns: &mut [Option<Conn>], key: usize, conn_id: u64) -> Option<&mut Conn> {
    conns
        .get_mut(key)
        .and_then(Option::as_mut)
        .filter(|c| c.conn_id == conn_id && !c.closed)
}

/// The connection's handshake left its slot (done, failed or abandoned):
/// no longer in flight, and its hold time to the pacer.
fn handshake_left(ctx: &Ctx, limits: &Limits, c: &mut Conn, now: Instant) {
    if c.handshake.take().is_some() {
        ctx.shared.metrics.handshakes_in_flight.dec();
        limits
            .pacer
            .left(now, now.saturating_duration_since(c.since));
    }
}

/// The connection has ended (closed here or lost): out of the index, its
/// slots back, and the device detached (a task).
fn teardown(
    ctx: &mut Ctx,
    limits: &Limits,
    key: usize,
    c: &mut Conn,
    users: &mut FxHashMap<u64, Vec<usize>>,
    detaches: &mut JoinSet<()>,
) {
    c.ended = true;
    c.alive.store(false, Ordering::Relaxed);
    let m = &ctx.shared.metrics;
    if let Some((user, _)) = c.registered.take()
        && let Some(keys) = users.get_mut(&user)
    {
        keys.retain(|&k| k != key);
        if keys.is_empty() {
            users.remove(&user);
        }
    }
    if c.counted {
        m.connections.dec();
        c.counted = false;
    }
    handshake_left(ctx, limits, c, ctx.now);
    c.slot = None;
    c.outbox = Outbox::new(0);
    c.ctl_out = Outbox::new(0);
    if let Some(peer) = c.peer.take() {
        let shared = ctx.shared.clone();
        let conn_id = c.conn_id;
        detaches.spawn(async move { session::detach(&shared, &peer, conn_id).await });
    }
    // A connection whose Hello task is still running is detached when the
    // task reports (`Cmd::Welcomed` for a connection that is gone).
}

fn on_event(ctx: &mut Ctx, limits: &Limits, key: usize, c: &mut Conn, event: Event) {
    let now = ctx.now;
    let hello_timeout = Duration::from_millis(ctx.shared.cfg.hello_timeout_ms);
    match event {
        Event::Connected => {
            handshake_left(ctx, limits, c, now);
            c.stage_done(now, &ctx.shared.metrics.handshake_seconds);
            // A connection slot only once the handshake is done.
            let Ok(slot) = limits.slots.clone().try_acquire_owned() else {
                let m = &ctx.shared.metrics;
                m.handshakes_refused.inc();
                m.error(ErrorCode::Unavailable);
                close(
                    ctx,
                    key,
                    c,
                    Some(ErrorCode::Unavailable),
                    "edge full; try another edge",
                );
                return;
            };
            c.slot = Some(slot);
            if c.control.is_some() {
                c.phase = Phase::AwaitHello;
                read_requests(ctx, key, c);
            } else {
                c.phase = Phase::AwaitStream;
            }
            c.app_deadline = Some(now + hello_timeout);
        }
        Event::ConnectionLost { reason } => {
            tracing::debug!(conn_id = c.conn_id, %reason, "connection lost");
            match c.phase {
                Phase::Handshaking => ctx.shared.metrics.abandoned("tls_lost"),
                Phase::AwaitStream | Phase::AwaitHello | Phase::Attaching => {
                    ctx.shared.metrics.abandoned("hello_lost")
                }
                Phase::Live | Phase::Ending => {}
            }
            c.closed = true;
        }
        Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
            if c.control.is_some() {
                return;
            }
            let Some(id) = c.proto.streams().accept(Dir::Bi) else {
                return;
            };
            c.control = Some(id);
            ctx.shared.metrics.connections.inc();
            c.counted = true;
            if c.phase == Phase::AwaitStream {
                c.phase = Phase::AwaitHello;
                c.app_deadline = Some(now + hello_timeout);
                read_requests(ctx, key, c);
            }
        }
        Event::Stream(StreamEvent::Readable { id }) if Some(id) == c.control => {
            read_requests(ctx, key, c);
        }
        Event::Stream(StreamEvent::Writable { id }) => {
            if Some(id) == c.control {
                flush_ctl(c);
            } else if Some(id) == c.delivery {
                pump(ctx, key, c);
            }
        }
        Event::Stream(StreamEvent::Available { dir: Dir::Uni }) => pump(ctx, key, c),
        Event::Stream(StreamEvent::Finished { id })
            if Some(id) == c.control && c.phase == Phase::Ending =>
        {
            let (code, msg) = c
                .closing
                .take()
                .unwrap_or((ErrorCode::Internal, String::new()));
            close_now(ctx, key, c, code as u16, &msg);
        }
        _ => {}
    }
}

/// The edge's own deadline for the phase passed.
fn app_timeout(ctx: &mut Ctx, key: usize, c: &mut Conn) {
    match c.phase {
        Phase::Handshaking => {
            tracing::debug!("handshake not done in time");
            ctx.shared.metrics.abandoned("tls_timeout");
            close(ctx, key, c, None, "handshake not done in time");
        }
        // A device that is only slow (a bad link, or a storm where its
        // packets wait) must come back: `unavailable`, which the SDK
        // reconnects after, not `protocol_violation`, which ends its
        // session for good. Its state goes either way.
        Phase::AwaitStream | Phase::AwaitHello => {
            ctx.shared.metrics.abandoned("hello_timeout");
            let missing = if c.phase == Phase::AwaitStream {
                "control stream"
            } else {
                "Hello"
            };
            fatal(
                ctx,
                key,
                c,
                ErrorCode::Unavailable,
                format!("no {missing} within edge.hello_timeout_ms; reconnect"),
            )
        }
        Phase::Live => fatal(
            ctx,
            key,
            c,
            ErrorCode::TokenExpired,
            "token expired; reconnect with a fresh one".into(),
        ),
        Phase::Ending => {
            let (code, msg) = c
                .closing
                .take()
                .unwrap_or((ErrorCode::Internal, String::new()));
            close_now(ctx, key, c, code as u16, &msg);
        }
        Phase::Attaching => {}
    }
}

/// A connection-level error: an `Error` frame on the control stream, then
/// (once it is acknowledged, or after [`ERROR_FLUSH`]) the close with the
/// same code.
fn fatal(ctx: &mut Ctx, key: usize, c: &mut Conn, code: ErrorCode, msg: String) {
    if c.closed || c.phase == Phase::Ending {
        return;
    }
    ctx.shared.metrics.error(code);
    tracing::debug!(%code, %msg, "closing connection");
    if c.control.is_none() {
        close(ctx, key, c, Some(code), &msg);
        return;
    }
    c.phase = Phase::Ending;
    c.busy = true;
    c.app_deadline = Some(ctx.now + ERROR_FLUSH);
    let frame = ServerFrame::error(0, code, msg.clone()).encode();
    c.closing = Some((code, msg));
    write_ctl(ctx, key, c, frame);
}

/// Closes with `code` (None: 0, the peer went away) now.
fn close(ctx: &mut Ctx, key: usize, c: &mut Conn, code: Option<ErrorCode>, reason: &str) {
    close_now(ctx, key, c, code.map_or(0, |c| c as u16), reason);
}

fn close_now(ctx: &mut Ctx, key: usize, c: &mut Conn, code: u16, reason: &str) {
    if c.closed {
        return;
    }
    let reason = &reason.as_bytes()[..reason.len().min(200)];
    c.proto
        .close(ctx.now, VarInt::from(code), Bytes::copy_from_slice(reason));
    c.closed = true;
    ctx.mark(key, c);
}

/// Writes `frame` on the control stream (after what is waiting there).
fn write_ctl(ctx: &mut Ctx, key: usize, c: &mut Conn, frame: Bytes) {
    c.ctl_out.push_bulk([frame]);
    flush_ctl(c);
    ctx.mark(key, c);
}

pub(super) fn write_into(
    proto: &mut quinn_proto::Connection,
    id: StreamId,
) -> impl FnMut(&mut [Bytes]) -> Option<usize> + '_ {
    move |chunks: &mut [Bytes]| match proto.send_stream(id).write_chunks(chunks) {
        Ok(w) => Some(w.chunks),
        Err(WriteError::Blocked) => None,
        // Stopped or closed by the peer: nothing more goes out on it.
        Err(_) => None,
    }
}

fn flush_ctl(c: &mut Conn) {
    let Some(id) = c.control else { return };
    let Conn { proto, ctl_out, .. } = c;
    let all_out = ctl_out.flush(write_into(proto, id), notify_frame);
    if all_out && c.phase == Phase::Ending && !c.fin_sent {
        c.fin_sent = true;
        let _ = c.proto.send_stream(id).finish();
    }
}

/// Moves the outbox into the delivery stream (opened on the first frame),
/// and asks for the next inbox page once it is empty.
fn pump(ctx: &mut Ctx, key: usize, c: &mut Conn) {
    if c.closed {
        return;
    }
    if !c.outbox.is_empty() {
        let id = match c.delivery {
            Some(id) => id,
            None => match c.proto.streams().open(Dir::Uni) {
                Some(id) => *c.delivery.insert(id),
                // The client allows no stream yet: `Available` brings us back.
                None => return,
            },
        };
        let Conn { proto, outbox, .. } = c;
        outbox.flush(write_into(proto, id), notify_frame);
        ctx.mark(key, c);
    }
    if let (Inbox::From(after), false, true) = (c.inbox, c.page_pending, c.outbox.is_empty()) {
        let Some(peer) = c.peer.clone() else { return };
        c.page_pending = true;
        let engine = ctx.shared.engine.clone();
        let tx = ctx.tx.clone();
        let alive = c.alive.clone();
        let conn_id = c.conn_id;
        tokio::spawn(async move {
            // A store that fails for a while (a failover) delays the drain,
            // it does not end it: retried for as long as the connection
            // lives, live frames flowing meanwhile.
            let mut backoff = Duration::from_millis(100);
            while alive.load(Ordering::Relaxed) {
                match engine.pending(peer.device(), after).await {
                    Ok(page) => {
                        let _ = tx.send(Cmd::Page { key, conn_id, page }).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(client_id = peer.client_id, error = %e, ?backoff, "inbox read failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }
}

/// Reads the control stream while no request is in flight: the Hello
/// first, then one request at a time.
fn read_requests(ctx: &mut Ctx, key: usize, c: &mut Conn) {
    loop {
        if c.busy || c.closed || !matches!(c.phase, Phase::AwaitHello | Phase::Live) {
            return;
        }
        let Some(id) = c.control else { return };
        if !c.reader.has_frame() && !c.recv_finished {
            let mut reset = false;
            match c.proto.recv_stream(id).read(true) {
                Ok(mut chunks) => {
                    loop {
                        match chunks.next(usize::MAX) {
                            Ok(Some(chunk)) => {
                                c.reader.push(&chunk.bytes);
                                if c.reader.has_frame() {
                                    break;
                                }
                            }
                            Ok(None) => {
                                c.recv_finished = true;
                                break;
                            }
                            Err(ReadError::Blocked) => break,
                            Err(ReadError::Reset(_)) => {
                                reset = true;
                                break;
                            }
                        }
                    }
                    let _ = chunks.finalize();
                }
                Err(_) => reset = true,
            }
            ctx.mark(key, c);
            if reset {
                close(ctx, key, c, None, "");
                return;
            }
        }
        let bytes = match c.reader.next_frame() {
            Ok(Some(b)) => b,
            Ok(None) => {
                if c.recv_finished {
                    match c.reader.at_end() {
                        Ok(()) => close(ctx, key, c, None, ""),
                        Err(e) => fatal(ctx, key, c, ErrorCode::MalformedFrame, e.to_string()),
                    }
                }
                return;
            }
            Err(e @ FrameError::TooLarge { .. }) => {
                fatal(ctx, key, c, ErrorCode::FrameTooLarge, e.to_string());
                return;
            }
            Err(e) => {
                fatal(ctx, key, c, ErrorCode::MalformedFrame, e.to_string());
                return;
            }
        };
        let frame = match ClientFrame::decode(&bytes, ctx.shared.cfg.max_frame_bytes) {
            Ok(f) => f,
            Err(e) => {
                fatal(
                    ctx,
                    key,
                    c,
                    ErrorCode::MalformedFrame,
                    format!("malformed frame: {e}"),
                );
                return;
            }
        };
        if c.phase == Phase::AwaitHello {
            c.stage_done(ctx.now, &ctx.shared.metrics.hello_wait_seconds);
            c.phase = Phase::Attaching;
            c.app_deadline = None;
            c.busy = true;
            tokio::spawn(hello(ctx.shared.clone(), ctx.conn_ref(key, c), frame));
            return;
        }
        request(ctx, key, c, frame);
    }
}

/// One request of a live connection: charged to its limits, then answered
/// here (Ping) or by a task.
fn request(ctx: &mut Ctx, key: usize, c: &mut Conn, frame: ClientFrame) {
    let peer = c.peer.clone().expect("a live connection has its peer");
    let limits = c.limits.as_ref().expect("a live connection has its limits");
    let id = frame.request_id;
    if let Err(wait) = session::limit(&ctx.shared, limits, &peer, &frame.body) {
        ctx.shared.metrics.error(ErrorCode::RateLimited);
        let ms = u32::try_from(wait.as_millis().max(1)).unwrap_or(u32::MAX);
        let reply =
            ServerFrame::rate_limited(id, ms, format!("too many requests; retry after {ms} ms"));
        write_ctl(ctx, key, c, reply.encode());
        return;
    }
    match frame.body {
        ClientBody::Ping { nonce } => {
            write_ctl(
                ctx,
                key,
                c,
                ServerFrame::new(id, ServerBody::Pong { nonce }).encode(),
            );
        }
        ClientBody::Hello { .. } => fatal(
            ctx,
            key,
            c,
            ErrorCode::ProtocolViolation,
            "Hello was already said".into(),
        ),
        _ => {
            c.busy = true;
            let shared = ctx.shared.clone();
            let tx = ctx.tx.clone();
            let conn_id = c.conn_id;
            tokio::spawn(async move {
                let reply = session::answer(&shared, &peer, frame).await;
                let _ = tx
                    .send(Cmd::Reply {
                        key,
                        conn_id,
                        reply,
                    })
                    .await;
            });
        }
    }
}

/// The Hello of one connection, as a task: check it, register the device
/// (in the shard's index first), attach it, and hand Welcome back.
async fn hello(shared: Arc<Shared>, conn: ConnRef, first: ClientFrame) {
    let (tx, key, conn_id) = (conn.tx.clone(), conn.key, conn.conn_id);
    let started = Instant::now();
    let peer = match session::hello(&shared, first).await {
        Ok(p) => p,
        Err(end) => {
            let _ = tx
                .send(Cmd::Reply {
                    key,
                    conn_id,
                    reply: Err(end),
                })
                .await;
            return;
        }
    };
    let registered = Instant::now();
    shared
        .metrics
        .hello_register_seconds
        .observe((registered - started).as_secs_f64());
    let _ = tx
        .send(Cmd::Registered {
            key,
            conn_id,
            user: peer.user,
            client_id: peer.client_id,
        })
        .await;
    // Subscribe before the inbox is read: a message stored meanwhile
    // reaches the device live or from the inbox (or both, and then it is
    // sent once: see `Seam`), never neither.
    if let Err(e) = session::attach(&shared, &peer, conn).await {
        let _ = tx
            .send(Cmd::Reply {
                key,
                conn_id,
                reply: Err(End::fatal(ErrorCode::Unavailable, e)),
            })
            .await;
        return;
    }
    shared
        .metrics
        .hello_attach_seconds
        .observe(registered.elapsed().as_secs_f64());
    let welcome = ServerFrame::new(
        0,
        ServerBody::Welcome {
            user_id: peer.user,
            client_id: peer.client_id,
            node_id: shared.engine.node_id(),
            server_time_ms: tiercast_engine::snowflake::now_unix_ms(),
            max_frame_bytes: shared.cfg.max_frame_bytes as u32,
            max_body_bytes: shared.engine.config().max_body_bytes as u32,
        },
    )
    .encode();
    let _ = tx
        .send(Cmd::Welcomed {
            key,
            conn_id,
            peer: Arc::new(peer),
            welcome,
        })
        .await;
}

#[cfg(test)]
mod tests {
    /// A connection's slot is quinn-proto's `Connection` (6,160 B in
    /// quinn-proto 0.11) plus the edge's own state, inline: the edge's part
    /// of the per-connection memory budget (docs/benchmarks.md, "RSS per
    /// connection") stays under 1 KiB (528 B when this was written).
    #[test]
    fn the_edges_own_share_of_a_connection_slot_stays_small() {
        let slot = std::mem::size_of::<Option<super::Conn>>();
        let quic = std::mem::size_of::<quinn_proto::Connection>();
        assert!(
            slot - quic <= 1024,
            "Conn adds {} B to quinn-proto's {quic} B",
            slot - quic
        );
    }
}
