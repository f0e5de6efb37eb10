//! Framing: every frame is a FlatBuffers size-prefixed buffer, a 4-byte
//! little-endian length followed by that many bytes of FlatBuffer.
//!
//! The length is checked against a limit before a byte of the body is read,
//! and the body is verified ([`verifier_options`]) before any field of it is
//! used.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The length prefix in bytes.
pub const PREFIX_BYTES: usize = 4;

/// Default upper bound for one frame, prefix excluded. A message body is
/// limited well below this (see the engine's `max_body_bytes`); 64 KiB leaves
/// room for a page of history while keeping a hostile peer from making the
/// edge buffer much per stream.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// What can go wrong reading a frame off a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// A frame whose bytes are not a valid FlatBuffer of the expected shape.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid flatbuffer: {0}")]
    Invalid(#[from] flatbuffers::InvalidFlatbuffer),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("unexpected frame `{0}`")]
    Unexpected(&'static str),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
}

/// Limits the verifier holds every frame to. Frames are small and flat, so
/// these are tight: a deeply nested or table-bombed frame is refused cheaply.
pub fn verifier_options(max_frame: usize) -> flatbuffers::VerifierOptions {
    flatbuffers::VerifierOptions {
        max_depth: 8,
        max_tables: 4_096,
        max_apparent_size: max_frame.saturating_mul(4),
        ignore_missing_null_terminator: false,
    }
}

/// Reads one frame, prefix included (FlatBuffers verifies a size-prefixed
/// buffer with its prefix, since alignment is reckoned from the buffer's
/// start). `Ok(None)` is a clean end of stream at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Bytes>, FrameError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut got = 0;
    while got < PREFIX_BYTES {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let mut buf = BytesMut::zeroed(PREFIX_BYTES + len);
    buf[..PREFIX_BYTES].copy_from_slice(&prefix);
    r.read_exact(&mut buf[PREFIX_BYTES..]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some(buf.freeze()))
}

/// Whether `frame` is exactly one size-prefixed frame.
pub fn prefix_matches(frame: &[u8]) -> bool {
    frame
        .get(..PREFIX_BYTES)
        .and_then(|p| <[u8; PREFIX_BYTES]>::try_from(p).ok())
        .is_some_and(|p| u32::from_le_bytes(p) as usize == frame.len() - PREFIX_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_frames_back_to_back_and_stops_cleanly() {
        let mut wire = Vec::new();
        for body in [&b"abc"[..], &b"de"[..]] {
            wire.extend_from_slice(&(body.len() as u32).to_le_bytes());
            wire.extend_from_slice(body);
        }
        let mut r = &wire[..];
        assert_eq!(
            read_frame(&mut r, 16).await.unwrap().unwrap(),
            &b"\x03\0\0\0abc"[..]
        );
        assert_eq!(
            read_frame(&mut r, 16).await.unwrap().unwrap(),
            &b"\x02\0\0\0de"[..]
        );
        assert!(read_frame(&mut r, 16).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn refuses_oversized_before_reading_the_body() {
        let wire = 1_000_000u32.to_le_bytes();
        let mut r = &wire[..];
        let err = read_frame(&mut r, 1024).await.unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 1_000_000,
                max: 1024
            }
        ));
    }

    #[tokio::test]
    async fn truncated_and_empty_frames_are_errors() {
        let mut r = &[5u8, 0, 0, 0, 1, 2][..];
        assert!(matches!(
            read_frame(&mut r, 16).await,
            Err(FrameError::Truncated)
        ));
        let mut r = &[5u8, 0][..];
        assert!(matches!(
            read_frame(&mut r, 16).await,
            Err(FrameError::Truncated)
        ));
        let mut r = &[0u8, 0, 0, 0][..];
        assert!(matches!(
            read_frame(&mut r, 16).await,
            Err(FrameError::Empty)
        ));
    }
}
