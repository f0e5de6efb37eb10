//! The layout of Snowflake message ids, which clients use too: 41 bits of
//! milliseconds since [`EPOCH_MS`], 10 bits of node id, 12 bits of sequence.
//! Ids order messages by time, so "every message since time T" is "every id
//! from [`min_id_at`]`(T)`". The generator lives in the engine.

/// 2026-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_767_225_600_000;
pub const NODE_BITS: u32 = 10;
pub const SEQ_BITS: u32 = 12;

/// The smallest id that any node could issue at `unix_ms`: a lower bound for
/// "messages since time T".
pub fn min_id_at(unix_ms: u64) -> u64 {
    (unix_ms.max(EPOCH_MS) - EPOCH_MS) << (NODE_BITS + SEQ_BITS)
}

/// When an id was issued, in Unix milliseconds.
pub fn unix_ms_of(id: u64) -> u64 {
    (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trips_through_ids() {
        let t = EPOCH_MS + 123_456_789;
        assert_eq!(unix_ms_of(min_id_at(t)), t);
        assert!(min_id_at(t) < min_id_at(t + 1));
        assert_eq!(min_id_at(0), 0, "before the epoch clamps to the first id");
    }
}
