//! The shard's UDP socket: batched receive (`recvmmsg` and GRO through
//! quinn-udp) and batched send (`sendmmsg` across destinations through
//! nix, GSO within one destination through quinn-udp). No unsafe code:
//! both crates wrap the system calls.
//!
//! Datagrams of one flush pass are gathered in a [`Batch`] (one buffer per
//! QUIC transmit, reused across passes) and go out in as few system calls
//! as the kernel allows: single datagrams to many destinations in
//! `sendmmsg` calls of up to [`SENDMMSG_BATCH`], segmented transmits (a
//! burst to one destination) as one GSO `sendmsg` each.
//!
//! A socket bound to one address sends without a source address per
//! datagram. A socket bound to a wildcard address answers from the
//! address each datagram arrived on (`IP_PKTINFO`), which a `sendmmsg`
//! call cannot vary per message: there every transmit goes through
//! quinn-udp one `sendmsg` at a time.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
use quinn_proto::{EcnCodepoint, Transmit};
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;

/// Destinations per `sendmmsg` call (Linux takes up to 1024; 64 keeps the
/// headers on a few pages).
pub const SENDMMSG_BATCH: usize = 64;

/// Datagrams received per `recvmmsg` call.
pub const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;

/// Bytes per receive buffer: a GRO batch of full-size datagrams.
const RECV_BUF: usize = 64 * 1024;

/// Binds `shards` UDP sockets on `addr`, sharing the port with
/// `SO_REUSEPORT` when there is more than one (the kernel then spreads
/// flows over them by their address 4-tuple, so one client's packets stay
/// on one shard). With port 0 the first socket picks the port and the
/// others join it.
pub fn bind(
    addr: SocketAddr,
    shards: usize,
    buffer: usize,
) -> io::Result<Vec<std::net::UdpSocket>> {
    let mut out = Vec::with_capacity(shards);
    let mut addr = addr;
    for _ in 0..shards.max(1) {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if shards > 1 {
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReusePort, &true)
                .map_err(io::Error::from)?;
        }
        // Best effort: a smaller buffer still works, it only drops earlier.
        let _ = s.set_recv_buffer_size(buffer);
        let _ = s.set_send_buffer_size(buffer);
        s.bind(&addr.into())?;
        s.set_nonblocking(true)?;
        let std: std::net::UdpSocket = s.into();
        addr = std.local_addr()?;
        out.push(std);
    }
    Ok(out)
}

/// One QUIC transmit waiting in a batch.
#[derive(Debug, Clone, Copy)]
struct Out {
    destination: SocketAddr,
    len: usize,
    segment_size: Option<usize>,
    src_ip: Option<IpAddr>,
    ecn: Option<EcnCodepoint>,
}

/// Transmits of one flush pass, each in its own reused buffer.
#[derive(Debug, Default)]
pub struct Batch {
    bufs: Vec<Vec<u8>>,
    outs: Vec<Out>,
    /// Transmits already sent from the front (a send that would block
    /// resumes here).
    sent: usize,
    /// Datagrams and send calls so far (counted across blocked flushes).
    pub totals: Sent,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.sent == self.outs.len()
    }

    pub fn len(&self) -> usize {
        self.outs.len() - self.sent
    }

    /// A cleared buffer for the next transmit.
    pub fn next_buf(&mut self) -> &mut Vec<u8> {
        let i = self.outs.len();
        if self.bufs.len() <= i {
            self.bufs.push(Vec::with_capacity(1500));
        }
        let b = &mut self.bufs[i];
        b.clear();
        b
    }

    /// Records the transmit quinn-proto just wrote into [`Self::next_buf`].
    pub fn push(&mut self, t: &Transmit) {
        self.outs.push(Out {
            destination: t.destination,
            len: t.size,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
            ecn: t.ecn,
        });
    }

    fn reset(&mut self) {
        self.outs.clear();
        self.sent = 0;
    }
}

/// What one [`Socket::flush`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub datagrams: u64,
    pub syscalls: u64,
}

#[derive(Debug)]
pub struct Socket {
    pub io: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// Bound to one address: no source address per datagram.
    specific: bool,
    recv_buf: Vec<u8>,
    metas: Vec<RecvMeta>,
}

impl Socket {
    pub fn new(std: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&std).into())?;
        let specific = !std.local_addr()?.ip().is_unspecified();
        Ok(Self {
            io: tokio::net::UdpSocket::from_std(std)?,
            state,
            specific,
            recv_buf: vec![0; RECV_BUF * RECV_BATCH],
            metas: vec![RecvMeta::default(); RECV_BATCH],
        })
    }

    /// Whether datagrams must carry the address they answer from.
    pub fn specific(&self) -> bool {
        self.specific
    }

    /// Datagrams quinn-proto may put in one transmit (GSO segments).
    pub fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments().min(10)
    }

    /// Receives what is waiting (one `recvmmsg`) and hands each datagram
    /// to `f` as (source, local address it arrived on, ECN, bytes). Err
    /// `WouldBlock` when nothing is waiting.
    pub fn recv(
        &mut self,
        mut f: impl FnMut(SocketAddr, Option<IpAddr>, Option<EcnCodepoint>, &[u8]),
    ) -> io::Result<usize> {
        let Self {
            io,
            state,
            recv_buf,
            metas,
            ..
        } = self;
        let mut iovs: Vec<IoSliceMut<'_>> =
            recv_buf.chunks_mut(RECV_BUF).map(IoSliceMut::new).collect();
        let io: &tokio::net::UdpSocket = io;
        let n = io.try_io(Interest::READABLE, || {
            state.recv(io.into(), &mut iovs, metas)
        })?;
        let mut datagrams = 0;
        for (meta, buf) in metas.iter().zip(iovs.iter()).take(n) {
            let data = &buf[..meta.len];
            let ecn = meta.ecn.and_then(|e| EcnCodepoint::from_bits(e as u8));
            // A GRO buffer holds several datagrams of `stride` bytes.
            for d in data.chunks(meta.stride.max(1)) {
                datagrams += 1;
                f(meta.addr, meta.dst_ip, ecn, d);
            }
        }
        Ok(datagrams)
    }

    /// Sends the batch. Err `WouldBlock` leaves the unsent rest in it (wait
    /// for the socket to be writable and flush again).
    /// Sends what `batch` holds; false if the socket would block (the rest
    /// waits in the batch for the socket to be writable again). Any other
    /// error is logged and the batch counts as sent (QUIC recovers it).
    pub fn send(&self, batch: &mut Batch) -> bool {
        if batch.is_empty() {
            return true;
        }
        match self.flush(batch) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::warn!(error = %e, "send failed");
                true
            }
        }
    }

    pub fn flush(&self, batch: &mut Batch) -> io::Result<Sent> {
        let before = batch.totals;
        while batch.sent < batch.outs.len() {
            let out = batch.outs[batch.sent];
            let plain = out.segment_size.is_none() && (self.specific || out.src_ip.is_none());
            if !plain {
                let transmit = quinn_udp::Transmit {
                    destination: out.destination,
                    ecn: out
                        .ecn
                        .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
                    contents: &batch.bufs[batch.sent][..out.len],
                    segment_size: out.segment_size,
                    src_ip: if self.specific { None } else { out.src_ip },
                };
                match self.io.try_io(Interest::WRITABLE, || {
                    self.state.try_send((&self.io).into(), &transmit)
                }) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                    // Any other error loses this datagram only; QUIC
                    // recovers it like a loss on the wire.
                    Err(e) => tracing::debug!(error = %e, "datagram not sent"),
                }
                batch.totals.syscalls += 1;
                batch.totals.datagrams += out
                    .segment_size
                    .map_or(1, |s| out.len.div_ceil(s.max(1)) as u64);
                batch.sent += 1;
                continue;
            }
            // A run of plain datagrams: one sendmmsg for up to a batch.
            let start = batch.sent;
            let mut end = start;
            while end < batch.outs.len()
                && end - start < SENDMMSG_BATCH
                && batch.outs[end].segment_size.is_none()
                && (self.specific || batch.outs[end].src_ip.is_none())
            {
                end += 1;
            }
            let n = self.sendmmsg(batch, start, end)?;
            batch.totals.syscalls += 1;
            batch.totals.datagrams += n as u64;
            batch.sent += n;
        }
        batch.reset();
        Ok(Sent {
            datagrams: batch.totals.datagrams - before.datagrams,
            syscalls: batch.totals.syscalls - before.syscalls,
        })
    }

    fn sendmmsg(&self, batch: &Batch, start: usize, end: usize) -> io::Result<usize> {
        let slices: Vec<[IoSlice<'_>; 1]> = (start..end)
            .map(|i| [IoSlice::new(&batch.bufs[i][..batch.outs[i].len])])
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> = batch.outs[start..end]
            .iter()
            .map(|o| Some(SockaddrStorage::from(o.destination)))
            .collect();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(end - start, None);
        let fd = self.io.as_raw_fd();
        let result = self.io.try_io(Interest::WRITABLE, || {
            sendmmsg(fd, &mut headers, &slices, &addrs, [], MsgFlags::empty())
                .map(|r| r.count())
                .map_err(io::Error::from)
        });
        match result {
            Ok(n) => Ok(n.max(1).min(end - start)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            // An error on the first message (an unreachable destination):
            // that datagram is lost like one on the wire; go on after it.
            Err(e) => {
                tracing::debug!(error = %e, "datagram not sent");
                Ok(1)
            }
        }
    }
}
