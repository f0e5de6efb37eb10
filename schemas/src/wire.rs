//! The client protocol as owned Rust types, with encoding to and verified
//! decoding from FlatBuffers frames.
//!
//! A client sends [`ClientFrame`]s on its control stream; the edge answers
//! with [`ServerFrame`]s on the same stream and pushes deliveries
//! ([`ServerBody::Message`], `Notify`, `ReadMarker`, `Drain`) on a stream of
//! its own. Byte fields ([`Message::body`]) share the frame's buffer: decoding
//! copies no body.

use bytes::Bytes;
use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::framing::{DecodeError, verifier_options};
use crate::generated::tiercast::proto as fb;

/// The error codes of the protocol (docs/protocol.md has the table). The
/// numbers are the wire values and the QUIC application close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    Unspecified = 0,
    MalformedFrame = 1,
    FrameTooLarge = 2,
    ProtocolViolation = 3,
    Unauthenticated = 4,
    TokenExpired = 5,
    TooManyDevices = 6,
    SlowConsumer = 7,
    Draining = 8,
    UnsupportedVersion = 9,
    UnknownDevice = 10,
    ConnectionReplaced = 11,
    Forbidden = 20,
    UnknownConversation = 21,
    BodyTooLarge = 22,
    RateLimited = 23,
    InvalidRequest = 24,
    Unavailable = 25,
    Internal = 26,
    NotPending = 27,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        Self::Unspecified,
        Self::MalformedFrame,
        Self::FrameTooLarge,
        Self::ProtocolViolation,
        Self::Unauthenticated,
        Self::TokenExpired,
        Self::TooManyDevices,
        Self::SlowConsumer,
        Self::Draining,
        Self::UnsupportedVersion,
        Self::UnknownDevice,
        Self::ConnectionReplaced,
        Self::Forbidden,
        Self::UnknownConversation,
        Self::BodyTooLarge,
        Self::RateLimited,
        Self::InvalidRequest,
        Self::Unavailable,
        Self::Internal,
        Self::NotPending,
    ];

    pub fn from_u16(v: u16) -> Self {
        Self::ALL
            .into_iter()
            .find(|c| *c as u16 == v)
            .unwrap_or(Self::Unspecified)
    }

    /// Connection-level codes: the edge closes the connection after sending
    /// the error. Request-level codes fail one request only.
    pub fn closes_connection(self) -> bool {
        (self as u16) < 20
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::MalformedFrame => "malformed_frame",
            Self::FrameTooLarge => "frame_too_large",
            Self::ProtocolViolation => "protocol_violation",
            Self::Unauthenticated => "unauthenticated",
            Self::TokenExpired => "token_expired",
            Self::TooManyDevices => "too_many_devices",
            Self::SlowConsumer => "slow_consumer",
            Self::Draining => "draining",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownDevice => "unknown_device",
            Self::ConnectionReplaced => "connection_replaced",
            Self::Forbidden => "forbidden",
            Self::UnknownConversation => "unknown_conversation",
            Self::BodyTooLarge => "body_too_large",
            Self::RateLimited => "rate_limited",
            Self::InvalidRequest => "invalid_request",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::NotPending => "not_pending",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

/// One stored message as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    pub conversation: u64,
    pub sender: u64,
    pub sender_client: u64,
    pub body: Bytes,
}

/// One conversation's state in a [`ServerBody::SyncResult`]; see
/// `SyncEntry` in `schemas/fbs/protocol.fbs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEntry {
    pub conversation: u64,
    /// 0: not a member (or no such conversation).
    pub tier: u8,
    /// Tiers 1 and 2: messages after the cursor, oldest first.
    pub messages: Vec<Message>,
    pub latest_id: u64,
    /// The newest message the user has read (0 = none).
    pub read_id: u64,
    pub more: bool,
}

/// A per-conversation position: the last message id a device has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub conversation: u64,
    pub last_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBody {
    Hello {
        token: String,
        client_id: u64,
        device: String,
        protocol_version: u16,
    },
    Send {
        conversation: u64,
        client_msg_id: u64,
        body: Bytes,
    },
    Ack {
        message_ids: Vec<u64>,
    },
    Fetch {
        conversation: u64,
        before: u64,
        after: u64,
        limit: u32,
    },
    Ping {
        nonce: u64,
    },
    Sync {
        cursors: Vec<Cursor>,
        limit: u32,
    },
    Read {
        conversation: u64,
        message_id: u64,
    },
}

/// A frame from a client. `request_id` is non-zero on requests that expect an
/// answer; the answer carries the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    pub request_id: u64,
    pub body: ClientBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerBody {
    Welcome {
        user_id: u64,
        client_id: u64,
        node_id: u16,
        server_time_ms: u64,
        max_frame_bytes: u32,
        max_body_bytes: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// `rate_limited`: when to ask again (0: not said).
        retry_after_ms: u32,
    },
    SendOk {
        conversation: u64,
        message_id: u64,
        duplicate: bool,
    },
    Message(Message),
    AckOk {
        removed: u32,
    },
    Messages {
        conversation: u64,
        messages: Vec<Message>,
        more: bool,
    },
    Pong {
        nonce: u64,
    },
    SyncResult {
        entries: Vec<SyncEntry>,
    },
    ReadOk {
        conversation: u64,
        message_id: u64,
    },
    ReadMarker {
        user: u64,
        conversation: u64,
        message_id: u64,
    },
    Notify {
        conversation: u64,
        message_id: u64,
    },
    Drain {
        reconnect_after_ms: u32,
        reason: String,
    },
}

/// A frame from the edge: an answer (`request_id` of its request) or a
/// delivery (`request_id` 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub request_id: u64,
    pub body: ServerBody,
}

pub(crate) fn build_message<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    m: &Message,
) -> WIPOffset<fb::Message<'a>> {
    let body = fbb.create_vector(&m.body);
    fb::Message::create(
        fbb,
        &fb::MessageArgs {
            id: m.id,
            conversation: m.conversation,
            sender: m.sender,
            sender_client: m.sender_client,
            body: Some(body),
        },
    )
}

/// The body bytes of `v` as a slice of `src` (no copy).
fn share(src: &Bytes, v: Option<flatbuffers::Vector<'_, u8>>) -> Bytes {
    match v {
        Some(v) if !v.is_empty() => src.slice_ref(v.bytes()),
        _ => Bytes::new(),
    }
}

pub(crate) fn read_message(src: &Bytes, m: fb::Message<'_>) -> Message {
    Message {
        id: m.id(),
        conversation: m.conversation(),
        sender: m.sender(),
        sender_client: m.sender_client(),
        body: share(src, m.body()),
    }
}

fn read_messages(
    src: &Bytes,
    v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::Message<'_>>>>,
) -> Vec<Message> {
    v.map(|v| v.iter().map(|m| read_message(src, m)).collect())
        .unwrap_or_default()
}

fn finish(
    mut fbb: FlatBufferBuilder<'_>,
    request_id: u64,
    ty: fb::Body,
    body: WIPOffset<flatbuffers::UnionWIPOffset>,
) -> Bytes {
    let root = fb::Frame::create(
        &mut fbb,
        &fb::FrameArgs {
            request_id,
            body_type: ty,
            body: Some(body),
        },
    );
    fb::finish_size_prefixed_frame_buffer(&mut fbb, root);
    collapse(fbb)
}

/// The finished buffer as `Bytes` without copying: the builder writes back to
/// front, so the frame is the tail of its vector.
pub(crate) fn collapse(fbb: FlatBufferBuilder<'_>) -> Bytes {
    let (buf, head) = fbb.collapse();
    Bytes::from(buf).slice(head..)
}

fn verified(frame: &[u8], max: usize) -> Result<fb::Frame<'_>, DecodeError> {
    if !crate::framing::prefix_matches(frame) {
        return Err(DecodeError::Missing("length prefix"));
    }
    Ok(fb::size_prefixed_root_as_frame_with_opts(
        &verifier_options(max),
        frame,
    )?)
}

macro_rules! field {
    ($e:expr, $name:literal) => {
        $e.ok_or(DecodeError::Missing($name))?
    };
}

impl ClientFrame {
    pub fn new(request_id: u64, body: ClientBody) -> Self {
        Self { request_id, body }
    }

    /// Encodes the frame with its length prefix, ready to write.
    pub fn encode(&self) -> Bytes {
        let mut fbb = FlatBufferBuilder::with_capacity(128);
        let (ty, off) = match &self.body {
            ClientBody::Hello {
                token,
                client_id,
                device,
                protocol_version,
            } => {
                let token = fbb.create_string(token);
                let device = fbb.create_string(device);
                let o = fb::Hello::create(
                    &mut fbb,
                    &fb::HelloArgs {
                        token: Some(token),
                        client_id: *client_id,
                        device: Some(device),
                        protocol_version: *protocol_version,
                    },
                );
                (fb::Body::Hello, o.as_union_value())
            }
            ClientBody::Send {
                conversation,
                client_msg_id,
                body,
            } => {
                let body = fbb.create_vector(body);
                let o = fb::Send::create(
                    &mut fbb,
                    &fb::SendArgs {
                        conversation: *conversation,
                        client_msg_id: *client_msg_id,
                        body: Some(body),
                    },
                );
                (fb::Body::Send, o.as_union_value())
            }
            ClientBody::Ack { message_ids } => {
                let ids = fbb.create_vector(message_ids);
                let o = fb::Ack::create(
                    &mut fbb,
                    &fb::AckArgs {
                        message_ids: Some(ids),
                    },
                );
                (fb::Body::Ack, o.as_union_value())
            }
            ClientBody::Fetch {
                conversation,
                before,
                after,
                limit,
            } => {
                let o = fb::Fetch::create(
                    &mut fbb,
                    &fb::FetchArgs {
                        conversation: *conversation,
                        before: *before,
                        after: *after,
                        limit: *limit,
                    },
                );
                (fb::Body::Fetch, o.as_union_value())
            }
            ClientBody::Ping { nonce } => {
                let o = fb::Ping::create(&mut fbb, &fb::PingArgs { nonce: *nonce });
                (fb::Body::Ping, o.as_union_value())
            }
            ClientBody::Sync { cursors, limit } => {
                let cs: Vec<fb::Cursor> = cursors
                    .iter()
                    .map(|c| fb::Cursor::new(c.conversation, c.last_id))
                    .collect();
                let cs = fbb.create_vector(&cs);
                let o = fb::Sync::create(
                    &mut fbb,
                    &fb::SyncArgs {
                        cursors: Some(cs),
                        limit: *limit,
                    },
                );
                (fb::Body::Sync, o.as_union_value())
            }
            ClientBody::Read {
                conversation,
                message_id,
            } => {
                let o = fb::Read::create(
                    &mut fbb,
                    &fb::ReadArgs {
                        conversation: *conversation,
                        message_id: *message_id,
                    },
                );
                (fb::Body::Read, o.as_union_value())
            }
        };
        finish(fbb, self.request_id, ty, off)
    }

    /// Verifies and decodes one frame, length prefix included.
    pub fn decode(frame: &Bytes, max_frame: usize) -> Result<Self, DecodeError> {
        let f = verified(frame, max_frame)?;
        let body = match f.body_type() {
            fb::Body::Hello => {
                let h = field!(f.body_as_hello(), "hello");
                ClientBody::Hello {
                    token: field!(h.token(), "hello.token").to_owned(),
                    client_id: h.client_id(),
                    device: h.device().unwrap_or_default().to_owned(),
                    protocol_version: h.protocol_version(),
                }
            }
            fb::Body::Send => {
                let s = field!(f.body_as_send(), "send");
                ClientBody::Send {
                    conversation: s.conversation(),
                    client_msg_id: s.client_msg_id(),
                    body: share(frame, s.body()),
                }
            }
            fb::Body::Ack => {
                let a = field!(f.body_as_ack(), "ack");
                ClientBody::Ack {
                    message_ids: a
                        .message_ids()
                        .map(|v| v.iter().collect())
                        .unwrap_or_default(),
                }
            }
            fb::Body::Fetch => {
                let q = field!(f.body_as_fetch(), "fetch");
                ClientBody::Fetch {
                    conversation: q.conversation(),
                    before: q.before(),
                    after: q.after(),
                    limit: q.limit(),
                }
            }
            fb::Body::Ping => ClientBody::Ping {
                nonce: field!(f.body_as_ping(), "ping").nonce(),
            },
            fb::Body::Sync => {
                let s = field!(f.body_as_sync(), "sync");
                ClientBody::Sync {
                    cursors: s
                        .cursors()
                        .map(|v| {
                            v.iter()
                                .map(|c| Cursor {
                                    conversation: c.conversation(),
                                    last_id: c.last_id(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    limit: s.limit(),
                }
            }
            fb::Body::Read => {
                let r = field!(f.body_as_read(), "read");
                ClientBody::Read {
                    conversation: r.conversation(),
                    message_id: r.message_id(),
                }
            }
            fb::Body::NONE => return Err(DecodeError::Missing("body")),
            other => {
                return Err(match other.variant_name() {
                    Some(name) => DecodeError::Unexpected(name),
                    None => DecodeError::UnknownType(other.0),
                });
            }
        };
        Ok(Self {
            request_id: f.request_id(),
            body,
        })
    }
}

impl ServerFrame {
    pub fn new(request_id: u64, body: ServerBody) -> Self {
        Self { request_id, body }
    }

    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(
            request_id,
            ServerBody::Error {
                code,
                message: message.into(),
                retry_after_ms: 0,
            },
        )
    }

    /// A `rate_limited` answer: ask again after `retry_after_ms`.
    pub fn rate_limited(request_id: u64, retry_after_ms: u32, message: impl Into<String>) -> Self {
        Self::new(
            request_id,
            ServerBody::Error {
                code: ErrorCode::RateLimited,
                message: message.into(),
                retry_after_ms,
            },
        )
    }

    /// Encodes the frame with its length prefix, ready to write.
    pub fn encode(&self) -> Bytes {
        let mut fbb = FlatBufferBuilder::with_capacity(match &self.body {
            ServerBody::Message(m) => m.body.len() + crate::budget::MESSAGE_OVERHEAD,
            _ => 128,
        });
        let (ty, off) = match &self.body {
            ServerBody::Welcome {
                user_id,
                client_id,
                node_id,
                server_time_ms,
                max_frame_bytes,
                max_body_bytes,
            } => {
                let o = fb::Welcome::create(
                    &mut fbb,
                    &fb::WelcomeArgs {
                        user_id: *user_id,
                        client_id: *client_id,
                        node_id: *node_id,
                        server_time_ms: *server_time_ms,
                        max_frame_bytes: *max_frame_bytes,
                        max_body_bytes: *max_body_bytes,
                    },
                );
                (fb::Body::Welcome, o.as_union_value())
            }
            ServerBody::Error {
                code,
                message,
                retry_after_ms,
            } => {
                let message = fbb.create_string(message);
                let o = fb::Error::create(
                    &mut fbb,
                    &fb::ErrorArgs {
                        code: fb::ErrorCode(*code as u16),
                        message: Some(message),
                        retry_after_ms: *retry_after_ms,
                    },
                );
                (fb::Body::Error, o.as_union_value())
            }
            ServerBody::SendOk {
                conversation,
                message_id,
                duplicate,
            } => {
                let o = fb::SendOk::create(
                    &mut fbb,
                    &fb::SendOkArgs {
                        conversation: *conversation,
                        message_id: *message_id,
                        duplicate: *duplicate,
                    },
                );
                (fb::Body::SendOk, o.as_union_value())
            }
            ServerBody::Message(m) => {
                let o = build_message(&mut fbb, m);
                (fb::Body::Message, o.as_union_value())
            }
            ServerBody::AckOk { removed } => {
                let o = fb::AckOk::create(&mut fbb, &fb::AckOkArgs { removed: *removed });
                (fb::Body::AckOk, o.as_union_value())
            }
            ServerBody::Messages {
                conversation,
                messages,
                more,
            } => {
                let ms: Vec<_> = messages
                    .iter()
                    .map(|m| build_message(&mut fbb, m))
                    .collect();
                let ms = fbb.create_vector(&ms);
                let o = fb::Messages::create(
                    &mut fbb,
                    &fb::MessagesArgs {
                        conversation: *conversation,
                        messages: Some(ms),
                        more: *more,
                    },
                );
                (fb::Body::Messages, o.as_union_value())
            }
            ServerBody::Pong { nonce } => {
                let o = fb::Pong::create(&mut fbb, &fb::PongArgs { nonce: *nonce });
                (fb::Body::Pong, o.as_union_value())
            }
            ServerBody::SyncResult { entries } => {
                let es: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        let ms: Vec<_> = e
                            .messages
                            .iter()
                            .map(|m| build_message(&mut fbb, m))
                            .collect();
                        let ms = fbb.create_vector(&ms);
                        fb::SyncEntry::create(
                            &mut fbb,
                            &fb::SyncEntryArgs {
                                conversation: e.conversation,
                                tier: e.tier,
                                messages: Some(ms),
                                latest_id: e.latest_id,
                                read_id: e.read_id,
                                more: e.more,
                            },
                        )
                    })
                    .collect();
                let es = fbb.create_vector(&es);
                let o = fb::SyncResult::create(&mut fbb, &fb::SyncResultArgs { entries: Some(es) });
                (fb::Body::SyncResult, o.as_union_value())
            }
            ServerBody::ReadOk {
                conversation,
                message_id,
            } => {
                let o = fb::ReadOk::create(
                    &mut fbb,
                    &fb::ReadOkArgs {
                        conversation: *conversation,
                        message_id: *message_id,
                    },
                );
                (fb::Body::ReadOk, o.as_union_value())
            }
            ServerBody::ReadMarker {
                user,
                conversation,
                message_id,
            } => {
                let o = fb::ReadMarker::create(
                    &mut fbb,
                    &fb::ReadMarkerArgs {
                        user: *user,
                        conversation: *conversation,
                        message_id: *message_id,
                    },
                );
                (fb::Body::ReadMarker, o.as_union_value())
            }
            ServerBody::Notify {
                conversation,
                message_id,
            } => {
                let o = fb::Notify::create(
                    &mut fbb,
                    &fb::NotifyArgs {
                        conversation: *conversation,
                        message_id: *message_id,
                    },
                );
                (fb::Body::Notify, o.as_union_value())
            }
            ServerBody::Drain {
                reconnect_after_ms,
                reason,
            } => {
                let reason = fbb.create_string(reason);
                let o = fb::Drain::create(
                    &mut fbb,
                    &fb::DrainArgs {
                        reconnect_after_ms: *reconnect_after_ms,
                        reason: Some(reason),
                    },
                );
                (fb::Body::Drain, o.as_union_value())
            }
        };
        finish(fbb, self.request_id, ty, off)
    }

    /// Verifies and decodes one frame, length prefix included.
    pub fn decode(frame: &Bytes, max_frame: usize) -> Result<Self, DecodeError> {
        let f = verified(frame, max_frame)?;
        let body = match f.body_type() {
            fb::Body::Welcome => {
                let w = field!(f.body_as_welcome(), "welcome");
                ServerBody::Welcome {
                    user_id: w.user_id(),
                    client_id: w.client_id(),
                    node_id: w.node_id(),
                    server_time_ms: w.server_time_ms(),
                    max_frame_bytes: w.max_frame_bytes(),
                    max_body_bytes: w.max_body_bytes(),
                }
            }
            fb::Body::Error => {
                let e = field!(f.body_as_error(), "error");
                ServerBody::Error {
                    code: ErrorCode::from_u16(e.code().0),
                    message: e.message().unwrap_or_default().to_owned(),
                    retry_after_ms: e.retry_after_ms(),
                }
            }
            fb::Body::SendOk => {
                let s = field!(f.body_as_send_ok(), "send_ok");
                ServerBody::SendOk {
                    conversation: s.conversation(),
                    message_id: s.message_id(),
                    duplicate: s.duplicate(),
                }
            }
            fb::Body::Message => {
                ServerBody::Message(read_message(frame, field!(f.body_as_message(), "message")))
            }
            fb::Body::AckOk => ServerBody::AckOk {
                removed: field!(f.body_as_ack_ok(), "ack_ok").removed(),
            },
            fb::Body::Messages => {
                let m = field!(f.body_as_messages(), "messages");
                ServerBody::Messages {
                    conversation: m.conversation(),
                    messages: read_messages(frame, m.messages()),
                    more: m.more(),
                }
            }
            fb::Body::Pong => ServerBody::Pong {
                nonce: field!(f.body_as_pong(), "pong").nonce(),
            },
            fb::Body::SyncResult => {
                let s = field!(f.body_as_sync_result(), "sync_result");
                ServerBody::SyncResult {
                    entries: s
                        .entries()
                        .map(|es| {
                            es.iter()
                                .map(|e| SyncEntry {
                                    conversation: e.conversation(),
                                    tier: e.tier(),
                                    messages: read_messages(frame, e.messages()),
                                    latest_id: e.latest_id(),
                                    read_id: e.read_id(),
                                    more: e.more(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            }
            fb::Body::ReadOk => {
                let r = field!(f.body_as_read_ok(), "read_ok");
                ServerBody::ReadOk {
                    conversation: r.conversation(),
                    message_id: r.message_id(),
                }
            }
            fb::Body::ReadMarker => {
                let r = field!(f.body_as_read_marker(), "read_marker");
                ServerBody::ReadMarker {
                    user: r.user(),
                    conversation: r.conversation(),
                    message_id: r.message_id(),
                }
            }
            fb::Body::Notify => {
                let n = field!(f.body_as_notify(), "notify");
                ServerBody::Notify {
                    conversation: n.conversation(),
                    message_id: n.message_id(),
                }
            }
            fb::Body::Drain => {
                let d = field!(f.body_as_drain(), "drain");
                ServerBody::Drain {
                    reconnect_after_ms: d.reconnect_after_ms(),
                    reason: d.reason().unwrap_or_default().to_owned(),
                }
            }
            fb::Body::NONE => return Err(DecodeError::Missing("body")),
            other => {
                return Err(match other.variant_name() {
                    Some(name) => DecodeError::Unexpected(name),
                    None => DecodeError::UnknownType(other.0),
                });
            }
        };
        Ok(Self {
            request_id: f.request_id(),
            body,
        })
    }
}

/// The reason phrase of QUIC's `CONNECTION_REFUSED` when an edge paces
/// its refusals: this, then the device's wait in decimal milliseconds
/// (docs/protocol.md, code 25; ADR 0015).
pub const RETRY_AFTER_PREFIX: &str = "retry-after-ms=";

/// The reason phrase an edge puts in a refusal that tells the device to
/// come back after `wait`.
pub fn refusal_reason(wait: std::time::Duration) -> String {
    format!("{RETRY_AFTER_PREFIX}{}", wait.as_millis())
}

/// The wait an edge put in the reason phrase of its `CONNECTION_REFUSED`
/// (`retry-after-ms=N`: when its handshake slots will have room for this
/// device). None for any other reason, or a number out of range.
pub fn refusal_retry_after(reason: &[u8]) -> Option<std::time::Duration> {
    let digits = reason.strip_prefix(RETRY_AFTER_PREFIX.as_bytes())?;
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::MAX_FRAME_BYTES;
    use proptest::prelude::*;

    #[test]
    fn the_reason_phrase_carries_the_wait_in_milliseconds() {
        assert_eq!(
            refusal_reason(std::time::Duration::from_micros(1_234_567)),
            "retry-after-ms=1234"
        );
        // What the edge writes, the SDK reads back.
        assert_eq!(
            refusal_retry_after(
                refusal_reason(std::time::Duration::from_millis(60_000)).as_bytes()
            ),
            Some(std::time::Duration::from_millis(60_000))
        );
    }

    fn body() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(Bytes::from)
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            body(),
        )
            .prop_map(|(id, conversation, sender, sender_client, body)| Message {
                id,
                conversation,
                sender,
                sender_client,
                body,
            })
    }

    fn client_body() -> impl Strategy<Value = ClientBody> {
        prop_oneof![
            (".{0,64}", any::<u64>(), ".{0,16}", any::<u16>()).prop_map(|(t, c, d, v)| {
                ClientBody::Hello {
                    token: t,
                    client_id: c,
                    device: d,
                    protocol_version: v,
                }
            }),
            (any::<u64>(), any::<u64>(), body()).prop_map(|(c, m, b)| ClientBody::Send {
                conversation: c,
                client_msg_id: m,
                body: b,
            }),
            proptest::collection::vec(any::<u64>(), 0..32)
                .prop_map(|ids| ClientBody::Ack { message_ids: ids }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(c, b, a, l)| {
                ClientBody::Fetch {
                    conversation: c,
                    before: b,
                    after: a,
                    limit: l,
                }
            }),
            any::<u64>().prop_map(|n| ClientBody::Ping { nonce: n }),
            (
                proptest::collection::vec((any::<u64>(), any::<u64>()), 0..16),
                any::<u32>()
            )
                .prop_map(|(cs, limit)| ClientBody::Sync {
                    cursors: cs
                        .into_iter()
                        .map(|(conversation, last_id)| Cursor {
                            conversation,
                            last_id,
                        })
                        .collect(),
                    limit,
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(c, m)| ClientBody::Read {
                conversation: c,
                message_id: m,
            }),
        ]
    }

    fn server_body() -> impl Strategy<Value = ServerBody> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u16>(), any::<u64>()).prop_map(|(u, c, n, t)| {
                ServerBody::Welcome {
                    user_id: u,
                    client_id: c,
                    node_id: n,
                    server_time_ms: t,
                    max_frame_bytes: 65536,
                    max_body_bytes: 4096,
                }
            }),
            (
                proptest::sample::select(ErrorCode::ALL.to_vec()),
                ".{0,64}",
                any::<u32>()
            )
                .prop_map(|(code, message, retry_after_ms)| ServerBody::Error {
                    code,
                    message,
                    retry_after_ms
                }),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(c, m, d)| {
                ServerBody::SendOk {
                    conversation: c,
                    message_id: m,
                    duplicate: d,
                }
            }),
            message().prop_map(ServerBody::Message),
            any::<u32>().prop_map(|removed| ServerBody::AckOk { removed }),
            (
                any::<u64>(),
                proptest::collection::vec(message(), 0..8),
                any::<bool>()
            )
                .prop_map(|(c, ms, more)| ServerBody::Messages {
                    conversation: c,
                    messages: ms,
                    more,
                }),
            any::<u64>().prop_map(|nonce| ServerBody::Pong { nonce }),
            proptest::collection::vec(
                (
                    any::<u64>(),
                    0u8..4,
                    proptest::collection::vec(message(), 0..4),
                    any::<u64>(),
                    any::<u64>(),
                    any::<bool>()
                )
                    .prop_map(
                        |(conversation, tier, messages, latest_id, read_id, more)| {
                            SyncEntry {
                                conversation,
                                tier,
                                messages,
                                latest_id,
                                read_id,
                                more,
                            }
                        }
                    ),
                0..4
            )
            .prop_map(|entries| ServerBody::SyncResult { entries }),
            (any::<u64>(), any::<u64>()).prop_map(|(c, m)| ServerBody::ReadOk {
                conversation: c,
                message_id: m,
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(u, c, m)| {
                ServerBody::ReadMarker {
                    user: u,
                    conversation: c,
                    message_id: m,
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(c, m)| ServerBody::Notify {
                conversation: c,
                message_id: m,
            }),
            (any::<u32>(), ".{0,32}").prop_map(|(ms, reason)| ServerBody::Drain {
                reconnect_after_ms: ms,
                reason,
            }),
        ]
    }

    proptest! {
        #[test]
        fn client_frames_round_trip(id in any::<u64>(), body in client_body()) {
            let f = ClientFrame::new(id, body);
            let wire = f.encode();
            prop_assert_eq!(ClientFrame::decode(&wire.clone(), MAX_FRAME_BYTES).unwrap(), f);
        }

        #[test]
        fn server_frames_round_trip(id in any::<u64>(), body in server_body()) {
            let f = ServerFrame::new(id, body);
            let wire = f.encode();
            prop_assert_eq!(ServerFrame::decode(&wire.clone(), MAX_FRAME_BYTES).unwrap(), f);
        }

        /// Arbitrary bytes never panic the decoder: they decode or are refused.
        #[test]
        fn garbage_is_refused_not_panicked(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let b = Bytes::from(bytes);
            let _ = ClientFrame::decode(&b, MAX_FRAME_BYTES);
            let _ = ServerFrame::decode(&b, MAX_FRAME_BYTES);
        }

        /// Flipping bytes of a valid frame gives a valid frame or a clean error.
        #[test]
        fn corrupted_frames_are_refused_not_panicked(body in client_body(), pos in any::<usize>(), val in any::<u8>()) {
            let wire = ClientFrame::new(7, body).encode();
            let mut raw = wire.to_vec();
            let i = 4 + pos % (raw.len() - 4);
            raw[i] = val;
            let _ = ClientFrame::decode(&Bytes::from(raw), MAX_FRAME_BYTES);
        }
    }

    #[test]
    fn a_server_frame_is_not_a_client_request() {
        let wire = ServerFrame::new(1, ServerBody::Pong { nonce: 3 }).encode();
        let err = ClientFrame::decode(&wire.clone(), MAX_FRAME_BYTES).unwrap_err();
        assert!(matches!(err, DecodeError::Unexpected("Pong")));
    }

    #[test]
    fn message_body_is_shared_not_copied() {
        let m = Message {
            id: 1,
            conversation: 2,
            sender: 3,
            sender_client: 4,
            body: Bytes::from_static(b"hello world"),
        };
        let wire = ServerFrame::new(0, ServerBody::Message(m)).encode();
        let ServerBody::Message(got) = ServerFrame::decode(&wire, MAX_FRAME_BYTES).unwrap().body
        else {
            panic!("not a message")
        };
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        assert!(range.contains(&(got.body.as_ptr() as usize)));
    }

    #[test]
    fn error_codes_are_stable_and_split_by_scope() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), c);
        }
        assert!(ErrorCode::MalformedFrame.closes_connection());
        assert!(ErrorCode::SlowConsumer.closes_connection());
        assert!(!ErrorCode::Forbidden.closes_connection());
        assert!(!ErrorCode::UnknownConversation.closes_connection());
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unspecified);
    }
}
