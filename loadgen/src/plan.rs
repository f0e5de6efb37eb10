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
        }
    }
}

/// What the plan needs from a run's JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub scenario: String,
    /// Server CPU microseconds per delivery (engine, store and edge, as the
    /// run measured them together).
    pub cpu_us_per_delivery: f64,
    pub rss_per_connection_bytes: f64,
    pub connections_held: u64,
    pub machine_cpus: u64,
}

/// A run whose median delivery took longer than this was not keeping up:
/// its queues were growing, so its CPU per delivery is not a steady-state
/// cost.
const OVERLOADED_P50_US: u64 = 1_000_000;

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
            cpu_us_per_delivery: need(
                "servers.cpu_us_per_delivery",
                r.servers.cpu_us_per_delivery,
            )?,
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
    pub lines: Vec<Line>,
}

pub fn plan(w: &Workload, c: &Calibration) -> Plan {
    let a = &w.assumptions;
    let mut lines = Vec::new();
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
    // Edges: the largest of what CPU, memory and connection count need.
    let mut deliveries = 0.0;
    for t in &w.tiers {
        deliveries += msgs * t.share_of_messages * t.avg_members * w.devices_per_user;
    }
    let deliveries = line(
        "deliveries/s",
        deliveries,
        "/s",
        "sum over tiers of messages/s x share x avg members x devices per user".into(),
    );
    let cores = line(
        "server cores for deliveries",
        deliveries * c.cpu_us_per_delivery / 1e6,
        "cores",
        format!(
            "deliveries/s x {:.1} us CPU per delivery (measured by `{}` on a {}-core machine, engine + store + edge together)",
            c.cpu_us_per_delivery, c.scenario, c.machine_cpus
        ),
    );
    let by_cpu = cores / (a.edge_cores * a.utilization);
    let mem = conns * c.rss_per_connection_bytes;
    let by_mem = mem / (a.edge_memory_gib * 1_073_741_824.0 * a.utilization);
    let by_mem = line(
        "edges for memory",
        by_mem.ceil(),
        "",
        format!(
            "connections x {:.0} B RSS per connection (measured) / ({} GiB x {} utilisation) (assumed edge size)",
            c.rss_per_connection_bytes, a.edge_memory_gib, a.utilization
        ),
    );
    let by_cpu = line(
        "edges for CPU",
        by_cpu.ceil(),
        "",
        format!(
            "cores / ({} cores per edge x {} utilisation) (assumed)",
            a.edge_cores, a.utilization
        ),
    );
    let edges = by_cpu.max(by_mem).max(1.0);
    line(
        "edges",
        edges,
        "",
        "the larger of the CPU and memory needs".into(),
    );
    // Redis: publishes per message by tier (counted, docs/fanout.md).
    let mut publishes = 0.0;
    let mut redis_bytes = 0.0;
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
                "{m:.0} messages/s x {per_msg:.0} publishes each ({})",
                match t.tier {
                    1 => "one per member, counted",
                    2 => "one per hosting edge, counted",
                    _ => "one 56-byte notification per hosting edge, counted",
                }
            ),
        );
        publishes += p;
        redis_bytes += p * bytes;
        let e = line(
            &format!("tier {} edge egress", t.tier),
            m * recipients * edge_bytes * 8.0 / 1e9,
            "Gbit/s",
            format!("{m:.0} messages/s x {recipients:.0} devices x {edge_bytes:.0} B per delivery"),
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
    let shards = line(
        "Redis shards",
        (publishes / (a.redis_publishes_per_shard * a.utilization))
            .ceil()
            .max(1.0),
        "",
        format!(
            "publishes/s / ({} per shard (assumed; measure with redis-benchmark) x {} utilisation); sharded pub/sub spreads by hash slot",
            a.redis_publishes_per_shard, a.utilization
        ),
    );
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
            "row writes/s / ({} per node (assumed) x {} utilisation), at least 3 for quorum",
            a.db_writes_per_node, a.utilization
        ),
    );
    Plan {
        edges: edges as u64,
        redis_shards: shards as u64,
        db_nodes: db as u64,
        lines,
    }
}

pub fn render(w: &Workload, c: &Calibration, p: &Plan) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan for `{}` from calibration run `{}`\n",
        w.name, c.scenario
    );
    for l in &p.lines {
        let value = if l.value >= 100.0 {
            format!("{:.0}", l.value)
        } else {
            format!("{:.2}", l.value)
        };
        let _ = writeln!(out, "{:<36} {:>14} {:<7} {}", l.what, value, l.unit, l.how);
    }
    let _ = writeln!(
        out,
        "\nanswer: {} edges, {} Redis shards, {} database nodes",
        p.edges, p.redis_shards, p.db_nodes
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calibration() -> Calibration {
        Calibration {
            scenario: "t".into(),
            cpu_us_per_delivery: 20.0,
            rss_per_connection_bytes: 16_384.0,
            connections_held: 10_000,
            machine_cpus: 2,
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
        let p = plan(&w, &calibration());
        assert!(p.edges >= 1 && p.redis_shards >= 1 && p.db_nodes >= 3);
        assert!(render(&w, &calibration(), &p).contains("answer:"));
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
        let p = plan(&w, &calibration());
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
}
