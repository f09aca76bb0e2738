//! Finding and verifying a request's snapshot.
//!
//! A restore holds, at its peak, the cache it rebuilds and one piece as the store returned it:
//! each piece is checked in place ([`PieceView`]) and its values written straight into the
//! cache's buffers ([`CacheRestore`]), which are made once, at their final size, before the first
//! piece is read; a piece's bytes are dropped before the next is read. [`restore_peak_bytes`]
//! is that peak, which admission reserves (`consumer::admission`).

use std::sync::Arc;

use candle_core::Device;
use tracing::info;

use super::format::{FormatError, KvShape, Manifest, PieceView};
use super::store::{SnapshotStore, StoreError};
use crate::model::{allocated_positions, CacheRestore, LlamaConfig, ModelError, SequenceCache};

/// A verified snapshot, ready to continue from.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// The KV cache of every position but the last generated token's; `None` for a tokens-only
    /// snapshot, whose cache is recomputed.
    pub cache: Option<SequenceCache>,
}

/// Why a snapshot that exists could not be used. The request then starts from the beginning.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The store could not be read.
    #[error("reading the snapshot: {0}")]
    Store(#[from] StoreError),
    /// A blob did not verify.
    #[error("the snapshot does not verify: {0}")]
    Format(#[from] FormatError),
    /// The manifest names a piece the store does not have (torn or swept).
    #[error("the snapshot's piece {0} is missing")]
    MissingPiece(String),
    /// The cache could not be rebuilt from verified pieces.
    #[error("rebuilding the cache: {0}")]
    Model(#[from] ModelError),
}

/// Loads the snapshot under `prefix`, if there is one, checking that it belongs to this model and
/// this request and that every byte verifies.
pub async fn load(
    store: &Arc<dyn SnapshotStore>,
    prefix: &str,
    model: &str,
    request: &str,
    config: &LlamaConfig,
    device: &Device,
) -> Result<Option<Restored>, ResumeError> {
    load_within(store, prefix, model, request, config, device, u64::MAX).await
}

/// [`load`], for a restore that may hold at most `allowance` bytes beside the cache
/// ([`restore_overhead_bytes`]): a snapshot that needs more (one written since the caller sized
/// its restore, or one too large for the budget) is loaded without its cache, which the engine
/// then recomputes from the tokens, as after a tokens-only snapshot.
pub async fn load_within(
    store: &Arc<dyn SnapshotStore>,
    prefix: &str,
    model: &str,
    request: &str,
    config: &LlamaConfig,
    device: &Device,
    allowance: u64,
) -> Result<Option<Restored>, ResumeError> {
    let Some(bytes) = store.get(&format!("{prefix}{}", super::format::MANIFEST)).await? else {
        return Ok(None);
    };
    let manifest = Manifest::decode(&bytes, model, request)?;
    if manifest.tokens.is_empty() {
        return Err(FormatError::Malformed("a snapshot with no generated tokens".into()).into());
    }
    let shape = KvShape {
        n_layer: config.n_layer as u32,
        n_kv_head: config.n_kv_head as u32,
        head_dim: config.head_dim as u32,
    };
    let overhead = restore_overhead_bytes(&manifest);
    if overhead > allowance {
        info!(
            prefix,
            overhead_mib = overhead.div_ceil(1 << 20),
            allowance_mib = allowance / (1 << 20),
            "restoring the snapshot's cache would hold more than was admitted: recomputing it from the tokens"
        );
        return Ok(Some(Restored { manifest, cache: None }));
    }
    let positions = manifest.kv_positions() as usize;
    let mut cache = (positions > 0).then(|| CacheRestore::new(config, positions));
    for entry in &manifest.pieces {
        let bytes = store
            .get(&format!("{prefix}{}", entry.name))
            .await?
            .ok_or_else(|| ResumeError::MissingPiece(entry.name.clone()))?;
        let piece = PieceView::check(&bytes, shape, entry)?;
        if let Some(cache) = &mut cache {
            cache.append(piece.positions(), |l| (piece.keys(l), piece.values(l)))?;
        }
        // `bytes` is dropped here, before the next piece is read.
    }
    let cache = cache.map(|c| c.finish(device)).transpose()?;
    Ok(Some(Restored { manifest, cache }))
}

/// The most memory restoring a snapshot holds at once, for a cache of `positions` positions
/// whose largest piece is `largest_piece_bytes` long, `bytes_per_position` bytes a position:
/// the cache's buffers, allocated in whole chunks, and that piece's bytes as the store returned
/// them (see the module doc). A store client's own buffering while it reads is not counted.
pub fn restore_peak_bytes(positions: usize, largest_piece_bytes: u64, bytes_per_position: u64) -> u64 {
    let cache = if positions == 0 {
        0
    } else {
        allocated_positions(positions) as u64 * bytes_per_position
    };
    cache.saturating_add(largest_piece_bytes)
}

/// The memory beyond the cache itself that restoring `manifest` holds at its peak: its largest
/// piece (none for a tokens-only snapshot). What admission reserves for a restore on top of the
/// request's worst-case cache, which the restored cache is part of.
pub fn restore_overhead_bytes(manifest: &Manifest) -> u64 {
    manifest.pieces.iter().map(|p| p.bytes).max().unwrap_or(0)
}

#[cfg(test)]
mod tests;
