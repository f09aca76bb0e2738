//! The chart of a run: a self-contained SVG of latency and throughput over time, with every
//! injected fault marked, so a reader sees at a glance what each fault did to the fleet.
//!
//! Two panels share the time axis (seconds since the start of the run):
//!
//! ```text
//!  latency  |   .  .   :|:  .          one dot per answered request, at the time its first
//!           | .  . .  . |:.  . .       final reply came, at the height of its total latency
//!           +-----------|-----------   (error replies as red crosses)
//!  answers/s|  ___    __|  ___         answers per second (left axis) and tokens per second
//!  tokens/s | /   \__/  |\/            (right axis), per one-second bucket
//!           +-----------|-----------
//!                     crash            a fault: a vertical line labelled by its kind; a freeze
//!                                      or broker outage also shades its span until it ended
//! ```
//!
//! Hand-written SVG, no dependency. There is no PNG: rasterising would need a renderer
//! (resvg and its font stack), which costs more than the chart is worth; any browser shows the
//! SVG, and `rsvg-convert chart.svg -o chart.png` converts it where a PNG is needed.

use std::fmt::Write as _;
use std::time::Duration;

use crate::metrics::{answered_with_error, latency_ms, per_second};
use crate::record::{FaultEvent, FaultKind, RequestRecord};

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 640.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 920.0;
/// Top and bottom of the latency panel, then of the throughput panel.
const LATENCY: (f64, f64) = (70.0, 320.0);
const THROUGHPUT: (f64, f64) = (370.0, 580.0);

const RESPONSE_COLOUR: &str = "#1f77b4";
const ERROR_COLOUR: &str = "#d62728";
const TOKENS_COLOUR: &str = "#2ca02c";

/// Renders the chart of a run of length `elapsed` as an SVG document.
pub fn render_svg(records: &[RequestRecord], faults: &[FaultEvent], elapsed: Duration) -> String {
    let series = per_second(records, elapsed);
    let fault_end_s = faults
        .iter()
        .map(|f| f.until_ms.unwrap_or(f.at_ms) / 1000.0)
        .fold(0.0_f64, f64::max);
    let end_s = (series.len() as f64)
        .max(elapsed.as_secs_f64())
        .max(fault_end_s)
        .max(1.0);
    let x = Scale::new((0.0, end_s), (LEFT, RIGHT));

    let points: Vec<(f64, f64, bool)> = records
        .iter()
        .filter_map(|r| Some((r.answered_ms()? / 1000.0, latency_ms(r)?, answered_with_error(r))))
        .collect();
    let max_latency_ms = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    // Seconds read better than thousands of milliseconds.
    let (unit, per_unit) = if max_latency_ms >= 2000.0 {
        ("s", 1000.0)
    } else {
        ("ms", 1.0)
    };
    let y_latency = Scale::new((0.0, nice_ceiling(max_latency_ms / per_unit)), (LATENCY.1, LATENCY.0));
    let max_answers = series.iter().map(|s| s.answers as f64).fold(0.0_f64, f64::max);
    let max_tokens = series.iter().map(|s| s.tokens as f64).fold(0.0_f64, f64::max);
    let y_answers = Scale::new((0.0, nice_ceiling(max_answers)), (THROUGHPUT.1, THROUGHPUT.0));
    let y_tokens = Scale::new((0.0, nice_ceiling(max_tokens)), (THROUGHPUT.1, THROUGHPUT.0));

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let answered = points.len();
    let errors = points.iter().filter(|p| p.2).count();
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="28" font-size="16" font-weight="bold">Latency and throughput: {} sent, {answered} answered ({errors} errors), {} faults</text>"#,
        records.len(),
        faults.len()
    );

    draw_fault_spans(&mut svg, faults, &x, end_s);
    // Latency panel.
    draw_frame(
        &mut svg,
        &x,
        &y_latency,
        LATENCY,
        &format!("total latency ({unit})"),
        None,
    );
    for &(t, latency, error) in &points {
        let (px, py) = (x.map(t), y_latency.map(latency / per_unit));
        if error {
            let _ = writeln!(
                svg,
                r#"<path d="M{:.1} {:.1} l6 6 M{:.1} {:.1} l-6 6" stroke="{ERROR_COLOUR}" stroke-width="1.5"/>"#,
                px - 3.0,
                py - 3.0,
                px + 3.0,
                py - 3.0
            );
        } else {
            let _ = writeln!(
                svg,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="2.5" fill="{RESPONSE_COLOUR}" fill-opacity="0.7"/>"#
            );
        }
    }
    legend(
        &mut svg,
        LATENCY.0,
        &[
            ("response", RESPONSE_COLOUR, "dot"),
            ("error reply", ERROR_COLOUR, "cross"),
        ],
    );

    // Throughput panel: one point per second, at the middle of its bucket.
    draw_frame(
        &mut svg,
        &x,
        &y_answers,
        THROUGHPUT,
        "answers/s",
        Some((&y_tokens, "tokens/s")),
    );
    let polyline = |values: &mut dyn Iterator<Item = f64>, y: &Scale| -> String {
        values
            .enumerate()
            .map(|(s, v)| format!("{:.1},{:.1}", x.map(s as f64 + 0.5), y.map(v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let tokens = polyline(&mut series.iter().map(|s| s.tokens as f64), &y_tokens);
    let answers = polyline(&mut series.iter().map(|s| s.answers as f64), &y_answers);
    let _ = writeln!(
        svg,
        r#"<polyline points="{tokens}" fill="none" stroke="{TOKENS_COLOUR}" stroke-width="1.5"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<polyline points="{answers}" fill="none" stroke="{RESPONSE_COLOUR}" stroke-width="2"/>"#
    );
    legend(
        &mut svg,
        THROUGHPUT.0,
        &[
            ("answers/s", RESPONSE_COLOUR, "line"),
            ("tokens/s (right axis)", TOKENS_COLOUR, "line"),
        ],
    );

    draw_fault_markers(&mut svg, faults, &x);
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since start (s)</text>"#,
        (LEFT + RIGHT) / 2.0,
        THROUGHPUT.1 + 40.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// A linear map from a domain to a range of pixels.
struct Scale {
    domain: (f64, f64),
    range: (f64, f64),
}

impl Scale {
    fn new(domain: (f64, f64), range: (f64, f64)) -> Scale {
        // An empty domain (nothing measured) still gets an axis from 0 to 1.
        let domain = if domain.1 > domain.0 {
            domain
        } else {
            (domain.0, domain.0 + 1.0)
        };
        Scale { domain, range }
    }

    fn map(&self, v: f64) -> f64 {
        let (d0, d1) = self.domain;
        let (r0, r1) = self.range;
        r0 + (v.clamp(d0, d1) - d0) / (d1 - d0) * (r1 - r0)
    }

    /// Tick values: multiples of 1, 2 or 5 times a power of ten, about six of them.
    fn ticks(&self) -> Vec<f64> {
        let step = nice_step(self.domain.1 - self.domain.0, 6.0);
        let first = (self.domain.0 / step).ceil() as i64;
        let last = (self.domain.1 / step + 1e-9).floor() as i64;
        (first..=last).map(|k| k as f64 * step).collect()
    }
}

/// The step of about `count` ticks over `span`: 1, 2 or 5 times a power of ten.
fn nice_step(span: f64, count: f64) -> f64 {
    let raw = (span / count).max(f64::MIN_POSITIVE);
    let power = 10_f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * power);
    step.max(f64::EPSILON)
}

/// The smallest tick value at or above `v`, so the top of an axis is a round number.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let step = nice_step(v, 5.0);
    (v / step).ceil() * step
}

fn label(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Axes, grid, ticks and labels of one panel; `right` is a second y axis on the right.
fn draw_frame(
    svg: &mut String,
    x: &Scale,
    y: &Scale,
    (top, bottom): (f64, f64),
    y_label: &str,
    right: Option<(&Scale, &str)>,
) {
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        RIGHT - LEFT,
        bottom - top
    );
    for t in x.ticks() {
        let px = x.map(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{bottom}" stroke="#eee"/><line x1="{px:.1}" y1="{bottom}" x2="{px:.1}" y2="{:.1}" stroke="#333"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            bottom + 5.0,
            bottom + 18.0,
            label(t)
        );
    }
    for t in y.ticks() {
        let py = y.map(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{RIGHT}" y2="{py:.1}" stroke="#eee"/><line x1="{:.1}" y1="{py:.1}" x2="{LEFT}" y2="{py:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 5.0,
            LEFT - 8.0,
            py + 4.0,
            label(t)
        );
    }
    let mid = (top + bottom) / 2.0;
    let _ = writeln!(
        svg,
        r#"<text x="20" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 20 {mid:.1})">{y_label}</text>"#
    );
    if let Some((y2, label2)) = right {
        for t in y2.ticks() {
            let py = y2.map(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{RIGHT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}" fill="{TOKENS_COLOUR}">{}</text>"##,
                RIGHT + 5.0,
                RIGHT + 8.0,
                py + 4.0,
                label(t)
            );
        }
        let xr = WIDTH - 15.0;
        let _ = writeln!(
            svg,
            r#"<text x="{xr}" y="{mid:.1}" text-anchor="middle" fill="{TOKENS_COLOUR}" transform="rotate(90 {xr} {mid:.1})">{label2}</text>"#
        );
    }
}

/// A legend in the top right corner of a panel; `shape` is `dot`, `cross` or `line`.
fn legend(svg: &mut String, top: f64, entries: &[(&str, &str, &str)]) {
    let x0 = RIGHT - 170.0;
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{:.1}" width="160" height="{:.1}" fill="white" fill-opacity="0.85" stroke="#999"/>"##,
        top + 8.0,
        entries.len() as f64 * 18.0 + 8.0
    );
    for (i, (name, colour, shape)) in entries.iter().enumerate() {
        let y = top + 24.0 + i as f64 * 18.0;
        let mark = match *shape {
            "dot" => format!(
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x0 + 15.0,
                y - 4.0
            ),
            "cross" => format!(
                r#"<path d="M{:.1} {:.1} l6 6 M{:.1} {:.1} l-6 6" stroke="{colour}" stroke-width="1.5"/>"#,
                x0 + 12.0,
                y - 7.0,
                x0 + 18.0,
                y - 7.0
            ),
            _ => format!(
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2"/>"#,
                x0 + 6.0,
                y - 4.0,
                x0 + 24.0,
                y - 4.0
            ),
        };
        let _ = writeln!(
            svg,
            r#"{mark}<text x="{:.1}" y="{y:.1}">{}</text>"#,
            x0 + 32.0,
            escape(name)
        );
    }
}

fn fault_colour(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Evict => "#ff7f0e",
        FaultKind::Crash => "#d62728",
        FaultKind::Freeze => "#9467bd",
        FaultKind::NodeDrain => "#8c564b",
        FaultKind::BrokerOutage => "#e377c2",
        FaultKind::BrokerCrash => "#17becf",
        FaultKind::Start => "#17becf",
        FaultKind::ScaleIn => "#7f7f7f",
    }
}

fn fault_name(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Evict => "evict",
        FaultKind::Crash => "crash",
        FaultKind::Freeze => "freeze",
        FaultKind::NodeDrain => "node drain",
        FaultKind::BrokerOutage => "broker outage",
        FaultKind::BrokerCrash => "broker crash",
        FaultKind::Start => "start",
        FaultKind::ScaleIn => "scale in",
    }
}

/// The shaded spans of faults with a duration (a freeze, a broker outage), behind everything.
/// One still going at the end of the run is shaded to the end.
fn draw_fault_spans(svg: &mut String, faults: &[FaultEvent], x: &Scale, end_s: f64) {
    for f in faults {
        if !matches!(
            f.kind,
            FaultKind::Freeze | FaultKind::BrokerOutage | FaultKind::BrokerCrash
        ) {
            continue;
        }
        let from = x.map(f.at_ms / 1000.0);
        let to = x.map(f.until_ms.map_or(end_s, |u| u / 1000.0));
        let _ = writeln!(
            svg,
            r#"<rect class="fault-span" x="{from:.1}" y="{}" width="{:.1}" height="{}" fill="{}" fill-opacity="0.15"/>"#,
            LATENCY.0,
            (to - from).max(1.0),
            THROUGHPUT.1 - LATENCY.0,
            fault_colour(f.kind)
        );
    }
}

/// A vertical line across both panels per fault, labelled by its kind and workers.
fn draw_fault_markers(svg: &mut String, faults: &[FaultEvent], x: &Scale) {
    for f in faults {
        let px = x.map(f.at_ms / 1000.0);
        let colour = fault_colour(f.kind);
        let mut text = fault_name(f.kind).to_string();
        if !f.workers.is_empty() {
            text = format!("{text} {}", f.workers.join(","));
        }
        let _ = writeln!(
            svg,
            r#"<line class="fault" x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="5 3"/><text class="fault-label" x="{:.1}" y="{}" fill="{colour}" transform="rotate(-90 {:.1} {})" text-anchor="end">{}</text>"#,
            LATENCY.0,
            THROUGHPUT.1,
            px + 12.0,
            LATENCY.0 + 4.0,
            px + 12.0,
            LATENCY.0 + 4.0,
            escape(&text)
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests;
