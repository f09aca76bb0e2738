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

pub mod format;
pub mod ledger;
pub mod resume;
pub mod store;
pub mod writer;

pub use resume::{load, Restored};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
pub use writer::{ResumeMode, SnapshotPolicy, SnapshotStats, SnapshotWriter};

use bytes::Bytes;
use candle_core::Device;
use tracing::{info, warn};

use crate::engine::{Prepared, ResumeFrom};
use crate::model::{LlamaConfig, Model};
use format::{KvShape, Manifest};
use ledger::{AttemptLog, EntryOutcome, Ledger};
use writer::{ChainStart, SnapshotIdentity, SnapshotSink};

/// The worker's snapshot service: the store, the policy, and what identifies this model.
#[derive(Debug, Clone)]
pub struct Snapshots {
    pub store: Arc<dyn store::SnapshotStore>,
    pub stats: Arc<SnapshotStats>,
    pub policy: SnapshotPolicy,
    model_fingerprint: String,
    config: LlamaConfig,
    device: Device,
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
        let device_name = if device.is_cpu() { "cpu" } else { "cuda" };
        // A CPU with candle's tiled Q8_0 kernels computes differently from one without: a
        // snapshot from one kind is not continued on the other, which recomputes from the start.
        let device_name = match model.weights.kernels() {
            "" => device_name.to_string(),
            kernels => format!("{device_name}+{kernels}"),
        };
        Self {
            store,
            stats: Arc::new(SnapshotStats::default()),
            policy,
            model_fingerprint: format::model_fingerprint(&model.sha256, weights, &device_name),
            config: model.weights.config.clone(),
            device: device.clone(),
        }
    }

    /// A service over `store` for a model described only by `config`, on the CPU: enough for
    /// tests that never load a model.
    #[cfg(test)]
    pub(crate) fn for_tests(store: Arc<dyn store::SnapshotStore>, config: LlamaConfig) -> Self {
        Self {
            store,
            stats: Arc::new(SnapshotStats::default()),
            policy: SnapshotPolicy {
                every_tokens: 0,
                every: None,
                mode: ResumeMode::Auto,
                max_pieces: 8,
            },
            model_fingerprint: format::model_fingerprint("test", "f32", "cpu"),
            config,
            device: Device::Cpu,
        }
    }

    pub fn shape(&self) -> KvShape {
        KvShape {
            n_layer: self.config.n_layer as u32,
            n_kv_head: self.config.n_kv_head as u32,
            head_dim: self.config.head_dim as u32,
        }
    }

    /// Looks for a verified snapshot of the request. A snapshot that does not verify is logged,
    /// counted, deleted (its manifest and pieces; the request's [`ledger`] stays), and the request
    /// starts from the beginning.
    pub async fn find(&self, prefix: &str, prepared: &Prepared) -> Option<Found> {
        let request = format::request_fingerprint(&prepared.prompt, &prepared.params);
        match resume::load(
            &self.store,
            prefix,
            &self.model_fingerprint,
            &request,
            &self.config,
            &self.device,
        )
        .await
        {
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
                warn!(prefix, error = %e, "cannot read the snapshot store; starting from the beginning");
                None
            }
            Err(e) => {
                self.stats.discarded.fetch_add(1, Relaxed);
                warn!(prefix, error = %e, "discarding a snapshot that does not verify; starting from the beginning");
                if let Err(e) = ledger::delete_snapshot_only(self.store.as_ref(), prefix).await {
                    warn!(prefix, error = %e, "cannot delete the discarded snapshot; it will be overwritten or expire");
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
        if !self.policy.enabled() {
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
        ))
    }

    /// Records that `worker` starts the request under `prefix` now, and returns the request's
    /// attempt log including this attempt (its [`AttemptLog::latest`] entry, with no outcome).
    ///
    /// The budget rule: the caller dead-letters instead of running when
    /// [`AttemptLog::over_budget`]`(max_attempts)`, that is `log.counted() > max_attempts`.
    /// The new attempt counts, so this holds exactly when the earlier attempts that died (no
    /// outcome) or failed already number `max_attempts`: with `max_attempts = 3`, the 4th start of
    /// a request whose 3 earlier attempts died or failed is dead-lettered instead of run.
    /// Suspended attempts never count.
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

    /// Records how `attempt` of the request under `prefix` ended. Failures are logged, not
    /// returned: an attempt whose end is not recorded counts as died, which only spends budget.
    pub async fn end_attempt(&self, prefix: &str, attempt: u32, outcome: EntryOutcome, error: Option<String>) {
        self.ledger().end_attempt(prefix, attempt, outcome, error).await
    }

    /// Keeps the final reply of the request under `prefix`, exactly as published, until its
    /// offset is committed and [`Snapshots::delete`] removes it with the rest of the prefix.
    pub async fn put_done(&self, prefix: &str, reply: &[u8]) -> Result<(), store::StoreError> {
        self.ledger().put_done(prefix, reply).await
    }

    /// The stored final reply of the request under `prefix`, to publish again instead of
    /// computing it again. Store errors are logged and read as `None`.
    pub async fn get_done(&self, prefix: &str) -> Option<Bytes> {
        self.ledger().get_done(prefix).await
    }

    fn ledger(&self) -> Ledger {
        Ledger::new(self.store.clone())
    }

    /// Deletes a request's snapshot and ledger once its answer is committed.
    pub async fn delete(&self, prefix: &str) {
        if let Err(e) = self.store.delete_prefix(prefix).await {
            warn!(prefix, error = %e, "cannot delete a finished request's snapshot; it will expire");
        }
    }

    /// Deletes snapshots older than `ttl` every `every`, for as long as the task runs: orphans
    /// of requests whose answer was never committed here.
    pub fn spawn_sweeper(&self, ttl: Duration, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.store.clone();
        tokio::spawn(async move {
            loop {
                match store.sweep_expired("ferry/", ttl).await {
                    Ok(0) => {}
                    Ok(n) => info!(deleted = n, "expired snapshots swept"),
                    Err(e) => warn!(error = %e, "sweeping expired snapshots failed"),
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}
