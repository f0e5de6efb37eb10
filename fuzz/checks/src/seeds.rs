//! Seeds: valid inputs built with the crates' own encoders, so a fresh
//! corpus starts past the verifier instead of having to discover FlatBuffers
//! from nothing. A target binary writes them and exits, without fuzzing,
//! when `TIERCAST_FUZZ_WRITE_SEEDS` names a directory (`scripts/fuzz.sh`
//! does this for an empty corpus): see [`write_seeds_if_asked`].

use std::path::Path;

use bytes::Bytes;
use tiercast_engine::auth::TokenKeys;
use tiercast_schemas::envelope::{Envelope, Payload, Tier};
use tiercast_schemas::wire::{
    ClientBody, ClientFrame, Cursor, ErrorCode, Message, ServerBody, ServerFrame, SyncEntry,
};

/// The HS256 secret the `token` target verifies with.
pub const TOKEN_SECRET: &[u8] = b"tiercast-fuzz-token-secret-0123456789abcdef";

/// A secret the `config` target supplies when the input sets none, so that
/// validation gets past `node.token_secret`.
pub const CONFIG_SECRET: &str = "tiercast-fuzz-config-secret-0123456789abcdef";

/// The environment variable that makes a target write its seeds and exit.
pub const WRITE_SEEDS_VAR: &str = "TIERCAST_FUZZ_WRITE_SEEDS";

/// Called from each target's `init`: when [`WRITE_SEEDS_VAR`] is set, writes
/// `seeds` as `seed-<name>` files into that directory and exits.
pub fn write_seeds_if_asked(seeds: fn() -> Vec<(&'static str, Vec<u8>)>) {
    let Some(dir) = std::env::var_os(WRITE_SEEDS_VAR) else {
        return;
    };
    let dir = Path::new(&dir);
    let code = match write_seeds(dir, seeds()) {
        Ok(n) => {
            eprintln!("wrote {n} seeds to {}", dir.display());
            0
        }
        Err(e) => {
            eprintln!("cannot write seeds to {}: {e}", dir.display());
            1
        }
    };
    std::process::exit(code);
}

fn write_seeds(dir: &Path, seeds: Vec<(&'static str, Vec<u8>)>) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let n = seeds.len();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(n)
}

fn message(id: u64, body: &'static [u8]) -> Message {
    Message {
        id,
        conversation: 7,
        sender: 42,
        sender_client: 9,
        body: Bytes::from_static(body),
    }
}

pub fn client_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frames = [
        (
            "hello",
            ClientBody::Hello {
                token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
                client_id: 9,
                device: "phone".into(),
                protocol_version: 1,
            },
        ),
        (
            "send",
            ClientBody::Send {
                conversation: 7,
                client_msg_id: 1,
                body: Bytes::from_static(b"hello, world"),
            },
        ),
        (
            "ack",
            ClientBody::Ack {
                message_ids: vec![1, 2, u64::MAX],
            },
        ),
        (
            "fetch",
            ClientBody::Fetch {
                conversation: 7,
                before: 100,
                after: 0,
                limit: 50,
            },
        ),
        ("ping", ClientBody::Ping { nonce: 3 }),
        (
            "sync",
            ClientBody::Sync {
                cursors: vec![
                    Cursor {
                        conversation: 7,
                        last_id: 10,
                    },
                    Cursor {
                        conversation: 8,
                        last_id: 0,
                    },
                ],
                limit: 20,
            },
        ),
        (
            "read",
            ClientBody::Read {
                conversation: 7,
                message_id: 10,
            },
        ),
    ];
    let mut out: Vec<_> = frames
        .into_iter()
        .map(|(name, body)| (name, ClientFrame::new(1, body).encode().to_vec()))
        .collect();
    // A server frame on the client's stream: refused as unexpected.
    out.push((
        "server-pong",
        ServerFrame::new(1, ServerBody::Pong { nonce: 3 })
            .encode()
            .to_vec(),
    ));
    out
}

pub fn server_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let bodies = [
        (
            "welcome",
            ServerBody::Welcome {
                user_id: 42,
                client_id: 9,
                node_id: 1,
                server_time_ms: 1_700_000_000_000,
                max_frame_bytes: 65_536,
                max_body_bytes: 16_384,
            },
        ),
        (
            "error",
            ServerBody::Error {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                retry_after_ms: 250,
            },
        ),
        (
            "send-ok",
            ServerBody::SendOk {
                conversation: 7,
                message_id: 10,
                duplicate: true,
            },
        ),
        ("message", ServerBody::Message(message(10, b"hi"))),
        ("ack-ok", ServerBody::AckOk { removed: 2 }),
        (
            "messages",
            ServerBody::Messages {
                conversation: 7,
                messages: vec![message(10, b"one"), message(11, b"")],
                more: true,
            },
        ),
        ("pong", ServerBody::Pong { nonce: 3 }),
        (
            "sync-result",
            ServerBody::SyncResult {
                entries: vec![
                    SyncEntry {
                        conversation: 7,
                        tier: 1,
                        messages: vec![message(10, b"one")],
                        latest_id: 10,
                        read_id: 9,
                        more: false,
                    },
                    SyncEntry {
                        conversation: 8,
                        tier: 3,
                        messages: vec![],
                        latest_id: 20,
                        read_id: 0,
                        more: true,
                    },
                ],
            },
        ),
        (
            "read-ok",
            ServerBody::ReadOk {
                conversation: 7,
                message_id: 10,
            },
        ),
        (
            "read-marker",
            ServerBody::ReadMarker {
                user: 42,
                conversation: 7,
                message_id: 10,
            },
        ),
        (
            "notify",
            ServerBody::Notify {
                conversation: 7,
                message_id: 10,
            },
        ),
        (
            "drain",
            ServerBody::Drain {
                reconnect_after_ms: 1_000,
                reason: "shutdown".into(),
            },
        ),
    ];
    let mut out: Vec<_> = bodies
        .into_iter()
        .map(|(name, body)| (name, ServerFrame::new(0, body).encode().to_vec()))
        .collect();
    out.push((
        "client-ping",
        ClientFrame::new(1, ClientBody::Ping { nonce: 3 })
            .encode()
            .to_vec(),
    ));
    out
}

pub fn envelope_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let payloads = [
        (
            "deliver-direct",
            Payload::Deliver {
                tier: Tier::Direct,
                message: message(10, b"hello"),
                except_client: 9,
            },
        ),
        (
            "deliver-sharded",
            Payload::Deliver {
                tier: Tier::Sharded,
                message: message(11, b""),
                except_client: 0,
            },
        ),
        (
            "notify",
            Payload::Notify {
                conversation: 7,
                message_id: 10,
            },
        ),
        (
            "read-marker",
            Payload::ReadMarker {
                user: 42,
                conversation: 7,
                message_id: 10,
                origin_client: 9,
            },
        ),
        (
            "membership",
            Payload::Membership {
                user: 42,
                conversation: 7,
                joined: true,
            },
        ),
        (
            "device-connected",
            Payload::DeviceConnected {
                user: 42,
                client_id: 9,
                since_ms: 1_700_000_000_000,
                edge: 3,
                conn_id: 11,
            },
        ),
    ];
    payloads
        .into_iter()
        .map(|(name, payload)| {
            let e = Envelope {
                origin_node: 3,
                payload,
            };
            (name, e.encode().to_vec())
        })
        .collect()
}

/// `header.claims.signature`, both parts given as JSON, signed with
/// [`TOKEN_SECRET`]: how the `token` target builds tokens with hostile claims
/// behind a valid signature. The header's `kid` must name the key
/// (`TokenKeys::kid`) for the claims to be looked at.
pub fn signed_token(header: &[u8], claims: &[u8]) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let message = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(TOKEN_SECRET),
        jsonwebtoken::Algorithm::HS256,
    )
    .expect("HS256 signing cannot fail");
    format!("{message}.{signature}")
}

/// The header the `token` target signs claims under unless the input gives
/// one: HS256 and the key id of `TokenKeys::new(TOKEN_SECRET)`.
pub fn token_header() -> Vec<u8> {
    let kid = TokenKeys::new(TOKEN_SECRET).kid().to_owned();
    format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#).into_bytes()
}

/// Where the `token` target's signed claims say `$NOW`, it writes the
/// current time plus this (a token valid now, whatever day the seed was
/// made).
pub const NOW_PLACEHOLDER: &[u8] = b"$NOW";
pub const NOW_OFFSET_SECS: u64 = 3_600;

/// Token inputs: a mode byte, then the rest (see [`crate::token`]).
/// Deterministic (no clock), so rewriting them changes no file.
pub fn token_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let header = token_header();
    let with_mode = |mode: u8, parts: &[&[u8]]| [&[mode][..], &parts.concat()].concat();
    // Raw tokens with fixed times: well-formed, verified up to the expiry
    // and lifetime checks.
    let raw = |claims: &[u8]| with_mode(0, &[signed_token(&header, claims).as_bytes()]);
    vec![
        (
            "raw-user",
            raw(br#"{"sub":"42","exp":2000000000,"iat":1700000000}"#),
        ),
        (
            "raw-publisher",
            raw(br#"{"sub":"backend","exp":2000000000,"role":"publisher"}"#),
        ),
        ("raw-expired", raw(br#"{"sub":"42","exp":1000000000}"#)),
        (
            "raw-no-kid",
            with_mode(
                0,
                &[signed_token(br#"{"alg":"HS256"}"#, br#"{"sub":"1","exp":1}"#).as_bytes()],
            ),
        ),
        ("raw-garbage", with_mode(0, &[b"not.a.jwt"])),
        (
            "signed-user",
            with_mode(1, &[br#"{"sub":"42","exp":$NOW,"iat":1,"convs":[1,2,3]}"#]),
        ),
        (
            "signed-publisher",
            with_mode(
                1,
                &[br#"{"sub":"svc","exp":$NOW,"nbf":1,"role":"publisher"}"#],
            ),
        ),
        (
            "signed-header",
            with_mode(
                3,
                &[&header, b"\n", br#"{"sub":"7","exp":$NOW,"role":"user"}"#],
            ),
        ),
    ]
}

pub fn config_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let default = toml::to_string(&tiercast_edge::Config::default()).unwrap_or_default();
    let minimal = format!("[node]\ntoken_secret = \"{CONFIG_SECRET}\"\n");
    let full = format!(
        r#"[node]
data_dir = "/var/lib/tiercast"
http_listen = "0.0.0.0:7480"
token_secret = "{CONFIG_SECRET}"
store = "embedded"

[engine]
node_id = 5
max_body_bytes = 4096
max_devices = 4
evict_oldest_device = true
max_page = 100

[engine.tiers]
sharded_above = 50
id_only_above = 2000
hysteresis_pct = 20

[edge]
listen = "[::1]:7443"
dev_cert_names = ["localhost"]
max_connections = 10
max_frame_bytes = 4096
"#
    );
    let redis = format!(
        r#"[node]
token_secret = "{CONFIG_SECRET}"

[backplane]
kind = "redis"

[backplane.redis]
nodes = ["127.0.0.1:7000", "[::1]:7001"]
cluster = true
"#
    );
    let scylla = format!(
        r#"[node]
token_secret = "{CONFIG_SECRET}"
store = "scylla"

[scylla]
nodes = ["127.0.0.1:9042"]
keyspace = "tc"
"#
    );
    let overrides = "edge.listen=127.0.0.1:9000\nTIERCAST_ENGINE__MAX_DEVICES=2\n\
                     engine.tiers.sharded_above=50\nbackplane.redis.nodes=[\"a:1\"]\n";
    vec![
        ("default", default.into_bytes()),
        ("minimal", minimal.into_bytes()),
        ("full", full.into_bytes()),
        ("redis", redis.into_bytes()),
        ("scylla", scylla.into_bytes()),
        ("overrides", overrides.as_bytes().to_vec()),
    ]
}
