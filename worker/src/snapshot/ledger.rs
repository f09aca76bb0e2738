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
/// The largest attempt log a reader accepts. An entry is a few hundred bytes (a worker name, two
/// numbers, an outcome, an engine error's message), and a log holds one per start: the budget
/// dead-letters a request after a handful of counted starts, and only suspensions (drains,
/// rebalances) add entries beyond that. A megabyte is thousands of entries; a larger log is read
/// as unreadable, so it is started afresh like a corrupt one.
pub const MAX_ATTEMPT_LOG_BYTES: usize = 1 << 20;
/// The largest done marker a reader accepts unless told otherwise
/// ([`super::Snapshots::with_max_reply_bytes`]): a done marker is a reply record as published,
/// and a record is at most `--max-record-bytes`, which librdkafka's default `message.max.bytes`
/// (1,000,000) bounds.
pub const DEFAULT_MAX_DONE_BYTES: usize = 1_000_000;

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
    /// It failed because its reply topic could not take the answer in time, under exactly-once
    /// delivery, where the transaction that touched that topic stops the worker: the attempt
    /// counts, and once the budget is spent the request is dead-lettered as
    /// `reply_topic_unwritable`, with no error reply to that topic. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reply_unwritable: bool,
}

/// Why an attempt ended badly, as its entry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    pub message: String,
    /// See [`AttemptEntry::out_of_memory`].
    pub out_of_memory: bool,
    /// See [`AttemptEntry::reply_unwritable`].
    pub reply_unwritable: bool,
}

impl From<String> for AttemptError {
    fn from(message: String) -> Self {
        Self {
            message,
            out_of_memory: false,
            reply_unwritable: false,
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
    /// max_attempts`, the budget rule of [`AttemptLog::budget_spent`] asked after the start is
    /// recorded (the worker asks before). Called on the log that includes the new attempt, this
    /// means the earlier attempts have already spent the budget: with `max_attempts = 3`, the 4th start of a request
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
            reply_unwritable: false,
        });
        attempt
    }

    /// Records how `attempt` ended. Returns false if the log has no such attempt.
    pub fn end(&mut self, attempt: u32, outcome: EntryOutcome, error: Option<AttemptError>) -> bool {
        match self.attempts.iter_mut().rev().find(|e| e.attempt == attempt) {
            Some(entry) => {
                entry.outcome = Some(outcome);
                entry.out_of_memory = error.as_ref().is_some_and(|e| e.out_of_memory);
                entry.reply_unwritable = error.as_ref().is_some_and(|e| e.reply_unwritable);
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
/// The manifest goes first and by name, whether a listing shows it or not: it is the commit
/// point, and what stands under its key may be no value a listing shows (a file store lists
/// regular files only, and a manifest refused for being a link must still go).
pub async fn delete_snapshot_only(store: &dyn SnapshotStore, prefix: &str) -> Result<(), StoreError> {
    let manifest = format!("{prefix}{}", super::format::MANIFEST);
    store.delete(&manifest).await?;
    for key in store.list(prefix).await? {
        if !is_ledger_key(prefix, &key) && key != manifest {
            store.delete(&key).await?;
        }
    }
    Ok(())
}

/// The ledger operations, on a store. [`super::Snapshots`] exposes them for the consumer.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Arc<dyn SnapshotStore>,
    /// The largest done marker to read: the largest reply this worker would publish. A larger
    /// one (kept by a worker allowed larger records) is ignored, and the answer computed again.
    max_done_bytes: usize,
}

impl Ledger {
    /// The ledger in `store`, reading done markers of at most `max_done_bytes`.
    pub fn new(store: Arc<dyn SnapshotStore>, max_done_bytes: usize) -> Self {
        Self { store, max_done_bytes }
    }

    /// The attempt log's bytes, if there is a log. One too large to read is logged and read as
    /// no log, like one that cannot be decoded.
    async fn read_log(&self, prefix: &str) -> Result<Option<Bytes>, StoreError> {
        match self
            .store
            .get(&format!("{prefix}{ATTEMPTS}"), MAX_ATTEMPT_LOG_BYTES)
            .await
        {
            Err(e) if e.is_refused_value() => {
                warn!(prefix, error = %e, "unreadable attempt log; counting this request's attempts afresh");
                Ok(None)
            }
            read => read,
        }
    }

    /// The attempts recorded so far for the request under `prefix` (empty when none, or when the
    /// log cannot be decoded).
    pub async fn read(&self, prefix: &str) -> Result<AttemptLog, StoreError> {
        Ok(match self.read_log(prefix).await? {
            None => AttemptLog::default(),
            Some(bytes) => AttemptLog::decode(&bytes).unwrap_or_default(),
        })
    }

    /// Records a new attempt of the request under `prefix`, started now by `worker`, and returns
    /// the log including it. See [`super::Snapshots::begin_attempt`].
    pub async fn begin_attempt(&self, prefix: &str, worker: &str) -> Result<AttemptLog, StoreError> {
        let key = format!("{prefix}{ATTEMPTS}");
        let mut log = match self.read_log(prefix).await? {
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
        let bytes = match self.read_log(prefix).await {
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
    /// be read is logged and treated as no reply, and so is a marker larger than a reply may be:
    /// the request is then computed again.
    pub async fn get_done(&self, prefix: &str) -> Option<Bytes> {
        match self.store.get(&format!("{prefix}{DONE}"), self.max_done_bytes).await {
            Ok(reply) => reply,
            Err(e) if e.is_refused_value() => {
                warn!(prefix, error = %e, "ignoring a done marker that cannot be a reply; computing the answer again");
                None
            }
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
mod tests;
