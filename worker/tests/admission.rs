//! Memory admission in a worker process: with a KV budget that holds one request's worst case,
//! requests beyond it wait for the budget instead of all generating at once, every one is still
//! answered as it is alone, and one that could never fit is dead-lettered with the reason.

mod support;

use std::time::Duration;

use ferry_schemas::{DeadLetter, ErrorCode, Reply, Request};
use ferry_testkit::http::{free_addr, get, wait_status};
use ferry_testkit::requests::chat;
use ferry_testkit::{block_on, wait_for, Setup};
use ferry_worker::consumer::admission::{allocated_positions, bytes_per_position, worst_case_tokens};
use ferry_worker::engine::Engine;

/// The value of an unlabelled sample in a Prometheus text page.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn requests_beyond_the_kv_budget_wait_and_are_all_answered() {
    let model = support::shared();
    let engine = Engine::new(model.clone());
    let requests: Vec<Request> = [
        "Write a haiku about autumn.",
        "Name three colours.",
        "What is the capital of France?",
        "Count from 1 to 10.",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| chat(&format!("kv-{i}"), t, 16))
    .collect();
    let expected: Vec<String> = requests
        .iter()
        .map(|r| {
            engine
                .generate(engine.prepare(r).expect("prepares"))
                .expect("generates")
                .text
        })
        .collect();
    // The budget holds the largest of the four worst cases, and not two of them.
    let per_position = bytes_per_position(&model.weights.config);
    let largest = requests
        .iter()
        .map(|r| {
            let p = engine.prepare(r).expect("prepares");
            allocated_positions(worst_case_tokens(
                p.prompt.len(),
                p.params.max_tokens,
                model.context_length,
            ))
        })
        .max()
        .expect("four");
    let budget = (largest as u64 * 3 / 2) * per_position;
    let budget_arg = budget.to_string();

    let s = Setup::new(1);
    let (cluster, topic, replies, dlq) = (&s.cluster, &s.pipeline.requests, &s.pipeline.replies, &s.pipeline.dlq);
    // Everything is in the topic before the worker starts, so it fetches all of it at once and
    // starts the four requests together (--max-in-flight 4).
    let producer = cluster.producer();
    for r in &requests {
        block_on(cluster.publish(&producer, topic, &r.id, &serde_json::to_vec(r).expect("json")));
    }
    // Could never fit: its max_tokens alone is several budgets.
    let huge = chat("kv-huge", "Tell me a very long story.", 4 * largest as u32);
    block_on(cluster.publish(&producer, topic, &huge.id, &serde_json::to_vec(&huge).expect("json")));

    let addr = free_addr();
    let args = s
        .pipeline
        .args()
        .set("--max-in-flight", "4")
        .set("--kv-budget", budget_arg);
    let _worker = s.worker("worker-kv", args.set("--http-addr", addr.to_string()));
    wait_status(addr, "/readyz", 200, Duration::from_secs(120));

    let answers = wait_for(Duration::from_secs(300), "four answers and one error", || {
        let replies: Vec<Reply> = cluster
            .read_all(replies)
            .iter()
            .map(|(_, v, _)| serde_json::from_slice(v).expect("a reply"))
            .collect();
        (replies.len() > requests.len()).then_some(replies)
    });
    for (r, text) in requests.iter().zip(&expected) {
        let got = answers.iter().find_map(|a| match a {
            Reply::Response(resp) if resp.id == r.id => Some(resp),
            _ => None,
        });
        let got = got.unwrap_or_else(|| panic!("no answer for {}: {answers:?}", r.id));
        assert_eq!(&got.text, text, "{}", r.id);
    }
    let refused = answers.iter().find_map(|a| match a {
        Reply::Error(e) if e.id == huge.id => Some(e),
        _ => None,
    });
    let refused = refused.unwrap_or_else(|| panic!("no error reply for the huge request: {answers:?}"));
    assert_eq!(
        refused.error.code,
        ErrorCode::InvalidRequest,
        "{}",
        refused.error.message
    );
    assert!(
        refused.error.message.contains("--kv-budget"),
        "{}",
        refused.error.message
    );
    let dead: Vec<DeadLetter> = cluster
        .read_all(dlq)
        .iter()
        .map(|(_, v, _)| serde_json::from_slice(v).expect("a dead-letter record"))
        .collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].request_id.as_deref(), Some(huge.id.as_str()));

    let metrics = wait_for(Duration::from_secs(30), "every reservation released", || {
        get(addr, "/metrics")
            .map(|(_, m)| m)
            .filter(|m| sample(m, "ferry_kv_reserved_bytes") == Some(0.0))
    });
    let waits = sample(&metrics, "ferry_kv_admission_waits_total").expect("the waits counter");
    assert!(waits >= 1.0, "no request waited for the budget:\n{metrics}");
    let shown = sample(&metrics, "ferry_kv_budget_bytes").expect("the budget gauge");
    assert!(
        shown > 0.0 && shown <= budget as f64,
        "budget {shown}, asked for {budget}"
    );
}
