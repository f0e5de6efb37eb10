//! A bench rig for the core's per-delivery path: many real QUIC
//! connections (handshaken in memory with quinn-proto clients), one frame
//! fanned out to all of them through the core's own outbox, stream write,
//! packet building and encryption, and batched send ([`super::udp`]) to a
//! real loopback socket that stands in for the devices, then their ACKs
//! received and processed. Only the edge's side is timed; the clients'
//! side (decrypting, acking) runs between the timed parts.
//!
//! Time is virtual for the QUIC state (each round is 50 ms later, as a
//! room at 20 messages a second), so acknowledgement delays and idle
//! timers behave as on a live edge without the bench sleeping.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, StreamId,
};

use super::outbox::Outbox;
use super::shard::write_into;
use super::udp::{Batch, Socket};
use crate::config::EdgeConfig;
use crate::server::notify_frame;
use crate::tls::Identity;

/// The virtual time between two rounds.
const ROUND: Duration = Duration::from_millis(50);
/// When the devices ack a round (past QUIC's 25 ms ack delay).
const ACK_AFTER: Duration = Duration::from_millis(30);

struct ServerConn {
    conn: Connection,
    ch: ConnectionHandle,
    stream: StreamId,
    outbox: Outbox,
}

/// The delivery frame of a room broadcast: one message of `body` bytes, as
/// the room scenarios send (the benches and the instruction counter use a
/// 100-byte body).
pub fn delivery_frame(body: usize) -> Bytes {
    use tiercast_schemas::wire::{Message, ServerBody, ServerFrame};
    ServerFrame::new(
        0,
        ServerBody::Message(Message {
            id: 1 << 40,
            conversation: 1,
            sender: 7,
            sender_client: 9,
            body: Bytes::from(vec![b'x'; body]),
        }),
    )
    .encode()
}

/// What one round cost the edge's side, and what it sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Round {
    /// Writing the frame, building and sending the packets.
    pub send: Duration,
    /// Receiving the ACKs into the connections.
    pub acks: Duration,
    pub datagrams: u64,
    pub syscalls: u64,
    pub ack_datagrams: u64,
}

pub struct Rig {
    /// The socket's readiness comes from a tokio reactor, driven only when
    /// a send would block.
    rt: tokio::runtime::Runtime,
    server: Endpoint,
    client: Endpoint,
    conns: Vec<ServerConn>,
    clients: Vec<Option<(Connection, Option<StreamId>)>>,
    socket: Socket,
    server_addr: SocketAddr,
    sink: UdpSocket,
    sink_addr: SocketAddr,
    batch: Batch,
    now: Instant,
    frame: Bytes,
    buf: Vec<u8>,
}

impl Rig {
    /// `n` connections to an edge configured by `cfg`, made by clients with
    /// `client` crypto (which must trust `id`).
    pub fn new(
        n: usize,
        cfg: &EdgeConfig,
        id: Identity,
        client: Arc<dyn quinn_proto::crypto::ClientConfig>,
        frame: Bytes,
    ) -> std::io::Result<Self> {
        let mut server_cfg = quinn_proto::ServerConfig::with_crypto(
            crate::tls::server_crypto(id).map_err(std::io::Error::other)?,
        );
        server_cfg.transport_config(Arc::new(crate::node::transport_config(cfg)));
        let sockets = super::udp::bind("127.0.0.1:0".parse().expect("literal"), 1, 4 << 20)?;
        let std = sockets.into_iter().next().expect("one socket");
        let server_addr = std.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let socket = {
            let _enter = rt.enter();
            Socket::new(std)?
        };
        let sink = UdpSocket::bind("127.0.0.1:0")?;
        sink.set_nonblocking(true)?;
        let sink_addr = sink.local_addr()?;
        let mut rig = Self {
            rt,
            server: Endpoint::new(
                Arc::new(EndpointConfig::default()),
                Some(Arc::new(server_cfg)),
                false,
                None,
            ),
            client: Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None),
            conns: Vec::with_capacity(n),
            clients: Vec::new(),
            socket,
            server_addr,
            sink,
            sink_addr,
            batch: Batch::default(),
            now: Instant::now(),
            frame,
            buf: Vec::with_capacity(1500),
        };
        for _ in 0..n {
            rig.connect(client.clone())?;
        }
        Ok(rig)
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// One handshake, in memory, to completion on both sides.
    fn connect(
        &mut self,
        crypto: Arc<dyn quinn_proto::crypto::ClientConfig>,
    ) -> std::io::Result<()> {
        let now = self.now;
        let (cch, mut cconn) = self
            .client
            .connect(
                now,
                ClientConfig::new(crypto),
                self.server_addr,
                "localhost",
            )
            .map_err(std::io::Error::other)?;
        let mut server: Option<(ConnectionHandle, Connection)> = None;
        let (mut client_up, mut server_up) = (false, false);
        for _ in 0..64 {
            if client_up && server_up {
                break;
            }
            // Client to server.
            loop {
                self.buf.clear();
                let Some(t) = cconn.poll_transmit(now, 1, &mut self.buf) else {
                    break;
                };
                let data = BytesMut::from(&self.buf[..t.size]);
                let mut resp = Vec::new();
                match self
                    .server
                    .handle(now, self.sink_addr, None, None, data, &mut resp)
                {
                    Some(DatagramEvent::NewConnection(incoming)) => {
                        let (ch, conn) = self
                            .server
                            .accept(incoming, now, &mut resp, None)
                            .map_err(|e| std::io::Error::other(format!("{:?}", e.cause)))?;
                        server = Some((ch, conn));
                    }
                    Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                        if let Some((_, s)) = server.as_mut() {
                            s.handle_event(ev);
                        }
                    }
                    _ => {}
                }
            }
            while let Some(ev) = cconn.poll_endpoint_events() {
                if let Some(back) = self.client.handle_event(cch, ev) {
                    cconn.handle_event(back);
                }
            }
            let Some((sch, sconn)) = server.as_mut() else {
                continue;
            };
            while let Some(ev) = sconn.poll() {
                server_up |= matches!(ev, Event::Connected);
            }
            while let Some(ev) = sconn.poll_endpoint_events() {
                if let Some(back) = self.server.handle_event(*sch, ev) {
                    sconn.handle_event(back);
                }
            }
            // Server to client.
            loop {
                self.buf.clear();
                let Some(t) = sconn.poll_transmit(now, 1, &mut self.buf) else {
                    break;
                };
                let data = BytesMut::from(&self.buf[..t.size]);
                let mut resp = Vec::new();
                if let Some(DatagramEvent::ConnectionEvent(_, ev)) =
                    self.client
                        .handle(now, self.server_addr, None, None, data, &mut resp)
                {
                    cconn.handle_event(ev);
                }
            }
            while let Some(ev) = cconn.poll() {
                client_up |= matches!(ev, Event::Connected);
            }
        }
        let (sch, mut sconn) = server
            .filter(|_| client_up && server_up)
            .ok_or_else(|| std::io::Error::other("handshake did not complete"))?;
        let stream = sconn
            .streams()
            .open(Dir::Uni)
            .ok_or_else(|| std::io::Error::other("no stream"))?;
        self.conns.push(ServerConn {
            conn: sconn,
            ch: sch,
            stream,
            outbox: Outbox::new(1024),
        });
        if self.clients.len() <= cch.0 {
            self.clients.resize_with(cch.0 + 1, || None);
        }
        self.clients[cch.0] = Some((cconn, None));
        Ok(())
    }

    /// One frame to every connection, and their ACKs back.
    pub fn round(&mut self) -> Round {
        self.now += ROUND;
        let now = self.now;
        let mut r = Round::default();
        let max_segments = self.socket.max_transmit_segments();
        let before = self.batch.totals;

        // The edge: the frame into every stream, packets out in batches.
        // Between batches (not timed) the devices take what arrived, so the
        // sink's buffer never drops a datagram.
        let mut next = 0;
        while next < self.conns.len() {
            let t0 = Instant::now();
            let (upto, sent) = self.edge_send(next, now, max_segments);
            r.send += t0.elapsed();
            self.take(now, sent.datagrams);
            next = upto;
        }
        r.datagrams = self.batch.totals.datagrams - before.datagrams;
        r.syscalls = self.batch.totals.syscalls - before.syscalls;

        // The devices (not timed): take the packets, ack when due.
        let acks = self.acks(now);
        r.ack_datagrams = acks.len() as u64;

        // The edge: the ACKs into the connections (at the time the devices
        // sent them).
        let t1 = Instant::now();
        self.edge_acks(now + ACK_AFTER, acks);
        r.acks = t1.elapsed();
        r
    }

    /// The edge's side of a round, from connection `from`: the frame into
    /// each stream and its packets built, until a batch of 256 datagrams is
    /// sent (or the last connection). Returns where the next batch starts.
    /// Not inlined, so that an instruction counter can tell the edge's side
    /// from the devices' (`scripts/count-instructions.sh`).
    #[inline(never)]
    fn edge_send(
        &mut self,
        from: usize,
        now: Instant,
        max_segments: usize,
    ) -> (usize, super::udp::Sent) {
        let mut i = from;
        while i < self.conns.len() {
            let c = &mut self.conns[i];
            i += 1;
            c.outbox.offer(self.frame.clone(), None);
            c.outbox
                .flush(write_into(&mut c.conn, c.stream), notify_frame);
            while let Some(t) = c
                .conn
                .poll_transmit(now, max_segments, self.batch.next_buf())
            {
                self.batch.push(&t);
                if c.conn.transmits_exhausted() {
                    break;
                }
            }
            if self.batch.len() >= 256 {
                break;
            }
        }
        (i, flush_batch(&self.rt, &self.socket, &mut self.batch))
    }

    /// The edge's side of the devices' ACKs, received at `at`.
    #[inline(never)]
    fn edge_acks(&mut self, at: Instant, acks: Vec<BytesMut>) {
        for data in acks {
            let mut resp = Vec::new();
            if let Some(DatagramEvent::ConnectionEvent(ch, ev)) =
                self.server
                    .handle(at, self.sink_addr, None, None, data, &mut resp)
            {
                // Server handles are dense from 0 in this rig.
                if let Some(c) = self.conns.get_mut(ch.0).filter(|c| c.ch == ch) {
                    c.conn.handle_event(ev);
                    while c.conn.poll().is_some() {}
                    let _ = c.conn.poll_timeout();
                }
            }
        }
    }

    /// The devices take `expected` datagrams off the sink, each into its
    /// client connection.
    fn take(&mut self, now: Instant, expected: u64) {
        let mut buf = vec![0u8; 65_536];
        let mut got = 0u64;
        let mut idle = 0;
        while got < expected && idle < 1_000 {
            match self.sink.recv_from(&mut buf) {
                Ok((n, _)) => {
                    got += 1;
                    idle = 0;
                    let mut resp = Vec::new();
                    if let Some(DatagramEvent::ConnectionEvent(ch, ev)) = self.client.handle(
                        now,
                        self.server_addr,
                        None,
                        None,
                        BytesMut::from(&buf[..n]),
                        &mut resp,
                    ) && let Some(Some((c, _))) = self.clients.get_mut(ch.0)
                    {
                        c.handle_event(ev);
                    }
                }
                Err(_) => {
                    idle += 1;
                    std::thread::yield_now();
                }
            }
        }
    }

    /// The devices read their streams and ack once their ack delay has
    /// passed (the next round is 50 ms later).
    fn acks(&mut self, now: Instant) -> Vec<BytesMut> {
        let later = now + ACK_AFTER;
        let mut acks = Vec::new();
        for (c, stream) in self.clients.iter_mut().flatten() {
            while c.poll().is_some() {}
            if stream.is_none() {
                *stream = c.streams().accept(Dir::Uni);
            }
            if let Some(id) = *stream
                && let Ok(mut chunks) = c.recv_stream(id).read(true)
            {
                while let Ok(Some(_)) = chunks.next(usize::MAX) {}
                let _ = chunks.finalize();
            }
            if c.poll_timeout().is_some_and(|t| t <= later) {
                c.handle_timeout(later);
            }
            loop {
                let mut out = Vec::with_capacity(1500);
                let Some(t) = c.poll_transmit(later, 1, &mut out) else {
                    break;
                };
                out.truncate(t.size);
                acks.push(BytesMut::from(&out[..]));
            }
        }
        acks
    }

    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }
}

/// Sends the batch, waiting while the socket would block; the datagrams
/// it sent (counted across the waits).
fn flush_batch(
    rt: &tokio::runtime::Runtime,
    socket: &Socket,
    batch: &mut Batch,
) -> super::udp::Sent {
    let before = batch.totals;
    let total = |b: &Batch| super::udp::Sent {
        datagrams: b.totals.datagrams - before.datagrams,
        syscalls: b.totals.syscalls - before.syscalls,
    };
    for _ in 0..10_000 {
        match socket.flush(batch) {
            Ok(_) => return total(batch),
            // The socket's send buffer is full (or its readiness not yet
            // known): wait until it is writable.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = rt.block_on(socket.io.writable());
            }
            Err(_) => return total(batch),
        }
    }
    total(batch)
}
