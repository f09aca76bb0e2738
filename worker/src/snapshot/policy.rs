//! When snapshots are taken and what they hold (`--snapshot-every-tokens`, `--resume`), and
//! the writers' counters that logs and metrics read.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use super::store::StoreFaults;

/// What a snapshot holds, and so how a resume rebuilds the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResumeMode {
    /// Token ids and the KV cache: resuming restores the cache (large snapshots, no recompute).
    Cache,
    /// Token ids only: resuming recomputes the cache (tiny snapshots, more compute).
    Tokens,
    /// Cache or tokens, whichever the measured store throughput and decode speed make cheaper
    /// to resume from.
    Auto,
}

/// When to snapshot and what.
#[derive(Debug, Clone)]
pub struct SnapshotPolicy {
    /// Snapshot every this many generated tokens (0: not by count).
    pub every_tokens: usize,
    /// Snapshot when this much time has passed since the last one (None: not by time).
    pub every: Option<Duration>,
    pub mode: ResumeMode,
    /// Compact once a snapshot has this many pieces.
    pub max_pieces: usize,
}

impl SnapshotPolicy {
    pub fn enabled(&self) -> bool {
        self.every_tokens > 0 || self.every.is_some()
    }
}

/// Counters, for logs and metrics.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Manifests written (each a durable snapshot).
    pub written: AtomicU64,
    /// Bytes written, pieces and manifests.
    pub bytes: AtomicU64,
    /// Snapshot points merged into a newer one because the store was busy.
    pub skipped: AtomicU64,
    /// Writes that failed (retried with the next snapshot).
    pub failed: AtomicU64,
    /// Snapshots found but refused on resume (they did not verify).
    pub discarded: AtomicU64,
    /// Generations resumed from a snapshot.
    pub resumed: AtomicU64,
    /// Time spent writing, in microseconds.
    pub write_micros: AtomicU64,
    /// Tokens that had to be computed again on resume (tokens mode, or the last token).
    pub tokens_recomputed: AtomicU64,
    /// Decode speed and store throughput, measured, for the `auto` resume mode
    /// (tokens/s and bytes/s, as f64 bits; 0 until measured).
    pub decode_tps_bits: AtomicU64,
    pub store_bps_bits: AtomicU64,
    /// Store calls that failed or timed out, by operation and kind.
    pub store_faults: Arc<StoreFaults>,
}

impl SnapshotStats {
    /// Whether the next snapshot should carry the KV cache under `mode`, for a cache of
    /// `bytes_per_token` bytes per position.
    pub fn use_cache(&self, mode: ResumeMode, bytes_per_token: usize) -> bool {
        match mode {
            ResumeMode::Cache => true,
            ResumeMode::Tokens => false,
            ResumeMode::Auto => {
                let tps = f64::from_bits(self.decode_tps_bits.load(Relaxed));
                let bps = f64::from_bits(self.store_bps_bits.load(Relaxed));
                // Until both are measured, keep the cache: it never recomputes.
                if tps <= 0.0 || bps <= 0.0 {
                    return true;
                }
                // Restoring a token's KV costs reading it; recomputing costs a decode step.
                bytes_per_token as f64 / bps < 1.0 / tps
            }
        }
    }

    pub(super) fn record_rate(cell: &AtomicU64, sample: f64) {
        let old = f64::from_bits(cell.load(Relaxed));
        let new = if old > 0.0 { 0.8 * old + 0.2 * sample } else { sample };
        cell.store(new.to_bits(), Relaxed);
    }

    pub fn record_decode_speed(&self, tokens_per_s: f64) {
        Self::record_rate(&self.decode_tps_bits, tokens_per_s);
    }
}
