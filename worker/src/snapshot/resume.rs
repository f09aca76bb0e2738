//! Finding and verifying a request's snapshot.
//!
//! A restore holds, at its peak, the cache it rebuilds and one piece as the store returned it:
//! each piece is checked in place ([`PieceView`]) and its values written straight into the
//! cache's buffers ([`CacheRestore`]), which are made once, at their final size, before the first
//! piece is read; a piece's bytes are dropped before the next is read. [`restore_peak_bytes`]
//! is that peak, which admission reserves (`consumer::admission`).

use std::sync::Arc;

use bytes::Bytes;
use candle_core::Device;
use tracing::info;

use super::format::{max_manifest_bytes, FormatError, KvShape, Manifest, PieceView};
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
    /// The store answered with a blob that is not one: larger than the manifest (or, for the
    /// manifest, the format) allows, or not a value at all (see
    /// [`StoreError::is_refused_value`]). Handled like a blob that does not verify.
    #[error("the snapshot does not verify: {0}")]
    Refused(StoreError),
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
    let manifest_key = format!("{prefix}{}", super::format::MANIFEST);
    let Some(bytes) = get(store, &manifest_key, max_manifest_bytes(config.context_length)).await? else {
        return Ok(None);
    };
    let manifest = Manifest::decode(&bytes, model, request)?;
    if manifest.tokens.is_empty() {
        return Err(FormatError::Malformed("a snapshot with no generated tokens".into()).into());
    }
    // The pieces cover the prompt and the tokens but the last (`Manifest::decode` checked), so
    // bounding that count bounds every piece's size below.
    let positions = manifest.prompt_len as usize + manifest.tokens.len();
    if positions > config.context_length {
        return Err(FormatError::Malformed(format!(
            "a snapshot of {positions} positions, in a context of {}",
            config.context_length
        ))
        .into());
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
        // What the piece's positions take, not what the manifest says it takes: a manifest
        // that disagrees does not verify, and no read goes by its number.
        let expected = shape.piece_bytes(entry.to - entry.from);
        if entry.bytes != expected {
            return Err(FormatError::Malformed(format!(
                "the manifest gives piece {} {} bytes; its {} positions take {expected}",
                entry.name,
                entry.bytes,
                entry.to - entry.from
            ))
            .into());
        }
        let limit = usize::try_from(expected).unwrap_or(usize::MAX);
        let bytes = get(store, &format!("{prefix}{}", entry.name), limit)
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

/// A bounded read, with a refused value told apart from a store that cannot be read.
async fn get(store: &Arc<dyn SnapshotStore>, key: &str, max_bytes: usize) -> Result<Option<Bytes>, ResumeError> {
    store.get(key, max_bytes).await.map_err(|e| {
        if e.is_refused_value() {
            ResumeError::Refused(e)
        } else {
            ResumeError::Store(e)
        }
    })
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
mod restore_tests;
#[cfg(test)]
mod tests;
