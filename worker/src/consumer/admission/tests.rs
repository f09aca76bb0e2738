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
    let Admission::Admitted(first) = budget.admit(300, 100, 0, &control).await else {
        panic!("the first fits");
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let second = {
        let budget = budget.clone();
        let control = control.clone();
        tokio::spawn(async move {
            let a = budget.admit(CACHE_CHUNK, 1, 0, &control).await;
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
    let Admission::Admitted(_held) = budget.admit(10, 10, 0, &control).await else {
        panic!("the first fits");
    };
    let waiting = JobControl::default();
    waiting.suspend.store(true, Ordering::Release);
    assert!(matches!(budget.admit(10, 10, 0, &waiting).await, Admission::Suspended));
}

#[tokio::test]
async fn what_can_never_fit_is_refused_with_the_reason() {
    let budget = KvBudget::new(Some(2 * CACHE_CHUNK as u64), 1, 8192, ops()).expect("budget");
    let control = JobControl::default();
    match budget.admit(100, 1000, 0, &control).await {
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
    match budget.admit(3 * CACHE_CHUNK, 1, 0, &control).await {
        Admission::TooLarge { code, .. } => assert_eq!(code, ErrorCode::PromptTooLong),
        other => panic!("{other:?}"),
    }
    // Capped by the context, even an enormous max_tokens fits a small context.
    let small = KvBudget::new(Some(2 * CACHE_CHUNK as u64), 1, 2 * CACHE_CHUNK, ops()).expect("budget");
    assert!(matches!(
        small.admit(10, 100_000, 0, &control).await,
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
        match budget.admit(2000, 48, 0, &control).await {
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

#[tokio::test]
async fn a_restore_is_admitted_for_its_piece_as_well_and_gives_it_back() {
    let ops = ops();
    // One byte a position, room for five chunks: two plain generations of two chunks fit
    // together, but a restore of a two-chunk cache from one piece as large (a compacted
    // snapshot) does not fit beside one.
    let budget = Arc::new(KvBudget::new(Some(5 * CACHE_CHUNK as u64), 1, 8192, ops.clone()).expect("budget"));
    let control = Arc::new(JobControl::default());
    let two_chunks = (CACHE_CHUNK + 100, 100);
    let piece = 2 * CACHE_CHUNK as u64;
    let plain = move |budget: Arc<KvBudget>, control: Arc<JobControl>| async move {
        match budget.admit(two_chunks.0, two_chunks.1, 0, &control).await {
            Admission::Admitted(p) => p,
            other => panic!("{other:?}"),
        }
    };
    let first = plain(budget.clone(), control.clone()).await;
    let second = plain(budget.clone(), control.clone()).await;
    assert_eq!(first.restore_allowance(), 0, "no snapshot, no allowance");
    drop((first, second));

    let Admission::Admitted(mut restoring) = budget.admit(two_chunks.0, two_chunks.1, piece, &control).await else {
        panic!("a restore alone fits");
    };
    assert_eq!(restoring.restore_allowance(), piece);
    assert!(
        ops.render_metrics()
            .contains(&format!("ferry_kv_reserved_bytes {}\n", 4 * CACHE_CHUNK)),
        "the worst case and the piece"
    );
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let waiting = {
        let (budget, control) = (budget.clone(), control.clone());
        tokio::spawn(async move {
            let p = plain(budget, control).await;
            let _ = tx.send(());
            p
        })
    };
    while !ops.render_metrics().contains("ferry_kv_admission_waits_total 1\n") {
        tokio::task::yield_now().await;
    }
    assert!(
        rx.try_recv().is_err(),
        "admitted beside a restore it does not fit beside"
    );
    // The restore is done: its piece is given back, and the other fits beside the cache.
    restoring.restored();
    assert_eq!(restoring.restore_allowance(), 0);
    let other = waiting.await.expect("task");
    let text = ops.render_metrics();
    assert!(
        text.contains(&format!("ferry_kv_reserved_bytes {}\n", 4 * CACHE_CHUNK)),
        "two worst cases, no piece: {text}"
    );
    drop((restoring, other));
    assert!(ops.render_metrics().contains("ferry_kv_reserved_bytes 0\n"));
}

#[tokio::test]
async fn a_restore_that_can_never_fit_is_admitted_to_recompute() {
    let budget = KvBudget::new(Some(2 * CACHE_CHUNK as u64), 1, 8192, ops()).expect("budget");
    let control = JobControl::default();
    // The worst case takes the whole budget: no room for the piece, ever. The request is not
    // refused for its snapshot; it resumes without the snapshot's cache.
    match budget.admit(CACHE_CHUNK + 1, 100, CACHE_CHUNK as u64, &control).await {
        Admission::Admitted(p) => assert_eq!(p.restore_allowance(), 0),
        other => panic!("{other:?}"),
    }
    // An unlimited budget lets any restore go ahead.
    let unlimited = KvBudget::new(None, 1, 8192, ops()).expect("budget");
    match unlimited.admit(10, 10, 1 << 40, &control).await {
        Admission::Admitted(p) => assert_eq!(p.restore_allowance(), u64::MAX),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_restore_allowance_is_counted_in_whole_positions() {
    assert_eq!(positions_for(0, 46_080), 0);
    assert_eq!(positions_for(1, 46_080), 1);
    assert_eq!(positions_for(46_080, 46_080), 1);
    assert_eq!(positions_for(46_081, 46_080), 2);
    assert_eq!(positions_for(10, 0), 10, "a zero-byte position counts as one byte");
}

#[test]
fn the_accelerator_default_leaves_a_tenth_and_at_least_512_mib() {
    const GIB: u64 = 1 << 30;
    // An 80 GiB device with the model loaded and 79 GiB free: 8 GiB stay free.
    assert_eq!(accelerator_budget(79 * GIB, 80 * GIB), Some(71 * GIB));
    // A small device keeps at least 512 MiB.
    assert_eq!(accelerator_budget(3 * GIB, 4 * GIB), Some(3 * GIB - 512 * MIB));
    // What others hold of the device is not free: it is left to them.
    assert_eq!(accelerator_budget(10 * GIB, 80 * GIB), Some(2 * GIB));
    assert_eq!(accelerator_budget(8 * GIB, 80 * GIB), None);
    assert_eq!(accelerator_budget(0, 0), None);
    // A driver that reports more free than total is read as all of it free.
    assert_eq!(accelerator_budget(100 * GIB, 80 * GIB), Some(72 * GIB));
}

#[test]
fn without_an_accelerator_there_is_no_accelerator_memory_to_read() {
    assert_eq!(accelerator_memory(&candle_core::Device::Cpu), None);
}
