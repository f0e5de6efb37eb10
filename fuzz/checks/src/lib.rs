//! What each fuzz target checks, one function per target, and the seeds the
//! targets start from.
//!
//! The fuzz package (`fuzz/`, nightly and libFuzzer, `scripts/fuzz.sh`) is a
//! thin shell: each of its targets hands libFuzzer's input to the function
//! of the same name here. This crate's test (`tests/corpus.rs`) hands the
//! same functions every input committed under `fuzz/corpus/` and every
//! seed, on the stable toolchain, in `cargo test`: what the fuzzer found
//! once is checked on every run without building the fuzzer.
//!
//! Each function panics when a check fails, and only then.

use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::Bytes;
use tiercast_edge::Config;
use tiercast_engine::auth::{PUBLISHER_ROLE, TokenKeys, now_unix};
use tiercast_schemas::MAX_FRAME_BYTES;
use tiercast_schemas::envelope::Envelope;
use tiercast_schemas::wire::{ClientFrame, ServerFrame};

mod seeds;

pub use seeds::*;

/// A target's check: panics when the input breaks what the target checks.
pub type Check = fn(&[u8]);

/// The targets, by name: the fuzz package's binaries and the directories
/// of `fuzz/corpus/`.
pub const TARGETS: [(&str, Check); 5] = [
    ("client_frame", client_frame),
    ("server_frame", server_frame),
    ("envelope", envelope),
    ("token", token),
    ("config", config),
];

/// The seeds of a target, by its name.
pub fn seeds_of(target: &str) -> Option<Vec<(&'static str, Vec<u8>)>> {
    Some(match target {
        "client_frame" => client_frame_seeds(),
        "server_frame" => server_frame_seeds(),
        "envelope" => envelope_seeds(),
        "token" => token_seeds(),
        "config" => config_seeds(),
        _ => return None,
    })
}

/// `ClientFrame::decode` on arbitrary bytes (length prefix included, as the
/// edge reads them), with the edge's frame limit. Whatever decodes must
/// survive a round trip: encode, decode again, get the same frame and the
/// same bytes.
pub fn client_frame(data: &[u8]) {
    round_trip(data, ClientFrame::decode, ClientFrame::encode);
}

/// `ServerFrame::decode` on arbitrary bytes (length prefix included, as a
/// client reads them), with the default frame limit, and the same round
/// trip as [`client_frame`].
pub fn server_frame(data: &[u8]) {
    round_trip(data, ServerFrame::decode, ServerFrame::encode);
}

/// `Envelope::decode` (a backplane payload, no length prefix) on arbitrary
/// bytes, and the same round trip (an envelope has no size limit of its
/// own: the backplane's message size bounds it).
pub fn envelope(data: &[u8]) {
    round_trip(data, |b, _| Envelope::decode(b), Envelope::encode);
}

/// Decodes `data` with [`MAX_FRAME_BYTES`]; what decodes must encode to
/// bytes that decode to the same value, and encode again to the same bytes.
fn round_trip<T, E>(
    data: &[u8],
    decode: impl Fn(&Bytes, usize) -> Result<T, E>,
    encode: impl Fn(&T) -> Bytes,
) where
    T: PartialEq + std::fmt::Debug,
    E: std::fmt::Display,
{
    let input = Bytes::copy_from_slice(data);
    let Ok(value) = decode(&input, MAX_FRAME_BYTES) else {
        return;
    };
    let wire = encode(&value);
    // The verifier's limits are reckoned from the frame limit, and an input
    // that shares one table between several references re-encodes larger
    // than it was: re-decode with room to spare, since the limit is not
    // what this checks.
    let again = decode(&wire, wire.len().max(MAX_FRAME_BYTES) * 4)
        .unwrap_or_else(|e| panic!("re-encoded {value:?} does not decode: {e}"));
    assert_eq!(again, value, "round trip changed the value");
    assert_eq!(encode(&again), wire, "encoding is not deterministic");
}

/// Token verification (`TokenKeys::verify`, `verify_user`,
/// `verify_publisher`) on hostile tokens, with one key made by
/// `TokenKeys::new`. The first byte picks a mode:
///
/// - even: the rest, as UTF-8, is the token itself. A forged token almost
///   never carries a valid signature, so this exercises the parsing of the
///   three parts, the header, the key lookup and the signature check.
/// - odd: the rest is the claims JSON (bit 1 set: `header JSON \n claims`),
///   signed here with the right key, so the claim checks behind the
///   signature (expiry, lifetime, subject, role) see hostile claims too.
///   `$NOW` in the claims becomes the current time plus an hour.
///
/// None may panic, and the entry points must agree with each other.
pub fn token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = TokenKeys::new(TOKEN_SECRET);
    if mode & 1 == 0 {
        if let Ok(token) = std::str::from_utf8(rest) {
            check_token(&keys, token);
        }
        return;
    }
    let split = (mode & 2 != 0)
        .then(|| rest.iter().position(|&b| b == b'\n'))
        .flatten();
    let token = match split {
        Some(i) => signed_token(&rest[..i], &with_now(&rest[i + 1..])),
        None => signed_token(default_header(), &with_now(rest)),
    };
    check_token(&keys, &token);
}

fn check_token(keys: &TokenKeys, token: &str) {
    let claims = keys.verify(token);
    let user = keys.verify_user(token);
    let publisher = keys.verify_publisher(token);
    let Ok(c) = &claims else {
        assert!(user.is_err(), "verify refused, verify_user accepted");
        assert!(
            publisher.is_err(),
            "verify refused, verify_publisher accepted"
        );
        return;
    };
    if let Ok(id) = &user {
        assert_eq!(id.expires_unix, c.exp);
        assert_eq!(id.convs, c.convs);
        assert_ne!(c.role.as_deref(), Some(PUBLISHER_ROLE));
    }
    if let Ok(p) = &publisher {
        assert_eq!(p, c);
        assert_eq!(p.role.as_deref(), Some(PUBLISHER_ROLE));
    }
    // Minting the claims back gives a token that verifies to them (unless
    // they are about to expire).
    if c.exp > now_unix() + 60 {
        assert_eq!(keys.verify(&keys.mint(c)).as_ref(), Ok(c));
    }
}

fn default_header() -> &'static [u8] {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    HEADER.get_or_init(token_header)
}

/// `claims` with each `$NOW` replaced by the time an hour from now.
fn with_now(claims: &[u8]) -> Vec<u8> {
    let now = (now_unix() + NOW_OFFSET_SECS).to_string();
    let mut out = Vec::with_capacity(claims.len() + 8);
    let mut rest = claims;
    while !rest.is_empty() {
        if rest.starts_with(NOW_PLACEHOLDER) {
            out.extend_from_slice(now.as_bytes());
            rest = &rest[NOW_PLACEHOLDER.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// The node configuration as the `tiercast` binary loads it:
/// `tiercast_edge::Config::load` (defaults < TOML file < `TIERCAST_*`
/// variables < `section.key=value` overrides, then validation) on hostile
/// input. It must never panic; it may only refuse.
///
/// Each input is used twice:
/// - as the TOML config file (written to a scratch file, since `load` reads
///   a path), with no variables or overrides;
/// - line by line as `KEY=VALUE` settings: `TIERCAST_*` keys as environment
///   variables (handed to `load`, not set in the process), any other as a
///   `--set` override, with a valid token secret supplied first so that
///   validation goes past it.
///
/// A file that loads must load again, to the same config, once serialized.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Some(cfg) = load_file(text)
        && let Ok(again) = toml::to_string(&cfg)
    {
        let reloaded = load_file(&again)
            .unwrap_or_else(|| panic!("serialized config does not load:\n{again}"));
        assert_eq!(
            reloaded, cfg,
            "config changed through a round trip:\n{again}"
        );
    }

    let mut vars = vec![(
        "TIERCAST_NODE__TOKEN_SECRET".to_owned(),
        CONFIG_SECRET.to_owned(),
    )];
    let mut overrides = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.starts_with(tiercast_edge::config::ENV_PREFIX) {
            vars.push((k.to_owned(), v.to_owned()));
        } else {
            overrides.push((k.to_owned(), v.to_owned()));
        }
    }
    let _ = Config::load(None, vars, &overrides);
}

/// One scratch file per process and thread (libFuzzer's -jobs/-fork run
/// several processes; the corpus test may run targets on several threads).
fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!(
        "tiercast-fuzz-config-{}-{:?}.toml",
        std::process::id(),
        std::thread::current().id()
    ))
}

fn load_file(text: &str) -> Option<Config> {
    let path = scratch();
    std::fs::write(&path, text).expect("writing the scratch config file");
    let cfg = Config::load(Some(&path), std::iter::empty(), &[]);
    let _ = std::fs::remove_file(&path);
    cfg.ok()
}
