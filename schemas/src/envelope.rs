//! Backplane envelopes: what an engine publishes on a channel and an edge
//! receives. One envelope is one pub/sub payload (no length prefix: the
//! backplane delimits messages).

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use crate::framing::{DecodeError, verifier_options};
use crate::generated::tiercast::backplane as fb;
use crate::wire::{Message, build_message, collapse, read_message};

/// The fan-out tier a message was published under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Tier {
    /// Full message to every recipient's user channel.
    Direct = 1,
    /// Full message once per edge hosting a member.
    Sharded = 2,
    /// Id only, once per hosting edge; devices pull the body.
    IdOnly = 3,
}

impl From<Tier> for u8 {
    fn from(t: Tier) -> u8 {
        t as u8
    }
}

impl TryFrom<u8> for Tier {
    /// The number that is not a tier.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        Self::from_u8(v).ok_or(v)
    }
}

impl Tier {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Direct),
            2 => Some(Self::Sharded),
            3 => Some(Self::IdOnly),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Deliver {
        tier: Tier,
        message: Message,
        /// The sending device, which has the message from its SendOk already.
        except_client: u64,
    },
    Notify {
        conversation: u64,
        message_id: u64,
    },
    ReadMarker {
        user: u64,
        conversation: u64,
        message_id: u64,
        origin_client: u64,
    },
    /// `user` joined or left `conversation`.
    Membership {
        user: u64,
        conversation: u64,
        joined: bool,
    },
    /// A connection of `user`'s device `client_id` began on `edge` at
    /// `since_ms`: older connections of the device elsewhere close.
    DeviceConnected {
        user: u64,
        client_id: u64,
        since_ms: u64,
        edge: u16,
        conn_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub origin_node: u16,
    pub payload: Payload,
}

/// Envelopes are bounded like client frames: a body plus a little framing.
pub const MAX_ENVELOPE_BYTES: usize = crate::framing::MAX_FRAME_BYTES;

impl Envelope {
    pub fn encode(&self) -> Bytes {
        let mut fbb = FlatBufferBuilder::with_capacity(match &self.payload {
            Payload::Deliver { message, .. } => message.body.len() + 112,
            _ => 64,
        });
        let (ty, off) = match &self.payload {
            Payload::Deliver {
                tier,
                message,
                except_client,
            } => {
                let m = build_message(&mut fbb, message);
                let o = fb::Deliver::create(
                    &mut fbb,
                    &fb::DeliverArgs {
                        tier: fb::Tier(*tier as u8),
                        message: Some(m),
                        except_client: *except_client,
                    },
                );
                (fb::Payload::Deliver, o.as_union_value())
            }
            Payload::Notify {
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
                (fb::Payload::Notify, o.as_union_value())
            }
            Payload::ReadMarker {
                user,
                conversation,
                message_id,
                origin_client,
            } => {
                let o = fb::ReadMarker::create(
                    &mut fbb,
                    &fb::ReadMarkerArgs {
                        user: *user,
                        conversation: *conversation,
                        message_id: *message_id,
                        origin_client: *origin_client,
                    },
                );
                (fb::Payload::ReadMarker, o.as_union_value())
            }
            Payload::Membership {
                user,
                conversation,
                joined,
            } => {
                let o = fb::Membership::create(
                    &mut fbb,
                    &fb::MembershipArgs {
                        user: *user,
                        conversation: *conversation,
                        joined: *joined,
                    },
                );
                (fb::Payload::Membership, o.as_union_value())
            }
            Payload::DeviceConnected {
                user,
                client_id,
                since_ms,
                edge,
                conn_id,
            } => {
                let o = fb::DeviceConnected::create(
                    &mut fbb,
                    &fb::DeviceConnectedArgs {
                        user: *user,
                        client_id: *client_id,
                        since_ms: *since_ms,
                        edge: *edge,
                        conn_id: *conn_id,
                    },
                );
                (fb::Payload::DeviceConnected, o.as_union_value())
            }
        };
        let root = fb::Envelope::create(
            &mut fbb,
            &fb::EnvelopeArgs {
                origin_node: self.origin_node,
                payload_type: ty,
                payload: Some(off),
            },
        );
        fb::finish_envelope_buffer(&mut fbb, root);
        collapse(fbb)
    }

    /// Verifies and decodes one envelope.
    pub fn decode(buf: &Bytes) -> Result<Self, DecodeError> {
        let e = fb::root_as_envelope_with_opts(&verifier_options(MAX_ENVELOPE_BYTES), buf)?;
        let payload = match e.payload_type() {
            fb::Payload::Deliver => {
                let d = e
                    .payload_as_deliver()
                    .ok_or(DecodeError::Missing("deliver"))?;
                Payload::Deliver {
                    tier: Tier::from_u8(d.tier().0).ok_or(DecodeError::Missing("deliver.tier"))?,
                    message: read_message(
                        buf,
                        d.message().ok_or(DecodeError::Missing("deliver.message"))?,
                    ),
                    except_client: d.except_client(),
                }
            }
            fb::Payload::Notify => {
                let n = e
                    .payload_as_notify()
                    .ok_or(DecodeError::Missing("notify"))?;
                Payload::Notify {
                    conversation: n.conversation(),
                    message_id: n.message_id(),
                }
            }
            fb::Payload::ReadMarker => {
                let r = e
                    .payload_as_read_marker()
                    .ok_or(DecodeError::Missing("read_marker"))?;
                Payload::ReadMarker {
                    user: r.user(),
                    conversation: r.conversation(),
                    message_id: r.message_id(),
                    origin_client: r.origin_client(),
                }
            }
            fb::Payload::Membership => {
                let m = e
                    .payload_as_membership()
                    .ok_or(DecodeError::Missing("membership"))?;
                Payload::Membership {
                    user: m.user(),
                    conversation: m.conversation(),
                    joined: m.joined(),
                }
            }
            fb::Payload::DeviceConnected => {
                let d = e
                    .payload_as_device_connected()
                    .ok_or(DecodeError::Missing("device_connected"))?;
                Payload::DeviceConnected {
                    user: d.user(),
                    client_id: d.client_id(),
                    since_ms: d.since_ms(),
                    edge: d.edge(),
                    conn_id: d.conn_id(),
                }
            }
            other => return Err(DecodeError::UnknownType(other.0)),
        };
        Ok(Self {
            origin_node: e.origin_node(),
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload() -> impl Strategy<Value = Payload> {
        prop_oneof![
            (
                1u8..=3,
                any::<[u64; 4]>(),
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<u64>()
            )
                .prop_map(|(t, [id, c, s, sc], body, ex)| Payload::Deliver {
                    tier: Tier::from_u8(t).unwrap(),
                    message: Message {
                        id,
                        conversation: c,
                        sender: s,
                        sender_client: sc,
                        body: Bytes::from(body),
                    },
                    except_client: ex,
                }),
            any::<[u64; 2]>().prop_map(|[c, m]| Payload::Notify {
                conversation: c,
                message_id: m,
            }),
            any::<[u64; 4]>().prop_map(|[u, c, m, o]| Payload::ReadMarker {
                user: u,
                conversation: c,
                message_id: m,
                origin_client: o,
            }),
            (any::<[u64; 2]>(), any::<bool>()).prop_map(|([u, c], joined)| {
                Payload::Membership {
                    user: u,
                    conversation: c,
                    joined,
                }
            }),
            (any::<[u64; 4]>(), any::<u16>()).prop_map(|([u, c, s, n], edge)| {
                Payload::DeviceConnected {
                    user: u,
                    client_id: c,
                    since_ms: s,
                    edge,
                    conn_id: n,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(node in any::<u16>(), payload in payload()) {
            let e = Envelope { origin_node: node, payload };
            prop_assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        }

        #[test]
        fn garbage_is_refused_not_panicked(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Envelope::decode(&Bytes::from(bytes));
        }
    }

    /// Tier 3's promise: the notification stays small whatever the body size.
    #[test]
    fn id_only_notification_is_under_64_bytes() {
        let e = Envelope {
            origin_node: 1023,
            payload: Payload::Notify {
                conversation: u64::MAX,
                message_id: u64::MAX,
            },
        };
        let n = e.encode().len();
        assert!(n < 64, "{n} bytes");
    }
}
