//! `--plot FILE.svg`: latency over time and latency distribution, written as plain SVG by hand
//! (no font files or drawing crate needed; the viewer renders the text).

use crate::report::Summary;
use std::fmt::Write as _;

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 300.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 160.0;
const MARGIN_TOP: f64 = 40.0;
const PANEL_GAP: f64 = 80.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

struct Panel {
    top: f64,
    x_max: f64,
    y_max: f64,
}

impl Panel {
    fn width() -> f64 {
        WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    }
    fn x(&self, value: f64) -> f64 {
        MARGIN_LEFT + (value / self.x_max).clamp(0.0, 1.0) * Self::width()
    }
    fn y(&self, value: f64) -> f64 {
        self.top + PANEL_HEIGHT - (value / self.y_max).clamp(0.0, 1.0) * PANEL_HEIGHT
    }
}

/// A "nice" upper bound for an axis (1, 2 or 5 times a power of ten).
fn nice_max(value: f64) -> f64 {
    if !(value.is_finite() && value > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&m| m >= value)
        .unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Position of quantile `q` on the distribution chart's x axis: log10(1/(1-q)), so that
/// 90%, 99%, 99.9% ... are evenly spaced (as in HdrHistogram plots).
fn quantile_x(q: f64) -> f64 {
    let tail = (1.0 - q).max(1e-5);
    -tail.log10()
}

fn axes(svg: &mut String, panel: &Panel, title: &str, y_label: &str) {
    let left = MARGIN_LEFT;
    let right = MARGIN_LEFT + Panel::width();
    let bottom = panel.top + PANEL_HEIGHT;
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}" font-size="16" font-weight="bold">{}</text>"#,
        panel.top - 12.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{}" width="{}" height="{PANEL_HEIGHT}" fill="none" stroke="#444"/>"##,
        panel.top,
        right - left
    );
    for i in 0..=5 {
        let value = panel.y_max * f64::from(i) / 5.0;
        let y = panel.y(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            left - 6.0,
            y + 4.0,
            format_number(value)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{:.1}" font-size="12" transform="rotate(-90 16 {:.1})" text-anchor="middle">{}</text>"#,
        panel.top + PANEL_HEIGHT / 2.0,
        panel.top + PANEL_HEIGHT / 2.0,
        escape(y_label)
    );
    let _ = bottom;
}

fn format_number(value: f64) -> String {
    if value >= 100.0 || value == 0.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

fn polyline(svg: &mut String, points: &[(f64, f64)], color: &str, dashed: bool) {
    if points.is_empty() {
        return;
    }
    let mut coords = String::new();
    for (x, y) in points {
        let _ = write!(coords, "{x:.1},{y:.1} ");
    }
    let dash = if dashed {
        r#" stroke-dasharray="5,3""#
    } else {
        ""
    };
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>"#,
        coords.trim_end()
    );
}

fn legend(svg: &mut String, top: f64, row: usize, color: &str, label: &str, dashed: bool) {
    let x = MARGIN_LEFT + Panel::width() + 12.0;
    let y = top + 14.0 + 18.0 * row as f64;
    let dash = if dashed {
        r#" stroke-dasharray="5,3""#
    } else {
        ""
    };
    let _ = writeln!(
        svg,
        r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}" font-size="11">{}</text>"#,
        x + 22.0,
        x + 28.0,
        y + 4.0,
        escape(label)
    );
}

/// Renders the two charts of a run as an SVG document.
pub fn render_svg(summary: &Summary) -> String {
    let height = MARGIN_TOP + 2.0 * PANEL_HEIGHT + PANEL_GAP + 50.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);

    // Panel 1: p50 (solid) and p99 (dashed) per second.
    let t_max = summary
        .timelines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.t_s))
        .fold(1.0, f64::max);
    let y_max = summary
        .timelines
        .iter()
        .flat_map(|(_, points)| points.iter().filter(|p| p.count > 0).map(|p| p.p99_ms))
        .fold(0.0, f64::max);
    let over_time = Panel {
        top: MARGIN_TOP,
        x_max: nice_max(t_max),
        y_max: nice_max(y_max),
    };
    axes(
        &mut svg,
        &over_time,
        &format!(
            "{}: latency over time (p50 solid, p99 dashed)",
            summary.command
        ),
        "latency (ms)",
    );
    for i in 0..=5 {
        let t = over_time.x_max * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}s</text>"#,
            over_time.x(t),
            over_time.top + PANEL_HEIGHT + 16.0,
            format_number(t)
        );
    }
    let mut row = 0;
    for (index, (name, points)) in summary.timelines.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let active: Vec<_> = points.iter().filter(|p| p.count > 0).collect();
        let p50: Vec<_> = active
            .iter()
            .map(|p| (over_time.x(p.t_s), over_time.y(p.p50_ms)))
            .collect();
        let p99: Vec<_> = active
            .iter()
            .map(|p| (over_time.x(p.t_s), over_time.y(p.p99_ms)))
            .collect();
        polyline(&mut svg, &p50, color, false);
        polyline(&mut svg, &p99, color, true);
        legend(
            &mut svg,
            over_time.top,
            row,
            color,
            &format!("{name} p50"),
            false,
        );
        legend(
            &mut svg,
            over_time.top,
            row + 1,
            color,
            &format!("{name} p99"),
            true,
        );
        row += 2;
    }

    // Panel 2: latency by percentile over the whole run.
    let lat_max = summary
        .distributions
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let distribution = Panel {
        top: MARGIN_TOP + PANEL_HEIGHT + PANEL_GAP,
        x_max: quantile_x(0.99999),
        y_max: nice_max(lat_max),
    };
    axes(
        &mut svg,
        &distribution,
        "latency by percentile (whole run)",
        "latency (ms)",
    );
    for (q, label) in [
        (0.0, "0%"),
        (0.9, "90%"),
        (0.99, "99%"),
        (0.999, "99.9%"),
        (0.9999, "99.99%"),
        (0.99999, "max"),
    ] {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{label}</text>"#,
            distribution.x(quantile_x(q)),
            distribution.top + PANEL_HEIGHT + 16.0
        );
    }
    for (index, (name, points)) in summary.distributions.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let line: Vec<_> = points
            .iter()
            .map(|&(ms, q)| (distribution.x(quantile_x(q)), distribution.y(ms)))
            .collect();
        polyline(&mut svg, &line, color, false);
        legend(&mut svg, distribution.top, index, color, name, false);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::RunStats;
    use std::time::Duration;

    #[test]
    fn nice_bounds() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.2), 5.0);
        assert_eq!(nice_max(12.0), 20.0);
        assert_eq!(nice_max(100.0), 100.0);
    }

    #[test]
    fn svg_contains_both_panels_and_series() {
        let stats = RunStats::new(&["e2e <x>"]);
        if let Some(series) = stats.latency("e2e <x>") {
            for ms in 1..50 {
                series.record(Duration::from_millis(ms));
            }
            series.tick(1.0);
            series.record(Duration::from_millis(7));
            series.tick(2.0);
        }
        let summary = Summary::from_stats("bench relay", "b", &stats, Duration::from_secs(2));
        let svg = render_svg(&summary);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("e2e &lt;x&gt; p99"));
        assert!(svg.contains("latency by percentile"));
    }
}
