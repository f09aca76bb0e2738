//! The KV cache of one sequence, a value the sequence owns: what snapshots copy out and restore.

use candle_core::{Device, Tensor};
use candle_nn::kv_cache::KvCache;

use super::llama::LlamaConfig;
use super::ModelError;

/// Keys and values of every layer for a range of positions, each position-major
/// (`(positions, n_kv_head, head_dim)` flattened): how snapshots carry the cache.
pub type LayerValues = Vec<(Vec<f32>, Vec<f32>)>;

/// The KV cache of one sequence: for every layer, the keys and values of every position so far,
/// shaped `(1, n_kv_head, positions, head_dim)`.
///
/// Not `Clone`: candle's cache writes new positions into its buffer in place, so a shallow copy
/// would share that buffer with the original. [`SequenceCache::deep_copy`] makes a real copy.
#[derive(Debug)]
pub struct SequenceCache {
    pub(super) layers: Vec<KvCache>,
    pub(super) len: usize,
}

/// Positions the cache allocates at a time. Small, so a short request does not pay for the
/// whole context; growth copies, but only every this many tokens. Memory admission
/// (`consumer::admission`) counts caches in these chunks.
pub const CACHE_CHUNK: usize = 256;

impl SequenceCache {
    pub fn new(config: &LlamaConfig) -> Self {
        Self {
            layers: (0..config.n_layer).map(|_| KvCache::new(2, CACHE_CHUNK)).collect(),
            len: 0,
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys and values of every layer for positions `[from, to)`, on the cache's device (shaped
    /// `(1, n_kv_head, to - from, head_dim)`), which later writes to the cache do not change.
    /// Cheap on a GPU (a device copy, queued); [`values_of`] reads them back to the host,
    /// position-major, which a snapshot writer does on its own task.
    pub fn range_tensors(&self, from: usize, to: usize) -> Result<Vec<(Tensor, Tensor)>, ModelError> {
        if from >= to || to > self.len {
            return Err(ModelError::Internal(format!(
                "cache range [{from}, {to}) of {}",
                self.len
            )));
        }
        // A contiguous copy of just these positions (or, where the range is contiguous already,
        // a view of storage that later writes never touch: they go to other positions, under
        // the storage's lock).
        let take = |t: Tensor| -> Result<Tensor, ModelError> { Ok(t.narrow(2, from, to - from)?.contiguous()?) };
        self.layer_tensors()?
            .into_iter()
            .map(|(k, v)| Ok((take(k)?, take(v)?)))
            .collect()
    }

    /// Rebuilds a cache from position-major values covering `positions` positions from 0.
    pub fn from_range_values(
        config: &LlamaConfig,
        positions: usize,
        layers: LayerValues,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let shape = (1, positions, config.n_kv_head, config.head_dim);
        let tensors = layers
            .into_iter()
            .map(|(k, v)| {
                let t = |x: Vec<f32>| Tensor::from_vec(x, shape, device)?.transpose(1, 2)?.contiguous();
                Ok((t(k)?, t(v)?))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Self::from_layer_tensors(config, &tensors)
    }

    /// An independent copy, sharing no buffer with `self`.
    pub fn deep_copy(&self, config: &LlamaConfig) -> Result<Self, ModelError> {
        if self.is_empty() {
            return Ok(Self::new(config));
        }
        Self::from_layer_tensors(config, &self.layer_tensors()?)
    }

    /// Keys and values of every layer, each `(1, n_kv_head, len, head_dim)`, for serialisation.
    pub fn layer_tensors(&self) -> Result<Vec<(Tensor, Tensor)>, ModelError> {
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            match (layer.k()?, layer.v()?) {
                (Some(k), Some(v)) => out.push((k, v)),
                _ => return Err(ModelError::Internal("an empty cache has no tensors".into())),
            }
        }
        Ok(out)
    }

    /// Rebuilds a cache from the tensors [`SequenceCache::layer_tensors`] gave.
    pub fn from_layer_tensors(config: &LlamaConfig, tensors: &[(Tensor, Tensor)]) -> Result<Self, ModelError> {
        if tensors.len() != config.n_layer {
            return Err(ModelError::Internal(format!(
                "cache has {} layers, model has {}",
                tensors.len(),
                config.n_layer
            )));
        }
        let mut cache = Self::new(config);
        for ((k, v), layer) in tensors.iter().zip(cache.layers.iter_mut()) {
            layer.append(&k.contiguous()?, &v.contiguous()?)?;
        }
        cache.len = tensors.first().map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0);
        Ok(cache)
    }
}

/// Host values of [`SequenceCache::range_tensors`]' copies, position-major
/// (`(to - from, n_kv_head, head_dim)` flattened per layer), as snapshot pieces hold them.
pub fn values_of(layers: &[(Tensor, Tensor)]) -> Result<LayerValues, ModelError> {
    let host = |t: &Tensor| -> Result<Vec<f32>, ModelError> {
        Ok(t.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
    };
    layers.iter().map(|(k, v)| Ok((host(k)?, host(v)?))).collect()
}
