//! The engine's settings (part of the process configuration).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Snowflake node id, 0..=1023. In a cluster it is leased instead.
    pub node_id: u16,
    /// Largest message body accepted, in bytes. 16 KiB covers chat text and
    /// small structured payloads; media travels by reference.
    pub max_body_bytes: usize,
    /// Registered devices per user.
    pub max_devices: usize,
    /// At the device limit, evict the least recently seen device instead of
    /// refusing the new one.
    pub evict_oldest_device: bool,
    /// How long a backward clock step is waited out before sends fail.
    pub max_clock_backstep_ms: u64,
    /// Cluster: the largest skew of this node's wall clock against the
    /// Redis servers' (measured at every lease renewal) at which it issues
    /// ids; beyond it sends fail with `unavailable` until the clock is
    /// fixed. It must stay below the SDK's resync window (3 s), which is
    /// what makes a resume independent of the nodes' clocks; 0 turns the
    /// check off.
    pub max_clock_skew_ms: u64,
    /// Largest page a Fetch or an inbox drain returns.
    pub max_page: usize,
    /// Tier thresholds (members) and their hysteresis.
    pub tiers: crate::planner::Thresholds,
    /// K: node channels per edge. Cluster-wide: every engine and edge must
    /// agree. 8 spreads one edge's tier 2/3 traffic over 8 hash slots, so
    /// over every shard of a small cluster.
    pub node_channels: u16,
    /// A device unseen this long is removed with its pending inbox.
    pub device_ttl_ms: u64,
    /// How often the device reaper looks for such devices.
    pub device_sweep_ms: u64,
    /// How long a failed publish of a stored message is retried (with
    /// backoff) before devices are left to catch up on their next connect.
    /// Covers a Redis failover (a shard without a master for a few
    /// seconds); the conversation's later messages wait behind it.
    pub publish_retry_ms: u64,
    /// Cursors one Sync may carry.
    pub max_sync_cursors: usize,
    /// Cluster: read markers a stopped flusher left pending this long are
    /// taken over by another engine's flusher.
    pub read_claim_idle_ms: u64,
    /// How long a send's idempotency key (sender, conversation,
    /// client_msg_id) is remembered: a retry within it returns the first
    /// id. A day covers any client's retry horizon (an app offline
    /// overnight resends on the next start) at one small row per send.
    pub dedupe_ttl_ms: u64,
    /// Users one call may add (create or add members). Larger lists go in
    /// several calls: one call is one store transaction and one HTTP body.
    /// Default [`DEFAULT_MAX_MEMBERS_PER_CALL`].
    pub max_members_per_call: usize,
    /// Members a conversation may have. Tier 3 serves millions; the cap
    /// stops a runaway script from growing one without bound.
    pub max_conversation_members: u64,
    /// Longest conversation name, in bytes (control characters refused).
    pub max_name_bytes: usize,
}

/// The default of `engine.max_members_per_call` (clients that add members
/// in chunks use it when they cannot read the setting).
pub const DEFAULT_MAX_MEMBERS_PER_CALL: usize = 1_000;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            node_id: 0,
            max_body_bytes: 16 * 1024,
            max_devices: 3,
            evict_oldest_device: false,
            max_clock_backstep_ms: 100,
            max_clock_skew_ms: 1_000,
            max_page: 200,
            tiers: crate::planner::Thresholds::default(),
            node_channels: 8,
            device_ttl_ms: 30 * 24 * 3_600_000,
            device_sweep_ms: 60_000,
            publish_retry_ms: 10_000,
            max_sync_cursors: 256,
            read_claim_idle_ms: 30_000,
            dedupe_ttl_ms: 24 * 3_600_000,
            max_members_per_call: DEFAULT_MAX_MEMBERS_PER_CALL,
            max_conversation_members: 10_000_000,
            max_name_bytes: 256,
        }
    }
}

/// A setting that is out of range, named as in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{setting}`: {reason}")]
pub struct InvalidSetting {
    pub setting: &'static str,
    pub reason: String,
}

impl InvalidSetting {
    pub fn new(setting: &'static str, reason: impl Into<String>) -> Self {
        Self {
            setting,
            reason: reason.into(),
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.node_id > crate::snowflake::MAX_NODE {
            return Err(InvalidSetting::new("engine.node_id", "must be 0..=1023"));
        }
        let max_body = tiercast_schemas::MAX_FRAME_BYTES - 256;
        if self.max_body_bytes == 0 || self.max_body_bytes > max_body {
            return Err(InvalidSetting::new(
                "engine.max_body_bytes",
                format!("must be 1..={max_body} (it must fit in one frame)"),
            ));
        }
        if !(1..=16).contains(&self.max_devices) {
            return Err(InvalidSetting::new("engine.max_devices", "must be 1..=16"));
        }
        if self.max_clock_backstep_ms > 10_000 {
            return Err(InvalidSetting::new(
                "engine.max_clock_backstep_ms",
                "must be at most 10000",
            ));
        }
        if self.max_clock_skew_ms > 2_000 {
            return Err(InvalidSetting::new(
                "engine.max_clock_skew_ms",
                "must be at most 2000 (below the SDK's 3 s resync window)",
            ));
        }
        if self.publish_retry_ms > 60_000 {
            return Err(InvalidSetting::new(
                "engine.publish_retry_ms",
                "must be at most 60000",
            ));
        }
        if !(1..=1000).contains(&self.max_page) {
            return Err(InvalidSetting::new("engine.max_page", "must be 1..=1000"));
        }
        self.tiers
            .validate()
            .map_err(|e| InvalidSetting::new("engine.tiers", e))?;
        if !(1..=256).contains(&self.node_channels) {
            return Err(InvalidSetting::new(
                "engine.node_channels",
                "must be 1..=256",
            ));
        }
        if self.device_ttl_ms < 1_000 {
            return Err(InvalidSetting::new(
                "engine.device_ttl_ms",
                "must be at least 1000",
            ));
        }
        if !(100..=86_400_000).contains(&self.device_sweep_ms) {
            return Err(InvalidSetting::new(
                "engine.device_sweep_ms",
                "must be 100..=86400000",
            ));
        }
        if !(100..=3_600_000).contains(&self.read_claim_idle_ms) {
            return Err(InvalidSetting::new(
                "engine.read_claim_idle_ms",
                "must be 100..=3600000",
            ));
        }
        if !(1_000..=30 * 86_400_000).contains(&self.dedupe_ttl_ms) {
            return Err(InvalidSetting::new(
                "engine.dedupe_ttl_ms",
                "must be 1000..=2592000000 (30 days)",
            ));
        }
        if !(1..=100_000).contains(&self.max_members_per_call) {
            return Err(InvalidSetting::new(
                "engine.max_members_per_call",
                "must be 1..=100000",
            ));
        }
        if self.max_conversation_members == 0 {
            return Err(InvalidSetting::new(
                "engine.max_conversation_members",
                "must be positive",
            ));
        }
        if !(1..=4096).contains(&self.max_name_bytes) {
            return Err(InvalidSetting::new(
                "engine.max_name_bytes",
                "must be 1..=4096",
            ));
        }
        if !(1..=4096).contains(&self.max_sync_cursors) {
            return Err(InvalidSetting::new(
                "engine.max_sync_cursors",
                "must be 1..=4096",
            ));
        }
        Ok(())
    }
}
