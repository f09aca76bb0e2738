//! Every answer checked against the uninterrupted reference, and what each fault cost.
//!
//! [`verify`] is pure: from the records of a run, the faults injected and the reference answers
//! (computed by `ferry-generate` on the same model, [`reference`]), it counts the requests that
//! got no answer (lost), those answered with anything but the reference (wrong), the extra copies
//! of correct answers (duplicates, which at-least-once delivery allows), the recovery time of
//! every fault ([`recovery`]) and the tokens generated twice because of them
//! ([`tokens_recomputed`]).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use ferry_schemas::{FinishReason, Request};
use serde::{Deserialize, Serialize};

use crate::record::{FaultEvent, FaultKind, RequestRecord};

mod recovery;

pub use recovery::{in_flight, percentile, recovered_since, FaultRecovery, RecoveryStats, Stalls};

/// The uninterrupted answer to a request, as `ferry-generate` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    pub id: String,
    pub text: String,
    pub completion_tokens: u32,
    pub finish_reason: FinishReason,
}

/// One request that was lost or answered wrongly, for the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub id: String,
    pub what: String,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    /// Requests sent.
    pub requests: usize,
    /// Requests with a final reply (response or error).
    pub answered: usize,
    /// Requests with no final reply at all.
    pub lost: usize,
    /// Requests with an error reply, or any response that differs from the reference in text,
    /// finish reason or token count.
    pub wrong: usize,
    /// Final responses beyond the first, summed over requests (each equal to the reference,
    /// or its request counts as wrong).
    pub duplicates: usize,
    /// Answered streaming requests whose chunks, put together as `schemas/README.md` says,
    /// do not rebuild the answer. Reported, not a failure: the final response is authoritative.
    pub stream_mismatches: usize,
    /// Requests whose answer continued from a snapshot.
    pub resumed: usize,
    /// See [`tokens_recomputed`].
    pub tokens_recomputed: u64,
    /// Per fault kind (`sigterm`, `sigkill`, `node_drain`, `freeze`, `broker_outage`,
    /// `scale_in`): recovery times over the faults of that kind that interrupted something.
    pub recovery_ms: BTreeMap<String, RecoveryStats>,
    /// Every fault with what it interrupted and how long that took to move again.
    pub faults: Vec<FaultRecovery>,
    /// Streams that stalled with no fault to blame (rebalances the restarts caused).
    pub other_stalls: Stalls,
    /// The lost and wrong requests, the first few of each.
    pub problems: Vec<Problem>,
}

impl Verification {
    /// Whether the run kept Ferry's promise: every request answered, every answer right.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.wrong == 0
    }
}

/// Problems listed in the report at most (the counts are always complete).
const MAX_PROBLEMS: usize = 20;

/// Checks every record against `reference` and measures the faults.
pub fn verify(
    records: &[RequestRecord],
    faults: &[FaultEvent],
    reference: &HashMap<String, Reference>,
) -> Verification {
    let mut v = Verification {
        requests: records.len(),
        answered: 0,
        lost: 0,
        wrong: 0,
        duplicates: 0,
        stream_mismatches: 0,
        resumed: 0,
        tokens_recomputed: 0,
        recovery_ms: BTreeMap::new(),
        faults: Vec::new(),
        other_stalls: Stalls::default(),
        problems: Vec::new(),
    };
    for r in records {
        let id = &r.request.id;
        let problem = |what: String| Problem { id: id.clone(), what };
        if r.answered_ms().is_none() {
            v.lost += 1;
            v.problems.push(problem("no final reply".into()));
            continue;
        }
        v.answered += 1;
        v.duplicates += r.responses.len().saturating_sub(1);
        if let Some(first) = r.responses.first() {
            v.resumed += usize::from(first.response.resumed_from_token.is_some());
        }
        v.tokens_recomputed += tokens_recomputed(r);
        let Some(expected) = reference.get(id) else {
            v.wrong += 1;
            v.problems.push(problem("no reference answer".into()));
            continue;
        };
        if let Some(e) = r.errors.first() {
            v.wrong += 1;
            v.problems.push(problem(format!(
                "error reply {:?}: {}",
                e.error.error.code, e.error.error.message
            )));
            continue;
        }
        if let Some(bad) = r.responses.iter().map(|s| &s.response).find(|resp| {
            resp.text != expected.text
                || resp.finish_reason != expected.finish_reason
                || resp.usage.completion_tokens != expected.completion_tokens
        }) {
            v.wrong += 1;
            v.problems.push(problem(format!(
                "answer from {} (attempt {}, resumed from {:?}) differs from the reference: {} tokens {:?}, \
                 expected {} tokens {:?}",
                bad.worker,
                bad.attempt,
                bad.resumed_from_token,
                bad.usage.completion_tokens,
                bad.finish_reason,
                expected.completion_tokens,
                expected.finish_reason,
            )));
            continue;
        }
        if r.request.stream && streamed_text(r) != expected.text {
            v.stream_mismatches += 1;
        }
    }
    v.problems.truncate(MAX_PROBLEMS);
    let (faults, other) = recovery::measure(records, faults);
    v.recovery_ms = recovery::stats_by_kind(&faults);
    v.faults = faults;
    v.other_stalls = other;
    v
}

/// The text a streaming client rebuilds from the chunks that came before the first final
/// reply: a chunk is appended only when its `seq` is above every one seen before.
pub fn streamed_text(r: &RequestRecord) -> String {
    let end = r.answered_ms().unwrap_or(f64::INFINITY);
    let mut highest: Option<u32> = None;
    let mut text = String::new();
    for c in r.chunks.iter().filter(|c| c.at_ms <= end) {
        if highest.is_none_or(|h| c.seq > h) {
            highest = Some(c.seq);
            text.push_str(&c.text);
        }
    }
    text
}

/// Tokens generated twice because a generation was interrupted and resumed, as far as the
/// stream shows it.
///
/// A resumed generation resends the chunks of the steps between its snapshot and the point the
/// interrupted worker had reached, with the same `seq`s. Walking the chunks that came before
/// the first final reply, each run of resends (chunks whose `seq` is not above the highest seen
/// so far) is one resumption: the interrupted worker had reached step `H` (the highest `seq`
/// seen), and the resuming one started over from step `R`, so steps `R..=H` were computed twice,
/// `H + 1 - R` tokens (never below 0). `R` is the answer's `resumed_from_token` for the last
/// resumption (exact) and the first resent `seq` for any earlier one (the snapshot is at or
/// before it, so that count is a lower bound).
///
/// It is a lower bound overall: steps that released no text, and steps the interrupted worker
/// computed but whose chunks never reached the broker before it died, are invisible. A graceful
/// drain snapshots at the current token, so an eviction normally costs 0; a crash costs up to
/// the snapshot interval. Work done again for a duplicate answer (after the first) is not
/// counted here; duplicates are counted on their own.
pub fn tokens_recomputed(r: &RequestRecord) -> u64 {
    let end = r.answered_ms().unwrap_or(f64::INFINITY);
    // (highest seq before the resends, first resent seq) per resumption.
    let mut resumptions: Vec<(u32, u32)> = Vec::new();
    let mut highest: Option<u32> = None;
    let mut resending = false;
    for c in r.chunks.iter().filter(|c| c.at_ms <= end) {
        match highest {
            Some(h) if c.seq <= h => {
                if !resending {
                    resumptions.push((h, c.seq));
                    resending = true;
                }
            }
            _ => {
                highest = Some(c.seq);
                resending = false;
            }
        }
    }
    let resumed_from = r.responses.first().and_then(|s| s.response.resumed_from_token);
    let last = resumptions.len().saturating_sub(1);
    resumptions
        .iter()
        .enumerate()
        .map(|(i, &(h, first_resent))| {
            let from = match resumed_from {
                Some(from) if i == last && from <= first_resent => from,
                _ => first_resent,
            };
            u64::from((h + 1).saturating_sub(from))
        })
        .sum()
}

/// The key of a fault kind in [`Verification::recovery_ms`]; `None` for fleet starts.
pub fn kind_key(kind: FaultKind) -> Option<&'static str> {
    Some(match kind {
        FaultKind::Evict => "sigterm",
        FaultKind::Crash => "sigkill",
        FaultKind::NodeDrain => "node_drain",
        FaultKind::Freeze => "freeze",
        FaultKind::BrokerOutage => "broker_outage",
        FaultKind::BrokerCrash => "broker_crash",
        FaultKind::ScaleIn => "scale_in",
        FaultKind::Start => return None,
    })
}

/// Runs `ferry-generate` on `requests` and returns the answers by id: the uninterrupted
/// reference. The requests are shared round robin among `processes` processes of one compute
/// thread each (they are independent, and the fleet is stopped by then, so the cores are free).
pub async fn reference(
    generate: &Path,
    model: &Path,
    weights: &str,
    requests: &[Request],
    processes: usize,
) -> anyhow::Result<HashMap<String, Reference>> {
    let processes = processes.clamp(1, requests.len().max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..processes {
        let mut input = String::new();
        for r in requests.iter().skip(k).step_by(processes) {
            input.push_str(&serde_json::to_string(r)?);
            input.push('\n');
        }
        let mut cmd = std::process::Command::new(generate);
        cmd.arg("--model")
            .arg(model)
            .arg("--weights")
            .arg(weights)
            .arg("--threads")
            .arg("1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tasks.spawn_blocking(move || generate_one(cmd, input));
    }
    let mut answers = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let stdout = done??;
        for line in String::from_utf8(stdout)?.lines().filter(|l| !l.trim().is_empty()) {
            let r: Reference = serde_json::from_str(line).with_context(|| format!("ferry-generate wrote {line:?}"))?;
            answers.insert(r.id.clone(), r);
        }
    }
    anyhow::ensure!(
        answers.len() == requests.len(),
        "ferry-generate answered {} of {} requests",
        answers.len(),
        requests.len()
    );
    Ok(answers)
}

/// Runs one `ferry-generate` on `input` (JSON lines) and returns its stdout. Blocking.
fn generate_one(mut cmd: std::process::Command, input: String) -> anyhow::Result<Vec<u8>> {
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let mut stdin = child.stdin.take().context("ferry-generate's stdin")?;
    // Written from a thread of its own: the child's stdout must be read while it reads stdin.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the stdin writer panicked"))?;
    anyhow::ensure!(
        out.status.success(),
        "ferry-generate failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    written.context("cannot write requests to ferry-generate")?;
    Ok(out.stdout)
}

#[cfg(test)]
pub(crate) mod tests;
