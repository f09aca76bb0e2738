//! Exactly-once delivery (`--delivery exactly-once`): a request's final records and its offset,
//! committed in one Kafka transaction.
//!
//! # How
//!
//! The worker has one transactional producer (`transactional.id` `ferry-<group>-<worker id>`,
//! so a restarted worker of the same name fences its predecessor at once) beside the idempotent
//! one that carries stream chunks, which are a preview outside any transaction. A request task
//! runs inside a [`Scope`]: the first final record it publishes (reply, error reply, dead letter,
//! hand-off) waits for the request's *turn*, then opens a transaction and holds it until the task
//! settles, when the request's offset is added to it (`send_offsets_to_transaction`, with the
//! consumer's group metadata) and the transaction is committed. Readers with `read_committed`
//! (librdkafka's default) see the records only with the offset committed; a worker that dies
//! before that has its transaction aborted (by its successor of the same name, or by the broker
//! after `--transaction-timeout`), and the request is redelivered and answered once.
//!
//! # Turns
//!
//! A committed offset covers everything below it, so a request commits only once every lower
//! offset of its partition is committed: its turn comes when it is the lowest offset its
//! partition still runs. The answers of a partition are released in offset order, and one
//! transaction at a time is open on the producer (each is short: the records and an offset). A
//! request told to suspend while it waits (a drain, a revocation) commits nothing; a plain
//! answer is kept as a done marker, which the partition's next owner publishes in its own
//! transaction instead of computing it again.
//!
//! # Fencing
//!
//! A worker that lost its partition without knowing it (frozen past the session timeout) is a
//! zombie. The group metadata its transaction carries is read under the in-flight lock together
//! with the partition's epoch, so it is that of a generation in which the partition was this
//! worker's; once the partition has moved, the group coordinator refuses the offsets, the
//! transaction is aborted, and no reader sees the zombie's answer.
//!
//! Retries: a failure (the broker away or restarted, a record or an offset commit refused)
//! aborts the transaction and publishes its records again in a new one, until
//! `--publish-timeout`; a fatal one (the producer fenced by a newer worker of the same name, or
//! by the broker after the transaction outlived `--transaction-timeout`) stops the worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_schemas::headers;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedHeaders, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::{info, warn};

use super::inflight::{blocking, InFlight, Turn};
use super::publish::{classify, PublishError};
use super::WorkerError;
use crate::engine::JobControl;
use crate::offsets::TopicPartition;

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// Runs `fut` inside `scope` when there is one (exactly-once delivery), as it is otherwise.
pub async fn within<F: std::future::Future>(scope: Option<Arc<Scope>>, fut: F) -> F::Output {
    match scope {
        Some(s) => SCOPE.scope(s, fut).await,
        None => fut.await,
    }
}

/// The scope of the running task, if any.
pub fn current() -> Option<Arc<Scope>> {
    SCOPE.try_with(Arc::clone).ok()
}

/// The transactional producer, one transaction open at a time.
pub struct Transactions {
    producer: FutureProducer,
    open: Arc<Mutex<()>>,
    /// Longest wait for one call to the broker.
    call_timeout: Duration,
    /// How long a transaction is retried before the worker gives up (`--publish-timeout`).
    retry_for: Duration,
}

/// One request's part in the transactions.
pub struct Scope {
    tp: TopicPartition,
    offset: i64,
    epoch: u64,
    control: Arc<JobControl>,
    inflight: Arc<InFlight>,
    state: Mutex<ScopeState>,
}

#[derive(Default)]
struct ScopeState {
    /// The producer, held while this request's transaction is open.
    open: Option<OwnedMutexGuard<()>>,
    /// The records published in it, to publish again in a new one after an abort; and the one
    /// that was waiting for its turn when the request was told to suspend.
    records: Vec<Kept>,
    /// How many of the first `records` an abort took out of the open transaction.
    unsent: usize,
    /// A transaction is begun on the producer (and not yet committed or aborted).
    in_transaction: bool,
    /// The open transaction cannot commit (a record in it failed): start it again first.
    broken: bool,
}

/// A record as sent, owned.
#[derive(Clone)]
struct Kept {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
}

impl Kept {
    fn of<K: ToBytes + ?Sized>(rec: &FutureRecord<'_, K, [u8]>) -> Self {
        Kept {
            topic: rec.topic.to_string(),
            key: rec.key.map(|k| k.to_bytes().to_vec()),
            payload: rec.payload.map(<[u8]>::to_vec).unwrap_or_default(),
            headers: rec.headers.clone(),
        }
    }

    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut rec = FutureRecord::<[u8], [u8]>::to(&self.topic).payload(&self.payload);
        if let Some(k) = &self.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(h) = &self.headers {
            rec = rec.headers(h.clone());
        }
        rec
    }

    /// Whether it is a final response (not an error reply, a dead letter or a hand-off).
    fn is_response(&self) -> bool {
        self.headers.as_ref().is_some_and(|h| {
            h.iter()
                .any(|x| x.key == headers::KIND && x.value == Some(b"response".as_slice()))
        })
    }
}

/// How a scope's transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Committed with the request's offset.
    Committed,
    /// Not committed: the request was told to suspend before its turn came, or its partition
    /// was revoked. Nothing of it is visible to read_committed readers.
    Suspended,
}

/// What to do after a failed call.
enum Next {
    Retry,
    Abort,
    Stop(WorkerError),
}

fn next(e: &KafkaError) -> Next {
    let txn = match e {
        KafkaError::Transaction(t) => Some(t),
        _ => None,
    };
    match txn {
        Some(t) if t.is_fatal() => Next::Stop(txn_error("fatal", e)),
        Some(t) if t.txn_requires_abort() => Next::Abort,
        Some(t) if t.is_retriable() => Next::Retry,
        // Timeouts and transport errors outside librdkafka's classification: start the
        // transaction again, which is always safe.
        _ => Next::Abort,
    }
}

fn txn_error(what: &str, e: &KafkaError) -> WorkerError {
    WorkerError::Transaction(format!("{what}: {e}"))
}

impl Scope {
    pub fn new(tp: TopicPartition, offset: i64, epoch: u64, control: Arc<JobControl>, inflight: Arc<InFlight>) -> Self {
        Self {
            tp,
            offset,
            epoch,
            control,
            inflight,
            state: Mutex::new(ScopeState::default()),
        }
    }

    /// The request's answer when the request published nothing else: what a done marker may
    /// keep (a dead letter or a hand-off aborted with its transaction must be made again, not
    /// replaced by the reply alone).
    pub async fn answer_only(&self) -> Option<Vec<u8>> {
        let st = self.state.lock().await;
        match st.records.as_slice() {
            [only] if only.is_response() => Some(only.payload.clone()),
            _ => None,
        }
    }

    /// Whether a lower offset of the partition is still to commit first.
    pub fn must_wait(&self) -> bool {
        self.inflight.turn(&self.tp, self.offset, self.epoch) == Turn::Wait
    }

    /// Waits until every lower offset of the partition is committed. `false` when the request
    /// is told to suspend first, or its partition is revoked.
    async fn wait_for_turn(&self) -> bool {
        let mut waited = false;
        loop {
            match self.inflight.turn(&self.tp, self.offset, self.epoch) {
                Turn::Ready => {
                    if waited {
                        info!("lower offsets committed: this request's turn to commit");
                    }
                    return true;
                }
                Turn::Gone => return false,
                Turn::Wait if self.control.suspend.load(std::sync::atomic::Ordering::Acquire) => return false,
                Turn::Wait => {
                    if !waited {
                        info!("answered; waiting for the lower offsets of the partition to commit first");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

impl Transactions {
    pub fn new(producer: FutureProducer, call_timeout: Duration, retry_for: Duration) -> Self {
        Self {
            producer,
            open: Arc::new(Mutex::new(())),
            call_timeout,
            retry_for,
        }
    }

    /// Opens the scope's transaction when it has none: waits for its turn, then for the
    /// producer. `false` when the request must suspend instead.
    async fn ensure_open(&self, scope: &Scope, st: &mut ScopeState) -> Result<bool, WorkerError> {
        if st.open.is_some() {
            return Ok(true);
        }
        if !scope.wait_for_turn().await {
            return Ok(false);
        }
        let guard = self.open.clone().lock_owned().await;
        self.producer
            .begin_transaction()
            .map_err(|e| txn_error("cannot begin a transaction", &e))?;
        st.open = Some(guard);
        st.in_transaction = true;
        Ok(true)
    }

    /// Publishes a final record in the scope's transaction and waits for the broker's
    /// acknowledgement. A refused record is returned as such, so the request goes on as it
    /// would outside a transaction (a dead letter, next); the transaction it spoiled is started
    /// again without it by the commit. Any other failure (the broker away) also leaves the
    /// transaction to be started again: the record is kept, and the commit publishes it again,
    /// or stops the worker once `--publish-timeout` has passed.
    pub async fn send<K: ToBytes + ?Sized>(
        &self,
        scope: &Scope,
        topic: &str,
        rec: FutureRecord<'_, K, [u8]>,
    ) -> Result<(), PublishError> {
        let mut st = scope.state.lock().await;
        let kept = Kept::of(&rec);
        if !self.ensure_open(scope, &mut st).await? {
            st.records.push(kept);
            return Err(PublishError::Suspended);
        }
        if st.broken {
            st.records.push(kept);
            return Ok(());
        }
        match self.producer.send(rec, self.call_timeout).await {
            Ok(_) => {
                st.records.push(kept);
                Ok(())
            }
            Err((e, _)) => {
                st.broken = true;
                match classify(topic, e) {
                    refused @ PublishError::Refused(_) => Err(refused),
                    other => {
                        warn!(error = %other, "publishing in the transaction failed; the commit starts it again");
                        st.records.push(kept);
                        Ok(())
                    }
                }
            }
        }
    }

    /// Aborts the transaction and opens a new one. Its records are published again in it by
    /// the commit, after the offsets: an offset commit the group refuses costs no copies.
    fn restart(&self, st: &mut ScopeState) -> Result<(), KafkaError> {
        self.abort_once(st)?;
        self.producer.begin_transaction()?;
        st.in_transaction = true;
        st.unsent = st.records.len();
        st.broken = false;
        Ok(())
    }

    /// Publishes again the records an abort took out of the transaction.
    async fn replay(&self, st: &mut ScopeState) -> Result<(), KafkaError> {
        for k in &st.records[..st.unsent] {
            self.producer
                .send(k.record(), self.call_timeout)
                .await
                .map_err(|(e, _)| e)?;
        }
        st.unsent = 0;
        Ok(())
    }

    fn abort_once(&self, st: &mut ScopeState) -> Result<(), KafkaError> {
        if st.in_transaction {
            blocking(|| self.producer.abort_transaction(self.call_timeout))?;
            st.in_transaction = false;
        }
        Ok(())
    }

    /// Aborts the open transaction, if any, retrying within `--publish-timeout`, and lets the
    /// producer go.
    async fn abort_open(&self, st: &mut ScopeState) -> Result<(), WorkerError> {
        let deadline = Instant::now() + self.retry_for;
        let had = st.in_transaction;
        loop {
            match self.abort_once(st) {
                Ok(()) => {
                    st.open = None;
                    if had && !st.records.is_empty() {
                        info!(
                            records = st.records.len(),
                            "transaction aborted: none of its records is visible"
                        );
                    }
                    return Ok(());
                }
                Err(e) => match next(&e) {
                    Next::Stop(stop) => return Err(stop),
                    _ if Instant::now() >= deadline => return Err(txn_error("cannot abort a transaction", &e)),
                    _ => {
                        warn!(error = %e, "aborting the transaction failed; trying again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    /// Aborts the scope's transaction if it is still open (the request failed or suspended
    /// after publishing): nothing of it becomes visible.
    pub async fn abort(&self, scope: &Scope) -> Result<(), WorkerError> {
        let mut st = scope.state.lock().await;
        if st.open.is_none() {
            return Ok(());
        }
        self.abort_open(&mut st).await
    }

    /// Commits the scope's records with the request's offset, waiting for its turn when it
    /// has not published anything yet.
    pub async fn commit(
        &self,
        scope: &Scope,
        consumer: &impl Consumer<super::inflight::WorkerContext>,
    ) -> Result<Settled, WorkerError> {
        let mut st = scope.state.lock().await;
        if !self.ensure_open(scope, &mut st).await? {
            return Ok(Settled::Suspended);
        }
        let deadline = Instant::now() + self.retry_for;
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&scope.tp.0, scope.tp.1, Offset::Offset(scope.offset + 1))
            .map_err(|e| txn_error("cannot build the offsets", &e))?;
        let mut offsets_sent = false;
        let mut failures = 0u32;
        loop {
            let failed = 'step: {
                if st.broken {
                    if let Err(e) = self.restart(&mut st) {
                        break 'step e;
                    }
                    offsets_sent = false;
                }
                if !offsets_sent {
                    // Read with the epoch, under the in-flight lock (see the module doc).
                    let Some(metadata) = scope
                        .inflight
                        .while_same_epoch(&scope.tp, scope.epoch, || consumer.group_metadata())
                    else {
                        warn!("the partition was revoked before the commit: aborting the transaction");
                        self.abort_open(&mut st).await?;
                        return Ok(Settled::Suspended);
                    };
                    let metadata = metadata.ok_or_else(|| WorkerError::Transaction("no group metadata".into()))?;
                    #[cfg(feature = "fault-injection")]
                    if !st.records.is_empty() {
                        fault_injection::maybe_freeze();
                    }
                    let sent = blocking(|| {
                        self.producer
                            .send_offsets_to_transaction(&offsets, &metadata, self.call_timeout)
                    });
                    match sent {
                        Ok(()) => offsets_sent = true,
                        Err(e) => break 'step e,
                    }
                }
                if let Err(e) = self.replay(&mut st).await {
                    break 'step e;
                }
                match blocking(|| self.producer.commit_transaction(self.call_timeout)) {
                    Ok(()) => {
                        st.in_transaction = false;
                        st.open = None;
                        return Ok(Settled::Committed);
                    }
                    Err(e) => e,
                }
            };
            if let Next::Stop(stop) = next(&failed) {
                return Err(stop);
            }
            if Instant::now() >= deadline {
                let _ = self.abort_once(&mut st);
                st.open = None;
                return Err(txn_error(
                    &format!("no transaction committed within --publish-timeout {:?}", self.retry_for),
                    &failed,
                ));
            }
            if scope.control.suspend.load(std::sync::atomic::Ordering::Acquire) {
                // A revocation or a drain waits for this request: it gives up rather than retry,
                // its answer left to the partition's next owner.
                warn!(error = %failed, "transaction failed while the request is told to suspend: aborting it");
                self.abort_open(&mut st).await?;
                return Ok(Settled::Suspended);
            }
            failures += 1;
            let backoff = Duration::from_millis(100 << failures.min(4));
            if matches!(next(&failed), Next::Retry) {
                warn!(error = %failed, "transaction step failed; retrying it");
            } else {
                warn!(error = %failed, "transaction failed; starting it again");
                st.broken = true;
            }
            tokio::time::sleep(backoff).await;
        }
    }
}

/// `FERRY_FAULT_FREEZE_BEFORE_COMMIT_FILE=<path>`: when the file exists as a transaction with
/// records is about to send its offsets, the file is removed and the worker stops itself
/// (SIGSTOP), as a node that freezes at the worst moment: its transaction open, its answer
/// published in it. A SIGCONT resumes it where it stood.
#[cfg(feature = "fault-injection")]
mod fault_injection {
    pub fn maybe_freeze() {
        let Some(path) = std::env::var_os("FERRY_FAULT_FREEZE_BEFORE_COMMIT_FILE") else {
            return;
        };
        if std::fs::remove_file(&path).is_ok() {
            tracing::warn!("fault injection: freezing before the commit");
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &std::process::id().to_string()])
                .status();
            tracing::warn!("fault injection: resumed after the freeze");
        }
    }
}
