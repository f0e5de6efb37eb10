//! One client connection: the Hello handshake, the request loop on the
//! control stream, and the writer of the delivery stream.
//!
//! Connection-level errors (a bad token, a malformed or oversized frame, a
//! fourth device) are answered with an `Error` frame, then the connection is
//! closed with the same code as the QUIC application close code. Request-level
//! errors (not a member, unknown conversation, body too large) fail the one
//! request and the connection goes on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tiercast_engine::auth::AuthError;
use tiercast_engine::backplane::user_channel;
use tiercast_engine::store::Device;
use tiercast_engine::{EngineError, Outgoing, Sender};
use tiercast_schemas::envelope::{Envelope, Payload};
use tiercast_schemas::framing::{FrameError, read_frame};
use tiercast_schemas::wire::{ClientBody, ClientFrame, ErrorCode, ServerBody, ServerFrame};
use tokio::sync::mpsc;

use crate::limits::{ConnLimits, Kind};
use crate::server::Shared;
use crate::sessions::{Coalesced, LocalConn};

/// The protocol version this edge speaks (defined once, in the schemas).
pub use tiercast_schemas::PROTOCOL_VERSION;

/// Why a connection ends.
#[derive(Debug)]
enum End {
    /// The peer went away or closed cleanly.
    Gone,
    /// A connection-level error: tell the peer, then close.
    Fatal(ErrorCode, String),
}

impl End {
    fn fatal(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self::Fatal(code, msg.into())
    }
}

struct Peer {
    user: u64,
    client_id: u64,
    /// When the token ends (Unix seconds): the connection ends then.
    expires_unix: u64,
    /// The token's `convs` claim: the only conversations it may send to.
    convs: Option<Vec<u64>>,
}

impl Peer {
    fn device(&self) -> Device {
        Device {
            user: self.user,
            client: self.client_id,
        }
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    handshake: tokio::sync::OwnedSemaphorePermit,
    permits: Arc<tokio::sync::Semaphore>,
) {
    shared.metrics.handshakes_in_flight.inc();
    let connecting =
        tokio::time::timeout(Duration::from_millis(shared.cfg.hello_timeout_ms), incoming).await;
    shared.metrics.handshakes_in_flight.dec();
    drop(handshake);
    let conn = match connecting {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake not done in time");
            return;
        }
    };
    // A connection slot only once the handshake is done.
    let Ok(_slot) = permits.try_acquire_owned() else {
        shared.metrics.handshakes_refused.inc();
        shared.metrics.error(ErrorCode::Unavailable);
        close(&conn, ErrorCode::Unavailable, "edge full; try another edge");
        return;
    };
    let (mut send, mut recv) = match tokio::time::timeout(
        Duration::from_millis(shared.cfg.hello_timeout_ms),
        conn.accept_bi(),
    )
    .await
    {
        Ok(Ok(streams)) => streams,
        Ok(Err(_)) => return,
        Err(_) => {
            close(
                &conn,
                ErrorCode::ProtocolViolation,
                "no control stream in time",
            );
            return;
        }
    };
    shared.metrics.connections.inc();
    let end = match hello(&shared, &conn, &mut recv).await {
        Ok(peer) => run(&shared, &conn, &mut send, &mut recv, peer).await,
        Err(end) => end,
    };
    shared.metrics.connections.dec();
    if let End::Fatal(code, msg) = end {
        shared.metrics.error(code);
        tracing::debug!(%code, %msg, "closing connection");
        let frame = ServerFrame::error(0, code, msg.clone()).encode();
        if send.write_all(&frame).await.is_ok() && send.finish().is_ok() {
            // Give the error frame a moment to be acknowledged; the close
            // below carries the code either way.
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
        }
        close(&conn, code, &msg);
    }
}

fn close(conn: &quinn::Connection, code: ErrorCode, msg: &str) {
    let reason = &msg.as_bytes()[..msg.len().min(200)];
    conn.close(quinn::VarInt::from(code as u16), reason);
}

async fn next_request(
    shared: &Shared,
    recv: &mut quinn::RecvStream,
) -> Result<Option<ClientFrame>, End> {
    let max = shared.cfg.max_frame_bytes;
    match read_frame(recv, max).await {
        Ok(Some(bytes)) => ClientFrame::decode(&bytes, max)
            .map(Some)
            .map_err(|e| End::fatal(ErrorCode::MalformedFrame, format!("malformed frame: {e}"))),
        Ok(None) => Ok(None),
        Err(e @ FrameError::TooLarge { .. }) => {
            Err(End::fatal(ErrorCode::FrameTooLarge, e.to_string()))
        }
        Err(e @ (FrameError::Empty | FrameError::Truncated)) => {
            Err(End::fatal(ErrorCode::MalformedFrame, e.to_string()))
        }
        Err(FrameError::Io(_)) => Err(End::Gone),
    }
}

async fn hello(
    shared: &Shared,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
) -> Result<Peer, End> {
    let first = tokio::time::timeout(
        Duration::from_millis(shared.cfg.hello_timeout_ms),
        next_request(shared, recv),
    )
    .await
    .map_err(|_| End::fatal(ErrorCode::ProtocolViolation, "no Hello in time"))??;
    let Some(ClientFrame {
        body:
            ClientBody::Hello {
                token,
                client_id,
                device,
                protocol_version,
            },
        ..
    }) = first
    else {
        return Err(End::fatal(
            ErrorCode::ProtocolViolation,
            "the first frame must be Hello",
        ));
    };
    if protocol_version != PROTOCOL_VERSION {
        return Err(End::fatal(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {protocol_version} is not supported (this edge speaks {PROTOCOL_VERSION})"
            ),
        ));
    }
    let identity = shared.keys.verify_user(&token).map_err(|e| match e {
        AuthError::Expired => End::fatal(ErrorCode::TokenExpired, "token expired"),
        e => End::fatal(ErrorCode::Unauthenticated, e.to_string()),
    })?;
    if device.len() > 128 {
        return Err(End::fatal(
            ErrorCode::ProtocolViolation,
            "device name over 128 bytes",
        ));
    }
    // A device id is issued (Hello without one) or must be the user's own.
    let client_id = match shared
        .engine
        .register_device(identity.user, client_id, &device)
        .await
    {
        Ok(id) => id,
        Err(e @ (EngineError::TooManyDevices { .. } | EngineError::UnknownDevice(_))) => {
            return Err(End::fatal(e.code(), e.to_string()));
        }
        Err(e @ EngineError::Invalid(_)) => {
            return Err(End::fatal(ErrorCode::ProtocolViolation, e.to_string()));
        }
        Err(e) => return Err(End::fatal(ErrorCode::Unavailable, e.to_string())),
    };
    tracing::debug!(user = identity.user, client_id, remote = %conn.remote_address(), "hello");
    Ok(Peer {
        user: identity.user,
        client_id,
        expires_unix: identity.expires_unix,
        convs: identity.convs,
    })
}

async fn run(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    peer: Peer,
) -> End {
    let conn_id = shared.next_conn_id();
    let (tx, rx) = mpsc::channel::<Bytes>(shared.cfg.outbound_queue);
    let coalesced = Arc::new(Coalesced::default());
    let (start_drain, drain_signal) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(write_deliveries(
        shared.clone(),
        conn.clone(),
        peer.device(),
        rx,
        coalesced.clone(),
        drain_signal,
    ));

    // Subscribe before reading the inbox: a message stored meanwhile reaches
    // the writer live or from the inbox (or both, and then it is sent once:
    // see `Seam`), never neither.
    if let Err(e) = attach(shared, &peer, conn_id, tx, coalesced, conn.clone()).await {
        writer.abort();
        return End::fatal(ErrorCode::Unavailable, e);
    }
    shared.metrics.handshakes.inc();
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
    );
    let end = match send.write_all(&welcome.encode()).await {
        Ok(()) => {
            // Welcome is out: the writer may send the inbox now.
            let _ = start_drain.send(());
            // The connection lives as long as its token: then it ends with
            // `token_expired` and the client reconnects with a fresh one.
            let expiry = std::time::UNIX_EPOCH + Duration::from_secs(peer.expires_unix);
            let left = expiry
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                end = request_loop(shared, send, recv, &peer) => end,
                () = tokio::time::sleep(left) => End::fatal(ErrorCode::TokenExpired, "token expired; reconnect with a fresh one"),
            }
        }
        Err(_) => End::Gone,
    };
    detach(shared, &peer, conn_id).await;
    writer.abort();
    // Last seen: now (the reaper counts the TTL from here).
    if let Err(e) = shared
        .engine
        .touch_devices(&[(peer.user, peer.client_id)])
        .await
    {
        tracing::debug!(error = %e, "last-seen not refreshed at disconnect");
    }
    end
}

async fn attach(
    shared: &Shared,
    peer: &Peer,
    conn_id: u64,
    tx: mpsc::Sender<Bytes>,
    coalesced: Arc<Coalesced>,
    conn: quinn::Connection,
) -> Result<(), String> {
    let since_ms = tiercast_engine::snowflake::now_unix_ms();
    subscribe(shared, peer, conn_id, since_ms, tx, coalesced, conn).await?;
    // Across edges: any older connection of this device elsewhere closes.
    let announcement = Envelope {
        origin_node: shared.edge_id(),
        payload: Payload::DeviceConnected {
            user: peer.user,
            client_id: peer.client_id,
            since_ms,
            edge: shared.edge_id(),
            conn_id,
        },
    }
    .encode();
    if let Err(e) = shared
        .engine
        .backplane()
        .publish(&user_channel(peer.user), announcement)
        .await
    {
        tracing::warn!(user = peer.user, error = %e, "device connection not announced to other edges");
    }
    Ok(())
}

async fn subscribe(
    shared: &Shared,
    peer: &Peer,
    conn_id: u64,
    since_ms: u64,
    tx: mpsc::Sender<Bytes>,
    coalesced: Arc<Coalesced>,
    conn: quinn::Connection,
) -> Result<(), String> {
    let _guard = shared.subscription_lock(peer.user).lock().await;
    let (first, replaced) = shared.sessions.insert_replacing(
        peer.user,
        LocalConn {
            conn_id,
            client_id: peer.client_id,
            since_ms,
            tx,
            coalesced,
            handle: conn,
        },
    );
    // One live connection per device: the newer wins.
    for old in replaced {
        shared.metrics.error(ErrorCode::ConnectionReplaced);
        old.close(
            quinn::VarInt::from(ErrorCode::ConnectionReplaced as u16),
            b"a newer connection of this device took over",
        );
    }
    if !first {
        return Ok(());
    }
    if let Err(e) = shared.subscriber.subscribe(&user_channel(peer.user)).await {
        shared.sessions.remove(peer.user, conn_id);
        return Err(format!("cannot subscribe: {e}"));
    }
    // Index the user's conversations and announce this edge for them, so
    // tier 2/3 traffic for them reaches it.
    let convs = match shared.engine.store().conversations_of(peer.user).await {
        Ok(c) => c,
        Err(e) => {
            shared.sessions.remove(peer.user, conn_id);
            let _ = shared
                .subscriber
                .unsubscribe(&user_channel(peer.user))
                .await;
            return Err(format!("cannot read conversations: {e}"));
        }
    };
    for c in shared.conversations.set_user(peer.user, &convs) {
        shared.sync_route(c).await;
    }
    Ok(())
}

async fn detach(shared: &Shared, peer: &Peer, conn_id: u64) {
    let _guard = shared.subscription_lock(peer.user).lock().await;
    if !shared.sessions.remove(peer.user, conn_id) {
        return;
    }
    if let Err(e) = shared
        .subscriber
        .unsubscribe(&user_channel(peer.user))
        .await
    {
        tracing::warn!(user = peer.user, error = %e, "unsubscribe failed");
    }
    // The user's last connection here: forget their conversations (the
    // next connect reads them afresh) and leave the routes no one needs.
    for c in shared.conversations.remove_user(peer.user) {
        shared.sync_route(c).await;
    }
}

/// One inbox page read in flight.
type PageRead = std::pin::Pin<
    Box<dyn std::future::Future<Output = Vec<tiercast_schemas::wire::Message>> + Send>,
>;

/// Where a connection's inbox drain stands.
#[derive(Clone, Copy)]
enum Drain {
    /// Not before Welcome.
    Waiting,
    /// Next page: pending ids above this one.
    From(u64),
    Done,
}

/// How long after the inbox drain ends the writer still remembers what it
/// sent: a live copy of a message the drain already sent can trail it by
/// the publish latency.
const SEAM_GRACE: Duration = Duration::from_secs(5);
/// Ids remembered at most (a device back with a huge inbox): past this the
/// device's own dedupe is all there is.
const SEAM_MAX_IDS: usize = 65_536;

/// The ids a connection's writer sent while its inbox drained and for
/// [`SEAM_GRACE`] after. A message stored during the handshake reaches the
/// writer twice, live and in an inbox page; it goes out once. Costs a frame
/// decode per live frame during that window only.
#[derive(Default)]
struct Seam {
    ids: std::collections::HashSet<u64>,
    /// When the drain ended.
    done_at: Option<tokio::time::Instant>,
    active: bool,
}

impl Seam {
    fn new() -> Self {
        Self {
            active: true,
            ..Self::default()
        }
    }

    /// The drain has ended (or will not run): start the grace period.
    fn drain_done(&mut self) {
        self.done_at.get_or_insert_with(tokio::time::Instant::now);
    }

    /// When the remembered ids can go (so an idle connection does not keep
    /// them until its next frame).
    fn expires_at(&self) -> Option<tokio::time::Instant> {
        self.done_at.filter(|_| self.active).map(|t| t + SEAM_GRACE)
    }

    fn watching(&mut self) -> bool {
        if self.active && self.done_at.is_some_and(|t| t.elapsed() >= SEAM_GRACE) {
            self.active = false;
            self.ids = Default::default();
        }
        self.active
    }

    /// False if `id` went out on this connection already.
    fn first(&mut self, id: u64) -> bool {
        if !self.watching() {
            return true;
        }
        if self.ids.len() >= SEAM_MAX_IDS {
            return !self.ids.contains(&id);
        }
        self.ids.insert(id)
    }

    /// False for a live message frame that went out already.
    fn first_frame(&mut self, frame: &Bytes) -> bool {
        if !self.watching() {
            return true;
        }
        match ServerFrame::decode(frame, tiercast_schemas::MAX_FRAME_BYTES) {
            Ok(ServerFrame {
                body: ServerBody::Message(m),
                ..
            }) => self.first(m.id),
            _ => true,
        }
    }
}

/// The connection's writer: queued deliveries (live fan-out), the device's
/// pending inbox (oldest first, page by page, once Welcome is out), and the
/// tier-3 notifications coalesced while the queue was full, all on one
/// server-opened stream (opened on the first frame). Live frames go first;
/// the inbox fills the gaps. Draining here rather than through the queue
/// keeps a large inbox from filling the queue and making the device look
/// like a slow consumer. Inbox entries stay pending until the device acks.
async fn write_deliveries(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    device: Device,
    mut rx: mpsc::Receiver<Bytes>,
    coalesced: Arc<Coalesced>,
    mut drain_signal: tokio::sync::oneshot::Receiver<()>,
) {
    let mut stream: Option<quinn::SendStream> = None;
    let mut drain = Drain::Waiting;
    // The inbox page being read, kept across live frames so a busy
    // connection does not restart (and repeat) the read each time.
    let mut page_read: Option<PageRead> = None;
    let mut seam = Seam::new();
    loop {
        if matches!(drain, Drain::Done) {
            seam.drain_done();
        }
        if let (Drain::From(after), None) = (drain, &page_read) {
            let engine = shared.engine.clone();
            page_read = Some(Box::pin(async move {
                // A store that fails for a while (a failover) delays the
                // drain, it does not end it: retried for as long as the
                // connection lives, live frames flowing meanwhile.
                let mut backoff = Duration::from_millis(100);
                loop {
                    match engine.pending(device, after).await {
                        Ok(page) => return page,
                        Err(e) => {
                            tracing::warn!(client_id = device.client, error = %e, ?backoff, "inbox read failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }));
        }
        let seam_expiry = seam.expires_at();
        let frames: Vec<Bytes> = tokio::select! {
            biased;
            frame = rx.recv() => match frame {
                Some(f) if seam.first_frame(&f) => vec![f],
                Some(_) => {
                    shared.metrics.seam_duplicates.inc();
                    continue;
                }
                None => return,
            },
            () = coalesced.wake.notified() => coalesced
                .take()
                .into_iter()
                .map(|(c, id)| crate::server::notify_frame(c, id))
                .collect(),
            () = tokio::time::sleep_until(seam_expiry.unwrap_or_else(tokio::time::Instant::now)), if seam_expiry.is_some() => {
                seam.watching();
                continue;
            }
            started = &mut drain_signal, if matches!(drain, Drain::Waiting) => {
                drain = if started.is_ok() { Drain::From(0) } else { Drain::Done };
                continue;
            }
            page = async { page_read.as_mut().expect("guarded").await }, if page_read.is_some() => {
                page_read = None;
                drain = page.last().map_or(Drain::Done, |m| Drain::From(m.id));
                let total = page.len();
                let frames: Vec<Bytes> = page
                    .into_iter()
                    .filter(|m| seam.first(m.id))
                    .map(|m| ServerFrame::new(0, ServerBody::Message(m)).encode())
                    .collect();
                shared.metrics.deliveries.inc_by(frames.len() as u64);
                shared.metrics.seam_duplicates.inc_by((total - frames.len()) as u64);
                frames
            }
        };
        let s = match &mut stream {
            Some(s) => s,
            None => match conn.open_uni().await {
                Ok(s) => stream.insert(s),
                Err(_) => return,
            },
        };
        for frame in frames {
            if s.write_all(&frame).await.is_err() {
                return;
            }
        }
    }
}

async fn request_loop(
    shared: &Shared,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    peer: &Peer,
) -> End {
    let limits = ConnLimits::new(&shared.cfg.rates);
    loop {
        let frame = match next_request(shared, recv).await {
            Ok(Some(f)) => f,
            Ok(None) => return End::Gone,
            Err(end) => return end,
        };
        let id = frame.request_id;
        let reply = match limit(shared, &limits, peer, &frame.body) {
            Err(wait) => {
                shared.metrics.error(ErrorCode::RateLimited);
                let ms = u32::try_from(wait.as_millis().max(1)).unwrap_or(u32::MAX);
                ServerFrame::rate_limited(id, ms, format!("too many requests; retry after {ms} ms"))
            }
            Ok(()) => match handle(shared, peer, frame.body).await {
                Ok(body) => ServerFrame::new(id, body),
                Err(Reply::Fatal(end)) => return end,
                Err(Reply::Refused(code, msg)) => {
                    shared.metrics.error(code);
                    ServerFrame::error(id, code, msg)
                }
            },
        };
        if send.write_all(&reply.encode()).await.is_err() {
            return End::Gone;
        }
    }
}

/// Charges a request to the connection's and the user's bucket of its kind.
fn limit(
    shared: &Shared,
    limits: &ConnLimits,
    peer: &Peer,
    body: &ClientBody,
) -> Result<(), Duration> {
    let kind = match body {
        ClientBody::Send { .. } => Kind::Send,
        ClientBody::Fetch { .. } => Kind::Fetch,
        ClientBody::Sync { .. } => Kind::Sync,
        ClientBody::Read { .. } => Kind::Read,
        ClientBody::Hello { .. } | ClientBody::Ack { .. } | ClientBody::Ping { .. } => {
            return Ok(());
        }
    };
    limits.check(&shared.user_limits, peer.user, kind)
}

enum Reply {
    Refused(ErrorCode, String),
    Fatal(End),
}

impl From<EngineError> for Reply {
    fn from(e: EngineError) -> Self {
        Reply::Refused(e.code(), e.to_string())
    }
}

async fn handle(shared: &Shared, peer: &Peer, body: ClientBody) -> Result<ServerBody, Reply> {
    let engine = &shared.engine;
    match body {
        ClientBody::Hello { .. } => Err(Reply::Fatal(End::fatal(
            ErrorCode::ProtocolViolation,
            "Hello was already said",
        ))),
        ClientBody::Send {
            conversation,
            client_msg_id,
            body,
        } => {
            if !tiercast_engine::auth::convs_allow(peer.convs.as_deref(), conversation) {
                return Err(Reply::Refused(
                    ErrorCode::Forbidden,
                    format!("this token may not send to conversation {conversation} (convs claim)"),
                ));
            }
            let receipt = engine
                .send(Outgoing {
                    conversation,
                    from: Sender::Device {
                        user: peer.user,
                        client: peer.client_id,
                    },
                    client_msg_id,
                    body,
                })
                .await?;
            Ok(ServerBody::SendOk {
                conversation,
                message_id: receipt.message_id,
                duplicate: receipt.duplicate,
            })
        }
        ClientBody::Ack { message_ids } => Ok(ServerBody::AckOk {
            removed: engine.ack(peer.device(), &message_ids).await?,
        }),
        // One id exactly (`after` = id - 1, `before` = id + 1): the pull of a
        // tier-3 body, served through the edge's single-flight cache. The
        // membership is the store's (one point read): the edge's index can
        // trail a removal by the announcement's latency.
        ClientBody::Fetch {
            conversation,
            before,
            after,
            ..
        } if before == after.wrapping_add(2) => {
            engine.check_member(conversation, peer.user).await?;
            let m = shared
                .pull(conversation, after + 1)
                .await
                .map_err(|e| Reply::Refused(ErrorCode::Unavailable, e))?;
            Ok(ServerBody::Messages {
                conversation,
                messages: m.into_iter().collect(),
                more: false,
            })
        }
        ClientBody::Fetch {
            conversation,
            before,
            after,
            limit,
        } => {
            let (messages, more) = engine
                .fetch(peer.user, conversation, before, after, limit)
                .await?;
            Ok(ServerBody::Messages {
                conversation,
                messages,
                more,
            })
        }
        ClientBody::Ping { nonce } => Ok(ServerBody::Pong { nonce }),
        ClientBody::Sync { cursors, limit } => {
            shared.metrics.syncs.inc();
            Ok(ServerBody::SyncResult {
                entries: engine.sync(peer.user, &cursors, limit).await?,
            })
        }
        ClientBody::Read {
            conversation,
            message_id,
        } => {
            engine
                .read(peer.user, peer.client_id, conversation, message_id)
                .await?;
            shared.metrics.reads.inc();
            Ok(ServerBody::ReadOk {
                conversation,
                message_id,
            })
        }
    }
}
