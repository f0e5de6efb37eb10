//! `ClientFrame::decode` on arbitrary bytes (length prefix included, as the
//! edge reads them), with the edge's frame limit. Whatever decodes must
//! survive a round trip: encode, decode again, get the same frame and the
//! same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tiercast_schemas::MAX_FRAME_BYTES;
use tiercast_schemas::wire::ClientFrame;

fuzz_target!(
    init: tiercast_fuzz::write_seeds_if_asked(tiercast_fuzz::client_frame_seeds),
    |data: &[u8]| {
        let input = Bytes::copy_from_slice(data);
        let Ok(frame) = ClientFrame::decode(&input, MAX_FRAME_BYTES) else {
            return;
        };
        let wire = frame.encode();
        // The verifier's limits are reckoned from `max_frame`, and an input
        // that shares one table between several references re-encodes
        // larger than it was: re-decode with room to spare, since the limit
        // is not what this checks.
        let again = ClientFrame::decode(&wire, wire.len().max(MAX_FRAME_BYTES) * 4)
            .unwrap_or_else(|e| panic!("re-encoded {frame:?} does not decode: {e}"));
        assert_eq!(again, frame, "round trip changed the frame");
        assert_eq!(again.encode(), wire, "encoding is not deterministic");
    }
);
