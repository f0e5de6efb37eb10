//! What a client connection asks of the edge, apart from its I/O (which
//! is the shard's, `crate::core`): the Hello (token, version, device), the
//! attach and detach of a device (the user's channel, conversations and
//! routes), the requests on the control stream, and the seam between the
//! inbox drain and live traffic.
//!
//! Connection-level errors (a bad token, a malformed or oversized frame, a
//! fourth device) are answered with an `Error` frame, then the connection is
//! closed with the same code as the QUIC application close code. Request-level
//! errors (not a member, unknown conversation, body too large) fail the one
//! request and the connection goes on.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tiercast_engine::auth::AuthError;
use tiercast_engine::backplane::user_channel;
use tiercast_engine::store::Device;
use tiercast_engine::{EngineError, Outgoing, Sender};
use tiercast_schemas::envelope::{Envelope, Payload};
use tiercast_schemas::wire::{ClientBody, ClientFrame, ErrorCode, ServerBody, ServerFrame};

use crate::core::ConnRef;
use crate::limits::{ConnLimits, Kind};
use crate::server::Shared;
use crate::sessions::LocalConn;

/// The protocol version this edge speaks (defined once, in the schemas).
pub use tiercast_schemas::PROTOCOL_VERSION;

/// Why a connection ends.
#[derive(Debug)]
pub(crate) enum End {
    /// A connection-level error: tell the peer, then close.
    Fatal(ErrorCode, String),
}

impl End {
    pub(crate) fn fatal(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self::Fatal(code, msg.into())
    }
}

#[derive(Debug)]
pub(crate) struct Peer {
    pub user: u64,
    pub client_id: u64,
    /// When the token ends (Unix seconds): the connection ends then.
    pub expires_unix: u64,
    /// The token's `convs` claim: the only conversations it may send to.
    pub convs: Option<Vec<u64>>,
}

impl Peer {
    pub(crate) fn device(&self) -> Device {
        Device {
            user: self.user,
            client: self.client_id,
        }
    }
}

/// The Hello: the version, the token, the device (registered, or issued
/// an id). `first` is the connection's first frame.
pub(crate) async fn hello(shared: &Shared, first: ClientFrame) -> Result<Peer, End> {
    let ClientFrame {
        body:
            ClientBody::Hello {
                token,
                client_id,
                device,
                protocol_version,
            },
        ..
    } = first
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
    tracing::debug!(user = identity.user, client_id, "hello");
    Ok(Peer {
        user: identity.user,
        client_id,
        expires_unix: identity.expires_unix,
        convs: identity.convs,
    })
}

/// Makes the device reachable here: in the edge's table (replacing an
/// older connection of the same device), the user's channel subscribed,
/// their conversations indexed and routed, and the connection announced to
/// the other edges. The shard has the connection in its own index already
/// (see `crate::core::Cmd::Registered`), so nothing published from here on
/// misses it.
pub(crate) async fn attach(shared: &Shared, peer: &Peer, conn: ConnRef) -> Result<(), String> {
    let since_ms = tiercast_engine::snowflake::now_unix_ms();
    let conn_id = conn.conn_id;
    subscribe(shared, peer, since_ms, conn).await?;
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
    since_ms: u64,
    conn: ConnRef,
) -> Result<(), String> {
    let conn_id = conn.conn_id;
    let _guard = shared.subscription_lock(peer.user).lock().await;
    let (first, replaced) = shared.sessions.insert_replacing(
        peer.user,
        LocalConn {
            conn_id,
            client_id: peer.client_id,
            since_ms,
            handle: conn,
        },
    );
    // One live connection per device: the newer wins.
    for old in replaced {
        shared.metrics.error(ErrorCode::ConnectionReplaced);
        old.close(
            ErrorCode::ConnectionReplaced,
            "a newer connection of this device took over",
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
    let convs = match shared.engine.conversations_of(peer.user).await {
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

/// Undoes [`attach`] when the connection ends; the user's last connection
/// here also leaves their channel and routes. Then the device's last-seen
/// time is now (the reaper counts its TTL from here).
pub(crate) async fn detach(shared: &Shared, peer: &Peer, conn_id: u64) {
    unattach(shared, peer, conn_id).await;
    if let Err(e) = shared
        .engine
        .touch_devices(&[(peer.user, peer.client_id)])
        .await
    {
        tracing::debug!(error = %e, "last-seen not refreshed at disconnect");
    }
}

async fn unattach(shared: &Shared, peer: &Peer, conn_id: u64) {
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

/// How long after the inbox drain ends the writer still remembers what it
/// sent: a live copy of a message the drain already sent can trail it by
/// the publish latency.
const SEAM_GRACE: Duration = Duration::from_secs(5);
/// Ids remembered at most (a device back with a huge inbox): past this the
/// device's own dedupe is all there is.
const SEAM_MAX_IDS: usize = 65_536;

/// The ids a connection's writer sent while its inbox drained and for
/// [`SEAM_GRACE`] after. A message stored during the handshake reaches the
/// writer twice, live and in an inbox page; it goes out once. Live frames
/// carry their message id beside them, so this is a set lookup, no decode.
#[derive(Debug, Default)]
pub(crate) struct Seam {
    ids: std::collections::HashSet<u64>,
    /// When the drain ended.
    done_at: Option<Instant>,
    active: bool,
}

impl Seam {
    pub(crate) fn new() -> Self {
        Self {
            active: true,
            ..Self::default()
        }
    }

    /// The drain has ended (or will not run): start the grace period.
    pub(crate) fn drain_done(&mut self) {
        self.done_at.get_or_insert_with(Instant::now);
    }

    /// When the remembered ids can go (so an idle connection does not keep
    /// them until its next frame).
    pub(crate) fn expires_at(&self) -> Option<Instant> {
        self.done_at.filter(|_| self.active).map(|t| t + SEAM_GRACE)
    }

    pub(crate) fn watching(&mut self) -> bool {
        if self.active && self.done_at.is_some_and(|t| t.elapsed() >= SEAM_GRACE) {
            self.active = false;
            self.ids = Default::default();
        }
        self.active
    }

    /// False if `id` went out on this connection already.
    pub(crate) fn first(&mut self, id: u64) -> bool {
        if !self.watching() {
            return true;
        }
        if self.ids.len() >= SEAM_MAX_IDS {
            return !self.ids.contains(&id);
        }
        self.ids.insert(id)
    }
}

/// Charges a request to the connection's and the user's bucket of its kind.
pub(crate) fn limit(
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

pub(crate) enum Reply {
    Refused(ErrorCode, String),
    Fatal(End),
}

impl From<EngineError> for Reply {
    fn from(e: EngineError) -> Self {
        Reply::Refused(e.code(), e.to_string())
    }
}

pub(crate) async fn handle(
    shared: &Shared,
    peer: &Peer,
    body: ClientBody,
) -> Result<ServerBody, Reply> {
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

/// Answers one request (already charged to its limits): the reply frame,
/// or the end of the connection.
pub(crate) async fn answer(shared: &Shared, peer: &Peer, frame: ClientFrame) -> Result<Bytes, End> {
    let id = frame.request_id;
    let started = std::time::Instant::now();
    let reply = handle(shared, peer, frame.body).await;
    shared
        .metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    match reply {
        Ok(body) => Ok(ServerFrame::new(id, body).encode()),
        Err(Reply::Fatal(end)) => Err(end),
        Err(Reply::Refused(code, msg)) => {
            shared.metrics.error(code);
            Ok(ServerFrame::error(id, code, msg).encode())
        }
    }
}
