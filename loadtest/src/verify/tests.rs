use super::*;
use crate::record::{ChunkSeen, ErrorSeen, ResponseSeen};
use ferry_schemas::{ErrorCode, ErrorDetail, ErrorReply, Response, Timings, Usage};

pub fn record(id: &str) -> RequestRecord {
    let request: Request =
        serde_json::from_value(serde_json::json!({"id": id, "prompt": "hi", "stream": true})).expect("valid");
    RequestRecord::new(request, 0, 0.0)
}

pub fn chunk(r: &mut RequestRecord, seq: u32, text: &str, at_ms: f64) {
    r.chunks.push(ChunkSeen {
        seq,
        text: text.into(),
        at_ms,
    });
}

pub fn respond(r: &mut RequestRecord, text: &str, tokens: u32, resumed: Option<u32>, at_ms: f64) {
    let response = Response {
        version: 1,
        id: r.request.id.clone(),
        model: "m".into(),
        text: text.into(),
        finish_reason: FinishReason::Length,
        stop_sequence: None,
        usage: Usage {
            prompt_tokens: 1,
            completion_tokens: tokens,
            total_tokens: tokens + 1,
        },
        timings: Timings {
            queued_ms: 0.0,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            total_ms: 0.0,
        },
        worker: "w".into(),
        attempt: 1 + u32::from(resumed.is_some()),
        resumed_from_token: resumed,
        metadata: None,
    };
    r.responses.push(ResponseSeen { response, at_ms });
}

fn reference_of(id: &str, text: &str, tokens: u32) -> (String, Reference) {
    let r = Reference {
        id: id.into(),
        text: text.into(),
        completion_tokens: tokens,
        finish_reason: FinishReason::Length,
    };
    (id.into(), r)
}

#[test]
fn lost_wrong_and_duplicate_answers_are_counted() {
    let mut ok = record("ok");
    chunk(&mut ok, 0, "a", 10.0);
    chunk(&mut ok, 1, "b", 20.0);
    respond(&mut ok, "ab", 2, None, 30.0);
    let mut dup = record("dup");
    respond(&mut dup, "cd", 2, None, 30.0);
    respond(&mut dup, "cd", 2, None, 40.0);
    respond(&mut dup, "cd", 2, Some(1), 50.0);
    let lost = record("lost");
    let mut wrong = record("wrong");
    respond(&mut wrong, "ef", 2, None, 30.0);
    respond(&mut wrong, "eX", 2, None, 40.0);
    let mut short = record("short");
    respond(&mut short, "gh", 1, None, 30.0);
    let mut error = record("error");
    error.errors.push(ErrorSeen {
        error: ErrorReply {
            version: 1,
            id: "error".into(),
            error: ErrorDetail {
                code: ErrorCode::AttemptsExhausted,
                message: "gave up".into(),
            },
            worker: "w".into(),
            attempt: 3,
            metadata: None,
        },
        at_ms: 5.0,
    });
    let reference: HashMap<_, _> = [
        reference_of("ok", "ab", 2),
        reference_of("dup", "cd", 2),
        reference_of("lost", "x", 1),
        reference_of("wrong", "ef", 2),
        reference_of("short", "gh", 2),
        reference_of("error", "x", 1),
    ]
    .into();
    let v = verify(&[ok, dup, lost, wrong, short, error], &[], &reference);
    assert_eq!((v.requests, v.answered, v.lost), (6, 5, 1));
    assert_eq!(
        v.wrong, 3,
        "a different duplicate, a different token count and an error reply"
    );
    assert_eq!(v.duplicates, 2 + 1, "two extra copies of dup, one of wrong");
    assert_eq!(v.resumed, 0, "only the first answer counts");
    assert_eq!(v.stream_mismatches, 1, "dup asked for a stream and got no chunk");
    assert!(!v.passed());
    let ids: Vec<&str> = v.problems.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["lost", "wrong", "short", "error"]);
}

#[test]
fn a_clean_run_passes_and_a_bad_stream_is_reported_without_failing() {
    let mut r = record("r");
    chunk(&mut r, 0, "a", 10.0);
    chunk(&mut r, 2, "X", 20.0);
    respond(&mut r, "ab", 2, None, 30.0);
    let reference: HashMap<_, _> = [reference_of("r", "ab", 2)].into();
    let v = verify(&[r], &[], &reference);
    assert!(v.passed());
    assert_eq!(v.stream_mismatches, 1);
}

#[test]
fn the_stream_is_rebuilt_from_the_highest_seqs_before_the_answer() {
    let mut r = record("r");
    chunk(&mut r, 0, "a", 1.0);
    chunk(&mut r, 1, "b", 2.0);
    chunk(&mut r, 3, "c", 3.0);
    // Resumed from a snapshot at token 1: steps 1 and 3 come again.
    chunk(&mut r, 1, "b", 9.0);
    chunk(&mut r, 3, "c", 10.0);
    chunk(&mut r, 4, "d", 11.0);
    respond(&mut r, "abcd", 5, Some(1), 12.0);
    // A duplicate processing after the answer is not part of the stream.
    chunk(&mut r, 0, "a", 20.0);
    assert_eq!(streamed_text(&r), "abcd");
}

#[test]
fn tokens_recomputed_counts_the_steps_between_the_snapshot_and_the_interruption() {
    let mut r = record("r");
    for seq in 0..=11 {
        chunk(&mut r, seq, "t", f64::from(seq));
    }
    // Killed at step 11, resumed from a snapshot of 8 tokens: steps 8..=11 again.
    for seq in 8..=15 {
        chunk(&mut r, seq, "t", 100.0 + f64::from(seq));
    }
    respond(&mut r, "", 16, Some(8), 200.0);
    assert_eq!(tokens_recomputed(&r), 4);
    // The same stream, had the first resent chunk been step 9 (step 8 released no text):
    // the answer's resumed_from_token still says 8.
    r.chunks.retain(|c| !(c.seq == 8 && c.at_ms > 100.0));
    assert_eq!(tokens_recomputed(&r), 4);
}

#[test]
fn two_resumptions_add_up_and_a_clean_drain_costs_nothing() {
    let mut r = record("r");
    for (seq, at) in [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)] {
        chunk(&mut r, seq, "t", at);
    }
    // First resumption from step 2 (2 steps again), second from step 5 after reaching 6.
    for (seq, at) in [
        (2, 10.0),
        (3, 11.0),
        (4, 12.0),
        (5, 13.0),
        (6, 14.0),
        (5, 20.0),
        (6, 21.0),
        (7, 22.0),
    ] {
        chunk(&mut r, seq, "t", at);
    }
    respond(&mut r, "", 8, Some(5), 30.0);
    assert_eq!(tokens_recomputed(&r), 2 + 2);

    // A drained worker snapshots at its current token: the resumed stream starts above
    // everything seen, nothing is resent.
    let mut d = record("d");
    for seq in 0..=5 {
        chunk(&mut d, seq, "t", f64::from(seq));
    }
    for seq in 6..=9 {
        chunk(&mut d, seq, "t", 50.0 + f64::from(seq));
    }
    respond(&mut d, "", 10, Some(6), 60.0);
    assert_eq!(tokens_recomputed(&d), 0);
    let mut plain = record("p");
    respond(&mut plain, "", 3, None, 1.0);
    assert_eq!(tokens_recomputed(&plain), 0);
}

#[test]
fn fault_kinds_have_report_keys() {
    assert_eq!(kind_key(FaultKind::Evict), Some("sigterm"));
    assert_eq!(kind_key(FaultKind::Crash), Some("sigkill"));
    assert_eq!(kind_key(FaultKind::NodeDrain), Some("node_drain"));
    assert_eq!(kind_key(FaultKind::Start), None);
}
