//! The few Prometheus primitives the worker needs, and the text exposition format (version
//! 0.0.4) they are written in. Hand-written rather than a metrics crate: a counter is an atomic,
//! a histogram a row of them, and the format is a few lines per family.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The content type of [`Exposition`] output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(std::sync::atomic::AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Observations counted into fixed buckets (cumulative on output, as Prometheus expects).
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, increasing; `+Inf` is implied.
    bounds: &'static [f64],
    /// One count per bound, plus the `+Inf` bucket; not cumulative.
    counts: Vec<AtomicU64>,
    /// The sum of observations, as f64 bits.
    sum_bits: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must increase");
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation. NaN is ignored (it would poison the sum).
    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum_bits.load(Relaxed))
    }
}

/// The metric kinds of the `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// Only `_sum` and `_count`, no quantiles: a total duration and how many it covers.
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// A text exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help);
        self.sample(name, &[], value as f64);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    /// A histogram family: cumulative `_bucket` lines, then `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, bound) in h.bounds.iter().enumerate() {
            cumulative += h.counts[i].load(Relaxed);
            self.sample(&bucket, &[("le", &format_value(*bound))], cumulative as f64);
        }
        cumulative += h.counts[h.bounds.len()].load(Relaxed);
        self.sample(&bucket, &[("le", "+Inf")], cumulative as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum());
        self.sample(&format!("{name}_count"), &[], cumulative as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

fn format_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        // Rust prints whole floats without a fraction (`1`), which Prometheus reads as well.
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        static BOUNDS: [f64; 3] = [0.1, 1.0, 10.0];
        let h = Histogram::new(&BOUNDS);
        for v in [0.05, 0.1, 0.5, 20.0, f64::NAN] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.histogram("ferry_x_seconds", "X.", &h);
        assert_eq!(
            e.finish(),
            "# HELP ferry_x_seconds X.\n# TYPE ferry_x_seconds histogram\n\
             ferry_x_seconds_bucket{le=\"0.1\"} 2\n\
             ferry_x_seconds_bucket{le=\"1\"} 3\n\
             ferry_x_seconds_bucket{le=\"10\"} 3\n\
             ferry_x_seconds_bucket{le=\"+Inf\"} 4\n\
             ferry_x_seconds_sum 20.65\n\
             ferry_x_seconds_count 4\n"
        );
    }

    #[test]
    fn labels_are_escaped() {
        let mut e = Exposition::new();
        e.sample("m", &[("a", "x\"y\\z\n"), ("b", "1")], 2.5);
        assert_eq!(e.finish(), "m{a=\"x\\\"y\\\\z\\n\",b=\"1\"} 2.5\n");
    }

    #[test]
    fn counters_and_gauges() {
        let (c, g) = (Counter::default(), Gauge::default());
        c.add(3);
        c.inc();
        g.inc();
        g.inc();
        g.dec();
        let mut e = Exposition::new();
        e.counter("ferry_c_total", "C.", c.get());
        e.gauge("ferry_g", "G.", g.get() as f64);
        let text = e.finish();
        assert!(
            text.contains("# TYPE ferry_c_total counter\nferry_c_total 4\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE ferry_g gauge\nferry_g 1\n"), "{text}");
    }
}
