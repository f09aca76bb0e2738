//! A request's ledger: how many times it has been started, and its answer once it has one.
//!
//! The ledger lives in the snapshot store under the request's snapshot prefix (see
//! [`super::format::snapshot_prefix`]), beside the snapshot itself, so deleting that prefix once
//! the answer is committed removes the ledger too, and the TTL sweep reclaims the ledgers of
//! requests that were never answered. Two keys:
//!
//! - `{prefix}attempts` ([`ATTEMPTS`]): the [`AttemptLog`], one entry per start of the request,
//!   written *before* the generation runs. A worker that dies mid-generation cannot record that it
//!   died, so an entry another worker reads with no outcome means exactly that: the attempt's
//!   worker crashed or lost its node. Counting those entries is what stops a request that kills
//!   every worker it lands on (a poison pill) from taking the whole group down one worker at a
//!   time: once the budget is spent it is dead-lettered instead of run (see
//!   [`AttemptLog::budget_spent`]). The rules (what counts, how attempts are numbered) live on
//!   [`AttemptLog`], whether the log is the store's or the worker's own when there is no store.
//! - `{prefix}done` ([`DONE`]): the final reply's bytes, exactly as published. A request can
//!   finish while an earlier offset of its partition is still running, so its own offset cannot be
//!   committed yet; if the partition is then redelivered, the stored answer is published again
//!   instead of being computed again.
//!
//! The limit: the attempt log is updated by read-modify-write, with no compare-and-swap (no
//! backend offers one across all of them). That is safe because only one worker owns a partition
//! at a time, so only one worker starts or ends attempts of a given request at a time. A worker
//! that froze, lost its partition and came back could still overwrite a newer entry; the cost is
//! a miscounted attempt, never a wrong answer. And because a counted attempt lives only as long as
//! its key, a request redelivered after the snapshot TTL has swept its ledger starts counting
//! again from zero.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::store::{SnapshotStore, StoreError};

/// Key of the attempt log, relative to the request's prefix.
pub const ATTEMPTS: &str = "attempts";
/// Key of the done marker, relative to the request's prefix.
pub const DONE: &str = "done";
/// Version of the attempt log's JSON. Readers treat any other as unreadable.
pub const LOG_VERSION: u32 = 1;

/// Every start of one request, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptLog {
    pub attempts: Vec<AttemptEntry>,
}

/// One start of a request by one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptEntry {
    /// 1 for the first start, then one more than the highest number in the log.
    pub attempt: u32,
    /// The worker that started it.
    pub worker: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_at_ms: i64,
    /// How it ended; `None` while it runs, and forever if its worker died.
    pub outcome: Option<EntryOutcome>,
    /// Why it failed, for the dead-letter record.
    pub error: Option<String>,
    /// It failed because the accelerator ran out of memory ([`ModelError::OutOfMemory`]), so the
    /// next attempt runs alone. Absent from the stored JSON when false (readers that predate it
    /// ignore it).
    ///
    /// [`ModelError::OutOfMemory`]: crate::model::ModelError::OutOfMemory
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub out_of_memory: bool,
}

/// Why an attempt ended badly, as its entry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    pub message: String,
    /// See [`AttemptEntry::out_of_memory`].
    pub out_of_memory: bool,
}

impl From<String> for AttemptError {
    fn from(message: String) -> Self {
        Self {
            message,
            out_of_memory: false,
        }
    }
}

impl From<&str> for AttemptError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

/// How an attempt ended, when its worker lived to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryOutcome {
    /// The generation failed with an error that a retry might not repeat.
    Failed,
    /// The worker stopped it on purpose (a drain, a rebalance) after snapshotting; it says
    /// nothing about the request, so it does not count against the budget.
    Suspended,
    /// The worker could not serve it for a reason of its own (out of memory, breaker open) and
    /// published it to the fallback topic, whose workers answer it. A redelivery of the
    /// original message that finds this entry settles it without serving it again.
    HandedOff,
}

/// Why stored attempt-log bytes could not be read. The log is then started afresh.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Not the JSON of an attempt log: a torn write, or something else under the key.
    #[error("not an attempt log: {0}")]
    Json(#[from] serde_json::Error),
    /// Written by another version of the log.
    #[error("attempt log version {0}, this worker reads {LOG_VERSION}")]
    Version(u32),
}

/// The log as stored: [`AttemptLog`] plus its version.
#[derive(Serialize, Deserialize)]
struct Stored<T> {
    version: u32,
    attempts: T,
}

impl AttemptLog {
    /// The attempts that count against the budget: those that failed, and those whose worker
    /// died (no outcome). Suspended attempts do not count. The attempt still running, if the log
    /// was just returned by [`Snapshots::begin_attempt`](super::Snapshots::begin_attempt), has
    /// no outcome and counts.
    pub fn counted(&self) -> u32 {
        let n = self
            .attempts
            .iter()
            .filter(|e| e.outcome != Some(EntryOutcome::Suspended))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether the attempt just begun must be dead-lettered instead of run: `counted() >
    /// max_attempts`. Called on the log that includes the new attempt, this means the earlier
    /// attempts have already spent the budget: with `max_attempts = 3`, the 4th start of a request
    /// whose 3 earlier attempts died or failed is dead-lettered, while a request that was
    /// suspended any number of times still runs.
    pub fn over_budget(&self, max_attempts: u32) -> bool {
        self.counted() > max_attempts
    }

    /// Whether the attempts so far have spent the budget, so the next start must be
    /// dead-lettered instead of run: [`AttemptLog::over_budget`] asked before the start is
    /// recorded (the start would be counted).
    pub fn budget_spent(&self, max_attempts: u32) -> bool {
        self.counted() >= max_attempts
    }

    /// The most recent attempt: after [`Snapshots::begin_attempt`](super::Snapshots::begin_attempt),
    /// the one just begun.
    pub fn latest(&self) -> Option<&AttemptEntry> {
        self.attempts.last()
    }

    /// Appends a running attempt numbered one above the highest so far, and returns its number.
    pub fn begin(&mut self, worker: &str, started_at_ms: i64) -> u32 {
        let attempt = self
            .attempts
            .iter()
            .map(|e| e.attempt)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        self.attempts.push(AttemptEntry {
            attempt,
            worker: worker.to_string(),
            started_at_ms,
            outcome: None,
            error: None,
            out_of_memory: false,
        });
        attempt
    }

    /// Records how `attempt` ended. Returns false if the log has no such attempt.
    pub fn end(&mut self, attempt: u32, outcome: EntryOutcome, error: Option<AttemptError>) -> bool {
        match self.attempts.iter_mut().rev().find(|e| e.attempt == attempt) {
            Some(entry) => {
                entry.outcome = Some(outcome);
                entry.out_of_memory = error.as_ref().is_some_and(|e| e.out_of_memory);
                entry.error = error.map(|e| e.message);
                true
            }
            None => false,
        }
    }

    /// The stored form: `{"version":1,"attempts":[...]}`.
    pub fn encode(&self) -> Bytes {
        let stored = Stored {
            version: LOG_VERSION,
            attempts: &self.attempts,
        };
        Bytes::from(serde_json::to_vec(&stored).expect("an attempt log always serialises"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, LogError> {
        let stored: Stored<Vec<AttemptEntry>> = serde_json::from_slice(bytes)?;
        if stored.version != LOG_VERSION {
            return Err(LogError::Version(stored.version));
        }
        Ok(Self {
            attempts: stored.attempts,
        })
    }
}

impl AttemptEntry {
    /// This attempt as the dead-letter record's history lists it. No outcome becomes
    /// [`ferry_schemas::AttemptOutcome::Died`]: by the time a record is written, an attempt with no
    /// outcome is not the one running. A start time out of `OffsetDateTime`'s range (only a
    /// corrupted log holds one) becomes the Unix epoch.
    pub fn to_schema(&self) -> ferry_schemas::Attempt {
        let started_at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.started_at_ms) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        ferry_schemas::Attempt {
            attempt: self.attempt,
            worker: self.worker.clone(),
            started_at,
            outcome: match self.outcome {
                None => ferry_schemas::AttemptOutcome::Died,
                Some(EntryOutcome::Failed) => ferry_schemas::AttemptOutcome::Failed,
                Some(EntryOutcome::Suspended) => ferry_schemas::AttemptOutcome::Suspended,
                // The contract has no handed-off outcome: this attempt failed here, and its
                // error says where the request went.
                Some(EntryOutcome::HandedOff) => ferry_schemas::AttemptOutcome::Failed,
            },
            error: self.error.clone(),
        }
    }
}

/// Whether `key` is one of the ledger's keys under `prefix` (with or without its trailing `/`),
/// which discarding a snapshot must leave in place.
pub fn is_ledger_key(prefix: &str, key: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    key.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|name| name == ATTEMPTS || name == DONE)
}

/// Deletes the snapshot under `prefix` (its manifest and pieces) but not the ledger beside it.
pub async fn delete_snapshot_only(store: &dyn SnapshotStore, prefix: &str) -> Result<(), StoreError> {
    for key in store.list(prefix).await? {
        if !is_ledger_key(prefix, &key) {
            store.delete(&key).await?;
        }
    }
    Ok(())
}

/// The ledger operations, on a store. [`super::Snapshots`] exposes them for the consumer.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Arc<dyn SnapshotStore>,
}

impl Ledger {
    pub fn new(store: Arc<dyn SnapshotStore>) -> Self {
        Self { store }
    }

    /// The attempts recorded so far for the request under `prefix` (empty when none, or when the
    /// log cannot be decoded).
    pub async fn read(&self, prefix: &str) -> Result<AttemptLog, StoreError> {
        let key = format!("{prefix}{ATTEMPTS}");
        Ok(match self.store.get(&key).await? {
            None => AttemptLog::default(),
            Some(bytes) => AttemptLog::decode(&bytes).unwrap_or_default(),
        })
    }

    /// Records a new attempt of the request under `prefix`, started now by `worker`, and returns
    /// the log including it. See [`super::Snapshots::begin_attempt`].
    pub async fn begin_attempt(&self, prefix: &str, worker: &str) -> Result<AttemptLog, StoreError> {
        let key = format!("{prefix}{ATTEMPTS}");
        let mut log = match self.store.get(&key).await? {
            None => AttemptLog::default(),
            Some(bytes) => AttemptLog::decode(&bytes).unwrap_or_else(|e| {
                warn!(prefix, error = %e, "unreadable attempt log; counting this request's attempts afresh");
                AttemptLog::default()
            }),
        };
        log.begin(worker, now_ms());
        self.store.put(&key, log.encode()).await?;
        Ok(log)
    }

    /// Records how `attempt` ended. A missing log is left missing: the request's prefix was
    /// deleted once its answer was committed, and must not be brought back.
    pub async fn end_attempt(&self, prefix: &str, attempt: u32, outcome: EntryOutcome, error: Option<AttemptError>) {
        let key = format!("{prefix}{ATTEMPTS}");
        let bytes = match self.store.get(&key).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                debug!(prefix, attempt, "no attempt log to end the attempt in");
                return;
            }
            Err(e) => {
                // The store logs its failures, at most once per interval.
                debug!(prefix, attempt, error = %e, "cannot read the attempt log; the attempt will count as died");
                return;
            }
        };
        let mut log = match AttemptLog::decode(&bytes) {
            Ok(log) => log,
            Err(e) => {
                warn!(prefix, attempt, error = %e, "unreadable attempt log; leaving it for the next start to replace");
                return;
            }
        };
        if !log.end(attempt, outcome, error) {
            warn!(
                prefix,
                attempt, "the attempt log has no such attempt; leaving it as it is"
            );
            return;
        }
        if let Err(e) = self.store.put(&key, log.encode()).await {
            debug!(prefix, attempt, error = %e, "cannot write the attempt log; the attempt will count as died");
        }
    }

    /// Stores the final reply of the request under `prefix`, exactly as published.
    pub async fn put_done(&self, prefix: &str, reply: &[u8]) -> Result<(), StoreError> {
        self.store
            .put(&format!("{prefix}{DONE}"), Bytes::copy_from_slice(reply))
            .await
    }

    /// The stored final reply of the request under `prefix`, if it has one. A store that cannot
    /// be read is logged and treated as no reply: the request is then computed again.
    pub async fn get_done(&self, prefix: &str) -> Option<Bytes> {
        match self.store.get(&format!("{prefix}{DONE}")).await {
            Ok(reply) => reply,
            Err(e) => {
                // The store logs its failures, at most once per interval.
                debug!(prefix, error = %e, "cannot read the done marker; computing the answer again");
                None
            }
        }
    }
}

pub(super) fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::{GenerationParams, Prepared, SamplingParams};
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
            .get(&format!("{PREFIX}attempts"))
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
        async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
            self.0.get(key).await
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
        let prepared = Prepared {
            prompt: vec![1, 2, 3],
            params: GenerationParams {
                sampling: SamplingParams::GREEDY,
                max_tokens: 8,
                stop: Vec::new(),
            },
        };
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
        let prepared = Prepared {
            prompt: vec![1, 2, 3],
            params: GenerationParams {
                sampling: SamplingParams::GREEDY,
                max_tokens: 8,
                stop: Vec::new(),
            },
        };
        assert!(none.find(PREFIX, &prepared).await.is_none());
        assert!(none.writer(PREFIX, &prepared, "w-1", None).is_none());
        // The numbering is the store's: one above the highest, whatever the order.
        let mut gaps = log_of(&[Some(EntryOutcome::Suspended), Some(EntryOutcome::Failed)]);
        gaps.attempts[0].attempt = 7;
        let (log, _) = none.begin_attempt_or(PREFIX, "w-2", &mut gaps).await;
        assert_eq!(log.latest().map(|e| e.attempt), Some(8));
    }
}
