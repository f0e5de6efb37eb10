//! Frames out of a stream's chunks, for a loop that cannot await: chunks
//! go in as quinn-proto hands them over, whole frames (prefix included, as
//! [`tiercast_schemas::framing::read_frame`] returns them) come out. The
//! length is checked before the body is buffered, with the same errors.

use bytes::{Bytes, BytesMut};
use tiercast_schemas::framing::{FrameError, PREFIX_BYTES};

#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Adds bytes read off the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The length the next frame announces, checked against the limit.
    fn announced(&self) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = self.buf.get(..PREFIX_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        Ok(Some(len))
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        match self.announced()? {
            Some(len) if self.buf.len() >= PREFIX_BYTES + len => {
                Ok(Some(self.buf.split_to(PREFIX_BYTES + len).freeze()))
            }
            _ => Ok(None),
        }
    }

    /// Whether a whole frame is buffered (or a bad prefix, which the next
    /// [`Self::next_frame`] reports): no need to read more.
    pub fn has_frame(&self) -> bool {
        match self.announced() {
            Ok(Some(len)) => self.buf.len() >= PREFIX_BYTES + len,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// The stream ended: clean at a frame boundary, truncated inside one.
    pub fn at_end(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(bodies: &[&[u8]]) -> Vec<u8> {
        let mut w = Vec::new();
        for b in bodies {
            w.extend_from_slice(&(b.len() as u32).to_le_bytes());
            w.extend_from_slice(b);
        }
        w
    }

    #[test]
    fn frames_split_anywhere_come_out_whole_and_in_order() {
        let w = wire(&[b"abc", b"de", b"fghij"]);
        // Every way of cutting the stream in two places.
        for i in 0..=w.len() {
            for j in i..=w.len() {
                let mut r = FrameReader::new(16);
                let mut out = Vec::new();
                for part in [&w[..i], &w[i..j], &w[j..]] {
                    r.push(part);
                    while let Some(f) = r.next_frame().unwrap() {
                        out.push(f);
                    }
                }
                assert_eq!(out, vec![&w[0..7], &w[7..13], &w[13..]], "cut at {i}, {j}");
                assert!(r.at_end().is_ok());
                assert!(!r.has_frame());
            }
        }
    }

    #[test]
    fn an_oversized_or_empty_frame_is_refused_before_its_body() {
        let mut r = FrameReader::new(16);
        r.push(&17u32.to_le_bytes());
        assert!(r.has_frame(), "a bad prefix is reported without more bytes");
        assert!(matches!(
            r.next_frame(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        ));
        let mut r = FrameReader::new(16);
        r.push(&0u32.to_le_bytes());
        assert!(matches!(r.next_frame(), Err(FrameError::Empty)));
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_truncated() {
        let mut r = FrameReader::new(16);
        r.push(&wire(&[b"abc"])[..5]);
        assert!(r.next_frame().unwrap().is_none());
        assert!(matches!(r.at_end(), Err(FrameError::Truncated)));
    }
}
