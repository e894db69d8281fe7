//! `--plot FILE.svg`: IOPS over time and latency percentiles of every job, drawn as a plain
//! SVG (no plotting dependency: a few polylines, bars and labels).

use std::fmt::Write as _;

use crate::job::Job;
use crate::report::{JobStats, PERCENTILES, TIMELINE_STEP};

const PANEL_WIDTH: f64 = 520.0;
const PANEL_HEIGHT: f64 = 220.0;
const MARGIN: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One row per job: IOPS over time on the left, latency percentiles (reads and writes) on the
/// right, with labelled axes.
pub fn render(results: &[(Job, JobStats)]) -> String {
    let rows = results.len().max(1) as f64;
    let width = 2.0 * (PANEL_WIDTH + 2.0 * MARGIN);
    let height = rows * (PANEL_HEIGHT + 2.0 * MARGIN);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (row, (job, stats)) in results.iter().enumerate() {
        let top = row as f64 * (PANEL_HEIGHT + 2.0 * MARGIN) + MARGIN;
        timeline_panel(&mut svg, MARGIN, top, job, stats);
        latency_panel(&mut svg, PANEL_WIDTH + 3.0 * MARGIN, top, job, stats);
    }
    svg.push_str("</svg>\n");
    svg
}

fn axes(svg: &mut String, left: f64, top: f64, title: &str, y_label: &str, y_max: f64) {
    let bottom = top + PANEL_HEIGHT;
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}" font-size="13">{}</text>"#,
        top - 12.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<polyline points="{left},{top} {left},{bottom} {},{bottom}" fill="none" stroke="black"/>"#,
        left + PANEL_WIDTH
    );
    for tick in 0..=4 {
        let value = y_max * f64::from(tick) / 4.0;
        let y = bottom - PANEL_HEIGHT * f64::from(tick) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{value:.0}</text>"##,
            left + PANEL_WIDTH,
            left - 4.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" transform="rotate(-90 {} {})" text-anchor="middle">{}</text>"#,
        left - 38.0,
        top + PANEL_HEIGHT / 2.0,
        left - 38.0,
        top + PANEL_HEIGHT / 2.0,
        escape(y_label)
    );
}

fn timeline_panel(svg: &mut String, left: f64, top: f64, job: &Job, stats: &JobStats) {
    let step_seconds = TIMELINE_STEP.as_secs_f64();
    let iops: Vec<f64> = stats
        .timeline
        .iter()
        .map(|&n| n as f64 / step_seconds)
        .collect();
    let y_max = iops.iter().copied().fold(1.0, f64::max) * 1.1;
    let title = format!(
        "{} [{}] IOPS over time ({} ms steps)",
        job.name,
        job.target,
        TIMELINE_STEP.as_millis()
    );
    axes(svg, left, top, &title, "IOPS", y_max);
    let bottom = top + PANEL_HEIGHT;
    let steps = iops.len().max(2) as f64 - 1.0;
    let points: Vec<String> = iops
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                left + PANEL_WIDTH * i as f64 / steps,
                bottom - PANEL_HEIGHT * v / y_max
            )
        })
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{}"/>"#,
        points.join(" "),
        COLORS[0]
    );
    let seconds = iops.len() as f64 * step_seconds;
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">time (s), 0 to {seconds:.1}</text>"#,
        left + PANEL_WIDTH / 2.0,
        bottom + 18.0
    );
}

fn latency_panel(svg: &mut String, left: f64, top: f64, job: &Job, stats: &JobStats) {
    let directions: Vec<(&str, &crate::report::DirectionStats)> =
        [("read", &stats.read), ("write", &stats.write)]
            .into_iter()
            .filter(|(_, d)| d.ops > 0)
            .collect();
    let micros = |d: &crate::report::DirectionStats, p: f64| {
        d.latency_ns.value_at_percentile(p) as f64 / 1000.0
    };
    let y_max = directions
        .iter()
        .flat_map(|(_, d)| PERCENTILES.iter().map(move |&p| micros(d, p)))
        .fold(1.0, f64::max)
        * 1.1;
    axes(
        svg,
        left,
        top,
        &format!("{} latency percentiles", job.name),
        "latency (µs)",
        y_max,
    );
    let bottom = top + PANEL_HEIGHT;
    let group = PANEL_WIDTH / PERCENTILES.len() as f64;
    let bar = group / (directions.len().max(1) as f64 + 1.0);
    for (g, &p) in PERCENTILES.iter().enumerate() {
        let x0 = left + group * g as f64;
        for (i, (_, direction)) in directions.iter().enumerate() {
            let value = micros(direction, p);
            let h = PANEL_HEIGHT * value / y_max;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{}"><title>{value:.1} µs</title></rect>"#,
                x0 + bar * (i as f64 + 0.5),
                bottom - h,
                COLORS[(i + 1) % COLORS.len()]
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">p{p}</text>"#,
            x0 + group / 2.0,
            bottom + 14.0
        );
    }
    for (i, (name, _)) in directions.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
            left + PANEL_WIDTH - 80.0,
            top + 6.0 + 16.0 * i as f64,
            COLORS[(i + 1) % COLORS.len()],
            left + PANEL_WIDTH - 66.0,
            top + 15.0 + 16.0 * i as f64
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_plot_is_an_svg_with_one_row_per_job() {
        let jobs = crate::job::parse_jobs(
            Some("[a]\nrw=randrw\nsize=1m\n[b]\nrw=write\nsize=1m\n"),
            &[],
        )
        .unwrap();
        let mut results = Vec::new();
        for job in jobs {
            let mut stats = JobStats::default();
            for i in 0..500u64 {
                stats.write.record(4096, Duration::from_micros(50 + i));
                stats.record_in_timeline(Duration::from_millis(i));
            }
            results.push((job, stats));
        }
        let svg = render(&results);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("IOPS over time").count(), 2);
        assert!(svg.matches("<polyline points=\"").count() >= 2);
        assert!(svg.contains("p99.9"));
    }
}
