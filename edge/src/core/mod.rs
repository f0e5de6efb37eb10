//! The edge's I/O core: connections as state, not tasks.
//!
//! An edge runs one shard per core (`edge.shards`). A shard owns a UDP
//! socket on the listen port (`SO_REUSEPORT` spreads clients over the
//! shards by address), a `quinn-proto` endpoint, and its connections'
//! QUIC state in a table indexed by connection handle, all driven by one
//! loop (`shard::Shard::run`). There is no task, channel or timer per
//! connection:
//!
//! - **Fan-out** is one command per backplane payload per shard, carrying
//!   the encoded frame (`Bytes`, shared, never copied per connection) and
//!   the recipients; the shard writes it into each local member's delivery
//!   stream directly and marks the connection dirty.
//! - **One flush pass per wake-up** polls transmits from the dirty
//!   connections (frames queued for one connection within a pass share a
//!   packet) and sends them in batches (`udp`: `sendmmsg` across
//!   destinations, GSO within one; receive with `recvmmsg` and GRO).
//! - **One timer wheel per shard** (`wheel`) holds each connection's next
//!   deadline, QUIC's and the edge's own (Hello, token expiry).
//! - **Requests** (Hello, Send, Fetch, ...) are decoded in the shard and
//!   answered by a task each (they wait on the store); the reply comes back
//!   as a command. One request per connection is in flight at a time, as
//!   before: the next is read off the stream only when the reply is out, so
//!   QUIC flow control holds back a client that sends faster.
//!
//! The protocol, limits, errors, slow-consumer policy and drain are the
//! edge's as before (`crate::session` has the parts that are not I/O).

mod frames;
mod outbox;
pub mod pacer;
#[doc(hidden)]
pub mod rig;
mod shard;
mod udp;
mod wheel;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tiercast_schemas::wire::ErrorCode;
use tokio::sync::mpsc;

pub(crate) use shard::{Cmd, Limits, Shard};

/// The loop's I/O parts, for another loop of many QUIC connections on one
/// socket (loadgen's device core): the batched UDP socket, the timer wheel
/// and the frame reader.
#[doc(hidden)]
pub mod io {
    pub use super::frames::FrameReader;
    pub use super::udp::{Batch, Sent, Socket};
    pub use super::wheel::Wheel;
}
pub use udp::bind as bind_sockets;

/// A connection as seen from outside its shard: what closes it.
#[derive(Debug, Clone)]
pub struct ConnRef {
    pub(crate) tx: mpsc::Sender<Cmd>,
    pub(crate) key: usize,
    pub conn_id: u64,
}

impl ConnRef {
    /// Closes the connection with `code` (the QUIC application close code)
    /// and `reason`.
    pub fn close(&self, code: ErrorCode, reason: &'static str) {
        let cmd = Cmd::Close {
            key: self.key,
            conn_id: self.conn_id,
            code,
            reason,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }
}

/// The bound sockets and QUIC configuration an edge serves on.
#[derive(Debug)]
pub struct Listener {
    pub(crate) sockets: Vec<std::net::UdpSocket>,
    pub(crate) server: Arc<quinn_proto::ServerConfig>,
    pub(crate) endpoint: Arc<quinn_proto::EndpointConfig>,
    pub local_addr: SocketAddr,
}

impl Listener {
    pub fn new(
        sockets: Vec<std::net::UdpSocket>,
        server: quinn_proto::ServerConfig,
        endpoint: quinn_proto::EndpointConfig,
    ) -> std::io::Result<Self> {
        let local_addr = sockets
            .first()
            .ok_or_else(|| std::io::Error::other("no socket"))?
            .local_addr()?;
        Ok(Self {
            sockets,
            server: Arc::new(server),
            endpoint: Arc::new(endpoint),
            local_addr,
        })
    }
}

/// The way to every shard, for the edge's tasks (fan-out, repair, drain).
#[derive(Debug, Clone)]
pub(crate) struct Shards {
    txs: Arc<[mpsc::Sender<Cmd>]>,
}

impl Shards {
    pub fn new(txs: Vec<mpsc::Sender<Cmd>>) -> Self {
        Self { txs: txs.into() }
    }

    pub fn senders(&self) -> &[mpsc::Sender<Cmd>] {
        &self.txs
    }

    /// `frame` to every local device of `users` but `except_client`;
    /// `message` = the id of the message it carries (a Message frame),
    /// `notify` = (conversation, id) for a tier-3 notification.
    pub async fn deliver(
        &self,
        users: Arc<[u64]>,
        except_client: u64,
        frame: Bytes,
        message: Option<u64>,
        notify: Option<(u64, u64)>,
    ) {
        for tx in self.txs.iter() {
            let _ = tx
                .send(Cmd::Deliver {
                    users: users.clone(),
                    except_client,
                    frame: frame.clone(),
                    message,
                    notify,
                })
                .await;
        }
    }

    /// `frame` to one device, if it is connected here and has room.
    pub async fn send_to(&self, user: u64, client_id: u64, frame: Bytes) {
        for tx in self.txs.iter() {
            let _ = tx
                .send(Cmd::SendTo {
                    user,
                    client_id,
                    frame: frame.clone(),
                })
                .await;
        }
    }
}
