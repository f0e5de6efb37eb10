//! `tiercast loadgen plan`: how many edges, Redis shards and database nodes
//! a workload needs, from what a `loadgen run` measured on one machine.
//!
//! Every number is printed with how it was computed and what it assumed.
//! Measured inputs (from the run's JSON): server CPU per delivery, edge
//! memory per connection. Counted, not assumed: Redis publishes per message
//! per tier (docs/fanout.md: tier 1 one per member, tiers 2 and 3 one per
//! hosting edge) and store writes per message (one message row plus one
//! inbox row per tier-1 recipient device). Assumed (override them in the
//! workload's `[assumptions]`): what one Redis shard and one database node
//! sustain, an edge machine's size, the target utilisation.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::report::RunReport;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    /// Users online at once.
    pub concurrent_users: u64,
    /// Connected devices per online user.
    pub devices_per_user: f64,
    /// Messages each online user causes per hour (sent by them or, for
    /// broadcasts, published to channels they are in, counted once).
    pub messages_per_user_per_hour: f64,
    pub payload_bytes: u64,
    pub tiers: Vec<TierMix>,
    #[serde(default)]
    pub assumptions: Assumptions,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierMix {
    pub tier: u8,
    /// Share of all messages (the shares add up to 1).
    pub share_of_messages: f64,
    pub avg_members: f64,
    /// Tier 3: share of notified devices that pull the body.
    #[serde(default)]
    pub pull_fraction: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Assumptions {
    /// Cores of one edge machine.
    pub edge_cores: f64,
    /// Memory of one edge machine, GiB.
    pub edge_memory_gib: f64,
    /// Share of an edge's measured capacity to plan for (headroom for
    /// reconnect storms and failover).
    pub utilization: f64,
    /// Publishes per second one Redis shard (primary) sustains.
    pub redis_publishes_per_shard: f64,
    /// Row writes per second one database node sustains.
    pub db_writes_per_node: f64,
    /// Frame bytes beyond the body per delivery (ids, FlatBuffers, QUIC).
    pub frame_overhead_bytes: f64,
    /// The most connections one edge is configured to admit
    /// (`edge.max_connections`); the plan never puts more on one edge,
    /// even with one edge down.
    pub edge_max_connections: f64,
    /// Edge CPU per returning device's handshake, microseconds: a resumed
    /// QUIC + TLS handshake measured by `cargo bench --bench handshake`
    /// (211-219 us, docs/runs/handshake-bench-run*.txt).
    pub handshake_cpu_us: f64,
    /// Seconds in which a failed edge's devices must be back on the others
    /// (their handshakes on the others' spare cores).
    pub storm_target_s: f64,
    /// Cores of one engine machine.
    pub engine_cores: f64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Self {
            edge_cores: 16.0,
            edge_memory_gib: 32.0,
            utilization: 0.5,
            redis_publishes_per_shard: 150_000.0,
            db_writes_per_node: 40_000.0,
            frame_overhead_bytes: 120.0,
            edge_max_connections: 100_000.0,
            handshake_cpu_us: 220.0,
            storm_target_s: 10.0,
            engine_cores: 8.0,
        }
    }
}

/// What the plan needs from a run's JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub scenario: String,
    /// Where it came from (the file), for the plan's lines.
    pub source: String,
    /// Server CPU microseconds per delivery (engine, store and edge, as the
    /// run measured them together).
    pub cpu_us_per_delivery: f64,
    /// Server CPU milliseconds per message.
    pub cpu_ms_per_message: f64,
    pub rss_per_connection_bytes: f64,
    pub connections_held: u64,
    pub machine_cpus: u64,
    /// Deliveries per second the run sustained (its measured window).
    pub deliveries_per_s: f64,
    /// Deliveries per tier: which tier's cost this run measures.
    pub tier_deliveries: std::collections::BTreeMap<u8, u64>,
}

/// A run whose median delivery took longer than this was not keeping up:
/// its queues were growing, so its CPU per delivery is not a steady-state
/// cost.
const OVERLOADED_P50_US: u64 = 1_000_000;

/// A run's p99 in the last third of its measured seconds against the
/// first third, when it climbed (more than 3x and past 100 ms): queues
/// growing through the run, so its CPU per delivery is not a steady state.
fn climbing(r: &RunReport) -> Option<(u64, u64)> {
    let (warm, duration) = r
        .scenario
        .as_ref()
        .map_or((0.0, f64::MAX), |s| (s.warmup_s, s.duration_s));
    let mut p99s: Vec<u64> = r
        .timeline
        .iter()
        .filter(|p| p.deliveries > 0 && (p.t_s as f64) >= warm && (p.t_s as f64) < warm + duration)
        .map(|p| p.p99_us)
        .collect();
    if p99s.len() < 6 {
        return None;
    }
    let third = p99s.len() / 3;
    let n = p99s.len();
    let median = |v: &mut [u64]| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let last = median(&mut p99s[n - third..]);
    let first = median(&mut p99s[..third]);
    (last > 3 * first && last > 100_000).then_some((first, last))
}

/// Deliveries of a tier at least this share of a run's make it that tier's
/// calibration.
pub const TIER_DOMINANT_SHARE: f64 = 0.8;

/// The cost of each tier, and from which run it came.
#[derive(Debug, Clone, Serialize)]
pub struct TierCost {
    pub tier: u8,
    pub cpu_us_per_delivery: f64,
    /// The calibration run it came from.
    pub source: String,
    /// Set when no run was mostly this tier and a blend stood in.
    pub blended: Option<String>,
}

/// Each workload tier's cost from the run that measured that tier (at
/// least [`TIER_DOMINANT_SHARE`] of its deliveries), or, with a warning,
/// the run with the largest share of it.
pub fn tier_costs(w: &Workload, cals: &[Calibration]) -> Vec<TierCost> {
    let share = |c: &Calibration, t: u8| {
        let all: u64 = c.tier_deliveries.values().sum();
        if all == 0 {
            // A report without per-tier counts: one blend for every tier.
            return 0.0;
        }
        c.tier_deliveries.get(&t).copied().unwrap_or(0) as f64 / all as f64
    };
    w.tiers
        .iter()
        .map(|t| {
            let best = cals
                .iter()
                .max_by(|a, b| share(a, t.tier).total_cmp(&share(b, t.tier)))
                .expect("at least one calibration");
            let s = share(best, t.tier);
            TierCost {
                tier: t.tier,
                cpu_us_per_delivery: best.cpu_us_per_delivery,
                source: best.source.clone(),
                blended: (s < TIER_DOMINANT_SHARE).then(|| {
                    format!(
                        "no calibration run is mostly tier {} (the best, `{}`, is {:.0} % tier {}): its blended cost stands in; add a run of a tier-{} scenario",
                        t.tier,
                        best.source,
                        s * 100.0,
                        t.tier,
                        t.tier
                    )
                }),
            }
        })
        .collect()
}

impl Calibration {
    /// Why a run cannot calibrate a plan, if it cannot: it lost
    /// deliveries, had failed sends or devices that never connected, or was
    /// overloaded. Figures from such a run describe a machine that fell
    /// behind, not what a delivery costs.
    pub fn refusal(r: &RunReport) -> Option<String> {
        let lost = r.total.lost;
        if lost > 0 {
            return Some(format!(
                "the calibration run lost {lost} deliveries; plan from a run with lost 0"
            ));
        }
        let send_errors = r.send_errors;
        if send_errors > 0 {
            return Some(format!(
                "the calibration run had {send_errors} failed sends ({}); plan from a run without",
                serde_json::to_string(&r.errors).unwrap_or_default()
            ));
        }
        let (connected, wanted) = (r.connect.connected, r.connect.connections);
        if connected < wanted {
            return Some(format!(
                "the calibration run connected {connected} of {wanted} devices; plan from a run where all connected"
            ));
        }
        let p50 = r.total.p50_us;
        if p50 > OVERLOADED_P50_US {
            return Some(format!(
                "the calibration run was overloaded (median delivery {:.0} ms, above {} ms): lower its rate or give it more cores",
                p50 as f64 / 1e3,
                OVERLOADED_P50_US / 1_000
            ));
        }
        if let Some((first, last)) = climbing(r) {
            return Some(format!(
                "the calibration run's latency climbed through it (p99 {:.0} ms in its first third, {:.0} ms in its last): it was falling behind; lower its rate",
                first as f64 / 1e3,
                last as f64 / 1e3
            ));
        }
        None
    }

    pub fn from_run(r: &RunReport) -> Result<Self, String> {
        if let Some(why) = Self::refusal(r) {
            return Err(why);
        }
        let need = |p: &str, x: Option<f64>| {
            x.ok_or_else(|| {
                format!("the calibration run has no `{p}` (run loadgen with --self-hosted so server CPU and memory are measured)")
            })
        };
        Ok(Self {
            scenario: r.scenario_name().to_owned(),
            source: r.scenario_name().to_owned(),
            cpu_us_per_delivery: need(
                "servers.cpu_us_per_delivery",
                r.servers.cpu_us_per_delivery,
            )?,
            cpu_ms_per_message: r.servers.cpu_ms_per_message.unwrap_or(0.0),
            deliveries_per_s: r.total.deliveries_per_s,
            tier_deliveries: r
                .tiers
                .iter()
                .filter_map(|(t, f)| Some((t.parse().ok()?, f.figures.deliveries)))
                .collect(),
            rss_per_connection_bytes: need(
                "servers.rss_per_connection_bytes",
                r.servers.rss_per_connection_bytes.map(|b| b as f64),
            )?,
            connections_held: r.connect.connected,
            machine_cpus: r.machine.cpus,
        })
    }
}

impl Workload {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read workload {}: {e}", path.display()))?;
        let w: Workload =
            toml::from_str(&text).map_err(|e| format!("workload {}: {e}", path.display()))?;
        w.validate()
            .map_err(|e| format!("workload {}: {e}", path.display()))?;
        Ok(w)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.concurrent_users == 0
            || !(self.devices_per_user >= 1.0 && self.devices_per_user <= 3.0)
        {
            return Err("concurrent_users must be positive and devices_per_user 1..=3".into());
        }
        if !(self.messages_per_user_per_hour.is_finite() && self.messages_per_user_per_hour >= 0.0)
        {
            return Err("messages_per_user_per_hour must be >= 0".into());
        }
        let total: f64 = self.tiers.iter().map(|t| t.share_of_messages).sum();
        if self.tiers.is_empty() || (total - 1.0).abs() > 0.01 {
            return Err(format!(
                "the tiers' share_of_messages must add up to 1 (they add up to {total:.3})"
            ));
        }
        for t in &self.tiers {
            if !(1..=3).contains(&t.tier)
                || !at_least(t.avg_members, 1.0)
                || !(0.0..=1.0).contains(&t.pull_fraction)
            {
                return Err(format!(
                    "tier {}: tier must be 1..=3, avg_members >= 1, pull_fraction 0..=1",
                    t.tier
                ));
            }
        }
        let a = &self.assumptions;
        let positive = [
            a.edge_cores,
            a.edge_memory_gib,
            a.redis_publishes_per_shard,
            a.db_writes_per_node,
        ]
        .iter()
        .all(|x| x.is_finite() && *x > 0.0);
        let utilization_ok = a.utilization > 0.0 && a.utilization <= 1.0;
        if !positive || !utilization_ok {
            return Err("assumptions must be positive and utilization in (0, 1]".into());
        }
        Ok(())
    }
}

fn at_least(x: f64, min: f64) -> bool {
    x.is_finite() && x >= min
}

/// One line of the answer: a figure, how it was derived, what it assumed.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub what: String,
    pub value: f64,
    pub unit: String,
    pub how: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub edges: u64,
    pub redis_shards: u64,
    pub db_nodes: u64,
    pub engines: u64,
    /// What each edge must be configured to admit (`edge.max_connections`):
    /// its share of the connections with one edge down, rounded up to a
    /// thousand.
    pub edge_max_connections: u64,
    pub tier_costs: Vec<TierCost>,
    /// Where the plan reaches past what was measured, or leans on a blend.
    pub warnings: Vec<String>,
    pub lines: Vec<Line>,
}

/// What one Redis shard's primary spends per SPUBLISH, measured by
/// `scripts/redis-capacity.sh` (its JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisCapacity {
    #[serde(default)]
    pub source: String,
    pub redis_version: String,
    pub rows: Vec<RedisRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisRow {
    pub payload_bytes: u64,
    pub pipeline: u64,
    pub server_cpu_us_per_publish: f64,
}

impl RedisCapacity {
    /// Reads the script's JSON; refused without unpipelined rows.
    pub fn parse(text: &str, source: &str) -> Result<Self, String> {
        let mut r: RedisCapacity = serde_json::from_str(text)
            .map_err(|e| format!("not a scripts/redis-capacity.sh JSON: {e}"))?;
        r.source = source.to_owned();
        r.rows
            .retain(|row| row.pipeline == 1 && row.server_cpu_us_per_publish > 0.0);
        r.rows.sort_by_key(|row| row.payload_bytes);
        if r.rows.len() < 2 {
            return Err("needs unpipelined (pipeline 1) rows at two payload sizes or more".into());
        }
        Ok(r)
    }

    /// CPU microseconds per publish of `bytes`, unpipelined (the worse
    /// case: the engine's publishes pipeline only as far as they are
    /// concurrent), interpolated between the measured sizes and carried
    /// on linearly past the largest; and whether it extrapolated.
    pub fn cpu_us(&self, bytes: f64) -> (f64, bool) {
        let pts: Vec<(f64, f64)> = self
            .rows
            .iter()
            .map(|r| (r.payload_bytes as f64, r.server_cpu_us_per_publish))
            .collect();
        let seg = pts
            .windows(2)
            .find(|w| bytes <= w[1].0)
            .unwrap_or(&pts[pts.len() - 2..]);
        let (x0, y0) = seg[0];
        let (x1, y1) = seg[1];
        let y = if bytes <= x0 {
            y0
        } else {
            y0 + (y1 - y0) * (bytes - x0) / (x1 - x0)
        };
        (y.max(0.0), bytes > pts[pts.len() - 1].0)
    }
}

pub fn plan(w: &Workload, cals: &[Calibration]) -> Plan {
    plan_with(w, cals, None)
}

/// A rate for the plan's lines: whole numbers, and two decimals below 10
/// (a broadcast every 2 s is 0.50/s, not 0).
fn rate(per_s: f64) -> String {
    if per_s < 10.0 {
        format!("{per_s:.2}")
    } else {
        format!("{per_s:.0}")
    }
}

/// [`plan`], with the Redis shards sized from a measured capacity instead
/// of the workload's assumption.
pub fn plan_with(w: &Workload, cals: &[Calibration], redis: Option<&RedisCapacity>) -> Plan {
    let a = &w.assumptions;
    let mut lines = Vec::new();
    let mut warnings = Vec::new();
    let mut line = |what: &str, value: f64, unit: &str, how: String| {
        lines.push(Line {
            what: what.into(),
            value,
            unit: unit.into(),
            how,
        });
        value
    };
    let users = w.concurrent_users as f64;
    let conns = line(
        "connections",
        users * w.devices_per_user,
        "",
        format!(
            "{} users x {} devices",
            w.concurrent_users, w.devices_per_user
        ),
    );
    let msgs = line(
        "messages/s",
        users * w.messages_per_user_per_hour / 3600.0,
        "/s",
        format!(
            "{} users x {} per hour / 3600",
            w.concurrent_users, w.messages_per_user_per_hour
        ),
    );
    // Server CPU per tier, each from the run that measured that tier.
    let costs = tier_costs(w, cals);
    let mut deliveries = 0.0;
    let mut cores = 0.0;
    for (t, cost) in w.tiers.iter().zip(&costs) {
        let d = msgs * t.share_of_messages * t.avg_members * w.devices_per_user;
        deliveries += d;
        cores += line(
            &format!("tier {} server cores", t.tier),
            d * cost.cpu_us_per_delivery / 1e6,
            "cores",
            format!(
                "{d:.0} deliveries/s x {:.1} us CPU per delivery (measured by `{}`{}, engine + store + edge together)",
                cost.cpu_us_per_delivery,
                cost.source,
                if cost.blended.is_some() {
                    ", a blend"
                } else {
                    ""
                }
            ),
        );
        if let Some(why) = &cost.blended {
            warnings.push(why.clone());
        }
    }
    let deliveries = line(
        "deliveries/s",
        deliveries,
        "/s",
        "sum over tiers of messages/s x share x avg members x devices per user".into(),
    );
    let cores = line("server cores", cores, "cores", "sum of the tiers".into());
    // Edges: the largest of what CPU, memory and connections need, plus one
    // (N+1), plus what a failed edge's reconnect storm needs.
    let rss = cals
        .iter()
        .map(|c| c.rss_per_connection_bytes)
        .fold(0.0, f64::max);
    let by_mem = line(
        "edges for memory",
        (conns * rss / (a.edge_memory_gib * 1_073_741_824.0 * a.utilization)).ceil(),
        "",
        format!(
            "connections x {rss:.0} B RSS per connection (the largest measured) / ({} GiB x {} utilisation) (assumed edge size)",
            a.edge_memory_gib, a.utilization
        ),
    );
    let by_cpu = line(
        "edges for CPU",
        (cores / (a.edge_cores * a.utilization)).ceil(),
        "",
        format!(
            "cores / ({} cores per edge x {} utilisation) (assumed)",
            a.edge_cores, a.utilization
        ),
    );
    let by_conns = line(
        "edges for connections",
        (conns / a.edge_max_connections).ceil(),
        "",
        format!(
            "connections / {} (edge.max_connections)",
            a.edge_max_connections
        ),
    );
    let needed = by_cpu.max(by_mem).max(by_conns).max(1.0);
    let mut edges = needed + 1.0;
    // A failed edge's devices come back on the others: their handshakes on
    // the others' spare cores must fit the storm target.
    let storm_s = |edges: f64| {
        (conns / edges) * a.handshake_cpu_us
            / 1e6
            / ((edges - 1.0) * a.edge_cores * (1.0 - a.utilization).max(0.05))
    };
    while storm_s(edges) > a.storm_target_s && edges < 1e6 {
        edges += 1.0;
    }
    let edges = line(
        "edges",
        edges,
        "",
        format!(
            "the largest need ({needed:.0}) + 1, so that one edge can fail; more if its storm needs it"
        ),
    );
    line(
        "reconnect storm after losing an edge",
        storm_s(edges),
        "s",
        format!(
            "{:.0} devices x {} us per resumed handshake (measured) over {:.0} edges' spare cores ({} x {:.0} % each); target {} s",
            conns / edges,
            a.handshake_cpu_us,
            edges - 1.0,
            a.edge_cores,
            (1.0 - a.utilization) * 100.0,
            a.storm_target_s
        ),
    );
    let per_edge_after_failure = conns / (edges - 1.0).max(1.0);
    let edge_max_connections = line(
        "edge.max_connections",
        ((per_edge_after_failure / 1000.0).ceil() * 1000.0).min(a.edge_max_connections),
        "",
        "each edge's share with one edge down, rounded up to a thousand (set it on every edge)"
            .into(),
    );
    // Extrapolation: how far past the measured this plan reaches.
    let held = cals.iter().map(|c| c.connections_held).max().unwrap_or(0) as f64;
    if per_edge_after_failure > held {
        warnings.push(format!(
            "extrapolated: {per_edge_after_failure:.0} connections per edge (one edge down) is {:.1}x the most held in a calibration run ({held:.0}); calibrate with a run that holds as many",
            per_edge_after_failure / held.max(1.0)
        ));
    }
    let measured_rate = cals
        .iter()
        .map(|c| c.deliveries_per_s / c.machine_cpus.max(1) as f64)
        .fold(0.0, f64::max);
    let planned_rate = deliveries / edges / a.edge_cores;
    if planned_rate > measured_rate {
        warnings.push(format!(
            "extrapolated: {planned_rate:.0} deliveries/s per edge core is {:.1}x the most measured per core ({measured_rate:.0})",
            planned_rate / measured_rate.max(1e-9)
        ));
    }
    // Engines: an upper bound. Every run's server CPU per message holds
    // the engine's share of a message and then some (store, edge), so the
    // smallest of them bounds the engine's cost from above.
    let (per_message_ms, per_message_source) = cals
        .iter()
        .filter(|c| c.cpu_ms_per_message > 0.0)
        .map(|c| (c.cpu_ms_per_message, c.source.as_str()))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, "none"));
    let engines = line(
        "engines",
        ((msgs * per_message_ms / 1e3 / (a.engine_cores * a.utilization)).ceil()).max(2.0) + 1.0,
        "",
        format!(
            "messages/s x {per_message_ms:.2} ms CPU per message (`{per_message_source}`, the smallest of the runs: engine + store + edge, an upper bound) / ({} cores x {} utilisation), at least 2, + 1",
            a.engine_cores, a.utilization
        ),
    );
    // Redis: publishes per message by tier (counted, docs/fanout.md).
    let mut publishes = 0.0;
    let mut redis_bytes = 0.0;
    // Redis primary CPU (microseconds per second) and how it was had.
    let mut redis_cpu_us = 0.0;
    let mut redis_how = Vec::new();
    let mut egress = 0.0;
    let mut writes = msgs; // one message row each
    let mut pulls = 0.0;
    for t in &w.tiers {
        let m = msgs * t.share_of_messages;
        let recipients = t.avg_members * w.devices_per_user;
        let hosting = edges.min(recipients);
        let (per_msg, bytes, edge_bytes) = match t.tier {
            1 => (
                t.avg_members,
                w.payload_bytes as f64 + 100.0,
                w.payload_bytes as f64 + a.frame_overhead_bytes,
            ),
            2 => (
                hosting,
                w.payload_bytes as f64 + 100.0,
                w.payload_bytes as f64 + a.frame_overhead_bytes,
            ),
            _ => (
                hosting,
                56.0,
                60.0 + t.pull_fraction * (w.payload_bytes as f64 + a.frame_overhead_bytes),
            ),
        };
        let p = line(
            &format!("tier {} Redis publishes/s", t.tier),
            m * per_msg,
            "/s",
            format!(
                "{} messages/s x {per_msg:.0} publishes each ({})",
                rate(m),
                match t.tier {
                    1 => "one per member, counted",
                    2 => "one per hosting edge, counted",
                    _ => "one 56-byte notification per hosting edge, counted",
                }
            ),
        );
        publishes += p;
        redis_bytes += p * bytes;
        if let Some(r) = redis {
            let (us, past) = r.cpu_us(bytes);
            redis_cpu_us += p * us;
            redis_how.push(format!("tier {} {bytes:.0} B: {us:.2} us", t.tier));
            if past {
                warnings.push(format!(
                    "Redis CPU per publish of tier {} ({bytes:.0} B) carried past the largest payload measured ({} B) in `{}`",
                    t.tier,
                    r.rows.last().map_or(0, |x| x.payload_bytes),
                    r.source
                ));
            }
        }
        let e = line(
            &format!("tier {} edge egress", t.tier),
            m * recipients * edge_bytes * 8.0 / 1e9,
            "Gbit/s",
            format!(
                "{} messages/s x {recipients:.0} devices x {edge_bytes:.0} B per delivery",
                rate(m)
            ),
        );
        egress += e;
        if t.tier == 1 {
            // An inbox row per recipient device, and its delete at ack.
            writes += m * recipients * 2.0;
        }
        if t.tier == 3 {
            pulls += m * hosting;
        }
    }
    line(
        "Redis publishes/s",
        publishes,
        "/s",
        "sum of the tiers".into(),
    );
    line(
        "Redis payload",
        redis_bytes * 8.0 / 1e9,
        "Gbit/s",
        "publishes x (body + ~100 B envelope), notifications 56 B".into(),
    );
    line("edge egress", egress, "Gbit/s", "sum of the tiers".into());
    let shards = match redis {
        Some(r) => line(
            "Redis shards",
            (redis_cpu_us / 1e6 / a.utilization).ceil().max(1.0),
            "",
            format!(
                "publishes/s x CPU per SPUBLISH measured by scripts/redis-capacity.sh (`{}`, Redis {}, one subscriber, unpipelined: {}) = {:.2} cores of shard primaries / {} utilisation (one core each); sharded pub/sub spreads by hash slot",
                r.source,
                r.redis_version,
                redis_how.join(", "),
                redis_cpu_us / 1e6,
                a.utilization
            ),
        ),
        None => line(
            "Redis shards",
            (publishes / (a.redis_publishes_per_shard * a.utilization))
                .ceil()
                .max(1.0),
            "",
            format!(
                "publishes/s / ({} per shard (assumed: give --redis-calibration from scripts/redis-capacity.sh to measure it) x {} utilisation); sharded pub/sub spreads by hash slot",
                a.redis_publishes_per_shard, a.utilization
            ),
        ),
    };
    let writes = line(
        "database row writes/s",
        writes,
        "/s",
        "one message row per message + for tier 1 an inbox row per recipient device and its delete at ack".into(),
    );
    line(
        "database reads/s for tier-3 pulls",
        pulls,
        "/s",
        "at most one per message per hosting edge (the edge's single-flight cache, counted in docs/fanout.md)".into(),
    );
    let db = line(
        "database nodes",
        (writes / (a.db_writes_per_node * a.utilization))
            .ceil()
            .max(3.0),
        "",
        format!(
            "row writes/s / ({} per node (an input: `db_writes_per_node` in the workload's [assumptions]; no ScyllaDB can run here to measure it) x {} utilisation), at least 3 for quorum",
            a.db_writes_per_node, a.utilization
        ),
    );
    Plan {
        edges: edges as u64,
        redis_shards: shards as u64,
        db_nodes: db as u64,
        engines: engines as u64,
        edge_max_connections: edge_max_connections as u64,
        tier_costs: costs,
        warnings,
        lines,
    }
}

pub fn render(w: &Workload, cals: &[Calibration], p: &Plan) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let names: Vec<&str> = cals.iter().map(|c| c.source.as_str()).collect();
    let _ = writeln!(
        out,
        "plan for `{}` from calibration runs {}\n",
        w.name,
        names.join(", ")
    );
    for l in &p.lines {
        let value = if l.value >= 100.0 {
            format!("{:.0}", l.value)
        } else {
            format!("{:.2}", l.value)
        };
        let _ = writeln!(out, "{:<36} {:>14} {:<7} {}", l.what, value, l.unit, l.how);
    }
    for warning in &p.warnings {
        let _ = writeln!(out, "\nwarning: {warning}");
    }
    let _ = writeln!(
        out,
        "\nanswer: {} edges (edge.max_connections = {}), {} engines, {} Redis shards, {} database nodes",
        p.edges, p.edge_max_connections, p.engines, p.redis_shards, p.db_nodes
    );
    out
}

/// The sizes as `terraform.tfvars.json` for `terraform/`.
pub fn tfvars(w: &Workload, p: &Plan) -> Value {
    json!({
        "edge_count": p.edges,
        "redis_shards": p.redis_shards,
        "db_nodes": p.db_nodes,
        "edge_cores": w.assumptions.edge_cores,
        "edge_memory_gib": w.assumptions.edge_memory_gib,
        "edge_max_connections": p.edge_max_connections,
        "engine_count": p.engines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calibration() -> Calibration {
        Calibration {
            scenario: "t".into(),
            source: "t.json".into(),
            cpu_us_per_delivery: 20.0,
            cpu_ms_per_message: 1.0,
            rss_per_connection_bytes: 16_384.0,
            connections_held: 10_000,
            machine_cpus: 2,
            deliveries_per_s: 50_000.0,
            tier_deliveries: Default::default(),
        }
    }

    /// A run that measured `tier` alone at `cpu_us` per delivery.
    fn tier_run(tier: u8, cpu_us: f64) -> Calibration {
        Calibration {
            source: format!("tier{tier}.json"),
            cpu_us_per_delivery: cpu_us,
            tier_deliveries: [(tier, 1_000)].into_iter().collect(),
            ..calibration()
        }
    }

    #[test]
    fn a_run_that_lost_failed_or_overloaded_is_refused_with_the_reason() {
        let ok: RunReport = serde_json::from_value(serde_json::json!({
            "scenario": null, "lost": 0, "send_errors": 0, "p50_us": 5_000,
            "connect": {"connected": 10, "connections": 10},
            "servers": {"cpu_us_per_delivery": 20.0, "rss_per_connection_bytes": 30_000},
            "machine": {"cpus": 2},
        }))
        .unwrap();
        assert!(Calibration::from_run(&ok).is_ok());
        let with = |change: &dyn Fn(&mut RunReport)| {
            let mut r = ok.clone();
            change(&mut r);
            Calibration::from_run(&r).unwrap_err()
        };
        assert!(with(&|r| r.total.lost = 3).contains("lost 3 deliveries"));
        assert!(with(&|r| r.send_errors = 2).contains("2 failed sends"));
        assert!(with(&|r| r.connect.connected = 9).contains("connected 9 of 10"));
        assert!(
            with(&|r| r.total.p50_us = 1_500_000).contains("overloaded (median delivery 1500 ms")
        );
    }

    #[test]
    fn the_shipped_workload_plans() {
        let w =
            Workload::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/10m-mixed.toml"))
                .unwrap();
        let p = plan(&w, &[calibration()]);
        assert!(p.edges >= 2 && p.redis_shards >= 1 && p.db_nodes >= 3);
        assert!(render(&w, &[calibration()], &p).contains("answer:"));
    }

    #[test]
    fn redis_shards_come_from_the_measured_cpu_per_publish() {
        let r = RedisCapacity::parse(
            r#"{"redis_version": "7.0.15", "rows": [
                {"payload_bytes": 56, "pipeline": 1, "server_cpu_us_per_publish": 4.0},
                {"payload_bytes": 56, "pipeline": 16, "server_cpu_us_per_publish": 1.0},
                {"payload_bytes": 352, "pipeline": 1, "server_cpu_us_per_publish": 6.0}
            ]}"#,
            "r.json",
        )
        .unwrap();
        assert_eq!(r.rows.len(), 2, "pipelined rows are not used");
        assert_eq!(r.cpu_us(56.0), (4.0, false));
        assert_eq!(r.cpu_us(204.0), (5.0, false), "interpolated");
        assert_eq!(r.cpu_us(10.0), (4.0, false));
        let (past, extrapolated) = r.cpu_us(648.0);
        assert!((past - 8.0).abs() < 1e-9 && extrapolated);
        assert!(RedisCapacity::parse(r#"{"redis_version": "7", "rows": []}"#, "x").is_err());

        // 1,000 tier-1 messages/s to 10 members of 100-byte bodies (200 B
        // publishes): 10,000 publishes/s x 4.97 us = 0.0497 cores; at 0.5
        // utilisation, one shard.
        let mut w =
            Workload::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/10m-mixed.toml"))
                .unwrap();
        w.assumptions.utilization = 0.5;
        let p = plan_with(&w, &[calibration()], Some(&r));
        let line = p.lines.iter().find(|l| l.what == "Redis shards").unwrap();
        assert!(line.how.contains("r.json"), "{}", line.how);
        let publishes = p
            .lines
            .iter()
            .filter(|l| l.what.ends_with("Redis publishes/s") && l.what.starts_with("tier"))
            .map(|l| l.value)
            .sum::<f64>();
        assert!(publishes > 0.0);
        // At least the cheapest publish's cost, at most the dearest's.
        let lo = (publishes * 4.0 / 1e6 / 0.5).ceil();
        assert!(p.redis_shards as f64 >= lo, "{} < {lo}", p.redis_shards);
    }

    #[test]
    fn figures_follow_the_counted_costs() {
        let w: Workload = toml::from_str(
            r#"
            name = "w"
            concurrent_users = 3600
            devices_per_user = 1
            messages_per_user_per_hour = 1
            payload_bytes = 100
            [[tiers]]
            tier = 1
            share_of_messages = 1
            avg_members = 10
        "#,
        )
        .unwrap();
        w.validate().unwrap();
        let p = plan(&w, &[calibration()]);
        let get = |name: &str| p.lines.iter().find(|l| l.what == name).unwrap().value;
        assert_eq!(get("messages/s"), 1.0);
        assert_eq!(get("deliveries/s"), 10.0);
        assert_eq!(get("tier 1 Redis publishes/s"), 10.0, "one per member");
        assert_eq!(get("database row writes/s"), 1.0 + 20.0);
    }

    #[test]
    fn shares_must_add_up() {
        let w: Result<Workload, _> = toml::from_str(
            r#"
            name = "w"
            concurrent_users = 1
            devices_per_user = 1
            messages_per_user_per_hour = 1
            payload_bytes = 100
            [[tiers]]
            tier = 1
            share_of_messages = 0.5
            avg_members = 2
        "#,
        );
        assert!(w.unwrap().validate().unwrap_err().contains("add up to 1"));
    }

    fn mixed_workload() -> Workload {
        let w: Workload = toml::from_str(
            r#"
            name = "w"
            concurrent_users = 1_000_000
            devices_per_user = 1
            messages_per_user_per_hour = 36
            payload_bytes = 100
            [[tiers]]
            tier = 1
            share_of_messages = 0.85
            avg_members = 4
            [[tiers]]
            tier = 2
            share_of_messages = 0.15
            avg_members = 300
        "#,
        )
        .unwrap();
        w.validate().unwrap();
        w
    }

    #[test]
    fn each_tier_costs_what_its_own_run_measured() {
        let w = mixed_workload();
        let p = plan(&w, &[tier_run(1, 1_000.0), tier_run(2, 20.0)]);
        let get = |name: &str| p.lines.iter().find(|l| l.what == name).unwrap();
        // 10,000 messages/s: tier 1 8,500 x 4 deliveries at 1 ms each.
        assert_eq!(
            get("tier 1 server cores").value,
            8_500.0 * 4.0 * 1_000.0 / 1e6
        );
        assert!(get("tier 1 server cores").how.contains("`tier1.json`"));
        assert_eq!(
            get("tier 2 server cores").value,
            1_500.0 * 300.0 * 20.0 / 1e6
        );
        assert!(get("tier 2 server cores").how.contains("`tier2.json`"));
        assert!(
            !p.warnings.iter().any(|w| w.contains("blend")),
            "{:?}",
            p.warnings
        );
        // One blended run for both: said, not hidden.
        let blended = Calibration {
            tier_deliveries: [(1, 300), (2, 700)].into_iter().collect(),
            ..calibration()
        };
        let p = plan(&w, &[blended]);
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("no calibration run is mostly tier 1")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn one_edge_can_fail_and_each_edge_admits_what_is_planned() {
        let w = mixed_workload();
        let p = plan(&w, &[tier_run(1, 1.0), tier_run(2, 1.0)]);
        // 1,000,000 connections need 10 edges at 100,000 each: 11 with N+1.
        assert!(p.edges >= 11, "{}", p.edges);
        // With any one edge down, the rest admit every connection...
        assert!(p.edge_max_connections as f64 * (p.edges - 1) as f64 >= 1_000_000.0);
        // ...and never more than edge.max_connections each.
        assert!(p.edge_max_connections <= 100_000);
        assert!(render(&w, &[tier_run(1, 1.0)], &p).contains("edge.max_connections = "));
        let tf = tfvars(&w, &p);
        assert_eq!(tf["edge_max_connections"], p.edge_max_connections);
        assert_eq!(tf["engine_count"], p.engines);
        assert!(p.engines >= 3, "at least two engines and a spare");
    }

    #[test]
    fn a_failed_edges_storm_fits_the_target_or_the_plan_grows() {
        let mut w = mixed_workload();
        w.assumptions.handshake_cpu_us = 50_000.0; // an absurd handshake
        let p = plan(&w, &[tier_run(1, 1.0), tier_run(2, 1.0)]);
        let storm = p
            .lines
            .iter()
            .find(|l| l.what == "reconnect storm after losing an edge")
            .unwrap()
            .value;
        assert!(storm <= w.assumptions.storm_target_s, "{storm}");
        assert!(
            p.edges > 11,
            "the storm, not the connections, sized it: {}",
            p.edges
        );
    }

    #[test]
    fn extrapolation_past_the_measured_is_named() {
        let w = mixed_workload();
        let p = plan(&w, &[tier_run(1, 1.0), tier_run(2, 1.0)]);
        // 10,000 connections held in the runs; ~100,000 planned per edge.
        assert!(
            p.warnings
                .iter()
                .any(|w| w.starts_with("extrapolated:") && w.contains("connections per edge")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn a_run_whose_latency_climbed_is_refused() {
        let points: Vec<serde_json::Value> = (0..30u64)
            .map(|t| serde_json::json!({"t_s": t, "sends": 10, "deliveries": 100, "p99_us": 20_000 + t * 40_000}))
            .collect();
        let r: RunReport = serde_json::from_value(serde_json::json!({
            "scenario": null, "lost": 0, "send_errors": 0, "p50_us": 5_000,
            "connect": {"connected": 10, "connections": 10},
            "servers": {"cpu_us_per_delivery": 20.0, "rss_per_connection_bytes": 30_000},
            "machine": {"cpus": 2},
            "timeline": points,
        }))
        .unwrap();
        let e = Calibration::from_run(&r).unwrap_err();
        assert!(e.contains("latency climbed"), "{e}");
    }
}
