//! What every edge of a fleet derives from its shared secret
//! (`node.token_secret`), so that a device moving between edges, or
//! meeting an edge that restarted, is recognised: the TLS ticket keys, the
//! QUIC stateless-reset key and the connection-id check.
//!
//! TLS session tickets that every edge of a fleet can open, so that a
//! returning device resumes (no certificate signature on the edge, no
//! chain verification on the device) on whichever edge it lands on, and
//! after an edge restarts.
//!
//! rustls's own ticketer keeps random keys in memory: a restarted edge, or
//! a device moved to another edge, could not open the tickets it issued,
//! and every reconnect after a crash would be a full handshake, exactly
//! when they all come at once. Here the key of each rotation period
//! (`epoch`) is derived with HKDF-SHA256 from the fleet's shared secret
//! and the epoch number: no state to share or persist, and keys rotate by
//! the clock. A ticket is sealed with the current epoch's key
//! (ChaCha20-Poly1305, a random nonce) and opened under the epoch it
//! names when that is the current one or its neighbour (clock skew
//! between edges; a ticket lives at most two periods). Tickets are only
//! for resumption (`psk_dhe_ke`: every resumed session still runs a fresh
//! ECDHE, so a leaked key does not expose past traffic); 0-RTT stays off
//! (replayable requests).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use prometheus_client::metrics::counter::Counter;

/// The ticket's header: the epoch (8 bytes, big endian), then the nonce.
const HEADER: usize = 8 + NONCE_LEN;

/// Seals and opens session tickets with keys derived from a fleet secret.
pub struct FleetTicketer {
    prk: hkdf::Prk,
    period_s: u64,
    rng: SystemRandom,
    /// The clock, in seconds since the epoch (a parameter for tests).
    now: fn() -> u64,
    counts: TicketCounts,
}

/// What a ticketer did since it started: tickets sealed, opened (a
/// returning device presenting a good ticket: a resumed handshake) and
/// refused (expired, another fleet's, or forged: a full handshake).
/// Clones share the counts (they are the edge's metrics).
#[derive(Debug, Clone, Default)]
pub struct TicketCounts {
    pub issued: Counter,
    pub opened: Counter,
    pub refused: Counter,
}

impl fmt::Debug for FleetTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetTicketer")
            .field("period_s", &self.period_s)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl FleetTicketer {
    /// Keys from `secret` (shared by every edge of the fleet), a new one
    /// every `period_s` seconds.
    pub fn new(secret: &[u8], period_s: u64, counts: TicketCounts) -> Self {
        Self::with_clock(secret, period_s, unix_now, counts)
    }

    fn with_clock(secret: &[u8], period_s: u64, now: fn() -> u64, counts: TicketCounts) -> Self {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tiercast/tls-ticket-keys/v1");
        Self {
            prk: salt.extract(secret),
            period_s: period_s.max(1),
            rng: SystemRandom::new(),
            now,
            counts,
        }
    }

    pub fn counts(&self) -> &TicketCounts {
        &self.counts
    }

    fn open(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < HEADER + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (head, sealed) = cipher.split_at(HEADER);
        let epoch = u64::from_be_bytes(head[..8].try_into().ok()?);
        let now = self.epoch();
        if epoch.saturating_add(1) < now || epoch > now.saturating_add(1) {
            return None;
        }
        let key = self.key(epoch)?;
        let nonce = Nonce::try_assume_unique_for_key(&head[8..]).ok()?;
        let mut body = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(&head[..8]), &mut body)
            .ok()?;
        let n = plain.len();
        body.truncate(n);
        Some(body)
    }

    fn epoch(&self) -> u64 {
        (self.now)() / self.period_s
    }

    fn key(&self, epoch: u64) -> Option<LessSafeKey> {
        let info = epoch.to_be_bytes();
        let info = [&info[..]];
        let okm = self.prk.expand(&info, &CHACHA20_POLY1305).ok()?;
        let mut raw = [0u8; 32];
        okm.fill(&mut raw).ok()?;
        Some(LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &raw).ok()?,
        ))
    }
}

impl rustls::server::ProducesTickets for FleetTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.period_s).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let epoch = self.epoch();
        let key = self.key(epoch)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER + plain.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let (head, body) = out.split_at_mut(HEADER);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..8]),
                body,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        self.counts.issued.inc();
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.open(cipher);
        let n = if plain.is_some() {
            &self.counts.opened
        } else {
            &self.counts.refused
        };
        n.inc();
        plain
    }
}

/// The QUIC endpoint settings of an edge of the fleet whose secret is
/// `secret`. Without them a restarted edge cannot tell its devices that it
/// lost their connections: quinn drops a packet whose connection id fails
/// the (per-process, random by default) id check before it considers a
/// reset, and a reset made with another process's random key does not
/// verify. With the fleet's keys the restarted edge answers each device's
/// next packet with a stateless reset the device accepts, and the device
/// reconnects at once instead of waiting out its idle timeout.
pub fn endpoint_config(secret: &[u8]) -> quinn_proto::EndpointConfig {
    let (reset, cid_key) = endpoint_keys(secret);
    let mut cfg = quinn_proto::EndpointConfig::new(std::sync::Arc::new(reset));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // quinn sends at most one reset per 20 ms per endpoint by default:
    // after a restart under 100,000 devices that is 50 a second, and the
    // rest wait out their idle timeout. Any positive bound also fails
    // here, because the shard gives every datagram of one receive batch
    // the same `now` (measured at 50 us: 3,360 of 8,000 devices still
    // left by idle timeout). A reset is always smaller than the packet
    // that caused it, and only packets with a connection id that passes
    // the fleet's check get one, so no bound is needed against
    // amplification: the shard's receive rate is the bound.
    cfg.min_reset_interval(std::time::Duration::ZERO);
    cfg
}

/// The key of the fleet's QUIC address-validation tokens (Retry tokens,
/// and the NEW_TOKEN tokens an edge gives each device for its next
/// connect), derived from the fleet secret like the endpoint keys: a token
/// from before a restart, or from another edge of the fleet, still proves
/// the device's address, so a reconnect storm needs no Retry round trip
/// for returning devices (docs/benchmarks.md, "Where a reconnect waits").
pub fn address_token_key(
    secret: &[u8],
) -> std::sync::Arc<dyn quinn_proto::crypto::HandshakeTokenKey> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tiercast/address-tokens/v1");
    std::sync::Arc::new(salt.extract(secret))
}

/// The stateless-reset key and the connection-id check key of the fleet.
fn endpoint_keys(secret: &[u8]) -> (ring::hmac::Key, u64) {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tiercast/endpoint-keys/v1");
    let prk = salt.extract(secret);
    let reset = prk
        .expand(&[b"stateless reset"], ring::hmac::HMAC_SHA256)
        .expect("32 bytes of HKDF output");
    let mut cid_key = [0u8; 8];
    prk.expand(&[b"connection id"], CidKey)
        .and_then(|okm| okm.fill(&mut cid_key))
        .expect("8 bytes of HKDF output");
    (ring::hmac::Key::from(reset), u64::from_be_bytes(cid_key))
}

/// HKDF output length of the connection-id key.
struct CidKey;

impl hkdf::KeyType for CidKey {
    fn len(&self) -> usize {
        8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn at(now: fn() -> u64) -> FleetTicketer {
        FleetTicketer::with_clock(
            b"a fleet secret of enough bytes!!",
            3600,
            now,
            TicketCounts::default(),
        )
    }

    fn fleet(secret: &[u8]) -> FleetTicketer {
        FleetTicketer::new(secret, 3600, TicketCounts::default())
    }

    #[test]
    fn another_edge_of_the_fleet_opens_the_ticket() {
        let a = fleet(b"a fleet secret of enough bytes!!");
        let b = fleet(b"a fleet secret of enough bytes!!");
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        assert_eq!(a.counts().issued.get(), 1);
        assert_eq!(b.counts().opened.get(), 1);
        // Fresh nonces: the same state seals differently each time.
        assert_ne!(a.encrypt(b"session state").unwrap(), t);
    }

    #[test]
    fn another_secret_or_a_changed_byte_opens_nothing() {
        let a = fleet(b"a fleet secret of enough bytes!!");
        let other = fleet(b"another fleet's secret, as long!");
        let t = a.encrypt(b"session state").unwrap();
        assert!(other.decrypt(&t).is_none());
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 0x01;
            assert!(a.decrypt(&bad).is_none(), "byte {i} flipped still opened");
        }
        assert!(a.decrypt(&t[..HEADER + 3]).is_none());
        assert!(a.decrypt(&[]).is_none());
        // An epoch at the end of the range is refused, not overflowed.
        let mut far = t.clone();
        far[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(a.decrypt(&far).is_none());
        assert_eq!(a.counts().refused.get(), t.len() as u64 + 3);
        assert_eq!(a.counts().opened.get(), 0);
    }

    #[test]
    fn a_restarted_edge_recognises_and_resets_its_fleets_connections() {
        use quinn_proto::ConnectionIdGenerator;
        let (reset, cid_key) = endpoint_keys(b"fleet one secret");
        let (reset_after, cid_key_after) = endpoint_keys(b"fleet one secret");
        let (reset_other, cid_key_other) = endpoint_keys(b"fleet two secret");
        let gen_ = |k| quinn_proto::HashedConnectionIdGenerator::from_key(k);
        let cid = gen_(cid_key).generate_cid();
        assert!(gen_(cid_key_after).validate(&cid).is_ok());
        assert!(gen_(cid_key_other).validate(&cid).is_err());
        let tag = |k: &ring::hmac::Key| ring::hmac::sign(k, &cid).as_ref().to_vec();
        assert_eq!(tag(&reset), tag(&reset_after));
        assert_ne!(tag(&reset), tag(&reset_other));
    }

    #[test]
    fn keys_rotate_and_a_ticket_lives_at_most_two_periods() {
        let t = at(|| 10 * 3600 + 5).encrypt(b"state").unwrap();
        // The same period and the next open it (a neighbour edge's clock
        // may be ahead, or the period turned since).
        assert!(at(|| 10 * 3600 + 3599).decrypt(&t).is_some());
        assert!(at(|| 11 * 3600 + 1).decrypt(&t).is_some());
        assert!(at(|| 9 * 3600 + 1).decrypt(&t).is_some());
        // Two periods on, its key is gone.
        assert!(at(|| 12 * 3600).decrypt(&t).is_none());
        // Each period seals under its own key.
        let later = at(|| 11 * 3600 + 5).encrypt(b"state").unwrap();
        assert_ne!(t[..8], later[..8]);
    }
}
