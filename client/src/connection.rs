//! One connection to an edge: the Hello handshake, request/answer matching
//! on the control stream, and the stream of deliveries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tiercast_schemas::MAX_FRAME_BYTES;
use tiercast_schemas::framing::{FrameError, read_frame};
use tiercast_schemas::wire::{
    ClientBody, ClientFrame, Cursor, ErrorCode, Message, ServerBody, ServerFrame, SyncEntry,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

/// The protocol version this SDK speaks (defined once, in the schemas).
pub use tiercast_schemas::PROTOCOL_VERSION;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    /// The name the edge's certificate is checked against.
    pub server_name: String,
    /// Certificates to trust, PEM.
    pub trusted_pem: String,
    pub token: String,
    /// This device's id as the edge issued it on an earlier connect (kept
    /// by the app), or 0 for a new device: the edge issues one
    /// ([`Client::client_id`]).
    pub client_id: u64,
    pub device: String,
    pub request_timeout: Duration,
    /// Deliveries buffered before the SDK stops reading (and the edge, in
    /// turn, sees a slow consumer).
    pub delivery_buffer: usize,
    /// QUIC flow-control window of the delivery stream, bytes (quinn's
    /// default when unset). A small one models a device on a slow link.
    pub stream_receive_window: Option<u32>,
    /// A connection silent this long is dead (pings go every third of it):
    /// how fast a device notices its edge died. A keep-alive sent after the
    /// last packet from the edge restarts the timer (RFC 9000, 10.1), so a
    /// dead edge is noticed within 4/3 of it: 5.3 s at the default 4 s.
    /// The price is a PING (and its ACK) every 1.3 s on an idle
    /// connection; an app in the background may choose a longer one. The
    /// edge's own idle timeout caps it.
    pub idle_timeout: Duration,
    /// TLS state to connect with, kept across connections: its session
    /// tickets let a returning device resume (no certificate chain to
    /// verify, no signature for the edge to make). `None`: a fresh one
    /// from `trusted_pem` (a full handshake). [`crate::Session`] keeps one
    /// per device.
    pub tls: Option<crate::tls::ClientTls>,
}

impl ClientConfig {
    pub fn new(addr: SocketAddr, trusted_pem: String, token: String, client_id: u64) -> Self {
        Self {
            addr,
            server_name: "localhost".into(),
            trusted_pem,
            token,
            client_id,
            device: "sdk".into(),
            request_timeout: Duration::from_secs(10),
            delivery_buffer: 4096,
            stream_receive_window: None,
            idle_timeout: Duration::from_secs(4),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The edge refused the request (or, for connection-level codes, the
    /// connection).
    /// `retry_after`: when the edge said it will have room (a connection
    /// it refused for load, `retry-after-ms=` in QUIC's reason phrase).
    #[error("refused: {code}: {message}")]
    Refused {
        code: ErrorCode,
        message: String,
        retry_after: Option<Duration>,
    },
    /// `rate_limited`: the request may be made again after `retry_after`.
    #[error("rate limited (retry after {retry_after:?}): {message}")]
    RateLimited {
        retry_after: Duration,
        message: String,
    },
    /// The connection is closed (by the edge with `code`, or lost).
    #[error("connection closed: {code}: {reason}")]
    Closed { code: ErrorCode, reason: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The edge's `Error` frame in answer to a request or the Hello.
    pub fn refused(code: ErrorCode, message: String) -> Self {
        Self::Refused {
            code,
            message,
            retry_after: None,
        }
    }

    /// When the edge said to come back, for a connection it refused for
    /// load with its turn (`Refused { retry_after }`).
    pub fn turn(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The wire code behind this error, if the edge gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } | Self::Closed { code, .. } => Some(*code),
            Self::RateLimited { .. } => Some(ErrorCode::RateLimited),
            _ => None,
        }
    }
}

/// What a refused connection reports (QUIC's `CONNECTION_REFUSED`: the
/// edge's handshake slots were full, or it is shutting down).
pub const REFUSED: &str = "the edge refused the connection: no room for it now";

/// The wait in a paced refusal's reason phrase; the wire format is the
/// schemas crate's, shared with the edge that writes it.
pub use tiercast_schemas::wire::refusal_retry_after;

/// The error an app sees for a connection that ended with `e` (the edge's
/// close code and reason, when it gave them). QUIC's own
/// `CONNECTION_REFUSED`, which an edge sends to a new connection it has no
/// room for, is [`ErrorCode::Unavailable`]: the edge shed load
/// ([`crate::resume::is_shed`]).
pub fn closed(e: &quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => ClientError::Closed {
            code: ErrorCode::from_u16(u16::try_from(c.error_code.into_inner()).unwrap_or(0)),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            ClientError::Refused {
                code: ErrorCode::Unavailable,
                message: REFUSED.into(),
                retry_after: refusal_retry_after(&c.reason),
            }
        }
        e => ClientError::Closed {
            code: ErrorCode::Unspecified,
            reason: e.to_string(),
        },
    }
}

/// What the edge pushes to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Message(Message),
    Notify {
        conversation: u64,
        message_id: u64,
    },
    ReadMarker {
        user: u64,
        conversation: u64,
        message_id: u64,
    },
    Drain {
        reconnect_after_ms: u32,
        reason: String,
    },
}

pub type Deliveries = mpsc::Receiver<Delivery>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOk {
    pub conversation: u64,
    pub message_id: u64,
    pub duplicate: bool,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerBody>>>>;

/// A connected, welcomed device.
#[derive(Debug, Clone)]
pub struct Client {
    conn: quinn::Connection,
    /// The endpoint this client made for itself, if it did (not when it
    /// shares one through [`Client::connect_on`]).
    own_endpoint: Option<quinn::Endpoint>,
    control: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    pending: Pending,
    next_request: Arc<AtomicU64>,
    timeout: Duration,
    /// Why this side closed the connection (a bad frame from the edge).
    fault: Fault,
    pub user_id: u64,
    pub client_id: u64,
    pub max_body_bytes: u32,
    /// The edge's wall clock minus this device's, from Welcome's
    /// `server_time_ms` (off by the one-way delay): what a device that
    /// computes ids from a time (a resume from the last disconnect) adds
    /// to its own clock, so that its resume does not depend on its clock.
    pub clock_offset_ms: i64,
}

fn endpoint_for(addr: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::1]:0".parse().expect("literal")
    } else if addr.ip().is_loopback() {
        "127.0.0.1:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    client_endpoint(bind, 0).map_err(|e| ClientError::Connect(e.to_string()))
}

/// A client UDP endpoint bound to `bind`, with `buffer` bytes of socket
/// buffer (0 = the system default). Many connections can share one endpoint
/// ([`Client::connect_on`]); a load generator holding thousands wants big
/// buffers so that bursts are not dropped on its side.
pub fn client_endpoint(bind: SocketAddr, buffer: usize) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bound_socket(bind, buffer)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A UDP socket bound to `bind`, with `buffer` bytes of kernel buffers each
/// way (0: the system's default).
pub(crate) fn bound_socket(
    bind: SocketAddr,
    buffer: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if buffer > 0 {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

impl Client {
    /// Connects on a fresh UDP socket of its own.
    pub async fn connect(cfg: ClientConfig) -> Result<(Self, Deliveries), ClientError> {
        let endpoint = endpoint_for(cfg.addr)?;
        let (mut client, rx) = Self::connect_on(&endpoint, cfg).await?;
        client.own_endpoint = Some(endpoint);
        Ok((client, rx))
    }

    /// Connects through an existing endpoint (many connections can share
    /// one UDP socket).
    pub async fn connect_on(
        endpoint: &quinn::Endpoint,
        cfg: ClientConfig,
    ) -> Result<(Self, Deliveries), ClientError> {
        let (crypto, tokens) = match &cfg.tls {
            Some(t) => (t.0.clone(), Some(t.tokens())),
            None => (
                crate::tls::client_crypto(&cfg.trusted_pem).map_err(ClientError::Connect)?,
                None,
            ),
        };
        let mut qcfg = quinn::ClientConfig::new(crypto);
        if let Some(tokens) = tokens {
            qcfg.token_store(tokens);
        }
        let mut transport = quinn::TransportConfig::default();
        // Pings well inside the idle timeout, so an idle device stays up and
        // a dead edge is noticed within the timeout.
        transport.keep_alive_interval(Some(cfg.idle_timeout / 3));
        if let Ok(t) = quinn::IdleTimeout::try_from(cfg.idle_timeout) {
            transport.max_idle_timeout(Some(t));
        }
        if let Some(w) = cfg.stream_receive_window {
            transport.stream_receive_window(w.into());
        }
        qcfg.transport_config(Arc::new(transport));
        let connecting = endpoint
            .connect_with(qcfg, cfg.addr, &cfg.server_name)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let conn = tokio::time::timeout(cfg.request_timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout(cfg.request_timeout))?
            .map_err(|e| match closed(&e) {
                shed @ ClientError::Refused { .. } => shed,
                _ => ClientError::Connect(e.to_string()),
            })?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(&e))?;
        let hello = ClientFrame::new(
            0,
            ClientBody::Hello {
                token: cfg.token.clone(),
                client_id: cfg.client_id,
                device: cfg.device.clone(),
                protocol_version: PROTOCOL_VERSION,
            },
        );
        send.write_all(&hello.encode())
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let first = tokio::time::timeout(cfg.request_timeout, read_server_frame(&mut recv))
            .await
            .map_err(|_| ClientError::Timeout(cfg.request_timeout))?;
        let (user_id, client_id, max_body_bytes, server_time_ms) = match first {
            Ok(Some(ServerFrame {
                body:
                    ServerBody::Welcome {
                        user_id,
                        client_id,
                        max_body_bytes,
                        server_time_ms,
                        ..
                    },
                ..
            })) => (user_id, client_id, max_body_bytes, server_time_ms),
            Ok(Some(ServerFrame {
                body: ServerBody::Error { code, message, .. },
                ..
            })) => return Err(ClientError::refused(code, message)),
            Ok(other) => {
                return Err(match conn.close_reason() {
                    Some(e) => closed(&e),
                    None => ClientError::Protocol(format!("expected Welcome, got {other:?}")),
                });
            }
            Err((code, why)) => {
                return Err(match conn.close_reason() {
                    Some(e) => closed(&e),
                    None => {
                        let message = format!("the edge sent a bad frame ({}): {why}", code.name());
                        conn.close(quinn::VarInt::from(code as u16), b"bad frame");
                        ClientError::Protocol(message)
                    }
                });
            }
        };

        let pending: Pending = Arc::default();
        let fault: Fault = Arc::default();
        let (tx, rx) = mpsc::channel(cfg.delivery_buffer);
        tokio::spawn(read_answers(
            recv,
            pending.clone(),
            conn.clone(),
            fault.clone(),
        ));
        tokio::spawn(read_deliveries(conn.clone(), tx, fault.clone()));
        Ok((
            Self {
                conn,
                own_endpoint: None,
                control: Arc::new(tokio::sync::Mutex::new(send)),
                pending,
                next_request: Arc::new(AtomicU64::new(1)),
                timeout: cfg.request_timeout,
                fault,
                user_id,
                client_id,
                max_body_bytes,
                clock_offset_ms: server_time_ms as i64 - unix_ms() as i64,
            },
            rx,
        ))
    }

    /// Sends one request and waits for its answer.
    pub async fn request(&self, body: ClientBody) -> Result<ServerBody, ClientError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let frame = ClientFrame::new(id, body).encode();
        let written = self.control.lock().await.write_all(&frame).await;
        if written.is_err() {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(self.close_error());
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(ServerBody::Error {
                code: ErrorCode::RateLimited,
                message,
                retry_after_ms,
            })) => Err(ClientError::RateLimited {
                retry_after: Duration::from_millis(u64::from(retry_after_ms)),
                message,
            }),
            Ok(Ok(ServerBody::Error { code, message, .. })) => {
                Err(ClientError::refused(code, message))
            }
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(self.close_error()),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                Err(ClientError::Timeout(self.timeout))
            }
        }
    }

    fn close_error(&self) -> ClientError {
        if let Some(e) = self.fault.lock().expect("fault lock").clone() {
            return e;
        }
        match self.conn.close_reason() {
            Some(e) => closed(&e),
            None => ClientError::Closed {
                code: ErrorCode::Unspecified,
                reason: "control stream ended".into(),
            },
        }
    }

    pub async fn send(
        &self,
        conversation: u64,
        client_msg_id: u64,
        body: Bytes,
    ) -> Result<SendOk, ClientError> {
        match self
            .request(ClientBody::Send {
                conversation,
                client_msg_id,
                body,
            })
            .await?
        {
            ServerBody::SendOk {
                conversation,
                message_id,
                duplicate,
            } => Ok(SendOk {
                conversation,
                message_id,
                duplicate,
            }),
            other => Err(unexpected("SendOk", &other)),
        }
    }

    /// Acknowledges delivered messages: they leave this device's inbox.
    pub async fn ack(&self, message_ids: &[u64]) -> Result<u32, ClientError> {
        match self
            .request(ClientBody::Ack {
                message_ids: message_ids.to_vec(),
            })
            .await?
        {
            ServerBody::AckOk { removed } => Ok(removed),
            other => Err(unexpected("AckOk", &other)),
        }
    }

    /// A page of history, newest first: ids below `before` (0 = from the
    /// newest). Returns the page and whether older messages remain.
    pub async fn fetch(
        &self,
        conversation: u64,
        before: u64,
        limit: u32,
    ) -> Result<(Vec<Message>, bool), ClientError> {
        match self
            .request(ClientBody::Fetch {
                conversation,
                before,
                after: 0,
                limit,
            })
            .await?
        {
            ServerBody::Messages { messages, more, .. } => Ok((messages, more)),
            other => Err(unexpected("Messages", &other)),
        }
    }

    /// The messages of `conversation` with ids in `(after, newest]`, oldest
    /// first, read as history pages newest first: what a tier-3
    /// notification of `newest` stands for when the device has shown
    /// everything up to `after` (notifications coalesce).
    pub async fn pull_since(
        &self,
        conversation: u64,
        after: u64,
        newest: u64,
    ) -> Result<Vec<Message>, ClientError> {
        let mut got = Vec::new();
        let mut before = newest.saturating_add(1);
        loop {
            let (page, more) = self.fetch(conversation, before, 100).await?;
            let done = !more || page.is_empty() || page.iter().any(|m| m.id <= after);
            before = page.iter().map(|m| m.id).min().unwrap_or(before);
            got.extend(page.into_iter().filter(|m| m.id > after));
            if done {
                got.reverse();
                return Ok(got);
            }
        }
    }

    /// The body of one message by id: what a device does after a tier-3
    /// `Notify`. `None` if there is no such message.
    pub async fn pull(
        &self,
        conversation: u64,
        message_id: u64,
    ) -> Result<Option<Message>, ClientError> {
        match self
            .request(ClientBody::Fetch {
                conversation,
                before: message_id.saturating_add(1),
                after: message_id.saturating_sub(1),
                limit: 1,
            })
            .await?
        {
            ServerBody::Messages { messages, .. } => {
                Ok(messages.into_iter().find(|m| m.id == message_id))
            }
            other => Err(unexpected("Messages", &other)),
        }
    }

    /// Catches up on conversations from cursors (see `SyncEntry`); no
    /// cursors lists every conversation of the user with its latest and
    /// read ids.
    pub async fn sync(
        &self,
        cursors: &[Cursor],
        limit: u32,
    ) -> Result<Vec<SyncEntry>, ClientError> {
        match self
            .request(ClientBody::Sync {
                cursors: cursors.to_vec(),
                limit,
            })
            .await?
        {
            ServerBody::SyncResult { entries } => Ok(entries),
            other => Err(unexpected("SyncResult", &other)),
        }
    }

    /// Marks `conversation` read up to `message_id`: the user's other
    /// devices get a `ReadMarker`, and it is kept for their next sync.
    pub async fn read(&self, conversation: u64, message_id: u64) -> Result<(), ClientError> {
        match self
            .request(ClientBody::Read {
                conversation,
                message_id,
            })
            .await?
        {
            ServerBody::ReadOk { .. } => Ok(()),
            other => Err(unexpected("ReadOk", &other)),
        }
    }

    pub async fn ping(&self, nonce: u64) -> Result<(), ClientError> {
        match self.request(ClientBody::Ping { nonce }).await? {
            ServerBody::Pong { nonce: n } if n == nonce => Ok(()),
            other => Err(unexpected("Pong", &other)),
        }
    }

    /// Writes raw bytes on the control stream: for testing how an edge
    /// treats a misbehaving client.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut s = self.control.lock().await;
        s.write_all(bytes).await.map_err(|_| self.close_error())?;
        s.flush().await.map_err(|_| self.close_error())
    }

    /// Resolves when the connection is closed, with why.
    /// Why the connection ended: the edge's close code, or the fault this
    /// side found (a malformed or oversized frame from the edge).
    pub async fn closed(&self) -> ClientError {
        let e = self.conn.closed().await;
        self.fault
            .lock()
            .expect("fault lock")
            .clone()
            .unwrap_or_else(|| closed(&e))
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    /// Closes and waits (at most a second) until the edge has been told, so
    /// a short-lived process does not leave its connection to time out.
    pub async fn shutdown(self) {
        self.close();
        if let Some(endpoint) = &self.own_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

fn unexpected(want: &str, got: &ServerBody) -> ClientError {
    ClientError::Protocol(format!("expected {want}, got {got:?}"))
}

/// Why this side closed a connection, for [`Client::closed`].
type Fault = Arc<std::sync::Mutex<Option<ClientError>>>;

/// The next frame from the edge: `Ok(None)` when the stream or connection
/// ends, an error for a frame that is malformed or too large.
async fn read_server_frame(
    recv: &mut quinn::RecvStream,
) -> Result<Option<ServerFrame>, (ErrorCode, String)> {
    match read_frame(recv, MAX_FRAME_BYTES).await {
        Ok(Some(bytes)) => ServerFrame::decode(&bytes, MAX_FRAME_BYTES)
            .map(Some)
            .map_err(|e| (ErrorCode::MalformedFrame, e.to_string())),
        Ok(None) | Err(FrameError::Io(_)) => Ok(None),
        Err(e @ FrameError::TooLarge { .. }) => Err((ErrorCode::FrameTooLarge, e.to_string())),
        Err(e) => Err((ErrorCode::MalformedFrame, e.to_string())),
    }
}

/// A bad frame from the edge: close the connection with the code, so the
/// app hears of it (`Client::closed`, the deliveries channel ends) instead
/// of a reader stopping in silence.
fn fault(conn: &quinn::Connection, fault: &Fault, (code, why): (ErrorCode, String)) {
    let message = format!("the edge sent a bad frame ({}): {why}", code.name());
    tracing::warn!(%message, "closing the connection");
    fault
        .lock()
        .expect("fault lock")
        .get_or_insert(ClientError::Protocol(message.clone()));
    let reason = &message.as_bytes()[..message.len().min(200)];
    conn.close(quinn::VarInt::from(code as u16), reason);
}

/// Matches answers on the control stream to waiting requests. An Error with
/// request id 0 is connection-level: the edge closes next.
async fn read_answers(
    mut recv: quinn::RecvStream,
    pending: Pending,
    conn: quinn::Connection,
    faulted: Fault,
) {
    loop {
        let frame = match read_server_frame(&mut recv).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                fault(&conn, &faulted, e);
                break;
            }
        };
        if frame.request_id == 0 {
            if let ServerBody::Error { code, message, .. } = &frame.body {
                tracing::debug!(%code, %message, "edge is closing the connection");
            }
            continue;
        }
        let waiter = pending
            .lock()
            .expect("pending lock")
            .remove(&frame.request_id);
        if let Some(w) = waiter {
            let _ = w.send(frame.body);
        }
    }
    // Dropping the waiters fails their requests with the close reason.
    pending.lock().expect("pending lock").clear();
}

async fn read_deliveries(conn: quinn::Connection, tx: mpsc::Sender<Delivery>, faulted: Fault) {
    let Ok(mut stream) = conn.accept_uni().await else {
        return;
    };
    loop {
        let frame = match read_server_frame(&mut stream).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                fault(&conn, &faulted, e);
                return;
            }
        };
        let d = match frame.body {
            ServerBody::Message(m) => Delivery::Message(m),
            ServerBody::Notify {
                conversation,
                message_id,
            } => Delivery::Notify {
                conversation,
                message_id,
            },
            ServerBody::ReadMarker {
                user,
                conversation,
                message_id,
            } => Delivery::ReadMarker {
                user,
                conversation,
                message_id,
            },
            ServerBody::Drain {
                reconnect_after_ms,
                reason,
            } => Delivery::Drain {
                reconnect_after_ms,
                reason,
            },
            other => {
                tracing::warn!(?other, "unexpected frame on the delivery stream");
                continue;
            }
        };
        if tx.send(d).await.is_err() {
            return;
        }
    }
}

/// The device's wall clock, Unix milliseconds.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_turn_is_read_only_from_its_exact_form() {
        let turn = |r: &str| refusal_retry_after(r.as_bytes());
        assert_eq!(turn("retry-after-ms=0"), Some(Duration::ZERO));
        assert_eq!(
            turn("retry-after-ms=59999"),
            Some(Duration::from_millis(59_999))
        );
        // Anything else is a refusal without a turn: the shed backoff.
        for bad in [
            "",
            "retry-after-ms=",
            "retry-after-ms=-5",
            "retry-after-ms=1.5",
            "retry-after-ms=12 ms",
            "retry-after-ms=1234567890",
            "Retry-After-Ms=10",
            " retry-after-ms=10",
            "edge full; try another edge",
        ] {
            assert_eq!(turn(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn quics_refusal_is_unavailable_with_the_edges_turn_if_it_gave_one() {
        let refused = |reason: &'static [u8]| {
            closed(&quinn::ConnectionError::ConnectionClosed(
                quinn::ConnectionClose {
                    error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
                    frame_type: None,
                    reason: bytes::Bytes::from_static(reason),
                },
            ))
        };
        assert_eq!(
            refused(b"retry-after-ms=250"),
            ClientError::Refused {
                code: ErrorCode::Unavailable,
                message: REFUSED.into(),
                retry_after: Some(Duration::from_millis(250)),
            }
        );
        let bare = refused(b"");
        assert_eq!(bare.code(), Some(ErrorCode::Unavailable));
        assert!(matches!(
            bare,
            ClientError::Refused {
                retry_after: None,
                ..
            }
        ));
    }
}
