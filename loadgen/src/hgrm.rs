//! HdrHistogram's percentile distribution text (`.hgrm`), the format
//! HdrHistogram's plotter and most latency tools read: values in
//! milliseconds, one block per histogram.

use std::fmt::Write;

use hdrhistogram::Histogram;

/// One block per `(name, histogram of microseconds)`.
pub fn render(histograms: &[(String, Histogram<u64>)]) -> String {
    let mut out = String::new();
    for (name, h) in histograms {
        let _ = writeln!(out, "# {name} (publish-to-delivery latency, ms)");
        let _ = writeln!(
            out,
            "{:>12} {:>14} {:>10} {:>14}\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        if h.is_empty() {
            let _ = writeln!(out, "#[no samples]\n");
            continue;
        }
        for v in h.iter_quantiles(5) {
            let p = v.quantile_iterated_to();
            let inv = if p < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - p))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:>12.3} {:>14.12} {:>10} {}",
                v.value_iterated_to() as f64 / 1e3,
                p,
                v.count_since_last_iteration(),
                inv
            );
        }
        let _ = writeln!(
            out,
            "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
            h.mean() / 1e3,
            h.stdev() / 1e3
        );
        let _ = writeln!(
            out,
            "#[Max     = {:>12.3}, Total count    = {:>12}]",
            h.max() as f64 / 1e3,
            h.len()
        );
        let _ = writeln!(
            out,
            "#[Buckets = {:>12}, SubBuckets     = {:>12}]\n",
            h.buckets(),
            h.distinct_values()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_listed_in_milliseconds() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let text = render(&[("tier 1".into(), h)]);
        assert!(text.starts_with("# tier 1"));
        assert!(text.contains("Total count    =         1000"));
        assert!(text.contains("#[Max     =       10.0"), "{text}");
    }
}
