//! `report.json` of a chaos run and the summary printed at its end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::inject::{Drain, Outcome};
use super::ChaosArgs;
use crate::faults::Scenario;
use crate::metrics::Report;
use crate::verify::{percentile, FaultRecovery, Problem, RecoveryStats, Stalls, Verification};

/// The report: the verdict's figures first, then what they were measured over.
#[derive(Debug, Serialize)]
pub struct ChaosReport {
    /// `pass` when no request was lost or answered wrongly, `fail` otherwise.
    pub verdict: &'static str,
    pub requests: usize,
    pub answered: usize,
    pub lost: usize,
    pub wrong: usize,
    pub duplicates: usize,
    pub stream_mismatches: usize,
    pub resumed: usize,
    pub tokens_recomputed: u64,
    /// Per fault kind: p50 and max over the faults that interrupted a stream (`count`), of the
    /// `faults` of that kind injected.
    pub recovery_ms: BTreeMap<String, RecoveryStats>,
    pub other_stalls: Stalls,
    pub faults: Vec<FaultRecovery>,
    pub skipped_faults: Vec<String>,
    pub unexpected_exits: Vec<String>,
    /// Workers evicted or drained by a fault: SIGTERM to exit, and their exit status.
    pub drains: Vec<Drain>,
    pub problems: Vec<Problem>,
    pub config: Config,
    /// The whole run, start to report, in seconds (the load's own length is `load.elapsed_s`).
    pub wall_s: f64,
    /// Latency, time to first token, throughput and counts, as `ferry-loadtest run` reports them.
    pub load: Report,
}

/// What the run was asked to do.
#[derive(Debug, Serialize)]
pub struct Config {
    pub scenario: Scenario,
    pub workers: usize,
    pub partitions: u32,
    pub requests: Option<usize>,
    pub duration_s: Option<f64>,
    pub concurrency: Option<usize>,
    pub rate_per_s: Option<f64>,
    pub fault_every_s: f64,
    pub restart_delay_s: f64,
    pub autoscale: bool,
    pub max_tokens: Option<u32>,
    pub weights: String,
    pub seed: u64,
    pub attached: bool,
    /// The broker the run used: `Apache Kafka 4.4.0 (ferry broker --kafka)`, the mock, or the
    /// cluster it attached to.
    pub broker: String,
    /// The workers' `--delivery` (`at-least-once` or `exactly-once`).
    pub delivery: String,
}

impl ChaosReport {
    pub fn new(args: &ChaosArgs, v: &Verification, injected: Outcome, load: Report, wall: Duration) -> Self {
        Self {
            verdict: if v.passed() { "pass" } else { "fail" },
            requests: v.requests,
            answered: v.answered,
            lost: v.lost,
            wrong: v.wrong,
            duplicates: v.duplicates,
            stream_mismatches: v.stream_mismatches,
            resumed: v.resumed,
            tokens_recomputed: v.tokens_recomputed,
            recovery_ms: v.recovery_ms.clone(),
            other_stalls: v.other_stalls,
            faults: v.faults.clone(),
            skipped_faults: injected.skipped,
            unexpected_exits: injected.unexpected_exits,
            drains: injected.drains,
            problems: v.problems.clone(),
            config: Config {
                scenario: args.scenario,
                workers: args.workers,
                partitions: args.partitions,
                requests: args.duration.is_none().then_some(args.requests),
                duration_s: args.duration.map(|d| d.as_secs_f64()),
                concurrency: args.rate.is_none().then_some(args.concurrency),
                rate_per_s: args.rate,
                fault_every_s: args.fault_every.as_secs_f64(),
                restart_delay_s: args.restart_delay.as_secs_f64(),
                autoscale: args.autoscale,
                max_tokens: args.max_tokens,
                weights: args.weights.clone(),
                seed: args.seed,
                attached: args.bootstrap_servers.is_some(),
                broker: match (&args.bootstrap_servers, args.broker) {
                    (Some(b), _) => format!("attached to {b}"),
                    (None, crate::fleet::BrokerKind::Kafka) => format!(
                        "Apache Kafka {} (ferry broker --kafka)",
                        ferry::broker::jars::KAFKA_VERSION
                    ),
                    (None, crate::fleet::BrokerKind::Mock) => format!(
                        "librdkafka {} mock cluster (ferry broker)",
                        rdkafka::util::get_rdkafka_version().1
                    ),
                },
                delivery: args.delivery.clone(),
            },
            wall_s: wall.as_secs_f64(),
            load,
        }
    }
}

/// The verification as a few lines of text, ending with the verdict.
pub fn summary(v: &Verification, drains: &[Drain]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "chaos: {} requests, {} answered, {} lost, {} wrong, {} duplicates; {} resumed from a snapshot, \
         {} tokens recomputed",
        v.requests, v.answered, v.lost, v.wrong, v.duplicates, v.resumed, v.tokens_recomputed
    );
    let _ = writeln!(
        out,
        "{:<14} {:>7} {:>12} {:>10} {:>10}",
        "recovery", "faults", "interrupted", "p50 (s)", "max (s)"
    );
    let secs = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |ms| format!("{:.1}", ms / 1e3));
    for (kind, s) in &v.recovery_ms {
        let _ = writeln!(
            out,
            "{kind:<14} {:>7} {:>12} {:>10} {:>10}",
            s.faults,
            s.count,
            secs(s.p50),
            secs(s.max)
        );
    }
    if v.other_stalls.count > 0 {
        let _ = writeln!(
            out,
            "{} stalls outside any fault (rebalances), longest {} s",
            v.other_stalls.count,
            secs(v.other_stalls.max_ms)
        );
    }
    if !drains.is_empty() {
        let times: Vec<f64> = drains.iter().map(|d| d.exit_ms).collect();
        let unclean = drains.iter().filter(|d| !d.clean).count();
        let _ = writeln!(
            out,
            "{} workers sent SIGTERM exited in {} s (p50), {} s (max); {} exited with an error",
            drains.len(),
            secs(percentile(&times, 50.0)),
            secs(percentile(&times, 100.0)),
            unclean
        );
    }
    if v.stream_mismatches > 0 {
        let _ = writeln!(
            out,
            "warning: {} streams did not rebuild their answer",
            v.stream_mismatches
        );
    }
    for p in &v.problems {
        let _ = writeln!(out, "  {}: {}", p.id, p.what);
    }
    let verdict = if v.passed() {
        "PASS: every request answered, every answer equal to the uninterrupted reference"
    } else {
        "FAIL: requests lost or answered wrongly"
    };
    let _ = write!(out, "{verdict}");
    out
}
