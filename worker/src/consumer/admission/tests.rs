use super::*;
use std::sync::atomic::Ordering;

fn ops() -> Arc<Ops> {
    let (tx, _rx) = tokio::sync::watch::channel(0);
    Ops::new(Arc::new(tx), 5, Duration::from_secs(60))
}

fn smollm2() -> LlamaConfig {
    LlamaConfig {
        n_layer: 30,
        n_head: 9,
        n_kv_head: 3,
        head_dim: 64,
        embedding_length: 576,
        context_length: 8192,
        rms_norm_eps: 1e-5,
        rope_freq_base: 100_000.0,
        vocab_size: 49_152,
    }
}

#[test]
fn a_position_is_keys_and_values_of_every_layer_in_f32() {
    assert_eq!(bytes_per_position(&smollm2()), 30 * 3 * 64 * 2 * 4);
    // And that is what a real cache of that shape holds.
    let c = LlamaConfig {
        n_layer: 2,
        n_kv_head: 2,
        head_dim: 4,
        ..smollm2()
    };
    let positions = 3;
    let values = (0..c.n_layer)
        .map(|_| {
            let n = positions * c.n_kv_head * c.head_dim;
            (vec![0.5f32; n], vec![0.25f32; n])
        })
        .collect();
    let cache = crate::model::SequenceCache::from_range_values(&c, positions, values, &candle_core::Device::Cpu)
        .expect("cache");
    let held: usize = cache
        .layer_tensors()
        .expect("tensors")
        .iter()
        .map(|(k, v)| (k.elem_count() * k.dtype().size_in_bytes()) + v.elem_count() * v.dtype().size_in_bytes())
        .sum();
    assert_eq!(held as u64, positions as u64 * bytes_per_position(&c));
}

#[test]
fn the_worst_case_is_capped_by_the_context_and_allocated_in_chunks() {
    assert_eq!(worst_case_tokens(100, 256, 8192), 356);
    assert_eq!(worst_case_tokens(8000, 1000, 8192), 8192);
    assert_eq!(worst_case_tokens(10, usize::MAX, 2048), 2048);
    assert_eq!(allocated_positions(1), CACHE_CHUNK);
    assert_eq!(allocated_positions(CACHE_CHUNK), CACHE_CHUNK);
    assert_eq!(allocated_positions(CACHE_CHUNK + 1), 2 * CACHE_CHUNK);
    assert_eq!(allocated_positions(0), 0);
}

#[test]
fn cgroup_limits_are_read_from_v2_then_v1() {
    assert_eq!(cgroup_limit(Some("3221225472\n"), None), Some(3 << 30));
    assert_eq!(
        cgroup_limit(Some("max\n"), Some("1073741824")),
        None,
        "v2 says no limit"
    );
    assert_eq!(cgroup_limit(None, Some("1073741824\n")), Some(1 << 30));
    assert_eq!(
        cgroup_limit(None, Some("9223372036854771712\n")),
        None,
        "v1's unlimited"
    );
    assert_eq!(cgroup_limit(None, None), None);
    assert_eq!(cgroup_limit(Some("garbage"), None), None);
    assert_eq!(cgroup_limit(Some("0"), None), None);
}

#[test]
fn resident_memory_is_read_from_proc_status() {
    let status = "Name:\tferry-worker\nVmPeak:\t 900000 kB\nVmRSS:\t  312344 kB\nThreads:\t9\n";
    assert_eq!(resident_bytes(status), Some(312_344 * 1024));
    assert_eq!(resident_bytes("Name:\tx\n"), None);
    assert_eq!(resident_bytes("VmRSS:\tlots\n"), None);
    assert_eq!(resident_bytes("VmRSS:\t12 MB\n"), None, "only kB is known");
}

#[test]
fn the_default_leaves_the_process_and_a_reserve() {
    // 3 GiB limit, 300 MiB resident: a reserve of 307.2 MiB (a tenth).
    let limit = 3 << 30;
    assert_eq!(default_budget(limit, 300 * MIB), Some(limit - 300 * MIB - limit / 10));
    // A small limit keeps at least 128 MiB.
    assert_eq!(default_budget(512 * MIB, 100 * MIB), Some(284 * MIB));
    assert_eq!(default_budget(512 * MIB, 400 * MIB), None);
    assert_eq!(default_budget(100 * MIB, 0), None);
}

#[test]
fn a_budget_smaller_than_one_chunk_is_refused() {
    assert!(KvBudget::new(Some(CACHE_CHUNK as u64 * 100 - 1), 100, 2048, ops()).is_err());
    assert!(KvBudget::new(Some(CACHE_CHUNK as u64 * 100), 100, 2048, ops()).is_ok());
    assert!(KvBudget::new(None, 100, 2048, ops()).is_ok());
}

#[tokio::test]
async fn a_second_admission_waits_until_the_first_permit_drops() {
    let ops = ops();
    // Room for three chunks: two requests of two chunks do not fit together.
    let budget = Arc::new(KvBudget::new(Some(3 * CACHE_CHUNK as u64), 1, 2048, ops.clone()).expect("budget"));
    let control = Arc::new(JobControl::default());
    let Admission::Admitted(first) = budget.admit(300, 100, &control).await else {
        panic!("the first fits");
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let second = {
        let budget = budget.clone();
        let control = control.clone();
        tokio::spawn(async move {
            let a = budget.admit(CACHE_CHUNK, 1, &control).await;
            let _ = tx.send(());
            a
        })
    };
    // The second is waiting: the wait is counted before it blocks.
    while !ops.render_metrics().contains("ferry_kv_admission_waits_total 1\n") {
        tokio::task::yield_now().await;
    }
    assert!(rx.try_recv().is_err(), "admitted while the first holds the budget");
    let text = ops.render_metrics();
    assert!(
        text.contains(&format!("ferry_kv_reserved_bytes {}\n", 2 * CACHE_CHUNK)),
        "{text}"
    );
    drop(first);
    assert!(matches!(second.await.expect("task"), Admission::Admitted(_)));
    let text = ops.render_metrics();
    assert!(
        text.contains("ferry_kv_reserved_bytes 0\n"),
        "the second's permit dropped too: {text}"
    );
    assert!(
        text.contains(&format!("ferry_kv_budget_bytes {}\n", 3 * CACHE_CHUNK)),
        "{text}"
    );
}

#[tokio::test]
async fn suspension_ends_a_wait() {
    let budget = KvBudget::new(Some(CACHE_CHUNK as u64), 1, 2048, ops()).expect("budget");
    let control = JobControl::default();
    let Admission::Admitted(_held) = budget.admit(10, 10, &control).await else {
        panic!("the first fits");
    };
    let waiting = JobControl::default();
    waiting.suspend.store(true, Ordering::Release);
    assert!(matches!(budget.admit(10, 10, &waiting).await, Admission::Suspended));
}

#[tokio::test]
async fn what_can_never_fit_is_refused_with_the_reason() {
    let budget = KvBudget::new(Some(2 * CACHE_CHUNK as u64), 1, 8192, ops()).expect("budget");
    let control = JobControl::default();
    match budget.admit(100, 1000, &control).await {
        Admission::TooLarge { code, message } => {
            assert_eq!(code, ErrorCode::InvalidRequest);
            assert!(message.contains("max_tokens 1000"), "{message}");
            assert!(
                message.contains(&format!("at most {} tokens", 2 * CACHE_CHUNK)),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    match budget.admit(3 * CACHE_CHUNK, 1, &control).await {
        Admission::TooLarge { code, .. } => assert_eq!(code, ErrorCode::PromptTooLong),
        other => panic!("{other:?}"),
    }
    // Capped by the context, even an enormous max_tokens fits a small context.
    let small = KvBudget::new(Some(2 * CACHE_CHUNK as u64), 1, 2 * CACHE_CHUNK, ops()).expect("budget");
    assert!(matches!(
        small.admit(10, 100_000, &control).await,
        Admission::Admitted(_)
    ));
}

#[tokio::test]
async fn an_unlimited_budget_admits_everything_at_once_and_still_reports() {
    let ops = ops();
    let budget = KvBudget::new(None, 2, 2048, ops.clone()).expect("budget");
    let control = JobControl::default();
    let mut held = Vec::new();
    for _ in 0..50 {
        match budget.admit(2000, 48, &control).await {
            Admission::Admitted(p) => held.push(p),
            other => panic!("{other:?}"),
        }
    }
    let text = ops.render_metrics();
    assert!(text.contains("ferry_kv_budget_bytes 0\n"), "{text}");
    assert!(
        text.contains(&format!("ferry_kv_reserved_bytes {}\n", 50 * 2048 * 2)),
        "{text}"
    );
    assert!(text.contains("ferry_kv_admission_waits_total 0\n"), "{text}");
}
