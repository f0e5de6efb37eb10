//! `ServerFrame::decode` on arbitrary bytes (length prefix included, as a
//! client reads them), with the default frame limit. Whatever decodes must
//! survive a round trip: encode, decode again, get the same frame and the
//! same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tiercast_schemas::MAX_FRAME_BYTES;
use tiercast_schemas::wire::ServerFrame;

fuzz_target!(
    init: tiercast_fuzz::write_seeds_if_asked(tiercast_fuzz::server_frame_seeds),
    |data: &[u8]| {
        let input = Bytes::copy_from_slice(data);
        let Ok(frame) = ServerFrame::decode(&input, MAX_FRAME_BYTES) else {
            return;
        };
        let wire = frame.encode();
        // See client_frame.rs: shared tables re-encode larger, so the
        // second decode gets a limit to spare.
        let again = ServerFrame::decode(&wire, wire.len().max(MAX_FRAME_BYTES) * 4)
            .unwrap_or_else(|e| panic!("re-encoded {frame:?} does not decode: {e}"));
        assert_eq!(again, frame, "round trip changed the frame");
        assert_eq!(again.encode(), wire, "encoding is not deterministic");
    }
);
