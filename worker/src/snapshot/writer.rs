//! Taking snapshots off the decode path.
//!
//! The engine thread calls [`SnapshotSink::offer`] at snapshot points (through its `Checkpoint`
//! hook, which the sink implements): it copies out only the
//! KV positions added since the last offer (cost proportional to the new tokens) and leaves them
//! in a one-element slot. The writer task, on the async runtime, takes whatever is in the slot,
//! stores it as a piece, then writes the manifest that names it. Decoding never waits for the
//! store. If the store is slower than generation, a new offer merges into the one still waiting
//! (coalescing to the newest state, counted in `skipped`) instead of queueing without bound.
//! A failed write is counted and its data goes back into the slot, merged with anything newer,
//! so the next write covers it: a piece is never silently lost from the chain.
//!
//! After `max_pieces` pieces the writer asks for a full copy at the next offer and, once the
//! manifest names only that one piece, deletes the old ones (compaction).
//!
//! Stopping never waits long for the store: every store call has a deadline (the store is a
//! [`super::store::DeadlineStore`]), [`SnapshotWriter::stop`] waits at most one store timeout for
//! the write in progress and [`SnapshotWriter::flush_and_stop`] at most [`FLUSH_CALLS`], after
//! which the write task is aborted. What it was writing is lost; the last durable snapshot stands.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;
use tracing::debug;

use super::format::{KvShape, Manifest, PieceRef, FORMAT_VERSION};
pub use super::policy::{ResumeMode, SnapshotPolicy, SnapshotStats};
use super::store::SnapshotStore;
use crate::engine::{Checkpoint, Sequence};
use crate::model::ModelError;

mod delta;
use delta::{Captured, Delta};

#[derive(Debug, Default)]
struct Slot {
    pending: Option<Delta>,
    /// Where the next extraction starts: the end of the last one.
    next_from: usize,
    /// The writer wants the next offer to copy the whole cache (compaction, or a failed chain).
    full_next: bool,
    /// No more offers will come; the writer exits once the slot is empty.
    closed: bool,
    /// The writer is between taking a delta and finishing its write.
    busy: bool,
    /// The generation finished: drop whatever is pending, and do not retry a failed write.
    stopped: bool,
}

#[derive(Debug)]
struct Shared {
    slot: Mutex<Slot>,
    wake: Notify,
    idle: Notify,
    /// Cuts short the back-off after a failed write once the writer is closed.
    closing: Notify,
    stats: Arc<SnapshotStats>,
    with_kv: bool,
}

/// Who the snapshot belongs to.
#[derive(Debug, Clone)]
pub struct SnapshotIdentity {
    pub prefix: String,
    pub model: String,
    pub request: String,
    pub prompt_len: u32,
    pub attempt: u32,
    pub worker: String,
}

/// The engine's side of a writer.
#[derive(Debug, Clone)]
pub struct SnapshotSink {
    shared: Arc<Shared>,
    policy: SnapshotPolicy,
    last_tokens: usize,
    last_at: Instant,
}

impl Checkpoint for SnapshotSink {
    fn maybe_offer(&mut self, seq: &Sequence) -> Result<(), ModelError> {
        SnapshotSink::maybe_offer(self, seq)
    }

    fn offer(&mut self, seq: &Sequence) -> Result<(), ModelError> {
        SnapshotSink::offer(self, seq)
    }
}

impl SnapshotSink {
    /// Offers a snapshot if the policy says one is due.
    pub fn maybe_offer(&mut self, seq: &Sequence) -> Result<(), ModelError> {
        let n = seq.generated().len();
        let by_count = self.policy.every_tokens > 0 && n >= self.last_tokens + self.policy.every_tokens;
        let by_time = self.policy.every.is_some_and(|t| self.last_at.elapsed() >= t) && n > self.last_tokens;
        if by_count || by_time {
            self.offer(seq)?;
        }
        Ok(())
    }

    /// Hands the state of `seq` to the writer now.
    pub fn offer(&mut self, seq: &Sequence) -> Result<(), ModelError> {
        let Some(end) = seq.snapshot_positions() else {
            return Ok(());
        };
        let stats = &self.shared.stats;
        let mut slot = self
            .shared
            .slot
            .lock()
            .map_err(|_| ModelError::Internal("snapshot slot poisoned".into()))?;
        let from = if slot.full_next { 0 } else { slot.next_from };
        let kv = if self.shared.with_kv && end > from {
            Some(Captured::new(from as u32, end as u32, seq.kv_tensors(from, end)?))
        } else {
            None
        };
        let delta = Delta {
            tokens: seq.generated().to_vec(),
            kv,
        };
        slot.pending = Some(match slot.pending.take() {
            Some(older) => {
                stats.skipped.fetch_add(1, Relaxed);
                Delta::merge(older, delta)
            }
            None => delta,
        });
        slot.next_from = end;
        slot.full_next = false;
        drop(slot);
        self.shared.wake.notify_one();
        self.last_tokens = seq.generated().len();
        self.last_at = Instant::now();
        Ok(())
    }
}

/// How many store timeouts [`SnapshotWriter::flush_and_stop`] waits at most: the write in
/// progress and the final one, a piece and a manifest each.
pub const FLUSH_CALLS: u32 = 4;

/// The async side: a task that stores what the engine offers.
#[derive(Debug)]
pub struct SnapshotWriter {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// The deadline of one store call: what bounds how long stopping waits for the task.
    store_timeout: Duration,
}

/// Where the chain of a resumed snapshot left off.
#[derive(Debug, Clone, Default)]
pub struct ChainStart {
    pub pieces: Vec<PieceRef>,
    pub seq: u64,
    pub tokens: usize,
}

impl SnapshotWriter {
    /// Starts a writer for one generation. `chain` continues a resumed snapshot's pieces.
    /// `store_timeout` is the deadline each of `store`'s calls has (see the module
    /// documentation).
    pub fn start(
        store: Arc<dyn SnapshotStore>,
        stats: Arc<SnapshotStats>,
        policy: SnapshotPolicy,
        shape: KvShape,
        id: SnapshotIdentity,
        chain: ChainStart,
        store_timeout: Duration,
    ) -> (SnapshotWriter, SnapshotSink) {
        let bytes_per_token = shape.bytes_per_position();
        let with_kv = stats.use_cache(policy.mode, bytes_per_token);
        // A resumed chain continues where it ended; a tokens-only chain switching to the cache
        // (or the reverse) starts a fresh, full copy.
        let keep_chain = with_kv != chain.pieces.is_empty();
        let next_from = if keep_chain {
            chain.pieces.last().map_or(0, |p| p.to as usize)
        } else {
            0
        };
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                next_from,
                full_next: !keep_chain && with_kv,
                ..Slot::default()
            }),
            wake: Notify::new(),
            idle: Notify::new(),
            closing: Notify::new(),
            stats,
            with_kv,
        });
        let pieces = if keep_chain { chain.pieces } else { Vec::new() };
        let task = tokio::spawn(write_loop(
            store,
            shared.clone(),
            shape,
            id,
            pieces,
            chain.seq,
            policy.max_pieces,
        ));
        let sink = SnapshotSink {
            shared: shared.clone(),
            policy,
            last_tokens: chain.tokens,
            last_at: Instant::now(),
        };
        (
            SnapshotWriter {
                shared,
                task,
                store_timeout,
            },
            sink,
        )
    }

    /// Writes whatever is still pending, retrying a failed write, then stops. Used when
    /// draining or on a revocation. Gives up after [`FLUSH_CALLS`] store timeouts, leaving the
    /// last durable snapshot as it is.
    pub async fn flush_and_stop(self) {
        self.close();
        let bound = self.store_timeout.saturating_mul(FLUSH_CALLS);
        self.wait(bound, "flushing the snapshot").await;
    }

    /// Stops without writing what is pending (the generation finished; its answer supersedes
    /// any snapshot). Waits at most one store timeout for the write in progress, so that it
    /// lands before the request's keys are deleted; a store that takes longer is not waited for.
    pub async fn stop(self) {
        if let Ok(mut slot) = self.shared.slot.lock() {
            slot.pending = None;
            slot.stopped = true;
        }
        self.close();
        let bound = self.store_timeout;
        self.wait(bound, "the snapshot write in progress").await;
    }

    fn close(&self) {
        if let Ok(mut slot) = self.shared.slot.lock() {
            slot.closed = true;
        }
        self.shared.wake.notify_one();
        self.shared.closing.notify_one();
    }

    /// Waits for the write task to end, for at most `bound`; then aborts it.
    async fn wait(self, bound: Duration, what: &str) {
        let mut task = self.task;
        if tokio::time::timeout(bound, &mut task).await.is_err() {
            task.abort();
            debug!(waited = ?bound, "the snapshot store is too slow: gave up on {what}");
        }
    }

    /// Waits until everything offered so far is written (or has failed).
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            let done = self
                .shared
                .slot
                .lock()
                .map(|s| s.pending.is_none() && !s.busy)
                .unwrap_or(true);
            if done || self.task.is_finished() {
                return;
            }
            notified.await;
        }
    }
}

async fn write_loop(
    store: Arc<dyn SnapshotStore>,
    shared: Arc<Shared>,
    shape: KvShape,
    id: SnapshotIdentity,
    mut pieces: Vec<PieceRef>,
    mut seq: u64,
    max_pieces: usize,
) {
    let stats = &shared.stats;
    let tag = worker_tag(&id.worker);
    let mut failures = 0u32;
    loop {
        let delta = loop {
            let notified = shared.wake.notified();
            {
                let Ok(mut slot) = shared.slot.lock() else { return };
                if let Some(d) = slot.pending.take() {
                    slot.busy = true;
                    break d;
                }
                if slot.closed {
                    return;
                }
            }
            shared.idle.notify_waiters();
            notified.await;
        };
        let started = Instant::now();
        let mut written = 0u64;
        let mut new_pieces = pieces.clone();
        let mut failed = false;
        let full = delta.kv.as_ref().is_some_and(|kv| kv.from == 0);
        // Read back to the host here, on the writer's task, not on the engine thread.
        let piece = match delta.kv.as_ref().map(Captured::to_piece).transpose() {
            Ok(piece) => piece,
            Err(e) => {
                debug!(error = %e, prefix = %id.prefix, "snapshot piece could not be read back; retrying with the next snapshot");
                failed = true;
                None
            }
        };
        if let Some(kv) = &piece {
            let name = format!("piece-{:06}-{tag}", seq + 1);
            let body = kv.encode(shape);
            let crc = u32::from_le_bytes(body[body.len() - 4..].try_into().expect("a piece ends with its crc"));
            let entry = PieceRef {
                name: name.clone(),
                from: kv.from,
                to: kv.to,
                bytes: body.len() as u64,
                crc32: crc,
            };
            written += body.len() as u64;
            match store.put(&format!("{}{name}", id.prefix), Bytes::from(body)).await {
                Ok(()) => {
                    if full {
                        new_pieces.clear();
                    }
                    new_pieces.push(entry);
                }
                Err(e) => {
                    // The store logs its failures, at most once per interval.
                    debug!(error = %e, prefix = %id.prefix, "snapshot piece write failed; retrying with the next snapshot");
                    failed = true;
                }
            }
        }
        if !failed {
            let manifest = Manifest {
                version: FORMAT_VERSION,
                model: id.model.clone(),
                request: id.request.clone(),
                prompt_len: id.prompt_len,
                tokens: delta.tokens.clone(),
                pieces: new_pieces.clone(),
                attempt: id.attempt,
                worker: id.worker.clone(),
                seq: seq + 1,
            };
            let body = manifest.encode();
            written += body.len() as u64;
            if let Err(e) = store
                .put(&format!("{}{}", id.prefix, super::format::MANIFEST), Bytes::from(body))
                .await
            {
                debug!(error = %e, prefix = %id.prefix, "snapshot manifest write failed; retrying with the next snapshot");
                failed = true;
            }
        }
        let elapsed = started.elapsed();
        stats.write_micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
        if failed {
            stats.failed.fetch_add(1, Relaxed);
            // Put the data back so the chain keeps no gap; a newer offer merges onto it. A
            // stopped writer has nothing left to write.
            let closed = {
                let Ok(mut slot) = shared.slot.lock() else { return };
                if slot.stopped {
                    slot.busy = false;
                    return;
                }
                let newer = slot.pending.take();
                slot.pending = Some(match newer {
                    Some(n) => Delta::merge(delta, n),
                    None => delta,
                });
                slot.busy = false;
                slot.closed
            };
            // Back off while the store is down, so a dead store costs neither CPU nor log volume;
            // a flush has a deadline, so it backs off less, and closing cuts the back-off short.
            failures = failures.saturating_add(1);
            let backoff = Duration::from_millis(100 << failures.min(if closed { 2 } else { 6 }));
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shared.closing.notified() => {}
            }
            continue;
        }
        failures = 0;
        seq += 1;
        stats.written.fetch_add(1, Relaxed);
        stats.bytes.fetch_add(written, Relaxed);
        if elapsed > Duration::ZERO {
            SnapshotStats::record_rate(&stats.store_bps_bits, written as f64 / elapsed.as_secs_f64());
        }
        debug!(prefix = %id.prefix, tokens = delta.tokens.len(), bytes = written, micros = elapsed.as_micros() as u64, "snapshot written");
        if full && !pieces.is_empty() {
            // Best effort: after the first failure the store is likely down, and what is left
            // expires with the TTL.
            for old in pieces.iter().filter(|o| !new_pieces.iter().any(|n| n.name == o.name)) {
                if store.delete(&format!("{}{}", id.prefix, old.name)).await.is_err() {
                    break;
                }
            }
        }
        pieces = new_pieces;
        if let Ok(mut slot) = shared.slot.lock() {
            slot.busy = false;
            if pieces.len() >= max_pieces.max(2) {
                slot.full_next = true;
            }
        }
        shared.idle.notify_waiters();
    }
}

/// A short tag from the worker id, so two workers writing the same request (a frozen one that
/// came back) never overwrite each other's pieces.
fn worker_tag(worker: &str) -> String {
    format!("{:08x}", crc32fast::hash(worker.as_bytes()))
}

#[cfg(test)]
mod tests;
