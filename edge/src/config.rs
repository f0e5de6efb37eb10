//! Process configuration: one typed struct, built from defaults, then a TOML
//! file, then `TIERCAST_<SECTION>__<KEY>` environment variables, then
//! command-line overrides (`section.key=value`), and validated as a whole
//! before anything binds. A bad value is a one-line error naming the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tiercast_engine::auth::{MIN_SECRET_BYTES, TokenKeys};
use tiercast_engine::config::{EngineConfig, InvalidSetting};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the embedded store keeps its file.
    pub data_dir: PathBuf,
    /// The engine HTTP API and `/metrics`.
    pub http_listen: SocketAddr,
    /// HS256 secret that client and publisher tokens are signed with.
    pub token_secret: String,
    /// Use the store of an engine service (`tiercast engine`) at this URL
    /// (`http://host:port`) instead of an embedded one: how several edge
    /// processes share one store without ScyllaDB.
    pub store_url: Option<String>,
    /// The CA certificate(s) (PEM) that sign the engine service's HTTPS
    /// certificate, for an `https://` `store_url`. A plain `http://` one is
    /// accepted only to a loopback address: the store API carries every
    /// message.
    pub store_ca_path: Option<PathBuf>,
    /// The store this process opens itself (when `store_url` is unset):
    /// `embedded` (redb in `data_dir`) or `scylla` (the `[scylla]` cluster).
    pub store: StoreKind,
}

/// Which store a process opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Embedded,
    /// ScyllaDB (untested on the development machines: no server there).
    Scylla,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("tiercast-data"),
            http_listen: "127.0.0.1:7480".parse().expect("literal address"),
            token_secret: String::new(),
            store_url: None,
            store_ca_path: None,
            store: StoreKind::Embedded,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// UDP address of the QUIC listener.
    pub listen: SocketAddr,
    /// PEM certificate chain and key; both unset = a self-signed development
    /// certificate, written to `<data_dir>/dev-cert.pem` for clients.
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
    /// Names in the self-signed certificate.
    pub dev_cert_names: Vec<String>,
    /// Connections held at once; more are refused at the handshake.
    pub max_connections: usize,
    /// Frames queued per connection before it counts as a slow consumer and
    /// is disconnected. 1024 frames absorb a burst of a busy chat while
    /// bounding what one stalled phone can pin in memory (~1 MiB at 1 KiB).
    pub outbound_queue: usize,
    /// Backplane payloads queued for this edge's fan-out before the
    /// backplane drops them (each gap is then repaired from the store).
    pub inbound_queue: usize,
    /// Largest frame accepted from a client.
    pub max_frame_bytes: usize,
    /// Time a new connection has to say Hello.
    pub hello_timeout_ms: u64,
    /// A connection with no traffic for this long is closed; clients ping
    /// well within it.
    pub idle_timeout_ms: u64,
    /// On shutdown (SIGTERM) each device is told to reconnect after a
    /// random delay in 0..=this, so an edge's devices do not all arrive
    /// elsewhere at once.
    pub drain_spread_ms: u64,
    /// How long a shutdown waits for devices to leave before closing the
    /// rest.
    pub drain_deadline_ms: u64,
    /// Handshakes in progress at once; past this, new ones are refused
    /// (the client backs off and retries). A handshake costs ~0.5 ms of CPU
    /// and a few KiB: 2,048 in flight is a second of both cores of a small
    /// edge, and bounded memory under a flood.
    pub max_handshakes_in_flight: usize,
    /// A connection refused past `max_handshakes_in_flight` is told when
    /// to come back (`retry-after-ms=N` in the refusal's reason phrase):
    /// the next free turn at the rate the slots turn over, so the refused
    /// devices return spread out, in order (`core::pacer`, ADR 0015).
    /// false: a bare refusal, and the devices wait on their shed backoff.
    pub pace_refusals: bool,
    /// Above this many new connections a second, a client must prove its
    /// address first (a QUIC Retry: one extra round trip) before the edge
    /// spends any crypto or state on it: a spoofed-source flood then costs
    /// one stateless packet each. 0: always.
    pub retry_above_per_s: u32,
    /// QUIC ACK frequency (draft-ietf-quic-ack-frequency, which quinn
    /// clients support): ask each device to acknowledge only every this
    /// many ack-eliciting packets, or after `ack_delay_ms`. 0 keeps QUIC's
    /// default (every second packet, and `ack_delay_ms` is not asked). A
    /// broadcast receiver's ACKs are most of what an edge receives; loss
    /// recovery still runs on the ACKs that come.
    pub ack_every: u32,
    /// With `ack_every`: the longest a device may hold its ACK, asked as
    /// is even where it exceeds the path's RTT (the patched quinn-proto,
    /// ADR 0015). At 20 frames a second a device's packets come 50 ms
    /// apart, so only a delay past that lets one ACK cover several. A
    /// lost packet's retransmission and the probe timeout wait up to this
    /// much longer.
    pub ack_delay_ms: u64,
    /// The most QUIC connection ids the edge issues to a device, counting
    /// the handshake's (the patched quinn-proto, ADR 0015; quinn-proto
    /// issues up to 8, a quinn device takes 5). Each one costs an entry in
    /// the shard's index and in the connection; a device that does not
    /// migrate uses one, a spare lets it migrate once (and a replacement is
    /// issued when it retires one). The edge does not follow a migration
    /// across shards anyway (`shards`).
    pub connection_ids: u32,
    /// I/O shards: each owns a UDP socket on the listen port
    /// (`SO_REUSEPORT`), its connections' QUIC state and one loop. 0: one
    /// per core. A client's connection stays on the shard its address
    /// hashes to, so a client whose address changes mid-connection
    /// reconnects (QUIC migration is not followed across shards).
    pub shards: usize,
    /// TLS session tickets (resumption): a returning device skips the
    /// certificate signature and its verification. The ticket keys are
    /// derived from `node.token_secret` and this period, so every edge of
    /// a fleet, and an edge after a restart, opens the tickets of the
    /// others; a new key every period, a ticket lives at most two. 0: no
    /// tickets (every handshake a full one).
    pub ticket_rotation_s: u64,
    /// Session tickets sent after each handshake (1-8; the SDK keeps up
    /// to 8 per edge name). A device spends one on every connect attempt,
    /// also on one the edge refuses before TLS (its handshake slots full,
    /// in a reconnect storm): with rustls's default of 2, a device refused
    /// twice came back with a full handshake. Each is a ChaCha20-Poly1305
    /// seal and about 150 bytes after the handshake.
    pub tickets_per_handshake: usize,
    /// QUIC address-validation tokens (NEW_TOKEN) sent on each connection
    /// (0-8; 0: none). A device presents one when it connects again, and is
    /// then not asked for a Retry above `retry_above_per_s`: in a reconnect
    /// storm the returning devices skip that round trip and the second
    /// Initial, while an unknown source still gets the Retry. Keyed by the
    /// fleet secret, so they hold across restarts and edges. 4 by default,
    /// as with tickets: a device spends one on every connect attempt, also
    /// on one the edge refuses.
    pub address_tokens: u32,
    /// Request rate limits per connection and per user.
    pub rates: crate::limits::Rates,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7443".parse().expect("literal address"),
            cert_path: None,
            key_path: None,
            dev_cert_names: vec!["localhost".into(), "127.0.0.1".into()],
            max_connections: 100_000,
            outbound_queue: 1024,
            inbound_queue: 65_536,
            max_frame_bytes: tiercast_schemas::MAX_FRAME_BYTES,
            hello_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
            drain_spread_ms: 5_000,
            drain_deadline_ms: 10_000,
            max_handshakes_in_flight: 2_048,
            pace_refusals: true,
            retry_above_per_s: 2_000,
            ack_every: 0,
            ack_delay_ms: 25,
            connection_ids: 2,
            shards: 0,
            ticket_rotation_s: 6 * 3600,
            tickets_per_handshake: 4,
            address_tokens: 4,
            rates: crate::limits::Rates::default(),
        }
    }
}

impl EdgeConfig {
    /// The number of I/O shards [`Self::shards`] asks for.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.cert_path.is_some() != self.key_path.is_some() {
            return Err(InvalidSetting::new(
                "edge.cert_path",
                "set both edge.cert_path and edge.key_path, or neither",
            ));
        }
        if self.max_connections == 0 {
            return Err(InvalidSetting::new(
                "edge.max_connections",
                "must be positive",
            ));
        }
        if !(8..=1_000_000).contains(&self.outbound_queue) {
            return Err(InvalidSetting::new(
                "edge.outbound_queue",
                "must be 8..=1000000",
            ));
        }
        if !(1..=16_777_216).contains(&self.inbound_queue) {
            return Err(InvalidSetting::new(
                "edge.inbound_queue",
                "must be 1..=16777216",
            ));
        }
        if !(1024..=tiercast_schemas::MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(InvalidSetting::new(
                "edge.max_frame_bytes",
                format!("must be 1024..={}", tiercast_schemas::MAX_FRAME_BYTES),
            ));
        }
        if !(100..=60_000).contains(&self.hello_timeout_ms) {
            return Err(InvalidSetting::new(
                "edge.hello_timeout_ms",
                "must be 100..=60000",
            ));
        }
        if self.shards > 256 {
            return Err(InvalidSetting::new("edge.shards", "must be 0..=256"));
        }
        if self.ack_every > 1_000 {
            return Err(InvalidSetting::new("edge.ack_every", "must be 0..=1000"));
        }
        if !(1..=1_000).contains(&self.ack_delay_ms) {
            return Err(InvalidSetting::new("edge.ack_delay_ms", "must be 1..=1000"));
        }
        if !(1..=8).contains(&self.connection_ids) {
            return Err(InvalidSetting::new("edge.connection_ids", "must be 1..=8"));
        }
        if !(1_000..=600_000).contains(&self.idle_timeout_ms) {
            return Err(InvalidSetting::new(
                "edge.idle_timeout_ms",
                "must be 1000..=600000",
            ));
        }
        if self.drain_spread_ms > 600_000 {
            return Err(InvalidSetting::new(
                "edge.drain_spread_ms",
                "must be at most 600000",
            ));
        }
        if self.drain_deadline_ms > 600_000 {
            return Err(InvalidSetting::new(
                "edge.drain_deadline_ms",
                "must be at most 600000",
            ));
        }
        if !(1..=1_000_000).contains(&self.max_handshakes_in_flight) {
            return Err(InvalidSetting::new(
                "edge.max_handshakes_in_flight",
                "must be 1..=1000000",
            ));
        }
        // RFC 8446 caps a ticket's life at 7 days; one lives two periods.
        if self.ticket_rotation_s != 0 && !(60..=302_400).contains(&self.ticket_rotation_s) {
            return Err(InvalidSetting::new(
                "edge.ticket_rotation_s",
                "must be 0 (no tickets) or 60..=302400 seconds",
            ));
        }
        if !(1..=8).contains(&self.tickets_per_handshake) {
            return Err(InvalidSetting::new(
                "edge.tickets_per_handshake",
                "must be 1..=8",
            ));
        }
        if self.address_tokens > 8 {
            return Err(InvalidSetting::new("edge.address_tokens", "must be 0..=8"));
        }
        self.rates.validate()?;
        Ok(())
    }
}

/// Token keys and credentials (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Key id of `node.token_secret`: written in the `kid` header of every
    /// token minted here, and how tokens name the key to verify them with.
    pub kid: String,
    /// Earlier keys still accepted, `kid = "secret"`: during a rotation the
    /// previous key stays here until the tokens it signed have expired.
    pub verify_keys: std::collections::BTreeMap<String, String>,
    /// Longest a token may still live when presented: bearer tokens that
    /// never expire are a liability when they leak.
    pub max_token_lifetime_s: u64,
    /// The internal credential's secret (edge processes calling an engine
    /// service's `/internal/store`), at least 32 bytes and unlike
    /// `node.token_secret`, so no user or publisher credential opens the
    /// raw store. Required with `node.store_url`; an engine service without
    /// it serves no internal API.
    pub internal_secret: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            kid: tiercast_engine::auth::DEFAULT_KID.into(),
            verify_keys: Default::default(),
            max_token_lifetime_s: tiercast_engine::auth::DEFAULT_MAX_LIFETIME_SECS,
            internal_secret: String::new(),
        }
    }
}

/// Which backplane carries messages between engines and edges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackplaneKind {
    /// In-process: a single node.
    #[default]
    Local,
    /// Redis Cluster (or one Redis 7 server) with sharded pub/sub.
    Redis,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackplaneConfig {
    pub kind: BackplaneKind,
    pub redis: tiercast_engine::backplane::redis::RedisConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub engine: EngineConfig,
    pub edge: EdgeConfig,
    pub backplane: BackplaneConfig,
    pub scylla: tiercast_engine::store::ScyllaConfig,
    pub auth: AuthConfig,
    pub http: tiercast_engine::http::HttpLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("setting `{key}`: {reason}")]
    Override { key: String, reason: String },
    #[error("{0}")]
    Invalid(#[from] InvalidSetting),
}

pub const ENV_PREFIX: &str = "TIERCAST_";

impl Config {
    /// Builds the configuration: defaults < `file` < environment (`vars`,
    /// `TIERCAST_EDGE__LISTEN=...`) < `overrides` (`edge.listen=...`), then
    /// validates it.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let cfg = Self::merged(file, vars, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The settings merged as [`Config::load`] merges them, not yet
    /// validated: for a caller that fills in a setting (the development
    /// node's secret) before it calls [`Config::validate`].
    pub fn merged(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut doc = toml::Table::try_from(Config::default()).expect("defaults serialize");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: path.display().to_string(),
                        reason: e.message().to_owned(),
                    })?;
            merge(&mut doc, table);
        }
        let env: Vec<(String, String)> = vars
            .into_iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(ENV_PREFIX)?;
                if !rest.contains("__") {
                    return None;
                }
                Some((rest.to_lowercase().replace("__", "."), v))
            })
            .collect();
        for (key, value) in env.iter().chain(overrides) {
            set(&mut doc, key, value)?;
        }
        let cfg: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: "(merged settings)".into(),
                reason: e.message().to_owned(),
            })?;
        Ok(cfg)
    }

    /// The keys user and publisher tokens are minted and verified with.
    pub fn token_keys(&self) -> TokenKeys {
        let others: Vec<(String, Vec<u8>)> = self
            .auth
            .verify_keys
            .iter()
            .map(|(k, s)| (k.clone(), s.as_bytes().to_vec()))
            .collect();
        TokenKeys::with_keys(
            &self.auth.kid,
            self.node.token_secret.as_bytes(),
            &others,
            self.auth.max_token_lifetime_s,
        )
    }

    /// The internal credential's keys, if one is configured.
    pub fn internal_keys(&self) -> Option<TokenKeys> {
        (!self.auth.internal_secret.is_empty()).then(|| {
            TokenKeys::with_keys(
                "internal",
                self.auth.internal_secret.as_bytes(),
                &[],
                self.auth.max_token_lifetime_s,
            )
        })
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.node.token_secret.len() < MIN_SECRET_BYTES {
            return Err(InvalidSetting::new(
                "node.token_secret",
                format!(
                    "must be at least {MIN_SECRET_BYTES} bytes (set TIERCAST_NODE__TOKEN_SECRET)"
                ),
            ));
        }
        let kid_ok = |k: &str| {
            !k.is_empty()
                && k.len() <= 64
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !kid_ok(&self.auth.kid) {
            return Err(InvalidSetting::new(
                "auth.kid",
                "must be 1..=64 of [A-Za-z0-9_-]",
            ));
        }
        for (kid, secret) in &self.auth.verify_keys {
            if !kid_ok(kid) || *kid == self.auth.kid {
                return Err(InvalidSetting::new(
                    "auth.verify_keys",
                    format!("key id `{kid}` must be 1..=64 of [A-Za-z0-9_-] and not auth.kid"),
                ));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(InvalidSetting::new(
                    "auth.verify_keys",
                    format!("the secret of `{kid}` must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
        }
        if !(60..=365 * 86_400).contains(&self.auth.max_token_lifetime_s) {
            return Err(InvalidSetting::new(
                "auth.max_token_lifetime_s",
                "must be 60..=31536000",
            ));
        }
        if !self.auth.internal_secret.is_empty()
            && (self.auth.internal_secret.len() < MIN_SECRET_BYTES
                || self.auth.internal_secret == self.node.token_secret)
        {
            return Err(InvalidSetting::new(
                "auth.internal_secret",
                format!(
                    "must be at least {MIN_SECRET_BYTES} bytes and differ from node.token_secret"
                ),
            ));
        }
        if let Some(url) = &self.node.store_url {
            check_store_url(url, self.node.store_ca_path.is_some())
                .map_err(|e| InvalidSetting::new("node.store_url", e))?;
        }
        if self.node.store_url.is_some() && self.auth.internal_secret.is_empty() {
            return Err(InvalidSetting::new(
                "auth.internal_secret",
                "is required with node.store_url (the edge's credential for the engine service; set TIERCAST_AUTH__INTERNAL_SECRET)",
            ));
        }
        self.engine.validate()?;
        self.edge.validate()?;
        self.http.validate()?;
        if self.node.store == StoreKind::Scylla && self.node.store_url.is_none() {
            self.scylla
                .validate()
                .map_err(|e| InvalidSetting::new("scylla", e))?;
        }
        if self.backplane.kind == BackplaneKind::Redis {
            self.backplane
                .redis
                .validate()
                .map_err(|e| InvalidSetting::new("backplane.redis", e))?;
        }
        Ok(())
    }
}

/// `https://host:port`, or `http://` to a loopback address only.
fn check_store_url(url: &str, have_ca: bool) -> Result<(), String> {
    let (scheme, rest) = url.split_once("://").ok_or("must be http(s)://host:port")?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .trim_matches(['[', ']']);
    match scheme {
        "https" if have_ca => Ok(()),
        "https" => Err("an https store_url needs node.store_ca_path (the CA of the engine service's certificate)".into()),
        "http" => {
            let loopback = host == "localhost"
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err("plain http only to a loopback address; use https (http.tls_cert_path on the engine service, node.store_ca_path here)".into())
            }
        }
        _ => Err("must be http(s)://host:port".into()),
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Sets `section.key` to `value`, read as a TOML value when it parses as one
/// (numbers, booleans, arrays) and as a string otherwise.
fn set(doc: &mut toml::Table, key: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::Override {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    let (path, field) = key
        .rsplit_once('.')
        .ok_or_else(|| bad("expected section.key"))?;
    let mut table = &mut *doc;
    for part in path.split('.') {
        table = table
            .get_mut(part)
            .and_then(|v| v.as_table_mut())
            .ok_or_else(|| {
                bad("unknown section (node, engine, engine.tiers, edge, edge.rates.KIND, backplane, backplane.redis, scylla, auth, auth.verify_keys, http)")
            })?;
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    table.insert(field.to_owned(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: (&str, &str) = (
        "TIERCAST_NODE__TOKEN_SECRET",
        "0123456789abcdef0123456789abcdef",
    );

    fn load(vars: &[(&str, &str)], overrides: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(
            None,
            vars.iter()
                .chain([&SECRET])
                .map(|(k, v)| (k.to_string(), v.to_string())),
            &overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[edge]\noutbound_queue = 64\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let cfg = Config::load(
            Some(&file),
            [
                (
                    "TIERCAST_EDGE__OUTBOUND_QUEUE".to_string(),
                    "128".to_string(),
                ),
                (SECRET.0.to_string(), SECRET.1.to_string()),
            ],
            &[("engine.max_devices".into(), "2".into())],
        )
        .unwrap();
        assert_eq!(cfg.edge.outbound_queue, 128);
        assert_eq!(cfg.edge.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.engine.max_devices, 2);
        assert_eq!(cfg.engine.max_page, EngineConfig::default().max_page);
    }

    #[test]
    fn nested_sections_and_lists() {
        let cfg = load(
            &[("TIERCAST_BACKPLANE__REDIS__CLUSTER", "false")],
            &[
                ("backplane.kind", "redis"),
                (
                    "backplane.redis.nodes",
                    "[\"127.0.0.1:7000\", \"127.0.0.1:7001\"]",
                ),
                ("engine.tiers.sharded_above", "50"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.backplane.kind, BackplaneKind::Redis);
        assert_eq!(cfg.backplane.redis.nodes.len(), 2);
        assert!(!cfg.backplane.redis.cluster);
        assert_eq!(cfg.engine.tiers.sharded_above, 50);
        let e = load(
            &[],
            &[
                ("backplane.kind", "redis"),
                ("backplane.redis.nodes", "[\"nope\"]"),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("backplane.redis"), "{e}");
    }

    #[test]
    fn errors_name_the_setting() {
        let e = load(&[], &[("engine.max_devices", "0")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting `engine.max_devices`: must be 1..=16"
        );
        let e = load(&[], &[("edge.listen", "nowhere")]).unwrap_err();
        assert!(
            e.to_string().contains("listen") || e.to_string().contains("socket"),
            "{e}"
        );
        for n in ["0", "9"] {
            let e = load(&[], &[("edge.connection_ids", n)]).unwrap_err();
            assert_eq!(
                e.to_string(),
                "invalid setting `edge.connection_ids`: must be 1..=8"
            );
        }
        for n in ["0", "9"] {
            let e = load(&[], &[("edge.tickets_per_handshake", n)]).unwrap_err();
            assert_eq!(
                e.to_string(),
                "invalid setting `edge.tickets_per_handshake`: must be 1..=8"
            );
        }
        let e = load(&[], &[("edge.address_tokens", "9")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting `edge.address_tokens`: must be 0..=8"
        );
        let e = load(&[], &[("edge.no_such_thing", "1")]).unwrap_err();
        assert!(e.to_string().contains("no_such_thing"), "{e}");
        let e = load(&[], &[("nosection", "1")]).unwrap_err();
        assert!(e.to_string().contains("section.key"), "{e}");
        let e = Config::load(None, [], &[]).unwrap_err();
        assert!(e.to_string().contains("node.token_secret"), "{e}");
        let e = load(&[], &[("edge.cert_path", "/x.pem")]).unwrap_err();
        assert!(e.to_string().contains("edge.cert_path"), "{e}");
        // The store API: plain HTTP only on loopback, HTTPS with a CA.
        let internal = ("auth.internal_secret", "internal-secret-0123456789abcdefgh");
        for (url, ca, ok) in [
            ("http://127.0.0.1:7480", None, true),
            ("http://localhost:7480", None, true),
            ("http://[::1]:7480", None, true),
            ("http://10.0.0.5:7480", None, false),
            ("https://engine.internal:7480", None, false),
            ("https://engine.internal:7480", Some("/etc/ca.pem"), true),
            ("ftp://x", None, false),
        ] {
            let mut o = vec![("node.store_url", url), internal];
            if let Some(ca) = ca {
                o.push(("node.store_ca_path", ca));
            }
            assert_eq!(load(&[], &o).is_ok(), ok, "{url} {ca:?}");
        }
        let e = load(&[], &[("node.store_url", "http://127.0.0.1:1")]).unwrap_err();
        assert!(e.to_string().contains("auth.internal_secret"), "{e}");
    }

    /// Every leaf setting of the defaults, `section.key` -> its TOML value.
    fn leaves(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeMap<String, String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(sub) => leaves(&key, sub, out),
                v => {
                    out.insert(key, v.to_string());
                }
            }
        }
    }

    #[test]
    fn configuration_doc_lists_every_setting() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let text = std::fs::read_to_string(path).unwrap();
        // Rows: | `section.key` | `default` | unit | meaning |
        let mut documented = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split(" | ").collect();
            let key = cells[0].trim_start_matches("| ").trim_matches('`');
            let default = cells[1].trim_matches('`');
            let meaning = cells.get(3).map_or("", |m| m.trim_end_matches(" |").trim());
            assert!(!meaning.is_empty(), "{key}: no meaning in {path}");
            assert!(
                documented
                    .insert(key.to_owned(), default.to_owned())
                    .is_none(),
                "{key} twice in {path}"
            );
        }
        let mut defaults = std::collections::BTreeMap::new();
        leaves(
            "",
            &toml::Table::try_from(Config::default()).unwrap(),
            &mut defaults,
        );
        for (key, value) in &defaults {
            assert_eq!(
                documented.get(key),
                Some(value),
                "{key}: the default is {value}; {path} must say so"
            );
        }
        for (key, default) in &documented {
            if defaults.contains_key(key) {
                continue;
            }
            // Unset by default (an Option, an empty map): still a setting,
            // which the loader takes (a type error, never an unknown field).
            assert!(
                default == "unset" || default == "{}",
                "{key}: {default} is no default"
            );
            let probe = Config::merged(None, [], &[(key.clone(), "\"probe\"".into())]);
            if let Err(e) = probe {
                let e = e.to_string();
                assert!(
                    !e.contains("unknown"),
                    "{key} in {path} is not a setting: {e}"
                );
            }
        }
    }
}
