//! Finding and verifying a request's snapshot.

use std::sync::Arc;

use bytes::Bytes;
use candle_core::Device;

use super::format::{max_manifest_bytes, FormatError, KvShape, Manifest, Piece};
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
    let mut whole: Option<Piece> = None;
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

#[cfg(test)]
mod tests;
