//! Load scenarios (`loadgen/scenarios/*.toml`): who is connected, which
//! conversations exist, and the open-loop send schedule. docs/loadgen.md
//! documents every key.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Users 1..=users, each with `devices_per_user` connected devices.
    pub users: u64,
    #[serde(default = "one")]
    pub devices_per_user: u64,
    /// Sending time measured, after the warm-up.
    pub duration_s: f64,
    /// Sending time before measuring (its messages are still accounted for
    /// loss, not for latency or throughput).
    #[serde(default)]
    pub warmup_s: f64,
    /// New connections per second while connecting.
    #[serde(default = "default_connect_rate")]
    pub connect_rate: f64,
    #[serde(default = "default_payload")]
    pub payload_bytes: usize,
    /// How long to wait for the last deliveries after the last send.
    #[serde(default = "default_settle")]
    pub settle_s: f64,
    /// Each device's idle timeout (keep-alives go every third of it), as
    /// the SDK's `ClientConfig::idle_timeout`: how fast a device notices
    /// its edge died, against a PING and its ACK per device every third of
    /// it (100,000 devices at the default 4 s: 75,000 packets/s each way).
    #[serde(default = "default_idle")]
    pub device_idle_timeout_s: f64,
    /// Each device's shed backoff (after an edge refused it for load), as
    /// the SDK's `SessionConfig::shed_backoff_base` and `_cap`.
    #[serde(default = "default_shed_base")]
    pub device_shed_backoff_base_s: f64,
    #[serde(default = "default_shed_cap")]
    pub device_shed_backoff_cap_s: f64,
    pub rate: Rate,
    /// Rate steps after the warm-up, in order (their durations add up to
    /// `duration_s`); empty: `rate` throughout. The warm-up runs at `rate`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
    pub conversations: Vec<Group>,
    #[serde(default)]
    pub reconnect_storm: Option<Storm>,
    /// An edge process is signalled mid-run (self-hosted targets only).
    #[serde(default)]
    pub edge_fault: Option<EdgeFault>,
}

fn one() -> u64 {
    1
}
fn default_connect_rate() -> f64 {
    1_000.0
}
fn default_payload() -> usize {
    128
}
fn default_settle() -> f64 {
    5.0
}
fn default_idle() -> f64 {
    4.0
}
fn default_shed_base() -> f64 {
    tiercast_client::reconnect::SHED_BACKOFF_BASE.as_secs_f64()
}
fn default_shed_cap() -> f64 {
    tiercast_client::reconnect::SHED_BACKOFF_CAP.as_secs_f64()
}
fn one_f() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateKind {
    /// Evenly spaced sends.
    Constant,
    /// Exponential gaps (a Poisson process) with the same mean.
    Poisson,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub kind: RateKind,
    /// Messages per second over all conversations.
    pub messages_per_s: f64,
}

/// One rate step of a scenario (`[[stages]]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub duration_s: f64,
    /// Messages per second over all conversations during the step (drawn
    /// as `rate.kind` says).
    pub messages_per_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sender {
    /// A member's device sends over QUIC.
    #[default]
    Member,
    /// A backend publishes over the HTTP API.
    Publisher,
}

/// A set of like conversations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub count: u64,
    /// Members per conversation: `size_min..=size_max` (uniform).
    pub size_min: u64,
    #[serde(default)]
    pub size_max: Option<u64>,
    /// Pin a tier (1..=3); by default the planner chooses by size.
    #[serde(default)]
    pub tier: Option<u8>,
    /// Share of the sends that go to this group (relative).
    #[serde(default = "one_f")]
    pub weight: f64,
    #[serde(default)]
    pub sender: Sender,
    /// Share of notified devices that pull a tier-3 body.
    #[serde(default)]
    pub pull_fraction: f64,
}

/// All devices connected to one edge drop at once and come back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storm {
    /// Seconds after the warm-up ends.
    pub at_s: f64,
    /// Which edge (index into the edges) loses its devices.
    #[serde(default)]
    pub edge: usize,
}

/// An edge fault mid-run: `kill` (SIGKILL to edge `edge`: no drain, its
/// devices notice by their idle timeout; not restarted), `term` (SIGTERM:
/// it drains its devices to the other edges and exits; not restarted), or
/// `restart` (a rolling restart: every edge in turn drains, exits and comes
/// back on its address before the next one goes; `edge` is ignored), or
/// `kill-restart` (SIGKILL to edge `edge`, then the same process started
/// again on its addresses and data directory, as a supervisor would: on a
/// single node, the whole node; its devices come back to it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeFault {
    /// Seconds after sending starts (warm-up included).
    pub at_s: f64,
    #[serde(default)]
    pub edge: usize,
    pub signal: FaultSignal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultSignal {
    Kill,
    Term,
    Restart,
    #[serde(rename = "kill-restart")]
    KillRestart,
}

impl FaultSignal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "KILL",
            Self::Term => "TERM",
            Self::Restart => "rolling restart",
            Self::KillRestart => "KILL and restart",
        }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read scenario {}: {e}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).map_err(|e| format!("scenario {}: {e}", path.display()))?;
        s.validate()
            .map_err(|e| format!("scenario {}: {e}", path.display()))?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.users < 2 {
            return Err("users must be at least 2".into());
        }
        if !(1..=3).contains(&self.devices_per_user) {
            return Err("devices_per_user must be 1..=3 (the device limit)".into());
        }
        if !(self.duration_s > 0.0 && self.duration_s <= 3_600.0) {
            return Err("duration_s must be in (0, 3600]".into());
        }
        if !(0.0..=600.0).contains(&self.warmup_s) || !(0.0..=600.0).contains(&self.settle_s) {
            return Err("warmup_s and settle_s must be 0..=600".into());
        }
        if !(1.0..=30.0).contains(&self.device_idle_timeout_s) {
            return Err(
                "device_idle_timeout_s must be 1..=30 (the edge's own idle timeout caps it)".into(),
            );
        }
        let (base, cap) = (
            self.device_shed_backoff_base_s,
            self.device_shed_backoff_cap_s,
        );
        if !(0.01..=600.0).contains(&base) || !(base..=600.0).contains(&cap) {
            return Err(
                "device_shed_backoff_base_s must be 0.01..=600 and device_shed_backoff_cap_s base..=600"
                    .into(),
            );
        }
        if !(self.connect_rate.is_finite() && self.connect_rate > 0.0) {
            return Err("connect_rate must be positive".into());
        }
        if !(16..=16 * 1024).contains(&self.payload_bytes) {
            return Err("payload_bytes must be 16..=16384".into());
        }
        if !(self.rate.messages_per_s > 0.0 && self.rate.messages_per_s <= 1_000_000.0) {
            return Err("rate.messages_per_s must be in (0, 1000000]".into());
        }
        if !self.stages.is_empty() {
            if let Some((i, _)) = self.stages.iter().enumerate().find(|(_, st)| {
                !(st.duration_s > 0.0
                    && st.messages_per_s > 0.0
                    && st.messages_per_s <= 1_000_000.0)
            }) {
                return Err(format!(
                    "stage {}: duration_s must be positive and messages_per_s in (0, 1000000]",
                    i + 1
                ));
            }
            let total: f64 = self.stages.iter().map(|st| st.duration_s).sum();
            if (total - self.duration_s).abs() > 1e-6 {
                return Err(format!(
                    "the stages last {total} s but duration_s is {}: they must add up to it",
                    self.duration_s
                ));
            }
        }
        if self.conversations.is_empty() {
            return Err("at least one [[conversations]] group is needed".into());
        }
        for g in &self.conversations {
            let max = g.size_max.unwrap_or(g.size_min);
            if g.count == 0 || g.size_min < 2 || max < g.size_min || max > self.users {
                return Err(format!(
                    "group `{}`: count must be positive and 2 <= size_min <= size_max <= users",
                    g.name
                ));
            }
            if g.tier.is_some_and(|t| !(1..=3).contains(&t)) {
                return Err(format!("group `{}`: tier must be 1..=3", g.name));
            }
            let weight_ok = g.weight.is_finite() && g.weight >= 0.0;
            if !weight_ok || !(0.0..=1.0).contains(&g.pull_fraction) {
                return Err(format!(
                    "group `{}`: weight must be >= 0 and pull_fraction 0..=1",
                    g.name
                ));
            }
        }
        if self.conversations.iter().all(|g| g.weight == 0.0) {
            return Err("at least one group needs a positive weight".into());
        }
        Ok(())
    }

    pub fn devices(&self) -> u64 {
        self.users * self.devices_per_user
    }

    /// The send rate at `t` seconds from the first send, and when that
    /// rate ends (infinity for the last).
    pub fn rate_at(&self, t: f64) -> (f64, f64) {
        if self.stages.is_empty() {
            return (self.rate.messages_per_s, f64::INFINITY);
        }
        if t < self.warmup_s {
            return (self.rate.messages_per_s, self.warmup_s);
        }
        let mut end = self.warmup_s;
        for (i, st) in self.stages.iter().enumerate() {
            end += st.duration_s;
            if t < end || i + 1 == self.stages.len() {
                let end = if i + 1 == self.stages.len() {
                    f64::INFINITY
                } else {
                    end
                };
                return (st.messages_per_s, end);
            }
        }
        (self.rate.messages_per_s, f64::INFINITY)
    }

    /// Each stage's window, seconds from the first send: (start, end).
    pub fn stage_windows(&self) -> Vec<(f64, f64)> {
        let mut start = self.warmup_s;
        self.stages
            .iter()
            .map(|st| {
                let w = (start, start + st.duration_s);
                start = w.1;
                w
            })
            .collect()
    }
}

/// One conversation of a run, with its members.
#[derive(Debug, Clone)]
pub struct ConversationPlan {
    pub id: u64,
    pub group: usize,
    pub members: Vec<u64>,
}

/// Lays the groups' conversations over the users: each conversation takes
/// consecutive users (wrapping) from where the previous one ended, so every
/// user is in some conversation when there are enough seats, and sizes are
/// drawn from the group's range with a fixed seed (the same scenario gives
/// the same layout).
pub fn layout(s: &Scenario, first_id: u64) -> Vec<ConversationPlan> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7117_ca57);
    let mut next_user = 0u64;
    let mut out = Vec::new();
    for (gi, g) in s.conversations.iter().enumerate() {
        let max = g.size_max.unwrap_or(g.size_min);
        for _ in 0..g.count {
            let size = rng.random_range(g.size_min..=max);
            let members = (0..size).map(|k| (next_user + k) % s.users + 1).collect();
            next_user = (next_user + size) % s.users;
            out.push(ConversationPlan {
                id: first_id + out.len() as u64,
                group: gi,
                members,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate().map(|()| s)
    }

    #[test]
    fn the_shipped_scenarios_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
        assert!(n >= 5);
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        let base = r#"
            name = "x"
            users = 10
            duration_s = 1
            rate = { kind = "constant", messages_per_s = 10 }
        "#;
        let e = scenario(&format!(
            "{base}\n[[conversations]]\nname = \"g\"\ncount = 1\nsize_min = 20\n"
        ))
        .unwrap_err();
        assert!(e.contains("size_max <= users"), "{e}");
        let e = scenario(base).unwrap_err();
        assert!(e.contains("conversations"), "{e}");
        let e = scenario(&format!(
            "{base}\nbogus = 1\n[[conversations]]\nname = \"g\"\ncount = 1\nsize_min = 2\n"
        ))
        .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let group = "[[conversations]]\nname = \"g\"\ncount = 1\nsize_min = 2\n";
        let e = scenario(&format!(
            "{base}\ndevice_shed_backoff_base_s = 2\ndevice_shed_backoff_cap_s = 1\n{group}"
        ))
        .unwrap_err();
        assert!(e.contains("device_shed_backoff_cap_s"), "{e}");
        let s = scenario(&format!("{base}\n{group}")).unwrap();
        assert_eq!(
            (s.device_shed_backoff_base_s, s.device_shed_backoff_cap_s),
            (1.0, 60.0),
            "the SDK's shed backoff by default"
        );
    }

    #[test]
    fn layout_is_deterministic_and_within_sizes() {
        let s = scenario(
            r#"
            name = "x"
            users = 50
            duration_s = 1
            rate = { kind = "poisson", messages_per_s = 10 }
            [[conversations]]
            name = "small"
            count = 30
            size_min = 2
            size_max = 5
        "#,
        )
        .unwrap();
        let a = layout(&s, 1);
        let b = layout(&s, 1);
        assert_eq!(a.len(), 30);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.members, y.members);
            assert!((2..=5).contains(&x.members.len()));
            let distinct: std::collections::HashSet<_> = x.members.iter().collect();
            assert_eq!(distinct.len(), x.members.len());
            assert!(x.members.iter().all(|&u| (1..=50).contains(&u)));
        }
    }
}
