//! KV-cache snapshots: how a generation survives its worker.
//!
//! While a sequence generates, the engine hands the positions added since the last snapshot to
//! a [`writer::SnapshotWriter`] every N tokens or T milliseconds; the writer stores them off the
//! decode path ([`store`]), in the self-checking incremental [`format`]. A worker that receives a
//! request first looks for its snapshot ([`resume`]); if one verifies, the generation continues
//! from it, token for token what the uninterrupted run would have produced.
//!
//! A snapshot can never make an answer wrong: whatever does not verify is discarded and the
//! request starts from the beginning.
//!
//! Beside each snapshot, under the same prefix, the request's [`ledger`] counts its attempts
//! and keeps its answer until the answer's offset is committed.
//!
//! Nor can a sick store stop an answer: every store call has a deadline
//! (`--snapshot-store-timeout`, see [`store::DeadlineStore`]), and whatever fails or times out is
//! served around: no snapshot, no ledger entry, the answer computed again. Looking for a snapshot
//! has an overall deadline too ([`FIND_CALLS`] store timeouts), and stopping a writer never waits
//! long (see [`writer`]).

mod device;
pub use device::{device_fingerprint, gpu_fingerprint};
pub mod format;
pub mod ledger;
pub mod policy;
pub mod resume;
pub mod store;
pub mod writer;

pub use policy::{ResumeMode, SnapshotPolicy, SnapshotStats};
pub use resume::{load, Restored};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
pub use writer::SnapshotWriter;

use bytes::Bytes;
use candle_core::Device;
use tracing::{debug, info, warn};

use crate::engine::{Prepared, ResumeFrom};
use crate::model::{LlamaConfig, Model};
use format::{KvShape, Manifest};
use ledger::{AttemptLog, EntryOutcome, Ledger};
use writer::{ChainStart, SnapshotIdentity, SnapshotSink};

/// The default of `--snapshot-store-timeout`: the deadline of one store call.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// Looking for a snapshot (a manifest and the pieces it names) may take this many store
/// timeouts in all before the request starts from the beginning instead.
pub const FIND_CALLS: u32 = 4;

/// The worker's snapshot service: the store, the policy, and what identifies this model.
#[derive(Debug, Clone)]
pub struct Snapshots {
    /// The store, behind a [`store::DeadlineStore`]: every call through it has a deadline.
    pub store: Arc<dyn store::SnapshotStore>,
    /// The backend behind `store`'s deadlines, to set other deadlines on.
    backend: Arc<dyn store::SnapshotStore>,
    /// The deadline of one store call.
    store_timeout: Duration,
    /// The largest done marker to read back: the largest reply this worker publishes.
    max_reply_bytes: usize,
    pub stats: Arc<SnapshotStats>,
    pub policy: SnapshotPolicy,
    model_fingerprint: String,
    config: LlamaConfig,
    device: Device,
    /// False for [`Snapshots::none`]: nothing is kept, and the attempts are counted in the
    /// request's own log.
    keeps: bool,
}

/// A snapshot found for a request, and how to continue from it.
#[derive(Debug)]
pub struct Found {
    pub resume: ResumeFrom,
    pub manifest: Manifest,
}

impl Snapshots {
    pub fn new(
        store: Arc<dyn store::SnapshotStore>,
        policy: SnapshotPolicy,
        model: &Model,
        weights: &str,
        device: &Device,
    ) -> Self {
        let device_name = device_fingerprint(device, model.weights.kernels());
        let stats = Arc::new(SnapshotStats::default());
        Self {
            store: bounded(store.clone(), DEFAULT_STORE_TIMEOUT, &stats),
            backend: store,
            store_timeout: DEFAULT_STORE_TIMEOUT,
            max_reply_bytes: ledger::DEFAULT_MAX_DONE_BYTES,
            stats,
            policy,
            model_fingerprint: format::model_fingerprint(&model.sha256, weights, &device_name),
            config: model.weights.config.clone(),
            device: device.clone(),
            keeps: true,
        }
    }

    /// A service over `store` for a model described only by `config`, on the CPU: enough for
    /// tests that never load a model.
    #[cfg(test)]
    pub(crate) fn for_tests(store: Arc<dyn store::SnapshotStore>, config: LlamaConfig) -> Self {
        // The service that keeps nothing, given a store to keep things in.
        let none = Self::none(config);
        Self {
            store: bounded(store.clone(), DEFAULT_STORE_TIMEOUT, &none.stats),
            backend: store,
            model_fingerprint: format::model_fingerprint("test", "f32", "cpu"),
            keeps: true,
            ..none
        }
    }

    /// The service of a worker without `--snapshot-store`, which keeps nothing: its store is
    /// [`store::NoStore`] and its policy takes no snapshots, so no snapshot is written or found
    /// and no done marker kept, and [`Snapshots::begin_attempt_or`] counts attempts in the
    /// request's own log. Its statistics stay at zero.
    pub fn none(config: LlamaConfig) -> Self {
        let store: Arc<dyn store::SnapshotStore> = Arc::new(store::NoStore);
        Self {
            store: store.clone(),
            backend: store,
            store_timeout: DEFAULT_STORE_TIMEOUT,
            max_reply_bytes: ledger::DEFAULT_MAX_DONE_BYTES,
            stats: Arc::new(SnapshotStats::default()),
            policy: SnapshotPolicy {
                every_tokens: 0,
                every: None,
                mode: ResumeMode::Auto,
                max_pieces: 8,
            },
            model_fingerprint: String::new(),
            config,
            device: Device::Cpu,
            keeps: false,
        }
    }

    /// Whether anything is kept: false for [`Snapshots::none`].
    pub fn keeps(&self) -> bool {
        self.keeps
    }

    /// The same service with a deadline of `timeout` on every store call
    /// (`--snapshot-store-timeout`) instead of [`DEFAULT_STORE_TIMEOUT`].
    pub fn with_store_timeout(mut self, timeout: Duration) -> Self {
        self.store = bounded(self.backend.clone(), timeout, &self.stats);
        self.store_timeout = timeout;
        self
    }

    /// The same service reading back done markers of at most `bytes` (`--max-record-bytes`, the
    /// largest reply the worker publishes) instead of [`ledger::DEFAULT_MAX_DONE_BYTES`].
    pub fn with_max_reply_bytes(mut self, bytes: usize) -> Self {
        self.max_reply_bytes = bytes;
        self
    }

    /// The deadline of one store call.
    pub fn store_timeout(&self) -> Duration {
        self.store_timeout
    }

    pub fn shape(&self) -> KvShape {
        KvShape {
            n_layer: self.config.n_layer as u32,
            n_kv_head: self.config.n_kv_head as u32,
            head_dim: self.config.head_dim as u32,
        }
    }

    /// The memory beyond the cache that restoring the request's snapshot would hold
    /// ([`resume::restore_overhead_bytes`]: its largest piece), for admission to reserve before
    /// [`Snapshots::find`] restores it; 0 when there is no snapshot of this model and request
    /// with a cache, and when the manifest cannot be read (the restore then finds what it finds
    /// within that allowance). One store read, of the manifest only.
    pub async fn restore_overhead(&self, prefix: &str, prepared: &Prepared) -> u64 {
        if !self.keeps {
            return 0;
        }
        let request = format::request_fingerprint(&prepared.prompt, &prepared.params);
        let limit = format::max_manifest_bytes(self.config.context_length);
        match self.store.get(&format!("{prefix}{}", format::MANIFEST), limit).await {
            Ok(Some(bytes)) => Manifest::decode(&bytes, &self.model_fingerprint, &request)
                .map_or(0, |m| resume::restore_overhead_bytes(&m)),
            Ok(None) => 0,
            Err(e) => {
                // The store logs its failures, at most once per interval.
                debug!(prefix, error = %e, "cannot read the snapshot's manifest to size its restore");
                0
            }
        }
    }

    /// Looks for a verified snapshot of the request. A snapshot that does not verify is logged,
    /// counted, deleted (its manifest and pieces; the request's [`ledger`] stays), and the request
    /// starts from the beginning. So does one that cannot be read, whole, within [`FIND_CALLS`]
    /// store timeouts. Every read is bounded: the manifest by the model's context
    /// ([`format::max_manifest_bytes`]), each piece by the positions the manifest gives it; a
    /// larger blob does not verify. Its restore may hold whatever it needs: see
    /// [`Snapshots::find_within`].
    pub async fn find(&self, prefix: &str, prepared: &Prepared) -> Option<Found> {
        self.find_within(prefix, prepared, u64::MAX).await
    }

    /// [`Snapshots::find`], for a restore that may hold at most `allowance` bytes beside the
    /// cache (what admission reserved, see [`Snapshots::restore_overhead`]): a snapshot that
    /// needs more is resumed from its tokens, its cache recomputed.
    pub async fn find_within(&self, prefix: &str, prepared: &Prepared, allowance: u64) -> Option<Found> {
        if !self.keeps {
            return None;
        }
        let request = format::request_fingerprint(&prepared.prompt, &prepared.params);
        let bound = self.store_timeout.saturating_mul(FIND_CALLS);
        let loaded = tokio::time::timeout(
            bound,
            resume::load_within(
                &self.store,
                prefix,
                &self.model_fingerprint,
                &request,
                &self.config,
                &self.device,
                allowance,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            let e = store::StoreError::Timeout {
                op: "get",
                after: bound,
            };
            // Counted and logged as the store's own failures are.
            self.stats.store_faults.record(store::StoreOp::Get, &e);
            Err(resume::ResumeError::Store(e))
        });
        match loaded {
            Ok(Some(r)) => {
                self.stats.resumed.fetch_add(1, Relaxed);
                let recomputed = if r.cache.is_some() {
                    0
                } else {
                    r.manifest.tokens.len() as u64
                };
                self.stats.tokens_recomputed.fetch_add(recomputed, Relaxed);
                info!(prefix, tokens = r.manifest.tokens.len(), with_cache = r.cache.is_some(),
                    from_worker = %r.manifest.worker, "resuming from snapshot");
                Some(Found {
                    resume: ResumeFrom {
                        tokens: r.manifest.tokens.clone(),
                        cache: r.cache,
                    },
                    manifest: r.manifest,
                })
            }
            Ok(None) => None,
            Err(resume::ResumeError::Store(e)) => {
                // The store logs its failures, at most once per interval.
                debug!(prefix, error = %e, "cannot read the snapshot store; starting from the beginning");
                None
            }
            Err(e) => {
                self.stats.discarded.fetch_add(1, Relaxed);
                warn!(prefix, error = %e, "discarding a snapshot that does not verify; starting from the beginning");
                if let Err(e) = ledger::delete_snapshot_only(self.store.as_ref(), prefix).await {
                    debug!(prefix, error = %e, "cannot delete the discarded snapshot; it will be overwritten or expire");
                }
                None
            }
        }
    }

    /// Starts the writer for a generation.
    pub fn writer(
        &self,
        prefix: &str,
        prepared: &Prepared,
        worker: &str,
        found: Option<&Manifest>,
    ) -> Option<(SnapshotWriter, SnapshotSink)> {
        if !self.keeps || !self.policy.enabled() {
            return None;
        }
        let id = SnapshotIdentity {
            prefix: prefix.to_string(),
            model: self.model_fingerprint.clone(),
            request: format::request_fingerprint(&prepared.prompt, &prepared.params),
            prompt_len: prepared.prompt.len() as u32,
            attempt: found.map_or(1, |m| m.attempt + 1),
            worker: worker.to_string(),
        };
        let chain = found.map_or_else(ChainStart::default, |m| ChainStart {
            pieces: m.pieces.clone(),
            seq: m.seq,
            tokens: m.tokens.len(),
        });
        Some(SnapshotWriter::start(
            self.store.clone(),
            self.stats.clone(),
            self.policy.clone(),
            self.shape(),
            id,
            chain,
            self.store_timeout,
        ))
    }

    /// Records that `worker` starts the request under `prefix` now, and returns the request's
    /// attempt log including this attempt (its [`AttemptLog::latest`] entry, with no outcome).
    ///
    /// The budget rule: before recording a start, the caller dead-letters instead of running
    /// when [`AttemptLog::budget_spent`]`(max_attempts)` on the log read so far, that is when the
    /// earlier attempts that died (no outcome) or failed already number `max_attempts`. Asked of
    /// the log this returns, which counts the new attempt, the same rule is
    /// [`AttemptLog::over_budget`]. With `max_attempts = 3`, the 4th start of a request whose 3
    /// earlier attempts died or failed is dead-lettered instead of run. Suspended attempts never
    /// count.
    ///
    /// A missing log starts a fresh one; so does one that cannot be decoded (logged as a warning).
    /// A store error is returned and nothing is recorded: the caller should run the request
    /// anyway, uncounted, since a store outage must not stop the service.
    pub async fn attempts(&self, prefix: &str) -> Result<AttemptLog, store::StoreError> {
        self.ledger().read(prefix).await
    }

    pub async fn begin_attempt(&self, prefix: &str, worker: &str) -> Result<AttemptLog, store::StoreError> {
        self.ledger().begin_attempt(prefix, worker).await
    }

    /// The attempts recorded so far: the store's log, or `local` (the request's own) when
    /// nothing is kept or the store cannot be read, so that a store outage never blocks serving.
    pub async fn attempts_or(&self, prefix: &str, local: &AttemptLog) -> AttemptLog {
        if self.keeps {
            match self.attempts(prefix).await {
                Ok(log) => return log,
                // The store logs its failures, at most once per interval.
                Err(e) => debug!(error = %e, "cannot read the attempt log; counting attempts here only"),
            }
        }
        local.clone()
    }

    /// Records that `worker` starts the request under `prefix` now: durably in the store, or in
    /// `local` when nothing is kept or the store cannot be reached (a store outage never blocks
    /// serving), numbered by the same rule ([`AttemptLog::begin`]). Returns the log including
    /// the new attempt, and whether the store recorded it.
    pub async fn begin_attempt_or(&self, prefix: &str, worker: &str, local: &mut AttemptLog) -> (AttemptLog, bool) {
        if self.keeps {
            match self.begin_attempt(prefix, worker).await {
                Ok(log) => return (log, true),
                // The store logs its failures, at most once per interval.
                Err(e) => debug!(error = %e, "cannot record the attempt in the snapshot store; counting it here only"),
            }
        }
        local.begin(worker, ledger::now_ms());
        (local.clone(), false)
    }

    /// Records how `attempt` of the request under `prefix` ended. Failures are logged, not
    /// returned: an attempt whose end is not recorded counts as died, which only spends budget.
    pub async fn end_attempt(
        &self,
        prefix: &str,
        attempt: u32,
        outcome: EntryOutcome,
        error: Option<ledger::AttemptError>,
    ) {
        if self.keeps {
            self.ledger().end_attempt(prefix, attempt, outcome, error).await
        }
    }

    /// Keeps the final reply of the request under `prefix`, exactly as published, until its
    /// offset is committed and [`Snapshots::delete`] removes it with the rest of the prefix.
    /// Returns whether it was kept: false when nothing is kept ([`Snapshots::none`]).
    pub async fn put_done(&self, prefix: &str, reply: &[u8]) -> Result<bool, store::StoreError> {
        if !self.keeps {
            return Ok(false);
        }
        self.ledger().put_done(prefix, reply).await.map(|()| true)
    }

    /// The stored final reply of the request under `prefix`, to publish again instead of
    /// computing it again. Store errors are logged and read as `None`.
    pub async fn get_done(&self, prefix: &str) -> Option<Bytes> {
        self.ledger().get_done(prefix).await
    }

    fn ledger(&self) -> Ledger {
        Ledger::new(self.store.clone(), self.max_reply_bytes)
    }

    /// Deletes a request's snapshot and ledger once its answer is committed: its keys by name
    /// (see [`request_keys`]), never by listing the store, which for Redis would walk the whole
    /// keyspace after every answer. Keys this cannot name (the pieces of a manifest that cannot be
    /// read, pieces an earlier compaction failed to delete) expire with the TTL.
    pub async fn delete(&self, prefix: &str) {
        if !self.keeps {
            return;
        }
        let key = format!("{prefix}{}", format::MANIFEST);
        let limit = format::max_manifest_bytes(self.config.context_length);
        let manifest = match self.store.get(&key, limit).await {
            Ok(bytes) => bytes.and_then(|b| Manifest::peek(&b).ok()),
            Err(e) => {
                debug!(prefix, error = %e, "cannot read a finished request's manifest; its pieces will expire");
                None
            }
        };
        let keys = request_keys(prefix, manifest.as_ref());
        let deleted = futures::future::join_all(keys.iter().map(|k| self.store.delete(k))).await;
        if let Some(Err(e)) = deleted.into_iter().find(Result::is_err) {
            debug!(prefix, error = %e, "cannot delete a finished request's snapshot; it will expire");
        }
    }

    /// Deletes snapshots older than `ttl` every `every`, for as long as the task runs: orphans
    /// of requests whose answer was never committed here, and keys [`Snapshots::delete`] could
    /// not name.
    pub fn spawn_sweeper(&self, ttl: Duration, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.store.clone();
        tokio::spawn(async move {
            loop {
                match store.sweep_expired("ferry/", ttl).await {
                    Ok(0) => {}
                    Ok(n) => info!(deleted = n, "expired snapshots swept"),
                    // The store logs its failures, at most once per interval.
                    Err(e) => debug!(error = %e, "sweeping expired snapshots failed"),
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

/// `store` behind a deadline of `timeout` per call, counting its failures in `stats`.
fn bounded(
    store: Arc<dyn store::SnapshotStore>,
    timeout: Duration,
    stats: &SnapshotStats,
) -> Arc<dyn store::SnapshotStore> {
    Arc::new(store::DeadlineStore::new(store, timeout, stats.store_faults.clone()))
}

/// Every key a request under `prefix` has, as far as its manifest (if it could be read) tells:
/// the pieces it names, the manifest, and the two [`ledger`] keys.
pub fn request_keys(prefix: &str, manifest: Option<&Manifest>) -> Vec<String> {
    let pieces = manifest
        .into_iter()
        .flat_map(|m| m.pieces.iter().map(|p| p.name.as_str()));
    pieces
        .chain([format::MANIFEST, ledger::ATTEMPTS, ledger::DONE])
        .map(|name| format!("{prefix}{name}"))
        .collect()
}

#[cfg(test)]
mod tests;
