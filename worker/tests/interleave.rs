//! The engine thread with several jobs at once, on the real model: interleaved generations give
//! exactly the answers they give alone, a deadline ends a generation with the text so far, and
//! streamed chunks rebuild the final text, also when the generation was interrupted and resumed.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_schemas::FinishReason;
use ferry_testkit::requests::chat;
use ferry_worker::engine::{
    Completion, Engine, EngineHandle, Job, Outcome, Prepared, ResumeFrom, Sequence, StreamChunk,
};
use ferry_worker::model::ModelError;
use support::shared;
use tokio::sync::mpsc;

fn finished(outcome: Result<Outcome, ModelError>) -> Completion {
    match outcome.expect("generates") {
        Outcome::Finished(c) => c,
        Outcome::Suspended { tokens } => panic!("suspended after {tokens} tokens, unasked"),
    }
}

/// A streaming client as the protocol expects one: it keeps the highest chunk number it has seen
/// and appends only chunks numbered higher.
#[derive(Debug, Default)]
struct Client {
    last: Option<u32>,
    text: String,
}

impl Client {
    fn take(&mut self, chunk: StreamChunk) {
        assert!(!chunk.text.is_empty(), "empty chunk {}", chunk.seq);
        if self.last.is_none_or(|last| chunk.seq > last) {
            self.last = Some(chunk.seq);
            self.text.push_str(&chunk.text);
        }
    }

    fn drain(&mut self, rx: &mut mpsc::UnboundedReceiver<StreamChunk>) {
        while let Ok(chunk) = rx.try_recv() {
            self.take(chunk);
        }
    }
}

/// A counting request cut by a four-character stop string from the middle of its answer: the
/// prepared request and the text it must end with.
fn count_with_stop(engine: &Engine) -> (Prepared, String, String) {
    let mut req = chat("count", "Count from 1 to 20, separated by commas.", 40);
    let full = engine
        .generate(engine.prepare(&req).expect("prepares"))
        .expect("generates")
        .text;
    let from = full.find('7').expect("the count reaches 7");
    let stop: String = full[from..].chars().take(4).collect();
    assert_eq!(stop.chars().count(), 4, "{full:?}");
    let at = full.find(&stop).expect("contains its own piece");
    req.stop = vec![stop.clone()];
    (engine.prepare(&req).expect("prepares"), full[..at].to_string(), stop)
}

/// Four jobs run together on one engine thread, interleaved, answer exactly as they do alone.
#[tokio::test]
async fn interleaved_jobs_answer_as_they_would_alone() {
    let engine = Engine::new(shared());
    let mut requests = [
        chat("a", "Write a haiku about autumn.", 24),
        chat("b", "Name three colours.", 20),
        chat("c", "Tell me a short story about a lighthouse keeper.", 28),
        chat("d", "Write a short poem about the sea.", 24),
    ];
    // Seeded sampling too: a sampler that kept state across sequences would break here.
    requests[3].temperature = Some(0.9);
    requests[3].seed = Some(42);
    let prepared: Vec<Prepared> = requests.iter().map(|r| engine.prepare(r).expect("prepares")).collect();
    let alone: Vec<Completion> = prepared
        .iter()
        .map(|p| engine.generate(p.clone()).expect("generates"))
        .collect();

    let handle = EngineHandle::spawn(engine.clone(), 4).expect("engine thread");
    // Which job each chunk came from, in the order they arrived.
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = prepared
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (handle, arrivals) = (handle.clone(), arrivals.clone());
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut j = Job::new(p.clone());
            j.chunks = Some(tx);
            tokio::spawn(async move {
                let listen = async {
                    let mut streamed = String::new();
                    while let Some(chunk) = rx.recv().await {
                        arrivals.lock().expect("not poisoned").push(i);
                        streamed.push_str(&chunk.text);
                    }
                    streamed
                };
                let (outcome, streamed) = tokio::join!(handle.run(j), listen);
                (finished(outcome.expect("engine thread runs")), streamed)
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (together, streamed) = task.await.expect("task");
        assert_eq!(together.text, alone[i].text, "request {i}");
        assert_eq!(together.tokens, alone[i].tokens, "request {i}");
        assert_eq!(together.finish, alone[i].finish, "request {i}");
        assert_eq!(streamed, together.text, "request {i} streamed");
    }
    // One job after another would switch jobs three times; round-robin switches every token.
    let arrivals = arrivals.lock().expect("not poisoned");
    let switches = arrivals.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > 3 * 3, "jobs ran one after another: {arrivals:?}");
}

/// A job that fails (here: a resume with no tokens) gets its error; the job beside it is not
/// disturbed.
#[tokio::test]
async fn a_failing_job_fails_alone() {
    let engine = Engine::new(shared());
    let prepared = engine
        .prepare(&chat("ok", "Name three colours.", 12))
        .expect("prepares");
    let alone = engine.generate(prepared.clone()).expect("generates");
    let handle = EngineHandle::spawn(engine, 2).expect("engine thread");
    let mut broken = Job::new(prepared.clone());
    broken.resume = Some(ResumeFrom {
        tokens: Vec::new(),
        cache: None,
    });
    let (good, bad) = tokio::join!(handle.run(Job::new(prepared)), handle.run(broken));
    assert!(bad.expect("engine thread runs").is_err(), "a resume with no tokens ran");
    let good = finished(good.expect("engine thread runs"));
    assert_eq!((good.text, good.tokens), (alone.text, alone.tokens));
}

/// A job whose deadline passed before it started gets no compute: a fresh one ends with no text,
/// a resumed one with the text of its snapshot.
#[tokio::test]
async fn a_deadline_already_passed_costs_nothing() {
    let engine = Engine::new(shared());
    let handle = EngineHandle::spawn(engine.clone(), 2).expect("engine thread");
    let prepared = engine
        .prepare(&chat("late", "Write a haiku about autumn.", 12))
        .expect("prepares");

    let mut late = Job::new(prepared.clone());
    late.deadline = Some(Instant::now());
    let c = finished(handle.run(late).await.expect("engine thread runs"));
    assert_eq!(c.finish.reason, FinishReason::Deadline);
    assert_eq!((c.text.as_str(), c.tokens.len()), ("", 0));
    assert_eq!(c.prompt_tokens, prepared.prompt.len());
    assert_eq!(c.prefill, Duration::ZERO, "the prompt was prefilled");

    let before = engine.generate(prepared.clone()).expect("generates");
    assert_eq!(before.finish.reason, FinishReason::Length);
    let mut late = Job::new(prepared);
    late.resume = Some(ResumeFrom {
        tokens: before.tokens.clone(),
        cache: None,
    });
    late.deadline = Some(Instant::now());
    let c = finished(handle.run(late).await.expect("engine thread runs"));
    assert_eq!(c.finish.reason, FinishReason::Deadline);
    assert_eq!((c.text, c.tokens), (before.text, before.tokens));
    assert_eq!(c.prefill, Duration::ZERO, "the snapshot was recomputed");
}

/// A deadline inside a long generation ends it there, with exactly the text a generation of that
/// many tokens gives.
#[test]
fn a_deadline_ends_a_long_generation_with_the_text_so_far() {
    let engine = Engine::new(shared());
    let mut req = chat("long", "", 400);
    req.messages = None;
    req.prompt = Some("Count from one to one thousand: one, two, three, four,".into());
    let prepared = engine.prepare(&req).expect("prepares");
    // A deadline three times what a four-token run takes falls well inside 400 tokens and after
    // the first, however fast this machine is.
    let mut short = prepared.clone();
    short.params.max_tokens = 4;
    let started = Instant::now();
    engine.generate(short).expect("generates");
    let budget = started.elapsed() * 3;

    let mut j = Job::new(prepared.clone());
    j.deadline = Some(Instant::now() + budget);
    let c = finished(engine.run(j));
    assert_eq!(
        c.finish.reason,
        FinishReason::Deadline,
        "{} tokens in {budget:?}",
        c.tokens.len()
    );
    assert!(!c.tokens.is_empty() && !c.text.is_empty(), "no text in {budget:?}");
    let mut same_length = prepared;
    same_length.params.max_tokens = c.tokens.len();
    let reference = engine.generate(same_length).expect("generates");
    assert_eq!(c.tokens, reference.tokens);
    assert_eq!(c.text, reference.text);
}

/// Streamed chunks are numbered in order and rebuild the final text; the stop string, though
/// generated a piece at a time, never reaches the stream.
#[test]
fn streamed_chunks_rebuild_the_text_without_the_stop_string() {
    let engine = Engine::new(shared());
    let (prepared, expected, stop) = count_with_stop(&engine);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut j = Job::new(prepared);
    j.chunks = Some(tx);
    let c = finished(engine.run(j));
    assert_eq!(c.finish.stop_sequence.as_deref(), Some(stop.as_str()));
    assert_eq!(c.text, expected);
    let mut chunks = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        chunks.push(chunk);
    }
    assert!(
        chunks.windows(2).all(|w| w[0].seq < w[1].seq),
        "chunk numbers not increasing: {chunks:?}"
    );
    assert!(chunks.iter().all(|ch| !ch.text.is_empty()));
    let streamed: String = chunks.iter().map(|ch| ch.text.as_str()).collect();
    assert_eq!(streamed, c.text);
}

/// A generation interrupted after `k` tokens (and, for a crash, having streamed `lost` tokens more
/// that its snapshot missed) and resumed from those `k` tokens re-sends chunks; a client that
/// keeps only newer chunk numbers still rebuilds exactly the uninterrupted text. Both through
/// [`Sequence`] and through a resumed [`Job`].
#[test]
fn resumed_streams_rebuild_the_uninterrupted_text() {
    let model = shared();
    let engine = Engine::new(model.clone());
    let (prepared, expected, _) = count_with_stop(&engine);
    let (prompt, params) = (prepared.prompt.clone(), prepared.params.clone());

    let mut reference = Client::default();
    let mut seq = Sequence::new(&model, prompt.clone(), params.clone());
    seq.prefill(&model).expect("prefills");
    while seq.finish().is_none() {
        if let Some(chunk) = seq.step(&model).expect("steps") {
            reference.take(chunk);
        }
    }
    let whole = seq.into_completion().expect("finished");
    assert_eq!(
        (whole.text.as_str(), reference.text.as_str()),
        (expected.as_str(), expected.as_str())
    );
    let n = whole.tokens.len();
    assert!(n > 12, "too short to interrupt: {n} tokens");

    for (k, lost) in [(1, 0), (5, 3), (n / 2, 0), (n - 2, 1)] {
        for through_job in [false, true] {
            let case = format!("k={k} lost={lost} through_job={through_job}");
            // The interrupted run, as far as the client saw it.
            let mut client = Client::default();
            let mut first = Sequence::new(&model, prompt.clone(), params.clone());
            first.prefill(&model).expect("prefills");
            while first.generated().len() < k + lost {
                if let Some(chunk) = first.step(&model).expect("steps") {
                    client.take(chunk);
                }
            }
            assert!(first.finish().is_none(), "{case}: finished before the interruption");
            let tokens = first.generated()[..k].to_vec();
            let text = if through_job {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let mut j = Job::new(prepared.clone());
                j.resume = Some(ResumeFrom { tokens, cache: None });
                j.chunks = Some(tx);
                let c = finished(engine.run(j));
                client.drain(&mut rx);
                c.text
            } else {
                let mut second =
                    Sequence::resume(&model, prompt.clone(), params.clone(), tokens, None).expect("resumes");
                while second.finish().is_none() {
                    if let Some(chunk) = second.step(&model).expect("steps") {
                        client.take(chunk);
                    }
                }
                second.into_completion().expect("finished").text
            };
            assert_eq!(text, expected, "{case}: final text");
            assert_eq!(client.text, expected, "{case}: streamed text");
        }
    }
}
