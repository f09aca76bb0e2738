//! A poison request, one that crashes every worker that takes it, is retried only
//! `--max-attempts` times across the fleet, then dead-lettered with its history; its caller gets
//! an `attempts_exhausted` error, and the rest of the traffic is served meanwhile.
//!
//! The crash is real (the process aborts, as on a segfault or an OOM kill) and comes from fault
//! injection compiled only into test builds (`--features fault-injection`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry_schemas::{AttemptOutcome, DeadLetter, ErrorCode, Reply, Request};
use ferry_testkit::requests::chat;
use ferry_testkit::{unique, ChildGuard, Setup};

#[test]
fn a_poison_request_is_dead_lettered_after_its_attempts_and_the_rest_is_served() {
    let s = Setup::new(2);
    let (cluster, requests, replies, dlq) = (&s.cluster, &s.pipeline.requests, &s.pipeline.replies, &s.pipeline.dlq);
    let poison = unique("poison");
    let args = s
        .args()
        .set("--session-timeout", "6s")
        .set("--max-attempts", "2")
        .set("--max-in-flight", "2");
    // Each answer waits a moment before it is published: a suspect that ran in that window
    // would crash the worker under an answered request and spend an attempt of it.
    let env = [
        ("FERRY_FAULT_CRASH_ON", poison.as_str()),
        ("FERRY_FAULT_SLOW_PUBLISH_MS", "400"),
    ];
    let start = |name: &str| -> ChildGuard { cluster.start_worker(name, args.clone(), &env) };
    let mut fleet: Vec<ChildGuard> = vec![start("worker-0"), start("worker-1")];
    let mut next = 2;

    let good: Vec<Request> = (0..6)
        .map(|i| chat(&format!("good-{i}-{}", unique("")), "Name a fruit.", 6))
        .collect();
    let bad = chat(&poison, "Say hello.", 6);
    let producer = cluster.producer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (i, r) in good.iter().enumerate() {
        if i == 2 {
            rt.block_on(cluster.publish_to(
                &producer,
                requests,
                0,
                &bad.id,
                &serde_json::to_vec(&bad).expect("json"),
            ));
        }
        rt.block_on(cluster.publish_to(
            &producer,
            requests,
            (i % 2) as i32,
            &r.id,
            &serde_json::to_vec(r).expect("json"),
        ));
    }

    // Like a Deployment, bring crashed workers back, until the poison is dead-lettered and every
    // good request is answered.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut crashes = 0;
    let mut gone = Vec::new();
    loop {
        for i in (0..fleet.len()).rev() {
            if let Some(status) = fleet[i].wait_exit(Duration::ZERO) {
                assert!(
                    !status.success(),
                    "{} exited cleanly without being asked to",
                    fleet[i].name
                );
                crashes += 1;
                gone.push(fleet.swap_remove(i));
                fleet.push(start(&format!("worker-{next}")));
                next += 1;
            }
        }
        let dead = cluster.read_all_partitions(dlq);
        let answered: HashMap<String, Reply> = cluster
            .read_all_partitions(replies)
            .into_iter()
            .map(|(_, k, b, _)| (k, serde_json::from_slice::<Reply>(&b).expect("reply")))
            .collect();
        if !dead.is_empty() && good.iter().all(|r| answered.contains_key(&r.id)) && answered.contains_key(&bad.id) {
            assert_eq!(dead.len(), 1, "only the poison is dead-lettered");
            let record: DeadLetter = serde_json::from_slice(&dead[0].2).expect("dead letter");
            assert_eq!(record.request_id.as_deref(), Some(bad.id.as_str()));
            assert_eq!(record.reason.code, ErrorCode::AttemptsExhausted);
            let outcomes: Vec<AttemptOutcome> = record.attempts.iter().map(|a| a.outcome).collect();
            assert_eq!(outcomes, [AttemptOutcome::Died, AttemptOutcome::Died], "{record:?}");
            match &answered[&bad.id] {
                Reply::Error(e) => assert_eq!(e.error.code, ErrorCode::AttemptsExhausted),
                other => panic!("the poison's caller got {other:?}"),
            }
            for r in &good {
                assert!(matches!(answered[&r.id], Reply::Response(_)), "{} not answered", r.id);
            }
            assert_eq!(crashes, 2, "two attempts, two crashes, then no more retries");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "poison dead-lettered: {}, good answered: {}/{}, crashes: {crashes}",
            dead.len(),
            good.iter().filter(|r| answered.contains_key(&r.id)).count(),
            good.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // No worker crashes after the dead-lettering.
    std::thread::sleep(Duration::from_secs(2));
    for w in &mut fleet {
        assert!(
            w.wait_exit(Duration::ZERO).is_none(),
            "{} crashed after the poison was dead-lettered",
            w.name
        );
    }
    drop(gone);
}
