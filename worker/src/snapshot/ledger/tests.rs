use std::time::Duration;

use super::*;
use crate::engine::Prepared;
use crate::model::LlamaConfig;
use crate::snapshot::{format, store, Snapshots};

const PREFIX: &str = "ferry/0123456789abcdef0123456789abcdef/";

fn entry(attempt: u32, outcome: Option<EntryOutcome>) -> AttemptEntry {
    AttemptEntry {
        attempt,
        worker: format!("w-{attempt}"),
        started_at_ms: 1_700_000_000_000 + i64::from(attempt),
        outcome,
        error: None,
        out_of_memory: false,
        reply_unwritable: false,
    }
}

fn log_of(outcomes: &[Option<EntryOutcome>]) -> AttemptLog {
    AttemptLog {
        attempts: outcomes.iter().zip(1..).map(|(o, n)| entry(n, *o)).collect(),
    }
}

async fn memory() -> Arc<dyn SnapshotStore> {
    store::open("memory://", Duration::from_secs(3600))
        .await
        .expect("memory store")
}

async fn file() -> (tempfile::TempDir, Arc<dyn SnapshotStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::FileStore::open(dir.path().join("snapshots"))
        .await
        .expect("file store");
    (dir, Arc::new(store))
}

fn snapshots(store: Arc<dyn SnapshotStore>) -> Snapshots {
    let config = LlamaConfig {
        n_layer: 2,
        n_head: 2,
        n_kv_head: 1,
        head_dim: 4,
        embedding_length: 8,
        context_length: 64,
        rms_norm_eps: 1e-5,
        rope_freq_base: 10_000.0,
        vocab_size: 32,
    };
    Snapshots::for_tests(store, config)
}

async fn keys(store: &dyn SnapshotStore) -> Vec<String> {
    store.list(PREFIX).await.expect("list")
}

#[test]
fn died_and_failed_attempts_count_and_suspended_ones_do_not() {
    use EntryOutcome::{Failed, Suspended};
    assert_eq!(AttemptLog::default().counted(), 0);
    assert_eq!(log_of(&[None, Some(Failed), Some(Suspended), None]).counted(), 3);
    assert_eq!(log_of(&[Some(Suspended); 5]).counted(), 0);
}

#[test]
fn the_start_after_the_budget_is_spent_is_over_it() {
    use EntryOutcome::{Failed, Suspended};
    // Each log ends with the attempt just begun, as `begin_attempt` returns it.
    assert!(!log_of(&[None]).over_budget(3));
    assert!(!log_of(&[None, Some(Failed), None]).over_budget(3), "3rd start runs");
    assert!(
        log_of(&[None, Some(Failed), None, None]).over_budget(3),
        "4th start after 3 is dead-lettered"
    );
    assert!(
        !log_of(&[
            Some(Suspended),
            None,
            Some(Suspended),
            Some(Failed),
            Some(Suspended),
            None
        ])
        .over_budget(3),
        "suspensions spend no budget"
    );
    assert!(log_of(&[None]).over_budget(0), "a budget of 0 runs nothing");
}

#[test]
fn attempts_are_numbered_above_the_highest_and_end_finds_theirs() {
    let mut log = log_of(&[None, None]);
    log.attempts.swap(0, 1);
    assert_eq!(log.begin("w-9", 5), 3);
    assert_eq!(log.latest().map(|e| (e.attempt, e.worker.as_str())), Some((3, "w-9")));
    assert!(log.end(1, EntryOutcome::Failed, Some("boom".into())));
    assert!(!log.end(7, EntryOutcome::Failed, None), "no attempt 7");
    let first = log.attempts.iter().find(|e| e.attempt == 1).expect("attempt 1");
    assert_eq!(
        (first.outcome, first.error.as_deref()),
        (Some(EntryOutcome::Failed), Some("boom"))
    );
    assert_eq!(log.attempts.iter().filter(|e| e.outcome.is_some()).count(), 1);
}

#[test]
fn the_stored_log_has_the_documented_shape() {
    let mut log = log_of(&[Some(EntryOutcome::Failed), Some(EntryOutcome::Suspended), None]);
    log.attempts[0].error = Some("out of memory".into());
    let json: serde_json::Value = serde_json::from_slice(&log.encode()).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"version": 1, "attempts": [
            {"attempt": 1, "worker": "w-1", "started_at_ms": 1_700_000_000_001_i64, "outcome": "failed", "error": "out of memory"},
            {"attempt": 2, "worker": "w-2", "started_at_ms": 1_700_000_000_002_i64, "outcome": "suspended", "error": null},
            {"attempt": 3, "worker": "w-3", "started_at_ms": 1_700_000_000_003_i64, "outcome": null, "error": null},
        ]})
    );
    assert_eq!(AttemptLog::decode(&log.encode()).expect("decode"), log);
    assert!(matches!(
        AttemptLog::decode(br#"{"version":2,"attempts":[]}"#),
        Err(LogError::Version(2))
    ));
    assert!(matches!(
        AttemptLog::decode(b"{\"version\":1,\"att"),
        Err(LogError::Json(_))
    ));
}

#[test]
fn history_maps_no_outcome_to_died() {
    let mut log = log_of(&[None, Some(EntryOutcome::Failed), Some(EntryOutcome::Suspended)]);
    log.attempts[1].error = Some("boom".into());
    let history: Vec<_> = log.attempts.iter().map(AttemptEntry::to_schema).collect();
    let outcomes: Vec<_> = history.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [
            ferry_schemas::AttemptOutcome::Died,
            ferry_schemas::AttemptOutcome::Failed,
            ferry_schemas::AttemptOutcome::Suspended
        ]
    );
    assert_eq!((history[1].attempt, history[1].worker.as_str()), (2, "w-2"));
    assert_eq!(history[1].error.as_deref(), Some("boom"));
    assert_eq!(
        history[0].started_at,
        time::OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("in range") + Duration::from_millis(1)
    );
    let mut corrupt = entry(1, None);
    corrupt.started_at_ms = i64::MAX;
    assert_eq!(corrupt.to_schema().started_at, time::OffsetDateTime::UNIX_EPOCH);
}

#[test]
fn only_the_two_ledger_keys_are_ledger_keys() {
    for prefix in [PREFIX, PREFIX.trim_end_matches('/')] {
        assert!(is_ledger_key(prefix, &format!("{PREFIX}attempts")));
        assert!(is_ledger_key(prefix, &format!("{PREFIX}done")));
        for key in ["manifest", "piece-000001-0abc1234", "attempts-old", "done/x", ""] {
            assert!(!is_ledger_key(prefix, &format!("{PREFIX}{key}")), "{key:?}");
        }
    }
    assert!(!is_ledger_key(PREFIX, "ferry/other/attempts"));
    assert!(!is_ledger_key("ferry/ab/", "ferry/abc/attempts"));
}

/// Five workers take the same request in turn; some die, one is drained, one fails.
async fn attempts_across_workers(store: Arc<dyn SnapshotStore>) {
    let snaps = snapshots(store.clone());
    let max_attempts = 3;

    // w-1 starts and dies: nothing ends its attempt.
    let log = snaps.begin_attempt(PREFIX, "w-1").await.expect("begin");
    assert_eq!((log.latest().map(|e| e.attempt), log.counted()), (Some(1), 1));

    // w-2 sees w-1's attempt with no outcome, and is drained.
    let log = snaps.begin_attempt(PREFIX, "w-2").await.expect("begin");
    assert_eq!(log.attempts.len(), 2);
    assert_eq!(
        (log.attempts[0].worker.as_str(), log.attempts[0].outcome),
        ("w-1", None)
    );
    snaps.end_attempt(PREFIX, 2, EntryOutcome::Suspended, None).await;

    // w-3 fails.
    let log = snaps.begin_attempt(PREFIX, "w-3").await.expect("begin");
    assert_eq!(
        (log.latest().map(|e| e.attempt), log.counted()),
        (Some(3), 2),
        "the suspension is not counted"
    );
    assert!(!log.over_budget(max_attempts));
    snaps
        .end_attempt(PREFIX, 3, EntryOutcome::Failed, Some("boom".into()))
        .await;

    // w-4 is the third counted attempt: it runs, and dies.
    let log = snaps.begin_attempt(PREFIX, "w-4").await.expect("begin");
    assert_eq!(log.counted(), 3);
    assert!(!log.over_budget(max_attempts));

    // w-5 would be the fourth: dead-lettered, with the whole history.
    let log = snaps.begin_attempt(PREFIX, "w-5").await.expect("begin");
    assert!(log.over_budget(max_attempts));
    let outcomes: Vec<_> = log
        .attempts
        .iter()
        .map(|e| (e.attempt, e.outcome, e.error.as_deref()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (1, None, None),
            (2, Some(EntryOutcome::Suspended), None),
            (3, Some(EntryOutcome::Failed), Some("boom")),
            (4, None, None),
            (5, None, None),
        ]
    );
    let stored = store
        .get(&format!("{PREFIX}attempts"), MAX_ATTEMPT_LOG_BYTES)
        .await
        .expect("get")
        .expect("the log is stored");
    assert_eq!(AttemptLog::decode(&stored).expect("decode"), log);
}

#[tokio::test]
async fn attempts_are_counted_across_workers_in_memory() {
    attempts_across_workers(memory().await).await;
}

#[tokio::test]
async fn attempts_are_counted_across_workers_on_disk() {
    let (_dir, store) = file().await;
    attempts_across_workers(store).await;
}

#[tokio::test]
async fn an_unreadable_log_starts_afresh() {
    let store = memory().await;
    let snaps = snapshots(store.clone());
    for garbage in [&b"\x00not json"[..], br#"{"version":99,"attempts":[]}"#] {
        store
            .put(&format!("{PREFIX}attempts"), Bytes::copy_from_slice(garbage))
            .await
            .expect("put");
        // Ending an attempt in an unreadable log leaves it for the next start to replace.
        snaps.end_attempt(PREFIX, 1, EntryOutcome::Failed, None).await;
        let log = snaps.begin_attempt(PREFIX, "w-1").await.expect("begin");
        assert_eq!(log.attempts.len(), 1);
        assert_eq!((log.attempts[0].attempt, log.counted()), (1, 1));
    }
}

#[tokio::test]
async fn ending_an_attempt_never_brings_a_deleted_ledger_back() {
    let store = memory().await;
    let snaps = snapshots(store.clone());
    let log = snaps.begin_attempt(PREFIX, "w-1").await.expect("begin");
    snaps.delete(PREFIX).await;
    let attempt = log.latest().expect("an attempt").attempt;
    snaps.end_attempt(PREFIX, attempt, EntryOutcome::Suspended, None).await;
    assert_eq!(keys(store.as_ref()).await, Vec::<String>::new());
}

async fn done_markers(store: Arc<dyn SnapshotStore>) {
    let snaps = snapshots(store.clone());
    assert_eq!(snaps.get_done(PREFIX).await, None);
    let reply = br#"{"version":1,"request_id":"r-1","text":"caf\u00e9 \n"}"#;
    snaps.put_done(PREFIX, reply).await.expect("put_done");
    assert_eq!(
        snaps.get_done(PREFIX).await.as_deref(),
        Some(&reply[..]),
        "byte for byte"
    );

    // Committing the answer deletes the whole prefix: snapshot and ledger alike.
    snaps.begin_attempt(PREFIX, "w-1").await.expect("begin");
    store
        .put(&format!("{PREFIX}manifest"), Bytes::from_static(b"m"))
        .await
        .expect("put");
    assert_eq!(keys(store.as_ref()).await.len(), 3);
    snaps.delete(PREFIX).await;
    assert_eq!(keys(store.as_ref()).await, Vec::<String>::new());
    assert_eq!(snaps.get_done(PREFIX).await, None);
}

#[tokio::test]
async fn done_markers_round_trip_and_go_with_the_prefix_in_memory() {
    done_markers(memory().await).await;
}

#[tokio::test]
async fn done_markers_round_trip_and_go_with_the_prefix_on_disk() {
    let (_dir, store) = file().await;
    done_markers(store).await;
}

/// A store that refuses to list or to delete by prefix: what Redis would do by walking the
/// whole keyspace.
#[derive(Debug)]
struct NoListing(Arc<dyn SnapshotStore>);

#[async_trait::async_trait]
impl SnapshotStore for NoListing {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.0.put(key, value).await
    }
    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
        self.0.get(key, max_bytes).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        panic!("delete_prefix({prefix}) walks the store")
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        panic!("list({prefix}) walks the store")
    }
    async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, StoreError> {
        self.0.sweep_expired(prefix, ttl).await
    }
}

#[tokio::test]
async fn a_finished_requests_keys_are_deleted_by_name() {
    let store = memory().await;
    let snaps = snapshots(Arc::new(NoListing(store.clone())));
    let piece = |name: &str| format::PieceRef {
        name: name.into(),
        from: 0,
        to: 1,
        bytes: 1,
        crc32: 0,
    };
    let manifest = format::Manifest {
        version: format::FORMAT_VERSION,
        model: "m".into(),
        request: "r".into(),
        prompt_len: 1,
        tokens: vec![7, 8],
        pieces: vec![piece("piece-000001-0abc1234"), piece("piece-000002-0abc1234")],
        attempt: 1,
        worker: "w-1".into(),
        seq: 2,
    };
    let other = "ferry/fedcba9876543210fedcba9876543210/manifest";
    for (key, value) in [
        (format!("{PREFIX}manifest"), Bytes::from(manifest.encode())),
        (format!("{PREFIX}piece-000001-0abc1234"), Bytes::from_static(b"kv")),
        (format!("{PREFIX}piece-000002-0abc1234"), Bytes::from_static(b"kv")),
        (other.to_string(), Bytes::from_static(b"another request's")),
    ] {
        store.put(&key, value).await.expect("put");
    }
    snaps.begin_attempt(PREFIX, "w-1").await.expect("begin");
    snaps.put_done(PREFIX, b"{}").await.expect("put_done");

    snaps.delete(PREFIX).await;
    assert_eq!(
        store.list("").await.expect("list"),
        [other],
        "only the other request's key is left"
    );
}

async fn discard_keeps_the_ledger(store: Arc<dyn SnapshotStore>) {
    let snaps = snapshots(store.clone());
    snaps.begin_attempt(PREFIX, "w-1").await.expect("begin");
    snaps.put_done(PREFIX, b"{}").await.expect("put_done");
    store
        .put(&format!("{PREFIX}manifest"), Bytes::from_static(b"not a manifest"))
        .await
        .expect("put");
    store
        .put(&format!("{PREFIX}piece-000001-0abc1234"), Bytes::from_static(b"kv"))
        .await
        .expect("put");
    let prepared = greedy_prepared();
    assert!(snaps.find(PREFIX, &prepared).await.is_none());
    assert_eq!(snaps.stats.discarded.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        keys(store.as_ref()).await,
        [format!("{PREFIX}attempts"), format!("{PREFIX}done")],
        "the snapshot is gone and the ledger stays"
    );
    let log = snaps.begin_attempt(PREFIX, "w-2").await.expect("begin");
    assert_eq!(log.counted(), 2, "the first attempt is still counted");
    assert_eq!(
        format::snapshot_prefix("t", "r").len(),
        PREFIX.len(),
        "PREFIX is shaped like a real one"
    );
}

#[tokio::test]
async fn discarding_a_bad_snapshot_keeps_the_ledger_in_memory() {
    discard_keeps_the_ledger(memory().await).await;
}

#[tokio::test]
async fn discarding_a_bad_snapshot_keeps_the_ledger_on_disk() {
    let (_dir, store) = file().await;
    discard_keeps_the_ledger(store).await;
}

#[tokio::test]
async fn without_a_store_attempts_are_counted_in_the_requests_own_log_by_the_same_rules() {
    let none = Snapshots::none(snapshots(Arc::new(store::NoStore)).config.clone());
    assert!(!none.keeps());
    let mut local = AttemptLog::default();
    for expected in 1..=3u32 {
        assert_eq!(none.attempts_or(PREFIX, &local).await, local, "the request's own log");
        let (log, durable) = none.begin_attempt_or(PREFIX, "w-1", &mut local).await;
        assert!(!durable, "nothing is kept");
        assert_eq!(log.latest().map(|e| e.attempt), Some(expected));
        assert_eq!(log, local);
        // Ending it is the caller's to record in its own log; the service keeps nothing.
        none.end_attempt(PREFIX, expected, EntryOutcome::Failed, Some("boom".into()))
            .await;
        assert!(local.end(expected, EntryOutcome::Failed, Some("boom".into())));
    }
    assert!(local.budget_spent(3) && !local.budget_spent(4));
    assert!(!none.put_done(PREFIX, b"{}").await.expect("no store, no error"));
    assert!(none.get_done(PREFIX).await.is_none());
    let prepared = greedy_prepared();
    assert!(none.find(PREFIX, &prepared).await.is_none());
    assert!(none.writer(PREFIX, &prepared, "w-1", None).is_none());
    // The numbering is the store's: one above the highest, whatever the order.
    let mut gaps = log_of(&[Some(EntryOutcome::Suspended), Some(EntryOutcome::Failed)]);
    gaps.attempts[0].attempt = 7;
    let (log, _) = none.begin_attempt_or(PREFIX, "w-2", &mut gaps).await;
    assert_eq!(log.latest().map(|e| e.attempt), Some(8));
}

/// A short greedy request, for the lookups that must find nothing.
fn greedy_prepared() -> Prepared {
    Prepared::greedy(vec![1, 2, 3], 8)
}

/// A done marker is read no larger than the largest reply the worker publishes: a larger one is
/// ignored, and the answer computed again.
#[tokio::test]
async fn a_done_marker_larger_than_a_reply_is_ignored() {
    let (_dir, store) = file().await;
    let snaps = snapshots(store.clone()).with_max_reply_bytes(1000);
    snaps.put_done(PREFIX, &[b'x'; 1000]).await.expect("put_done");
    assert_eq!(snaps.get_done(PREFIX).await.map(|b| b.len()), Some(1000));
    snaps.put_done(PREFIX, &[b'x'; 1001]).await.expect("put_done");
    assert_eq!(snaps.get_done(PREFIX).await, None);
}

/// An attempt log over [`MAX_ATTEMPT_LOG_BYTES`] is read as an unreadable one: the count starts
/// afresh, and the request is still counted in the store rather than not at all.
#[tokio::test]
async fn an_attempt_log_over_its_cap_is_started_afresh() {
    let (_dir, store) = file().await;
    let snaps = snapshots(store.clone());
    store
        .put(
            &format!("{PREFIX}{ATTEMPTS}"),
            Bytes::from(vec![b' '; MAX_ATTEMPT_LOG_BYTES + 1]),
        )
        .await
        .expect("put");
    assert_eq!(snaps.attempts(PREFIX).await.expect("read").counted(), 0);
    let log = snaps.begin_attempt(PREFIX, "w-1").await.expect("begin");
    assert_eq!(log.latest().map(|e| e.attempt), Some(1));
    assert_eq!(
        snaps.attempts(PREFIX).await.expect("read"),
        log,
        "the fresh log replaced it"
    );
}
