//! Finding and verifying a request's snapshot.

use std::sync::Arc;

use candle_core::Device;

use super::format::{FormatError, KvShape, Manifest, Piece};
use super::store::{SnapshotStore, StoreError};
use crate::model::{LlamaConfig, ModelError, SequenceCache};

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
    let mut whole: Option<Piece> = None;
    for entry in &manifest.pieces {
        let bytes = store
            .get(&format!("{prefix}{}", entry.name))
            .await?
            .ok_or_else(|| ResumeError::MissingPiece(entry.name.clone()))?;
        let piece = Piece::decode(&bytes, shape, entry)?;
        match &mut whole {
            None => whole = Some(piece),
            Some(w) => w.append(piece)?,
        }
    }
    let cache = match whole {
        None => None,
        Some(p) => Some(SequenceCache::from_range_values(
            config,
            p.to as usize,
            p.layers,
            device,
        )?),
    };
    Ok(Some(Restored { manifest, cache }))
}
