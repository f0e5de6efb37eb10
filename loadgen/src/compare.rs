//! `tiercast loadgen compare A.json B.json`: what changed between two runs,
//! per tier and for the servers, and which changes are larger than the
//! run-to-run noise. The noise is measured, not assumed: repeated runs of
//! the baseline (`--baseline A2.json ...`) give each figure's spread; without
//! them a floor of [`DEFAULT_NOISE_PCT`] applies and the output says so.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::RunReport;

/// The change below which a figure is called noise when no repeated runs
/// of the baseline are given (the spread of CPU per delivery over repeated
/// room runs on the development machine: 17.0-20.6 us, docs/benchmarks.md).
pub const DEFAULT_NOISE_PCT: f64 = 20.0;

/// One figure of both runs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    /// `tier 1 p99_ms`, `servers cpu_us_per_delivery`, ...
    pub figure: String,
    pub a: f64,
    pub b: f64,
    /// (b - a) / a, percent (0 when a is 0 and b is too).
    pub change_pct: f64,
    /// The noise band this change is judged against, percent.
    pub noise_pct: f64,
    /// Larger than the noise.
    pub significant: bool,
}

/// The figures compared, by name.
fn figures(r: &RunReport) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (tier, t) in &r.tiers {
        let f = &t.figures;
        let mut put = |k: &str, v: f64| {
            out.insert(format!("tier {tier} {k}"), v);
        };
        put("deliveries_per_s", f.deliveries_per_s);
        put("p50_ms", f.p50_us as f64 / 1e3);
        put("p99_ms", f.p99_us as f64 / 1e3);
        put("max_ms", f.max_us as f64 / 1e3);
        put("lost", f.lost as f64);
        put("duplicates", f.duplicates as f64);
    }
    let s = &r.servers;
    if let Some(v) = s.cpu_us_per_delivery {
        out.insert("servers cpu_us_per_delivery".into(), v);
    }
    if let Some(v) = s.cpu_floors_per_delivery {
        out.insert("servers cpu_floors_per_delivery".into(), v);
    }
    if let Some(v) = s.rss_per_connection_bytes {
        out.insert("servers rss_per_connection_bytes".into(), v as f64);
    }
    out.insert("connect p99_ms".into(), r.connect.p99_ms);
    out.insert("send_errors".into(), r.send_errors as f64);
    out
}

fn pct(a: f64, b: f64) -> f64 {
    if a == 0.0 {
        if b == 0.0 { 0.0 } else { 100.0 }
    } else {
        (b - a) / a.abs() * 100.0
    }
}

/// Compares `b` against `a`; `repeats` are further runs of `a`'s setup,
/// whose spread around `a` is each figure's noise.
pub fn compare(a: &RunReport, b: &RunReport, repeats: &[RunReport]) -> Vec<Change> {
    let fa = figures(a);
    let fb = figures(b);
    let reps: Vec<BTreeMap<String, f64>> = repeats.iter().map(figures).collect();
    fa.iter()
        .filter_map(|(k, &va)| {
            let vb = *fb.get(k)?;
            let noise = if reps.is_empty() {
                DEFAULT_NOISE_PCT
            } else {
                reps.iter()
                    .filter_map(|r| r.get(k))
                    .map(|&v| pct(va, v).abs())
                    .fold(0.0, f64::max)
            };
            let change = pct(va, vb);
            // Counts that should be 0 (lost, errors) change for real at any
            // size.
            let exact = k.ends_with(" lost") || k == "send_errors";
            Some(Change {
                figure: k.clone(),
                a: va,
                b: vb,
                change_pct: change,
                noise_pct: if exact { 0.0 } else { noise },
                significant: if exact {
                    va != vb
                } else {
                    change.abs() > noise
                },
            })
        })
        .collect()
}

pub fn render(changes: &[Change], noise_measured: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:>14} {:>14} {:>9} {:>8}",
        "figure", "A", "B", "change", "noise"
    );
    for c in changes {
        let _ = writeln!(
            out,
            "{:<36} {:>14.2} {:>14.2} {:>8.1}% {:>7.1}%{}",
            c.figure,
            c.a,
            c.b,
            c.change_pct,
            c.noise_pct,
            if c.significant {
                "  <- beyond noise"
            } else {
                ""
            }
        );
    }
    let n = changes.iter().filter(|c| c.significant).count();
    let _ = writeln!(
        out,
        "\n{n} of {} figures changed beyond the noise{}",
        changes.len(),
        if noise_measured {
            " (measured from the repeated baseline runs)"
        } else {
            " (no repeated baseline runs given: a 20 % band; pass --baseline to measure it)"
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p99_us: u64, cpu: f64, lost: u64) -> RunReport {
        serde_json::from_value(serde_json::json!({
            "scenario": null, "lost": lost, "send_errors": 0, "p50_us": 1_000,
            "tiers": {"1": {"messages_sent": 10, "expected_deliveries": 40, "deliveries": 40 - lost,
                             "lost": lost, "p50_us": 1_000, "p99_us": p99_us, "max_us": p99_us,
                             "deliveries_per_s": 100.0}},
            "connect": {"connected": 10, "connections": 10, "p99_ms": 5.0},
            "servers": {"cpu_us_per_delivery": cpu},
            "machine": {"cpus": 2},
        }))
        .unwrap()
    }

    fn get<'a>(c: &'a [Change], figure: &str) -> &'a Change {
        c.iter().find(|c| c.figure == figure).unwrap()
    }

    #[test]
    fn changes_are_judged_against_the_measured_noise() {
        let a = run(10_000, 20.0, 0);
        let b = run(20_000, 21.0, 0);
        // Two more runs of A: p99 within 10 %, CPU within 10 %.
        let repeats = [run(11_000, 22.0, 0), run(9_500, 19.0, 0)];
        let c = compare(&a, &b, &repeats);
        let p99 = get(&c, "tier 1 p99_ms");
        assert_eq!((p99.a, p99.b, p99.change_pct), (10.0, 20.0, 100.0));
        assert_eq!(p99.noise_pct, 10.0);
        assert!(p99.significant);
        let cpu = get(&c, "servers cpu_us_per_delivery");
        assert_eq!(cpu.change_pct, 5.0);
        assert_eq!(cpu.noise_pct, 10.0);
        assert!(!cpu.significant, "5 % is within this setup's 10 % spread");
        assert!(render(&c, true).contains("2 of "), "p99 and max moved");
    }

    #[test]
    fn a_loss_is_never_noise_and_without_repeats_the_band_is_said() {
        let c = compare(&run(10_000, 20.0, 0), &run(10_000, 20.0, 1), &[]);
        let lost = get(&c, "tier 1 lost");
        assert!(lost.significant && lost.noise_pct == 0.0);
        assert_eq!(get(&c, "tier 1 p99_ms").noise_pct, DEFAULT_NOISE_PCT);
        assert!(render(&c, false).contains("pass --baseline to measure it"));
    }
}
