//! `tiercast loadgen predict`: from a run on a few edges (the calibration,
//! usually one edge and the engine service on a Redis Cluster), the server
//! CPU and latency of the same scenario on N edges; given runs measured at
//! those sizes, predicted against measured.
//!
//! The model, per message M and per delivery D of the run being predicted
//! (the load is an input, not a prediction: the measured run's own counts
//! are used when it is compared):
//!
//! - engine CPU = M x (a + b x (N - n0)): `a` the calibration's engine CPU
//!   per message at its n0 edges; `b` what each further edge adds per
//!   message (tier-2 and tier-3 messages are published once per hosting
//!   edge).
//! - edge CPU (all edges) = D x d + M x c x (N - n0): `d` the calibration's
//!   edge CPU per delivery; `c` what each further edge adds per message
//!   (its share of the conversations' payloads, its own timers and
//!   runtime). Devices spread evenly, so one edge carries 1/N of it.
//! - latency: the calibration's p50 and p99, times (1 + g x (N - n0)): `g`
//!   the relative growth per further edge (0 in the naive model: no queue
//!   grows while the servers are below saturation; on a machine where the
//!   edges share the cores it does not hold, and `--learn` measures it).
//!
//! Without a second run `b` and `c` are 0: the naive model, in which
//! adding edges adds no cost. With one (`--learn`, a run at another edge
//! count) they are learnt from its residual, and the model is tested on
//! the sizes it did not learn from.

use serde::Serialize;

use crate::report::RunReport;

/// The CPU split of a run by role, with its load.
#[derive(Debug, Clone, Serialize)]
pub struct Split {
    pub source: String,
    pub edges: usize,
    pub messages: u64,
    pub deliveries: u64,
    pub engine_cpu_s: f64,
    pub edges_cpu_s: f64,
    /// The busiest edge's CPU.
    pub max_edge_cpu_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Split {
    /// A run's split; refused when it cannot calibrate (not self-hosted on
    /// an engine service and edges, no per-process CPU, loss, failed sends).
    pub fn of(r: &RunReport, source: &str) -> Result<Self, String> {
        if !r.clean() {
            return Err(format!(
                "{source}: lost {} deliveries and had {} failed sends; a run that lost or failed calibrates nothing",
                r.total.lost, r.send_errors
            ));
        }
        let mut engine = None;
        let mut edges = Vec::new();
        for p in &r.servers.processes {
            let Some(cpu) = p.cpu_s else {
                return Err(format!(
                    "{source}: no CPU per process (a report from an older build, or not self-hosted)"
                ));
            };
            if p.role == "engine" {
                engine = Some(cpu);
            } else if p.role.starts_with("edge ") && !p.role.contains("single") {
                edges.push(cpu);
            }
        }
        let Some(engine_cpu_s) = engine else {
            return Err(format!(
                "{source}: no engine process: predict needs a run with --self-hosted --redis (an engine service and its edges)"
            ));
        };
        if edges.is_empty() || r.total.messages_sent == 0 || r.total.deliveries == 0 {
            return Err(format!("{source}: no edge, message or delivery measured"));
        }
        Ok(Self {
            source: source.to_owned(),
            edges: edges.len(),
            messages: r.total.messages_sent,
            deliveries: r.total.deliveries,
            engine_cpu_s,
            edges_cpu_s: edges.iter().sum(),
            max_edge_cpu_s: edges.iter().copied().fold(0.0, f64::max),
            p50_us: r.total.p50_us,
            p99_us: r.total.p99_us,
        })
    }
}

/// The model's coefficients (CPU seconds).
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    /// The calibration's edge count.
    pub n0: usize,
    /// Engine CPU per message at n0 edges.
    pub a: f64,
    /// Engine CPU per message per further edge.
    pub b: f64,
    /// Edge CPU per delivery.
    pub d: f64,
    /// Edge CPU per message per further edge.
    pub c: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Relative growth of p50 and p99 per further edge.
    pub p50_growth: f64,
    pub p99_growth: f64,
    /// Where `b`, `c` and the growths came from (`None`: the naive
    /// model, 0).
    pub learnt_from: Option<String>,
}

impl Model {
    pub fn calibrate(cal: &Split, learn: Option<&Split>) -> Result<Self, String> {
        let a = cal.engine_cpu_s / cal.messages as f64;
        let d = cal.edges_cpu_s / cal.deliveries as f64;
        let growth = |calibrated: u64, learnt: u64, extra: f64| {
            if calibrated == 0 {
                0.0
            } else {
                (learnt as f64 / calibrated as f64 - 1.0) / extra
            }
        };
        let (b, c, g50, g99, learnt_from) = match learn {
            None => (0.0, 0.0, 0.0, 0.0, None),
            Some(l) => {
                if l.edges == cal.edges {
                    return Err(format!(
                        "--learn {} ran on {} edges like the calibration: it must differ",
                        l.source, l.edges
                    ));
                }
                let extra = l.edges as f64 - cal.edges as f64;
                let b = (l.engine_cpu_s / l.messages as f64 - a) / extra;
                let c = (l.edges_cpu_s - l.deliveries as f64 * d) / (l.messages as f64 * extra);
                (
                    b,
                    c,
                    growth(cal.p50_us, l.p50_us, extra),
                    growth(cal.p99_us, l.p99_us, extra),
                    Some(l.source.clone()),
                )
            }
        };
        Ok(Self {
            n0: cal.edges,
            a,
            b,
            d,
            c,
            p50_us: cal.p50_us,
            p99_us: cal.p99_us,
            p50_growth: g50,
            p99_growth: g99,
            learnt_from,
        })
    }

    /// Predicted (engine, all edges) CPU seconds for `messages` and
    /// `deliveries` on `edges` edges.
    pub fn cpu(&self, edges: usize, messages: u64, deliveries: u64) -> (f64, f64) {
        let extra = edges as f64 - self.n0 as f64;
        let m = messages as f64;
        let engine = m * (self.a + self.b * extra);
        let edge = deliveries as f64 * self.d + m * self.c * extra;
        (engine.max(0.0), edge.max(0.0))
    }

    /// Predicted (p50, p99) in microseconds on `edges` edges.
    pub fn latency(&self, edges: usize) -> (u64, u64) {
        let extra = edges as f64 - self.n0 as f64;
        let at = |us: u64, g: f64| (us as f64 * (1.0 + g * extra)).max(0.0).round() as u64;
        (
            at(self.p50_us, self.p50_growth),
            at(self.p99_us, self.p99_growth),
        )
    }
}

/// One size predicted, and measured where a run was given.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub edges: usize,
    pub messages: u64,
    pub deliveries: u64,
    pub predicted_cpu_s: f64,
    pub predicted_engine_cpu_s: f64,
    pub predicted_edge_cpu_s: f64,
    pub predicted_p50_us: u64,
    pub predicted_p99_us: u64,
    pub measured: Option<Split>,
    /// (predicted - measured) / measured, for the total CPU, the engine,
    /// one edge (the busiest), p50 and p99.
    pub error_cpu: Option<f64>,
    pub error_engine: Option<f64>,
    pub error_edge: Option<f64>,
    pub error_p50: Option<f64>,
    pub error_p99: Option<f64>,
}

fn err(predicted: f64, measured: f64) -> Option<f64> {
    (measured > 0.0).then(|| (predicted - measured) / measured)
}

/// Rows for `sizes` (the calibration's load) and for each measured run
/// (its own load).
pub fn predict(model: &Model, cal: &Split, sizes: &[usize], measured: &[Split]) -> Vec<Row> {
    let row = |edges: usize, messages: u64, deliveries: u64, m: Option<&Split>| {
        let (engine, edge) = model.cpu(edges, messages, deliveries);
        let (p50, p99) = model.latency(edges);
        let mut r = Row {
            edges,
            messages,
            deliveries,
            predicted_cpu_s: engine + edge,
            predicted_engine_cpu_s: engine,
            predicted_edge_cpu_s: edge,
            predicted_p50_us: p50,
            predicted_p99_us: p99,
            measured: m.cloned(),
            error_cpu: None,
            error_engine: None,
            error_edge: None,
            error_p50: None,
            error_p99: None,
        };
        if let Some(m) = m {
            r.error_cpu = err(engine + edge, m.engine_cpu_s + m.edges_cpu_s);
            r.error_engine = err(engine, m.engine_cpu_s);
            r.error_edge = err(edge / edges as f64, m.max_edge_cpu_s);
            r.error_p50 = err(p50 as f64, m.p50_us as f64);
            r.error_p99 = err(p99 as f64, m.p99_us as f64);
        }
        r
    };
    let mut rows: Vec<Row> = sizes
        .iter()
        .filter(|n| !measured.iter().any(|m| m.edges == **n))
        .map(|&n| row(n, cal.messages, cal.deliveries, None))
        .collect();
    rows.extend(
        measured
            .iter()
            .map(|m| row(m.edges, m.messages, m.deliveries, Some(m))),
    );
    rows.sort_by_key(|r| r.edges);
    rows
}

/// The prediction for people.
pub fn render(model: &Model, cal: &Split, rows: &[Row]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "calibration {}: {} edge(s), {} messages, {} deliveries; engine {:.2} CPU s, edges {:.2} CPU s",
        cal.source, cal.edges, cal.messages, cal.deliveries, cal.engine_cpu_s, cal.edges_cpu_s
    );
    let _ = writeln!(
        out,
        "model: engine {:.1} us/message + {:.1} us/message per further edge; edges {:.2} us/delivery + {:.1} us/message per further edge; latency x (1 + {:.2} (p50) / {:.2} (p99) per further edge) ({})",
        model.a * 1e6,
        model.b * 1e6,
        model.d * 1e6,
        model.c * 1e6,
        model.p50_growth,
        model.p99_growth,
        model
            .learnt_from
            .as_deref()
            .map_or("naive: further edges cost nothing".to_owned(), |s| format!(
                "per-edge terms learnt from {s}"
            ))
    );
    let pct = |e: Option<f64>| e.map_or("-".to_owned(), |e| format!("{:+.1}%", e * 100.0));
    let _ = writeln!(
        out,
        "{:>5} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}",
        "edges",
        "CPU s pred",
        "measured",
        "error",
        "engine pr",
        "measured",
        "error",
        "1 edge pr",
        "busiest",
        "error",
        "p99 pred",
        "measured",
        "error"
    );
    for r in rows {
        let m = r.measured.as_ref();
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "{:>5} {:>10.2} {:>10} {:>8} {:>10.2} {:>10} {:>8} {:>10.2} {:>10} {:>8} {:>9.1} {:>9} {:>8}",
            r.edges,
            r.predicted_cpu_s,
            f(m.map(|m| m.engine_cpu_s + m.edges_cpu_s)),
            pct(r.error_cpu),
            r.predicted_engine_cpu_s,
            f(m.map(|m| m.engine_cpu_s)),
            pct(r.error_engine),
            r.predicted_edge_cpu_s / r.edges as f64,
            f(m.map(|m| m.max_edge_cpu_s)),
            pct(r.error_edge),
            r.predicted_p99_us as f64 / 1e3,
            m.map_or("-".to_owned(), |m| format!("{:.1}", m.p99_us as f64 / 1e3)),
            pct(r.error_p99),
        );
    }
    let _ = writeln!(out, "(CPU in seconds over each run's window; p99 in ms)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(edges: usize, engine: f64, edge_each: f64, messages: u64, deliveries: u64) -> Split {
        Split {
            source: format!("{edges} edges"),
            edges,
            messages,
            deliveries,
            engine_cpu_s: engine,
            edges_cpu_s: edge_each * edges as f64,
            max_edge_cpu_s: edge_each,
            p50_us: 1_000,
            p99_us: 5_000,
        }
    }

    #[test]
    fn the_naive_model_spreads_one_edges_cost() {
        let cal = split(1, 2.0, 8.0, 1_000, 100_000);
        let m = Model::calibrate(&cal, None).unwrap();
        let rows = predict(&m, &cal, &[2, 4], &[]);
        assert_eq!(rows.len(), 2);
        assert!((rows[0].predicted_cpu_s - 10.0).abs() < 1e-9);
        assert!((rows[1].predicted_edge_cpu_s / 4.0 - 2.0).abs() < 1e-9);
        assert!(rows[0].measured.is_none() && rows[0].error_cpu.is_none());
    }

    #[test]
    fn a_second_size_teaches_the_per_edge_terms_and_predicts_a_third() {
        // Engine: 2 ms/message + 0.5 ms per further edge; edges: 80 us per
        // delivery + 1 ms per message per further edge.
        let truth = |n: usize| {
            let extra = n as f64 - 1.0;
            let engine = 1_000.0 * (0.002 + 0.0005 * extra);
            let edges = 100_000.0 * 80e-6 + 1_000.0 * 0.001 * extra;
            split(n, engine, edges / n as f64, 1_000, 100_000)
        };
        let mut two = truth(2);
        two.p99_us = 7_500; // +50 % per further edge
        let m = Model::calibrate(&truth(1), Some(&two)).unwrap();
        assert!((m.b - 0.0005).abs() < 1e-12 && (m.c - 0.001).abs() < 1e-12);
        assert!((m.p99_growth - 0.5).abs() < 1e-12 && m.p50_growth == 0.0);
        assert_eq!(m.latency(3), (1_000, 10_000));
        let rows = predict(&m, &truth(1), &[], &[truth(3)]);
        assert_eq!(rows[0].edges, 3);
        assert!(rows[0].error_cpu.unwrap().abs() < 1e-9);
        assert!(rows[0].error_engine.unwrap().abs() < 1e-9);
        assert!(rows[0].error_edge.unwrap().abs() < 1e-9);
        // Learning from a run at the calibration's own size is refused.
        assert!(Model::calibrate(&truth(1), Some(&truth(1))).is_err());
    }

    #[test]
    fn a_run_without_per_process_cpu_or_with_loss_is_refused() {
        let mut r = RunReport::default();
        r.total.messages_sent = 1;
        r.total.deliveries = 1;
        r.servers.processes = vec![crate::report::ServerProcess {
            role: "engine".into(),
            pid: 1,
            cpu_s: None,
        }];
        assert!(Split::of(&r, "x").unwrap_err().contains("CPU per process"));
        r.total.lost = 1;
        assert!(Split::of(&r, "x").unwrap_err().contains("lost"));
    }
}
