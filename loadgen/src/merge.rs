//! `tiercast loadgen merge`: several generators' reports of one run (each
//! driving its own users of one deployment, `--user-offset`/`--run-id`)
//! as one report. Counts add up; latencies come from the generators'
//! histograms merged (`run --hdr` writes them), never from averaged
//! percentiles.
//!
//! The histogram file is HdrHistogram's interval log (V2, deflated, one
//! entry per histogram tagged `all`, `tier1`, `tier2`, `tier3`): the format
//! HdrHistogram's own tools (HistogramLogAnalyzer, `hdr-plot`) read.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::interval_log::{
    IntervalLogIterator, IntervalLogWriterBuilder, LogEntry, Tag,
};
use hdrhistogram::serialization::{Deserializer, V2DeflateSerializer};

use crate::report::{FaultFigures, RunFigures, RunReport};

/// Histograms as a run names them: "all", "tier 1", ...
pub type Named = Vec<(String, Histogram<u64>)>;

/// The interval log's tag for a histogram's name (tags have no spaces).
fn tag_of(name: &str) -> String {
    name.replace(' ', "")
}

/// A tag back to the run's name.
fn name_of(tag: &str) -> String {
    match tag.strip_prefix("tier") {
        Some(n) => format!("tier {n}"),
        None => tag.to_owned(),
    }
}

/// `histograms` as an HdrHistogram interval log.
pub fn write_log(histograms: &Named, run_seconds: f64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut ser = V2DeflateSerializer::new();
    {
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment("tiercast loadgen: publish-to-delivery latency, microseconds")
            .with_start_time(SystemTime::now())
            .begin_log_with(&mut out, &mut ser)
            .map_err(|e| e.to_string())?;
        let length = Duration::from_secs_f64(run_seconds.max(0.0));
        for (name, h) in histograms {
            let tag = tag_of(name);
            let tag = Tag::new(&tag).ok_or_else(|| format!("histogram name {name:?}"))?;
            w.write_histogram(h, Duration::ZERO, length, Some(tag))
                .map_err(|e| format!("{e:?}"))?;
        }
    }
    Ok(out)
}

/// An interval log as written by [`write_log`] (several entries of one
/// tag are added together).
pub fn read_log(bytes: &[u8]) -> Result<Named, String> {
    let mut out: Named = Vec::new();
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(bytes) {
        let entry = entry.map_err(|e| format!("not an HdrHistogram interval log: {e:?}"))?;
        let LogEntry::Interval(ih) = entry else {
            continue;
        };
        let name = name_of(ih.tag().map_or("all", |t| t.as_str()));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(ih.encoded_histogram())
            .map_err(|e| format!("histogram {name}: {e}"))?;
        let h: Histogram<u64> = de
            .deserialize(&mut std::io::Cursor::new(raw))
            .map_err(|e| format!("histogram {name}: {e:?}"))?;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, acc)) => acc
                .add(&h)
                .map_err(|e| format!("histogram {name}: {e:?}"))?,
            None => out.push((name, h)),
        }
    }
    if out.is_empty() {
        return Err("no histogram in the log".into());
    }
    Ok(out)
}

/// Adds `b`'s counts and rate to `a`'s (the generators ran at once; the
/// latencies are set afterwards from the merged histograms).
fn add_counts(a: &mut RunFigures, b: &RunFigures) {
    a.add_counts(b);
    a.deliveries_per_s += b.deliveries_per_s;
}

fn add_map(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

fn max_opt<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y > x { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The generators' reports as one, with their histograms merged. Refused:
/// fewer than two, different scenarios or builds, or generators that
/// shared users or a run id (they would have counted each other's
/// deliveries).
pub fn merge(runs: &[(RunReport, Named)]) -> Result<(RunReport, Named), String> {
    let [(first, _), rest @ ..] = runs else {
        return Err("nothing to merge".into());
    };
    if rest.is_empty() {
        return Err("merge needs the reports of two or more generators".into());
    }
    let users = |r: &RunReport| r.scenario.as_ref().map_or(0, |s| s.users);
    let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
    let mut run_ids = HashSet::new();
    for (i, (r, _)) in runs.iter().enumerate() {
        if r.scenario_name() != first.scenario_name() {
            return Err(format!(
                "report {} ran scenario {}, report 1 ran {}",
                i + 1,
                r.scenario_name(),
                first.scenario_name()
            ));
        }
        if r.versions.tiercast != first.versions.tiercast
            || r.versions.protocol != first.versions.protocol
        {
            return Err(format!(
                "report {} came from tiercast {} (protocol {}), report 1 from {} ({})",
                i + 1,
                r.versions.tiercast,
                r.versions.protocol,
                first.versions.tiercast,
                first.versions.protocol
            ));
        }
        if !run_ids.insert(r.loadgen.run_id) {
            return Err(format!(
                "two reports share run id {}: give each generator its own --run-id",
                r.loadgen.run_id
            ));
        }
        let (lo, hi) = (r.loadgen.user_offset + 1, r.loadgen.user_offset + users(r));
        if let Some((a, b, j)) = ranges.iter().find(|(a, b, _)| lo <= *b && *a <= hi) {
            return Err(format!(
                "reports {} and {} share users ({}..={} and {lo}..={hi}): give each generator its own --user-offset",
                j + 1,
                i + 1,
                a,
                b
            ));
        }
        ranges.push((lo, hi, i));
    }

    // Histograms: added by name.
    let mut hists: Named = Vec::new();
    for (i, (_, named)) in runs.iter().enumerate() {
        if !named.iter().any(|(n, _)| n == "all") {
            return Err(format!("histograms {}: no `all` histogram", i + 1));
        }
        for (name, h) in named {
            match hists.iter_mut().find(|(n, _)| n == name) {
                Some((_, acc)) => acc
                    .add(h)
                    .map_err(|e| format!("histograms {}, {name}: {e:?}", i + 1))?,
                None => hists.push((name.clone(), h.clone())),
            }
        }
    }

    let mut m = first.clone();
    m.lost_sample.truncate(20);
    for (r, _) in rest {
        add_counts(&mut m.total, &r.total);
        for (tier, f) in &r.tiers {
            let mt = m.tiers.entry(tier.clone()).or_default();
            add_counts(&mut mt.figures, &f.figures);
            add_map(&mut mt.errors, &f.errors);
            mt.notified = match (mt.notified, f.notified) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
            mt.pulled = match (mt.pulled, f.pulled) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
        }
        add_map(&mut m.errors, &r.errors);
        m.send_errors += r.send_errors;
        // Connect percentiles: each generator's own; the merged one is the
        // worst of them (the distributions are not kept).
        let c = &mut m.connect;
        c.connections += r.connect.connections;
        c.connected += r.connect.connected;
        c.failed += r.connect.failed;
        c.p50_ms = c.p50_ms.max(r.connect.p50_ms);
        c.p99_ms = c.p99_ms.max(r.connect.p99_ms);
        c.max_ms = c.max_ms.max(r.connect.max_ms);
        c.rate_per_s += r.connect.rate_per_s;
        c.seconds = c.seconds.max(r.connect.seconds);
        let l = &mut m.loadgen;
        l.cpu_s = match (l.cpu_s, r.loadgen.cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        l.sockets += r.loadgen.sockets;
        l.pulls += r.loadgen.pulls;
        l.datagrams_dropped += r.loadgen.datagrams_dropped;
        l.receive_drops = match (l.receive_drops, r.loadgen.receive_drops) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        l.user_offset = l.user_offset.min(r.loadgen.user_offset);
        m.reorder.held += r.reorder.held;
        m.reorder.reordered += r.reorder.reordered;
        m.reorder.late += r.reorder.late;
        for s in &r.lost_sample {
            if m.lost_sample.len() < 20 {
                m.lost_sample.push(s.clone());
            }
        }
        for p in &r.timeline {
            match m.timeline.iter_mut().find(|q| q.t_s == p.t_s) {
                Some(q) => {
                    q.sends += p.sends;
                    q.deliveries += p.deliveries;
                    q.p99_us = q.p99_us.max(p.p99_us);
                }
                None => m.timeline.push(p.clone()),
            }
        }
        m.run_seconds = m.run_seconds.max(r.run_seconds);
        // Storms and faults: devices added up, percentiles the worst
        // generator's (their distributions are not kept).
        if let Some(b) = &r.reconnect_storm {
            let a = m.reconnect_storm.get_or_insert_with(Default::default);
            a.devices_dropped += b.devices_dropped;
            a.reconnects += b.reconnects;
            a.reconnect_p50_ms = a.reconnect_p50_ms.max(b.reconnect_p50_ms);
            a.reconnect_p99_ms = a.reconnect_p99_ms.max(b.reconnect_p99_ms);
            a.reconnect_max_ms = a.reconnect_max_ms.max(b.reconnect_max_ms);
            if a.reconnects_per_s.len() < b.reconnects_per_s.len() {
                a.reconnects_per_s.resize(b.reconnects_per_s.len(), 0);
            }
            for (x, y) in a.reconnects_per_s.iter_mut().zip(&b.reconnects_per_s) {
                *x += y;
            }
        }
        if let Some(b) = &r.edge_fault {
            let a = m.edge_fault.get_or_insert_with(|| FaultFigures {
                devices_on_edge: 0,
                devices_back: 0,
                ..b.clone()
            });
            a.devices_on_edge += b.devices_on_edge;
            a.devices_back += b.devices_back;
            a.back_p50_ms = a.back_p50_ms.max(b.back_p50_ms);
            a.back_p99_ms = a.back_p99_ms.max(b.back_p99_ms);
            a.back_max_ms = a.back_max_ms.max(b.back_max_ms);
        }
        if let Some(s) = m.scenario.as_mut() {
            s.users += users(r);
        }
    }
    m.timeline.sort_by_key(|p| p.t_s);
    for (tier, f) in &mut m.tiers {
        if let Some((_, h)) = hists.iter().find(|(n, _)| *n == format!("tier {tier}")) {
            f.figures.set_latency(h);
        }
    }
    if let Some((_, h)) = hists.iter().find(|(n, _)| n == "all") {
        m.total.set_latency(h);
    }

    // The servers: one deployment seen by every generator (its /metrics
    // over overlapping windows: the largest reading), or each generator's
    // own self-hosted servers (added up).
    let self_hosted = runs
        .iter()
        .all(|(r, _)| r.target.mode.starts_with("self-hosted"));
    let mut cpu = first.servers.cpu_s;
    let mut rss_end = first.servers.rss_bytes_end;
    for (r, _) in rest {
        cpu = if self_hosted {
            match (cpu, r.servers.cpu_s) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            }
        } else {
            max_opt(cpu, r.servers.cpu_s)
        };
        rss_end = max_opt(rss_end, r.servers.rss_bytes_end);
        // Store batches: each generator's own servers add up; against one
        // deployment every generator read the same edges' counters.
        for (op, b) in &r.servers.store_batches {
            let e = m.servers.store_batches.entry(op.clone()).or_default();
            if self_hosted {
                e.batches += b.batches;
                e.calls += b.calls;
            } else if b.calls > e.calls {
                *e = *b;
            }
        }
        // Commits likewise: added over self-hosted generators' own edges,
        // the fullest one against a shared deployment.
        m.servers.store_commits = match (&m.servers.store_commits, &r.servers.store_commits) {
            (Some(a), Some(b)) if self_hosted => Some(a.add(b)),
            (Some(a), Some(b)) if b.count > a.count => Some(b.clone()),
            (None, b) => b.clone(),
            (a, _) => a.clone(),
        };
        if self_hosted {
            m.servers
                .processes
                .extend(r.servers.processes.iter().cloned());
        }
    }
    m.servers.cpu_s = cpu;
    m.servers.rss_bytes_end = rss_end;
    m.servers.cpu_us_per_delivery = cpu
        .filter(|_| m.total.deliveries > 0)
        .map(|c| c * 1e6 / m.total.deliveries as f64);
    m.servers.cpu_ms_per_message = cpu
        .filter(|_| m.total.messages_sent > 0)
        .map(|c| c * 1e3 / m.total.messages_sent as f64);
    m.servers.cpu_floors_per_delivery = m
        .servers
        .cpu_us_per_delivery
        .zip(m.machine.udp_floor_us)
        .map(|(c, f)| c / f);
    // Per-connection memory is each edge's own measure, not additive.
    m.servers.rss_per_connection_bytes = runs
        .iter()
        .filter_map(|(r, _)| r.servers.rss_per_connection_bytes)
        .max();
    m.merged_from = runs
        .iter()
        .map(|(r, _)| {
            format!(
                "run id {} users {}..={}",
                r.loadgen.run_id,
                r.loadgen.user_offset + 1,
                r.loadgen.user_offset + users(r)
            )
        })
        .collect();
    Ok((m, hists))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::histogram;
    use crate::report::TierFigures;

    fn hist(values: &[(u64, u64)]) -> Histogram<u64> {
        let mut h = histogram();
        for &(v, n) in values {
            h.record_n(v, n).unwrap();
        }
        h
    }

    /// A generator's report: `n` deliveries of tier 1 at `latency_us`.
    fn run(run_id: u16, user_offset: u64, n: u64, latency_us: u64) -> (RunReport, Named) {
        let mut r = RunReport {
            scenario: Some(
                toml::from_str::<crate::scenario::Scenario>(
                    "name = \"s\"\ndescription = \"d\"\nusers = 10\nduration_s = 1\n\
                     rate = { kind = \"constant\", messages_per_s = 1 }\n\
                     [[conversations]]\nname = \"c\"\ncount = 1\nsize_min = 2\n",
                )
                .unwrap(),
            ),
            ..RunReport::default()
        };
        r.loadgen.run_id = run_id;
        r.loadgen.user_offset = user_offset;
        r.target.mode = "self-hosted single node".into();
        let h = hist(&[(latency_us, n)]);
        let mut f = RunFigures {
            messages_sent: n,
            expected_deliveries: n,
            deliveries: n,
            ..RunFigures::default()
        };
        f.set_latency(&h);
        r.total = f.clone();
        r.tiers.insert(
            "1".into(),
            TierFigures {
                figures: f,
                ..TierFigures::default()
            },
        );
        r.servers.cpu_s = Some(1.0);
        (r, vec![("tier 1".into(), h.clone()), ("all".into(), h)])
    }

    #[test]
    fn the_log_reads_back_what_was_written() {
        let named: Named = vec![
            ("tier 1".into(), hist(&[(1_000, 5), (90_000, 1)])),
            ("all".into(), hist(&[(1_000, 5), (90_000, 1), (7, 2)])),
        ];
        let back = read_log(&write_log(&named, 20.0).unwrap()).unwrap();
        assert_eq!(back.len(), 2);
        for ((a, ha), (b, hb)) in named.iter().zip(&back) {
            assert_eq!(a, b);
            assert_eq!(ha, hb);
        }
        assert!(read_log(b"not a log\n").is_err());
    }

    #[test]
    fn percentiles_come_from_the_merged_histograms_not_averaged() {
        // One generator saw 990 deliveries at 1 ms, the other 10 at 2 s:
        // averaging their p99s would say ~1 s; the merged p99 is 1 ms and
        // the p99.9 is 2 s.
        let a = run(1, 0, 990, 1_000);
        let b = run(2, 10, 10, 2_000_000);
        let (m, hists) = merge(&[a, b]).unwrap();
        let union = hist(&[(1_000, 990), (2_000_000, 10)]);
        assert_eq!(m.total.deliveries, 1_000);
        assert_eq!(m.total.expected_deliveries, 1_000);
        assert_eq!(m.total.p99_us, union.value_at_quantile(0.99));
        assert_eq!(m.total.p999_us, union.value_at_quantile(0.999));
        assert_eq!(m.total.max_us, union.max());
        assert_eq!(m.tiers["1"].figures.p99_us, union.value_at_quantile(0.99));
        assert_eq!(hists.iter().find(|(n, _)| n == "all").unwrap().1, union);
        assert_eq!(m.scenario.as_ref().unwrap().users, 20);
        assert_eq!(m.servers.cpu_s, Some(2.0), "self-hosted servers add up");
        assert_eq!(m.merged_from.len(), 2);
    }

    #[test]
    fn generators_that_collided_are_refused() {
        let e = merge(&[run(1, 0, 1, 1), run(2, 5, 1, 1)]).unwrap_err();
        assert!(e.contains("share users"), "{e}");
        let e = merge(&[run(1, 0, 1, 1), run(1, 10, 1, 1)]).unwrap_err();
        assert!(e.contains("run id"), "{e}");
        let e = merge(&[run(1, 0, 1, 1)]).unwrap_err();
        assert!(e.contains("two or more"), "{e}");
    }
}
