//! `--plot FILE.svg`: one picture of a run. Top: deliveries and sends per
//! second over the run. Middle: p99 latency per second. Then the latency
//! percentile spectrum per tier (x = "nines": 90 %, 99 %, 99.9 % ...). A run
//! with a reconnect storm or a restarted edge adds a last panel: devices
//! back per second, from the storm (or from the edge listening again).

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::report::TimelinePoint;

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

pub fn draw(
    path: &Path,
    title: &str,
    timeline: &[TimelinePoint],
    histograms: &[(String, Histogram<u64>)],
    reconnects_per_s: &[u64],
) -> anyhow::Result<()> {
    let rows = if reconnects_per_s.is_empty() { 3 } else { 4 };
    let root = SVGBackend::new(path, (1000, 370 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let panels = root.split_evenly((rows, 1));
    let t_max = timeline.iter().map(|p| p.t_s).max().unwrap_or(1).max(1) as f64;

    // Throughput: deliveries (left axis) and scheduled sends (right axis).
    let d_max = timeline
        .iter()
        .map(|p| p.deliveries)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let s_max = timeline.iter().map(|p| p.sends).max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut c = ChartBuilder::on(&panels[0])
        .caption("throughput per second (after warm-up)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..d_max)?
        .set_secondary_coord(0f64..t_max, 0f64..s_max);
    c.configure_mesh()
        .x_desc("seconds since sending started")
        .y_desc("deliveries/s")
        .draw()?;
    c.configure_secondary_axes().y_desc("sends/s").draw()?;
    c.draw_series(LineSeries::new(
        timeline.iter().map(|p| (p.t_s as f64, p.deliveries as f64)),
        COLORS[0].stroke_width(2),
    ))?
    .label("deliveries/s (left)")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], COLORS[0].stroke_width(2)));
    c.draw_secondary_series(LineSeries::new(
        timeline.iter().map(|p| (p.t_s as f64, p.sends as f64)),
        COLORS[1].stroke_width(2),
    ))?
    .label("sends/s, scheduled (right)")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], COLORS[1].stroke_width(2)));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    // p99 per second.
    let p_max = timeline.iter().map(|p| p.p99_us).max().unwrap_or(1).max(1) as f64 / 1e3 * 1.1;
    let mut c = ChartBuilder::on(&panels[1])
        .caption(
            "p99 publish-to-delivery latency per second",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..p_max)?;
    c.configure_mesh()
        .x_desc("seconds since sending started")
        .y_desc("ms")
        .draw()?;
    c.draw_series(LineSeries::new(
        timeline
            .iter()
            .filter(|p| p.p99_us > 0)
            .map(|p| (p.t_s as f64, p.p99_us as f64 / 1e3)),
        COLORS[3].stroke_width(2),
    ))?;

    // Percentile spectrum.
    let nines = |q: f64| -(1.0 - q).max(1e-6).log10();
    let l_max = histograms
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(_, h)| h.max())
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1e3
        * 1.1;
    let mut c = ChartBuilder::on(&panels[2])
        .caption("latency by percentile", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..5.0, 0f64..l_max)?;
    c.configure_mesh()
        .x_labels(6)
        .x_desc("percentile")
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => "99.999%".into(),
        })
        .y_desc("ms")
        .draw()?;
    for (i, (name, h)) in histograms.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = (0..=500)
            .map(|k| {
                let x = f64::from(k) / 100.0;
                let q = 1.0 - 10f64.powf(-x);
                (x, h.value_at_quantile(q.min(0.999_999)) as f64 / 1e3)
            })
            .filter(|(x, _)| *x <= nines(1.0 - 1.0 / h.len() as f64) + 0.01)
            .collect();
        c.draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    if !reconnects_per_s.is_empty() {
        reconnect_curve(&panels[3], reconnects_per_s)?;
    }
    root.present()?;
    Ok(())
}

/// Devices back per second after a storm or a restart, as bars.
fn reconnect_curve(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    per_s: &[u64],
) -> anyhow::Result<()> {
    let n_max = per_s.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut c = ChartBuilder::on(area)
        .caption(
            "devices back per second (from the storm, or from the edge listening again)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..per_s.len() as f64, 0f64..n_max)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("devices back")
        .draw()?;
    c.draw_series(per_s.iter().enumerate().map(|(i, &n)| {
        Rectangle::new(
            [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, n as f64)],
            COLORS[2].filled(),
        )
    }))?;
    Ok(())
}
