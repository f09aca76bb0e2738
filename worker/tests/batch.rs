//! Batched decoding on the real model: a sequence's logits are bit-identical whether it runs
//! alone or in a batch, the same request answers the same text alone and among eight, and a
//! long prompt joining a running batch is prefilled in chunks while the others keep decoding.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_testkit::requests::chat;
use ferry_worker::engine::{Completion, Engine, EngineHandle, Job, Outcome, Prepared, PREFILL_CHUNK};
use ferry_worker::model::{BatchInput, SequenceCache};
use support::shared;
use tokio::sync::mpsc;

fn finished(outcome: Outcome) -> Completion {
    match outcome {
        Outcome::Finished(c) => c,
        Outcome::Suspended { tokens } => panic!("suspended after {tokens} tokens, unasked"),
    }
}

const TOPICS: [&str; 8] = [
    "Write a haiku about autumn.",
    "Name three colours.",
    "Tell me a short story about a lighthouse keeper.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Count from 1 to 10.",
    "Give me a recipe for pancakes.",
];

/// A sequence forwarded alone and as one of eight, through a prefill and decode steps, gets
/// exactly the same logits: batching shares the matrix multiplications, not the arithmetic of
/// any row.
#[test]
fn logits_do_not_depend_on_the_batch() {
    let model = shared();
    let engine = Engine::new(model.clone());
    let prompts: Vec<Vec<u32>> = TOPICS
        .iter()
        .map(|t| engine.prepare(&chat("l", t, 8)).expect("prepares").prompt)
        .collect();
    let config = &model.weights.config;

    let mut alone_cache = SequenceCache::new(config);
    let mut alone = vec![model.weights.forward(&prompts[0], &mut alone_cache).expect("forward")];
    let steps = [504u32, 3575, 282, 11];
    for t in steps {
        alone.push(model.weights.forward(&[t], &mut alone_cache).expect("forward"));
    }

    let mut caches: Vec<SequenceCache> = prompts.iter().map(|_| SequenceCache::new(config)).collect();
    let mut inputs: Vec<BatchInput> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| BatchInput { tokens: p, cache })
        .collect();
    let mut together = vec![model.weights.forward_batch(&mut inputs).expect("batch").swap_remove(0)];
    for (n, t) in steps.into_iter().enumerate() {
        // The others feed different tokens, and one of them a multi-token chunk.
        let others: Vec<Vec<u32>> = (1..8)
            .map(|i| {
                if i == 3 {
                    vec![t + 7, t + 8, t + 9]
                } else {
                    vec![t + i as u32 + n as u32]
                }
            })
            .collect();
        let own = [t];
        let mut inputs: Vec<BatchInput> = std::iter::once(&own[..])
            .chain(others.iter().map(Vec::as_slice))
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| BatchInput { tokens, cache })
            .collect();
        // Put the sequence under test in the middle of the batch this time.
        inputs.swap(0, 4);
        let mut logits = model.weights.forward_batch(&mut inputs).expect("batch");
        together.push(logits.swap_remove(4));
    }
    assert_eq!(caches[0].len(), alone_cache.len());
    for (step, (a, b)) in alone.iter().zip(&together).enumerate() {
        let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().expect("f32"), b.to_vec1().expect("f32"));
        assert!(a == b, "logits of step {step} differ in a batch");
    }
}

/// Eight different requests decoded together through the engine thread each answer exactly as
/// alone: greedy ones and a seeded sampled one.
#[tokio::test]
async fn the_same_request_alone_and_in_a_batch_of_eight() {
    let engine = Engine::new(shared());
    let prepared: Vec<Prepared> = TOPICS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut r = chat(&format!("r{i}"), t, 24);
            if i % 3 == 1 {
                r.temperature = Some(0.9);
                r.top_p = Some(0.95);
                r.seed = Some(40 + i as u64);
            }
            engine.prepare(&r).expect("prepares")
        })
        .collect();
    let alone: Vec<Completion> = prepared
        .iter()
        .map(|p| engine.generate(p.clone()).expect("generates"))
        .collect();
    let handle = EngineHandle::spawn(engine, 8).expect("engine thread");
    let runs = prepared.iter().map(|p| handle.run(Job::new(p.clone())));
    let together = futures::future::join_all(runs).await;
    for (i, (c, a)) in together.into_iter().zip(&alone).enumerate() {
        let c = finished(c.expect("engine thread runs").expect("generates"));
        assert_eq!(
            (&c.text, &c.tokens, &c.finish),
            (&a.text, &a.tokens, &a.finish),
            "request {i}"
        );
    }
}

/// A prompt of several chunks joins a batch that is decoding: the others keep getting tokens
/// while it is prefilled (at most one chunk per round), and it answers as it does alone.
#[tokio::test]
async fn a_long_prompt_does_not_stall_the_batch() {
    let engine = Engine::new(shared());
    let list = (1..=60).map(|i| format!("item {i},")).collect::<Vec<_>>().join(" ");
    let long = chat("long", &format!("{list} How many items are in the list above?"), 8);
    let long = engine.prepare(&long).expect("prepares");
    let chunks = long.prompt.len().div_ceil(PREFILL_CHUNK);
    assert!(chunks >= 4, "the prompt is only {} tokens", long.prompt.len());
    let long_alone = engine.generate(long.clone()).expect("generates");

    let handle = EngineHandle::spawn(engine.clone(), 4).expect("engine thread");
    // Which of the decoding jobs released each streamed chunk, and when.
    let events: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for (i, topic) in TOPICS.iter().enumerate().take(3) {
        let p = engine.prepare(&chat(&format!("s{i}"), topic, 60)).expect("prepares");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut j = Job::new(p);
        j.chunks = Some(tx);
        let (handle, events) = (handle.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            let listen = async {
                while rx.recv().await.is_some() {
                    events.lock().expect("not poisoned").push((i, Instant::now()));
                }
            };
            let (outcome, ()) = tokio::join!(handle.run(j), listen);
            finished(outcome.expect("engine thread runs").expect("generates"))
        }));
    }
    // Join once the three are decoding.
    while events.lock().expect("not poisoned").len() < 6 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let joined = Instant::now();
    let long_task = {
        let handle = handle.clone();
        tokio::spawn(async move {
            finished(
                handle
                    .run(Job::new(long))
                    .await
                    .expect("engine thread runs")
                    .expect("generates"),
            )
        })
    };
    let long_together = long_task.await.expect("task");
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        (long_together.text, long_together.tokens),
        (long_alone.text, long_alone.tokens)
    );
    // Between joining and the long job's first logits (its prefill time runs from its admission,
    // at most a round after `joined`), its prompt took `chunks` rounds: the three others, still
    // decoding, released text in nearly each of them. Had the prefill stalled them, at most one
    // round's worth (three chunks) would fall in that window.
    let prefilled = joined + long_together.prefill;
    let events = events.lock().expect("not poisoned");
    let meanwhile = events.iter().filter(|(_, t)| *t > joined && *t <= prefilled).count();
    assert!(
        meanwhile >= 2 * chunks,
        "{meanwhile} chunks of the others while a {chunks}-chunk prompt was prefilled"
    );
    eprintln!("{meanwhile} chunks of the others while a {chunks}-chunk prompt was prefilled");
}
