//! Recovery time per fault, from the streams alone.
//!
//! With streaming on, a request that is generating sends a chunk every step or so. A fault
//! that interrupts it shows as a stall: a gap between two of its progress events (chunks, then
//! the first final reply) far longer than its usual pace. A stall is blamed on the earliest
//! fault that fell inside it (the one that started it; later faults only found it already
//! stalled), and the fault's recovery time is the longest, over the requests it interrupted, from
//! the fault to their next progress event, which is normally the first chunk from the worker
//! that resumed them. A fault that interrupted nothing has no recovery time (not zero), and
//! stalls inside no fault are counted apart: they come from the rebalances a fleet change
//! causes (a replacement joining takes partitions from the survivors).
//!
//! A request counts as interrupted only once it has streamed something, so requests that were
//! merely queued behind a fault, and non-streaming requests, are not measured.

use std::collections::BTreeMap;

use serde::Serialize;

use super::kind_key;
use crate::record::{FaultEvent, FaultKind, RequestRecord};

/// A gap between progress events shorter than this is never a stall, whatever the pace.
pub const STALL_MIN_MS: f64 = 1_500.0;
/// A gap longer than this many times the request's median gap is a stall.
pub const STALL_FACTOR: f64 = 4.0;

/// A stall that began this soon after a fault is still the fault's: a worker sent SIGTERM
/// finishes its current step, and chunks already on their way arrive, before its streams stop.
pub const FAULT_LEAD_MS: f64 = 1_000.0;

/// One fault and what it did to the requests in flight.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultRecovery {
    pub kind: FaultKind,
    pub at_ms: f64,
    pub until_ms: Option<f64>,
    pub workers: Vec<String>,
    /// Requests whose stream stalled across the fault and moved again.
    pub interrupted: usize,
    /// Requests whose stream stopped after the fault and never moved again (lost, or counted
    /// as such).
    pub unrecovered: usize,
    /// From the fault to the last of its interrupted requests moving again; `None` when it
    /// interrupted nothing.
    pub recovery_ms: Option<f64>,
}

/// Recovery times over the faults of one kind that interrupted something.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RecoveryStats {
    /// Faults of this kind injected.
    pub faults: usize,
    /// Of those, the ones that interrupted a stream: the sample the figures below are over.
    pub count: usize,
    pub p50: Option<f64>,
    pub max: Option<f64>,
}

/// Stalls no fault explains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stalls {
    pub count: usize,
    pub max_ms: Option<f64>,
}

/// Times a request made progress, from its first chunk to its first final reply, in order.
fn progress(r: &RequestRecord) -> Vec<f64> {
    let end = r.answered_ms();
    let mut times: Vec<f64> = r
        .chunks
        .iter()
        .map(|c| c.at_ms)
        .filter(|t| end.is_none_or(|e| *t <= e))
        .collect();
    if times.is_empty() {
        return times;
    }
    times.extend(end);
    times.sort_by(f64::total_cmp);
    times
}

/// The gap above which `times` counts as stalled: [`STALL_FACTOR`] times the median gap between
/// its distinct arrival times (chunks come in batches: a consumer's fetch returns several at
/// once, so equal times are one arrival), and never below [`STALL_MIN_MS`].
fn stall_threshold(times: &[f64]) -> f64 {
    let mut distinct = times.to_vec();
    distinct.dedup();
    let mut gaps: Vec<f64> = distinct.windows(2).map(|w| w[1] - w[0]).collect();
    if gaps.is_empty() {
        return STALL_MIN_MS;
    }
    gaps.sort_by(f64::total_cmp);
    (gaps[gaps.len() / 2] * STALL_FACTOR).max(STALL_MIN_MS)
}

/// Every fault (fleet starts left out) with its recovery, and the stalls no fault explains.
pub fn measure(records: &[RequestRecord], faults: &[FaultEvent]) -> (Vec<FaultRecovery>, Stalls) {
    let mut out: Vec<FaultRecovery> = faults
        .iter()
        .filter(|f| kind_key(f.kind).is_some())
        .map(|f| FaultRecovery {
            kind: f.kind,
            at_ms: f.at_ms,
            until_ms: f.until_ms,
            workers: f.workers.clone(),
            interrupted: 0,
            unrecovered: 0,
            recovery_ms: None,
        })
        .collect();
    out.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    let mut other = Stalls::default();
    for r in records {
        let times = progress(r);
        let threshold = stall_threshold(&times);
        for w in times.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b - a <= threshold {
                continue;
            }
            match out.iter_mut().find(|f| a - FAULT_LEAD_MS <= f.at_ms && f.at_ms < b) {
                Some(f) => {
                    f.interrupted += 1;
                    let took = b - f.at_ms;
                    f.recovery_ms = Some(f.recovery_ms.map_or(took, |m| m.max(took)));
                }
                None => {
                    other.count += 1;
                    other.max_ms = Some(other.max_ms.map_or(b - a, |m| m.max(b - a)));
                }
            }
        }
        if let (None, Some(&last)) = (r.answered_ms(), times.last()) {
            if let Some(f) = out.iter_mut().find(|f| f.at_ms >= last) {
                f.unrecovered += 1;
            }
        }
    }
    (out, other)
}

/// The nearest-rank percentile `p` (0 to 100) of `values`, `None` when there are none.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len().max(1)) - 1).copied()
}

/// [`RecoveryStats`] per fault kind, keyed as [`kind_key`] names them.
pub fn stats_by_kind(faults: &[FaultRecovery]) -> BTreeMap<String, RecoveryStats> {
    let mut by: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    for f in faults {
        let Some(key) = kind_key(f.kind) else { continue };
        let e = by.entry(key.to_string()).or_default();
        e.0 += 1;
        e.1.extend(f.recovery_ms);
    }
    // The report always names SIGTERM and SIGKILL, so a run without one shows it as absent.
    for key in ["sigterm", "sigkill"] {
        by.entry(key.to_string()).or_default();
    }
    by.into_iter()
        .map(|(k, (faults, v))| {
            let stats = RecoveryStats {
                faults,
                count: v.len(),
                p50: percentile(&v, 50.0),
                max: v.iter().copied().reduce(f64::max),
            };
            (k, stats)
        })
        .collect()
}

/// Requests streaming right now: some chunk, no final reply yet.
pub fn in_flight(records: &[RequestRecord]) -> usize {
    records
        .iter()
        .filter(|r| !r.chunks.is_empty() && r.answered_ms().is_none())
        .count()
}

/// Whether every request that was streaming at `at_ms` has made progress since: the live
/// test of the drill's "wait until recovered".
pub fn recovered_since(records: &[RequestRecord], at_ms: f64) -> bool {
    records.iter().all(|r| {
        let streaming = r.chunks.iter().any(|c| c.at_ms <= at_ms) && r.answered_ms().is_none_or(|e| e > at_ms);
        !streaming || r.answered_ms().is_some() || r.chunks.iter().any(|c| c.at_ms > at_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{chunk, record, respond};
    use super::*;

    fn fault(kind: FaultKind, at_ms: f64) -> FaultEvent {
        FaultEvent {
            kind,
            at_ms,
            workers: vec!["worker-0".into()],
            until_ms: None,
        }
    }

    /// A request streaming a chunk every 100 ms over `[from, to)`, then over `[resume, end)`.
    fn stream(id: &str, from: f64, to: f64, resume: f64, end: f64) -> RequestRecord {
        let mut r = record(id);
        let mut seq = 0;
        for (a, b) in [(from, to), (resume, end)] {
            let mut t = a;
            while t < b {
                chunk(&mut r, seq, "t", t);
                seq += 1;
                t += 100.0;
            }
        }
        respond(&mut r, "", seq, None, end);
        r
    }

    #[test]
    fn a_fault_recovers_when_the_last_request_it_stalled_moves_again() {
        let records = [
            stream("a", 0.0, 1_000.0, 6_000.0, 7_000.0),
            stream("b", 0.0, 1_050.0, 9_000.0, 9_500.0),
            // On another worker: no stall.
            stream("c", 0.0, 5_000.0, 5_000.0, 8_000.0),
        ];
        let (faults, other) = measure(&records, &[fault(FaultKind::Crash, 1_100.0)]);
        assert_eq!(faults[0].interrupted, 2);
        assert_eq!(faults[0].recovery_ms, Some(9_000.0 - 1_100.0));
        assert_eq!(other, Stalls::default());
        let stats = stats_by_kind(&faults);
        assert_eq!(stats["sigkill"].count, 1);
        assert_eq!(stats["sigkill"].max, Some(7_900.0));
        assert_eq!(
            stats["sigterm"],
            RecoveryStats {
                faults: 0,
                count: 0,
                p50: None,
                max: None
            }
        );
    }

    #[test]
    fn a_stall_is_blamed_on_the_first_fault_inside_it() {
        let records = [stream("a", 0.0, 1_000.0, 9_000.0, 9_500.0)];
        let events = [
            fault(FaultKind::Crash, 1_100.0),
            fault(FaultKind::Evict, 4_000.0),
            fault(FaultKind::Start, 1_200.0),
        ];
        let (faults, _) = measure(&records, &events);
        assert_eq!(faults.len(), 2, "fleet starts are not faults");
        // A drained worker's last chunk comes a moment after the signal.
        let (late, _) = measure(&records, &[fault(FaultKind::Evict, 700.0)]);
        assert_eq!((late[0].interrupted, late[0].recovery_ms), (1, Some(9_000.0 - 700.0)));
        assert_eq!((faults[0].kind, faults[0].interrupted), (FaultKind::Crash, 1));
        assert_eq!(
            (faults[1].kind, faults[1].interrupted, faults[1].recovery_ms),
            (FaultKind::Evict, 0, None)
        );
        let stats = stats_by_kind(&faults);
        assert_eq!(stats["sigterm"].faults, 1);
        assert_eq!(
            stats["sigterm"].count, 0,
            "it interrupted nothing: no figure rather than zero"
        );
    }

    #[test]
    fn stalls_without_a_fault_and_streams_that_never_resume_are_counted_apart() {
        let mut lost = record("lost");
        chunk(&mut lost, 0, "t", 100.0);
        chunk(&mut lost, 1, "t", 200.0);
        let records = [stream("a", 0.0, 1_000.0, 4_000.0, 4_500.0), lost];
        let (faults, other) = measure(&records, &[fault(FaultKind::Evict, 5_000.0)]);
        assert_eq!(other.count, 1);
        assert_eq!(other.max_ms, Some(4_000.0 - 900.0));
        assert_eq!(faults[0].unrecovered, 1);
        assert_eq!(faults[0].interrupted, 0);
    }

    #[test]
    fn a_slow_stream_is_not_a_stall_at_its_own_pace() {
        // A chunk every 400 ms: a 1.2 s gap is under 4 times that.
        let mut r = record("slow");
        for i in 0..10 {
            chunk(&mut r, i, "t", f64::from(i) * 400.0);
        }
        chunk(&mut r, 10, "t", 3_600.0 + 1_200.0);
        respond(&mut r, "", 11, None, 5_000.0);
        let (faults, other) = measure(&[r], &[fault(FaultKind::Freeze, 4_000.0)]);
        assert_eq!((faults[0].interrupted, other.count), (0, 0));
    }

    #[test]
    fn batched_arrivals_set_the_pace_by_batch() {
        // Ten chunks per batch, a batch every 500 ms: a 1.2 s gap (one fetch missed) is no stall.
        let mut r = record("batched");
        let mut seq = 0;
        for batch in [0.0, 500.0, 1_000.0, 1_500.0, 2_700.0, 3_200.0] {
            for _ in 0..10 {
                chunk(&mut r, seq, "t", batch);
                seq += 1;
            }
        }
        respond(&mut r, "", seq, None, 3_200.0);
        let (faults, other) = measure(&[r], &[fault(FaultKind::Evict, 1_600.0)]);
        assert_eq!((faults[0].interrupted, other.count), (0, 0));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 50.0), Some(3.0));
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0, 5.0], 50.0), Some(3.0));
        assert_eq!(percentile(&[4.0, 1.0, 3.0], 100.0), Some(4.0));
    }

    #[test]
    fn in_flight_and_recovered_follow_the_streams() {
        let mut a = record("a");
        chunk(&mut a, 0, "t", 100.0);
        let mut b = record("b");
        chunk(&mut b, 0, "t", 100.0);
        respond(&mut b, "", 1, None, 200.0);
        let queued = record("q");
        let records = vec![a.clone(), b, queued];
        assert_eq!(in_flight(&records), 1);
        assert!(!recovered_since(&records, 150.0), "a has not moved since");
        chunk(&mut a, 1, "t", 300.0);
        let records = [a, record("q")];
        assert!(recovered_since(&records, 150.0));
        assert!(recovered_since(&records, 50.0), "nothing was streaming then");
    }
}
