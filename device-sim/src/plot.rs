//! `--plot FILE.svg` (or `.png`): latency over time, errors and rejections over time, and the latency
//! distribution, written as plain SVG by hand (no font files or drawing crate needed; the
//! viewer renders the text).
//!
//! Latency is drawn on a logarithmic axis, so that a sub-millisecond series and a tail of
//! seconds are both readable; the time axis spans the run; the legend column is as wide as
//! its longest label.

use crate::report::Summary;
use crate::stats::{FailurePoint, IntervalPoint};
use std::fmt::Write as _;

const PLOT_WIDTH: f64 = 680.0;
const PANEL_HEIGHT: f64 = 280.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_TOP: f64 = 40.0;
const PANEL_GAP: f64 = 80.0;
/// Width of a legend's line sample and the gap after it.
const LEGEND_SAMPLE: f64 = 40.0;
/// Rough width of one character of the legend's 11-px text.
const CHAR_WIDTH: f64 = 6.6;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
/// The lowest latency the log axis goes down to (1 µs).
const LOG_FLOOR_MS: f64 = 0.001;

/// One chart: where it is and what its axes span.
struct Panel {
    top: f64,
    x_max: f64,
    y: Scale,
}

/// A y axis: linear from 0, or logarithmic between two powers of ten.
enum Scale {
    Linear { max: f64 },
    Log { min: f64, max: f64 },
}

impl Scale {
    /// The value's height as a share of the panel (0 at the bottom, 1 at the top).
    fn share(&self, value: f64) -> f64 {
        let share = match *self {
            Scale::Linear { max } => value / max,
            Scale::Log { min, max } => {
                (value.max(min).log10() - min.log10()) / (max.log10() - min.log10())
            }
        };
        share.clamp(0.0, 1.0)
    }

    /// The values the axis labels.
    fn ticks(&self) -> Vec<f64> {
        match *self {
            Scale::Linear { max } => (0..=5).map(|i| max * f64::from(i) / 5.0).collect(),
            Scale::Log { min, max } => {
                let (low, high) = (min.log10().round() as i32, max.log10().round() as i32);
                (low..=high).map(|e| 10f64.powi(e)).collect()
            }
        }
    }

    /// A log axis from the power of ten at or below the smallest value to the one at or above
    /// the largest.
    fn log_over(values: impl Iterator<Item = f64>) -> Scale {
        let (low, high) = values
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if high <= 0.0 {
            return Scale::Log {
                min: 0.1,
                max: 10.0,
            };
        }
        let min = 10f64
            .powf(low.max(LOG_FLOOR_MS).log10().floor())
            .max(LOG_FLOOR_MS);
        let max = 10f64.powf(high.log10().ceil()).max(min * 10.0);
        Scale::Log { min, max }
    }
}

impl Panel {
    fn x(&self, value: f64) -> f64 {
        MARGIN_LEFT + (value / self.x_max).clamp(0.0, 1.0) * PLOT_WIDTH
    }
    fn y(&self, value: f64) -> f64 {
        self.top + PANEL_HEIGHT - self.y.share(value) * PANEL_HEIGHT
    }
    fn bottom(&self) -> f64 {
        self.top + PANEL_HEIGHT
    }
}

/// The smallest "nice" number (1, 2 or 5 times a power of ten) at or above `value`: an axis's
/// upper bound, or (of a fifth of its span) the step between its ticks.
fn nice(value: f64) -> f64 {
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

fn format_number(value: f64) -> String {
    if value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        // Enough digits for 0.001 and 0.01 alike, without trailing zeros.
        let text = format!("{value:.3}");
        text.trim_end_matches('0').to_string()
    }
}

/// An SVG document being drawn: its body, and the legend column's x.
struct Chart {
    svg: String,
    legend_x: f64,
}

impl Chart {
    fn axes(&mut self, panel: &Panel, title: &str, y_label: &str) {
        let left = MARGIN_LEFT;
        let right = MARGIN_LEFT + PLOT_WIDTH;
        let _ = writeln!(
            self.svg,
            r#"<text x="{left}" y="{}" font-size="16" font-weight="bold">{}</text>"#,
            panel.top - 12.0,
            escape(title)
        );
        let _ = writeln!(
            self.svg,
            r##"<rect x="{left}" y="{}" width="{PLOT_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#444"/>"##,
            panel.top
        );
        for value in panel.y.ticks() {
            let y = panel.y(value);
            let _ = writeln!(
                self.svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                left - 6.0,
                y + 4.0,
                format_number(value)
            );
        }
        let middle = panel.top + PANEL_HEIGHT / 2.0;
        let _ = writeln!(
            self.svg,
            r#"<text x="16" y="{middle:.1}" font-size="12" transform="rotate(-90 16 {middle:.1})" text-anchor="middle">{}</text>"#,
            escape(y_label)
        );
    }

    /// Labels the x axis with seconds, from 0 to the run's end.
    fn time_axis(&mut self, panel: &Panel) {
        let step = nice(panel.x_max / 5.0);
        let mut t = 0.0;
        while t <= panel.x_max + 1e-9 {
            self.x_label(panel, panel.x(t), &format!("{}s", format_number(t)));
            t += step;
        }
    }

    fn x_label(&mut self, panel: &Panel, x: f64, label: &str) {
        let _ = writeln!(
            self.svg,
            r#"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{label}</text>"#,
            panel.bottom() + 16.0
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], color: &str, dashed: bool) {
        if points.is_empty() {
            return;
        }
        let mut coords = String::new();
        for (x, y) in points {
            let _ = write!(coords, "{x:.1},{y:.1} ");
        }
        let _ = writeln!(
            self.svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.6"{}/>"#,
            coords.trim_end(),
            dash(dashed)
        );
    }

    fn legend(&mut self, panel: &Panel, row: usize, color: &str, label: &str, dashed: bool) {
        let x = self.legend_x;
        let y = panel.top + 14.0 + 18.0 * row as f64;
        let _ = writeln!(
            self.svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"{}/><text x="{}" y="{}" font-size="11">{}</text>"#,
            x + LEGEND_SAMPLE - 18.0,
            dash(dashed),
            x + LEGEND_SAMPLE - 12.0,
            y + 4.0,
            escape(label)
        );
    }
}

fn dash(dashed: bool) -> &'static str {
    if dashed {
        r#" stroke-dasharray="5,3""#
    } else {
        ""
    }
}

/// A series of a chart: its label, and what it reads from each point.
type Series<P, V> = (&'static str, fn(&P) -> V);

/// The series of the failures chart.
const FAILURES: [Series<FailurePoint, u64>; 3] = [
    ("errors", |p| p.errors),
    ("429 throttled", |p| p.throttled),
    ("other rejections", |p| p.rejected),
];

/// Renders the three charts of a run as an SVG document.
pub fn render_svg(summary: &Summary) -> String {
    let mut labels: Vec<String> = FAILURES.iter().map(|(l, _)| l.to_string()).collect();
    for (name, _) in &summary.timelines {
        labels.push(format!("{name} p50"));
        labels.push(format!("{name} p99"));
    }
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let legend_x = MARGIN_LEFT + PLOT_WIDTH + 16.0;
    let width = (legend_x + LEGEND_SAMPLE + CHAR_WIDTH * longest as f64 + 16.0).ceil();
    let height = MARGIN_TOP + 3.0 * PANEL_HEIGHT + 2.0 * PANEL_GAP + 50.0;
    let mut chart = Chart {
        svg: String::new(),
        legend_x,
    };
    let _ = writeln!(
        chart.svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        chart.svg,
        r#"<rect width="100%" height="100%" fill="white"/>"#
    );

    // The time axis spans the run (and any interval that ended after it).
    let t_end = summary
        .timelines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.t_s))
        .chain(summary.failures.iter().map(|p| p.t_s))
        .fold(summary.duration_s, f64::max)
        .max(1.0);

    // Panel 1: p50 (solid) and p99 (dashed) per second, on a log axis.
    let over_time = Panel {
        top: MARGIN_TOP,
        x_max: t_end,
        y: Scale::log_over(
            summary
                .timelines
                .iter()
                .flat_map(|(_, points)| points.iter().filter(|p| p.count > 0))
                .flat_map(|p| [p.p50_ms, p.p99_ms]),
        ),
    };
    chart.axes(
        &over_time,
        &format!(
            "{}: latency over time (p50 solid, p99 dashed)",
            summary.command
        ),
        "latency (ms, log)",
    );
    chart.time_axis(&over_time);
    let mut row = 0;
    for (index, (name, points)) in summary.timelines.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let active: Vec<_> = points.iter().filter(|p| p.count > 0).collect();
        let quantiles: [Series<IntervalPoint, f64>; 2] =
            [("p50", |p| p.p50_ms), ("p99", |p| p.p99_ms)];
        for (which, value) in quantiles {
            let dashed = which == "p99";
            let line: Vec<_> = active
                .iter()
                .map(|p| (over_time.x(p.t_s), over_time.y(value(p))))
                .collect();
            chart.polyline(&line, color, dashed);
            chart.legend(&over_time, row, color, &format!("{name} {which}"), dashed);
            row += 1;
        }
    }

    // Panel 2: errors and rejections per second.
    let most = summary
        .failures
        .iter()
        .flat_map(|p| FAILURES.iter().map(move |(_, count)| count(p)))
        .max()
        .unwrap_or(0);
    let failures = Panel {
        top: over_time.bottom() + PANEL_GAP,
        x_max: t_end,
        y: Scale::Linear {
            max: nice(most.max(1) as f64),
        },
    };
    chart.axes(&failures, "errors and rejections over time", "per second");
    chart.time_axis(&failures);
    for (index, (label, count)) in FAILURES.iter().enumerate() {
        let color = COLORS[(index + 1) % COLORS.len()];
        let line: Vec<_> = summary
            .failures
            .iter()
            .map(|p| (failures.x(p.t_s), failures.y(count(p) as f64)))
            .collect();
        chart.polyline(&line, color, false);
        let total: u64 = summary.failures.iter().map(count).sum();
        chart.legend(
            &failures,
            index,
            color,
            &format!("{label} ({total})"),
            false,
        );
    }

    // Panel 3: latency by percentile over the whole run, on a log axis.
    let distribution = Panel {
        top: failures.bottom() + PANEL_GAP,
        x_max: quantile_x(0.99999),
        y: Scale::log_over(
            summary
                .distributions
                .iter()
                .flat_map(|(_, points)| points.iter().map(|p| p.0)),
        ),
    };
    chart.axes(
        &distribution,
        "latency by percentile (whole run)",
        "latency (ms, log)",
    );
    for (q, label) in [
        (0.0, "0%"),
        (0.9, "90%"),
        (0.99, "99%"),
        (0.999, "99.9%"),
        (0.9999, "99.99%"),
        (0.99999, "max"),
    ] {
        chart.x_label(&distribution, distribution.x(quantile_x(q)), label);
    }
    for (index, (name, points)) in summary.distributions.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let line: Vec<_> = points
            .iter()
            .map(|&(ms, q)| (distribution.x(quantile_x(q)), distribution.y(ms)))
            .collect();
        chart.polyline(&line, color, false);
        chart.legend(&distribution, index, color, name, false);
    }
    chart.svg.push_str("</svg>\n");
    chart.svg
}

/// Writes the charts to `path`: SVG, or PNG when its name ends in `.png` (rasterized at twice
/// the SVG's size, text in the system's fonts). A note for the user when the PNG has no text
/// because no font was found.
pub fn write(path: &std::path::Path, summary: &Summary) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    let svg = render_svg(summary);
    let png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        return Ok(None);
    }
    let (bytes, fonts) = render_png(&svg)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok((fonts == 0).then(|| {
        format!(
            "no fonts found: {} has no text (install a font, e.g. Debian's fonts-dejavu-core, or use .svg)",
            path.display()
        )
    }))
}

/// The SVG rasterized as PNG bytes, and how many font faces its text could use.
fn render_png(svg: &str) -> anyhow::Result<(Vec<u8>, usize)> {
    use resvg::{tiny_skia, usvg};
    const SCALE: f32 = 2.0;
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    // The chart asks for `sans-serif`, which the font database takes for Arial: use the
    // sans-serif family the system has instead.
    let families: Vec<String> = fonts
        .faces()
        .flat_map(|face| face.families.iter().map(|(name, _)| name.clone()))
        .collect();
    let sans = [
        "DejaVu Sans",
        "Liberation Sans",
        "Noto Sans",
        "Arial",
        "Helvetica",
    ]
    .iter()
    .find(|wanted| families.iter().any(|name| name == *wanted))
    .map(|name| name.to_string())
    .or_else(|| families.first().cloned());
    if let Some(sans) = sans {
        fonts.set_sans_serif_family(sans);
    }
    let fonts = fonts.len();
    let tree = usvg::Tree::from_str(svg, &options)?;
    let size = tree.size().to_int_size().scale_by(SCALE);
    let size = size.ok_or_else(|| anyhow::anyhow!("chart too large to rasterize"))?;
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| anyhow::anyhow!("chart too large to rasterize"))?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(SCALE, SCALE),
        &mut pixmap.as_mut(),
    );
    Ok((pixmap.encode_png()?, fonts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::RunStats;
    use std::time::Duration;

    #[test]
    fn nice_bounds() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(3.2), 5.0);
        assert_eq!(nice(12.0), 20.0);
        assert_eq!(nice(100.0), 100.0);
        assert_eq!(nice(30.0 / 5.0), 10.0);
        assert_eq!(nice(7.0 / 5.0), 2.0);
    }

    /// The y coordinates of the first polyline drawn with `color` and `dashed`.
    fn line_ys(svg: &str, color: &str, dashed: bool) -> Vec<f64> {
        svg.lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(color))
            .find(|l| l.contains("stroke-dasharray") == dashed)
            .and_then(|l| l.split("points=\"").nth(1))
            .and_then(|l| l.split('"').next())
            .map(|points| {
                points
                    .split(' ')
                    .filter_map(|xy| xy.split(',').nth(1)?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn svg_has_three_panels_and_every_series() {
        let stats = RunStats::new(&["e2e <x>"]);
        if let Some(series) = stats.latency("e2e <x>") {
            for ms in 1..50 {
                series.record(Duration::from_millis(ms));
            }
            series.tick(1.0);
            series.record(Duration::from_millis(7));
            series.tick(2.0);
        }
        stats.tick_failures(1.0);
        stats.tick_failures(2.0);
        let summary = Summary::from_stats("bench relay", "b", &stats, Duration::from_secs(2));
        let svg = render_svg(&summary);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // p50 and p99 over time, three failure series, one distribution.
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains("e2e &lt;x&gt; p99"));
        assert!(svg.contains("errors and rejections over time"));
        assert!(svg.contains("latency by percentile"));
    }

    #[test]
    fn a_sub_millisecond_series_is_readable_beside_a_slow_one() {
        let stats = RunStats::new(&["fast", "slow"]);
        let (fast, slow) = (stats.latency("fast"), stats.latency("slow"));
        for t in 1..=30 {
            if let (Some(fast), Some(slow)) = (&fast, &slow) {
                fast.record(Duration::from_micros(50 + t));
                slow.record(Duration::from_millis(800));
                fast.tick(t as f64);
                slow.tick(t as f64);
            }
        }
        let summary = Summary::from_stats("fleet", "b", &stats, Duration::from_secs(30));
        let svg = render_svg(&summary);
        // On a linear axis up to 1 s, 0.05 ms would sit on the bottom line; on the log axis
        // (0.01 ms to 1 s) it is a fifth of the way up.
        let bottom = MARGIN_TOP + PANEL_HEIGHT;
        let fast_ys = line_ys(&svg, COLORS[0], false);
        assert_eq!(fast_ys.len(), 30);
        assert!(
            fast_ys.iter().all(|&y| bottom - y > PANEL_HEIGHT * 0.1),
            "{fast_ys:?}"
        );
        assert!(
            svg.contains(">0.01</text>") && svg.contains(">1000</text>"),
            "{svg}"
        );
        // The time axis ends where the run does: its last label is 30 s, at the right edge.
        let right = MARGIN_LEFT + PLOT_WIDTH;
        assert!(
            svg.contains(&format!(
                r#"<text x="{right:.1}" y="{:.1}" font-size="11" text-anchor="middle">30s</text>"#,
                bottom + 16.0
            )),
            "{svg}"
        );
    }

    #[test]
    fn failures_over_time_are_drawn_per_second() {
        let stats = RunStats::new(&["e2e"]);
        for _ in 0..3 {
            stats.rejected.add("429");
        }
        stats.tick_failures(1.0);
        stats.errors.add("connection");
        stats.rejected.add("400");
        for _ in 0..8 {
            stats.rejected.add("429");
        }
        stats.tick_failures(2.0);
        stats.tick_failures(3.0);
        let points = stats.failures.points();
        let throttled: Vec<u64> = points.iter().map(|p| p.throttled).collect();
        let errors: Vec<u64> = points.iter().map(|p| p.errors).collect();
        let rejected: Vec<u64> = points.iter().map(|p| p.rejected).collect();
        assert_eq!(throttled, [3, 8, 0]);
        assert_eq!(errors, [0, 1, 0]);
        assert_eq!(rejected, [0, 1, 0]);
        let summary = Summary::from_stats("fleet", "b", &stats, Duration::from_secs(3));
        let svg = render_svg(&summary);
        assert!(svg.contains("429 throttled (11)"), "{svg}");
        assert!(svg.contains("errors (1)"));
        // The axis is scaled to the busiest second (8 → 10).
        assert!(svg.contains(">10</text>"));
    }

    #[test]
    fn a_png_is_the_svg_rasterized_at_twice_its_size() {
        let stats = RunStats::new(&["e2e"]);
        if let Some(series) = stats.latency("e2e") {
            series.record(Duration::from_millis(3));
            series.tick(1.0);
        }
        stats.tick_failures(1.0);
        let summary = Summary::from_stats("fleet", "b", &stats, Duration::from_secs(1));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.png");
        write(&path, &summary).expect("png written");
        let png = std::fs::read(&path).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, at bytes 16..24.
        let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
        let height = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
        let svg = render_svg(&summary);
        let attribute = |name: &str| -> f64 {
            svg.split(&format!(" {name}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        assert_eq!(f64::from(width), 2.0 * attribute("width"));
        assert_eq!(f64::from(height), 2.0 * attribute("height"));
        // Not blank: lines and, where the system has a font, text.
        assert!(png.len() > 10_000, "{} bytes", png.len());
        let (with_text, fonts) = render_png(&svg).expect("png");
        let without: String = svg
            .lines()
            .map(|line| match line.find("<text") {
                Some(at) => &line[..at],
                None => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let (without_text, _) = render_png(&without).expect("png");
        if fonts > 0 {
            assert!(
                with_text.len() > without_text.len() + 5_000,
                "text drawn: {} vs {} bytes",
                with_text.len(),
                without_text.len()
            );
        }
    }

    #[test]
    fn the_legend_column_fits_the_longest_label() {
        let name: &'static str = "connect + subscribe + first get answer over TLS";
        let stats = RunStats::new(&[name]);
        if let Some(series) = stats.latency(name) {
            series.record(Duration::from_millis(3));
            series.tick(1.0);
        }
        let summary = Summary::from_stats("fleet", "b", &stats, Duration::from_secs(1));
        let svg = render_svg(&summary);
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|w| w.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap_or(0.0);
        let label = format!("{name} p99");
        let needed =
            MARGIN_LEFT + PLOT_WIDTH + 16.0 + LEGEND_SAMPLE + CHAR_WIDTH * label.len() as f64;
        assert!(width >= needed, "width {width} < {needed}");
    }
}
