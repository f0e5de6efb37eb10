//! Wire formats of Tiercast: the client protocol spoken over QUIC and the
//! envelopes engines and edges exchange over the backplane.
//!
//! The schemas live in `schemas/fbs/*.fbs`; `src/generated/` is the code
//! `flatc` 25.12.19 generates from them (`scripts/gen-schemas.sh`, checked by
//! `scripts/gen-schemas.sh --check`). Nothing outside this crate touches the
//! generated code: it goes through the owned, verified types here.
//!
//! - [`framing`]: the length prefix, the frame size limit, reading frames
//!   from a stream.
//! - [`wire`]: client protocol frames ([`wire::ClientFrame`],
//!   [`wire::ServerFrame`]) and the error-code table ([`wire::ErrorCode`]).
//! - [`envelope`]: backplane envelopes ([`envelope::Envelope`]).
//! - [`ids`]: the layout of Snowflake message ids (time order).
//! - [`budget`]: how many messages a reply fits in one frame.

pub mod budget;
pub mod envelope;
pub mod framing;
pub mod ids;
pub mod wire;

#[allow(unsafe_code, unused_imports, clippy::all, clippy::pedantic, missing_docs)]
#[rustfmt::skip]
pub mod generated;

pub use framing::{DecodeError, FrameError, MAX_FRAME_BYTES};

/// The client protocol version (`Hello.protocol_version`); an edge refuses
/// any other with `unsupported_version`.
pub const PROTOCOL_VERSION: u16 = 1;

/// The TLS ALPN protocol id of the client protocol over QUIC.
pub const ALPN: &[u8] = b"tiercast/1";
