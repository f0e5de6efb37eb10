//! `Envelope::decode` (a backplane payload, no length prefix) on arbitrary
//! bytes. Whatever decodes must survive a round trip: encode, decode again,
//! get the same envelope and the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tiercast_schemas::envelope::Envelope;

fuzz_target!(
    init: tiercast_fuzz::write_seeds_if_asked(tiercast_fuzz::envelope_seeds),
    |data: &[u8]| {
        let input = Bytes::copy_from_slice(data);
        let Ok(envelope) = Envelope::decode(&input) else {
            return;
        };
        let wire = envelope.encode();
        let again = Envelope::decode(&wire)
            .unwrap_or_else(|e| panic!("re-encoded {envelope:?} does not decode: {e}"));
        assert_eq!(again, envelope, "round trip changed the envelope");
        assert_eq!(again.encode(), wire, "encoding is not deterministic");
    }
);
