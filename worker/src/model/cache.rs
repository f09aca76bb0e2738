//! The KV cache of one sequence, a value the sequence owns: what snapshots copy out and restore.

use candle_core::{Device, Tensor};

use super::llama::LlamaConfig;
use super::ModelError;

/// Keys and values of every layer for a range of positions, each position-major
/// (`(positions, n_kv_head, head_dim)` flattened): how snapshots carry the cache.
pub type LayerValues = Vec<(Vec<f32>, Vec<f32>)>;

/// The KV cache of one sequence: for every layer, the keys and values of every position so far,
/// shaped `(1, n_kv_head, positions, head_dim)`.
///
/// Not `Clone`: new positions are written into the cache's buffers in place, so a shallow copy
/// would share those buffers with the original. [`SequenceCache::deep_copy`] makes a real copy.
#[derive(Debug)]
pub struct SequenceCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) len: usize,
}

/// Positions the cache allocates at a time. Small, so a short request does not pay for the
/// whole context; growth copies, but only every this many tokens. Memory admission
/// (`consumer::admission`) counts caches in these chunks.
pub const CACHE_CHUNK: usize = 256;

/// The positions a cache of `positions` positions has allocated: whole [`CACHE_CHUNK`]s.
pub fn allocated_positions(positions: usize) -> usize {
    positions.div_ceil(CACHE_CHUNK) * CACHE_CHUNK
}

/// One layer's keys and values: two buffers `(1, n_kv_head, capacity, head_dim)`, of which the
/// first `len` positions are written and the rest are zeros.
///
/// Invariant: the capacity is [`allocated_positions`]`(len)` (one chunk at the least), however
/// the positions came (one at a time, in prefill chunks, or restored at once), so a restored cache lies in memory
/// exactly as the uninterrupted run's did, strides included. This is candle's `KvCache` with a
/// growth of [`CACHE_CHUNK`], except that growing copies the buffer once, not once per chunk,
/// and that a restore can hand it buffers it filled itself ([`CacheRestore`]).
#[derive(Debug, Default)]
pub struct LayerCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
}

impl LayerCache {
    /// Positions held.
    pub fn current_seq_len(&self) -> usize {
        self.len
    }

    /// The whole buffers, keys and values, capacity included; `None` before the first append.
    pub fn buffers(&self) -> Option<(&Tensor, &Tensor)> {
        self.buffers.as_ref().map(|(k, v)| (k, v))
    }

    /// Keys and values of the positions held, `(1, n_kv_head, len, head_dim)` views of the
    /// buffers; `None` before the first append.
    pub fn current(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        match &self.buffers {
            None => Ok(None),
            Some((k, v)) => Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))),
        }
    }

    /// Appends `k` and `v`, contiguous `(1, n_kv_head, n, head_dim)`, and returns the keys and
    /// values of every position held (see [`LayerCache::current`]). Grows the buffers to
    /// [`allocated_positions`] of the new length when they are full.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        // The first append allocates a chunk even for no positions, as candle's cache does.
        let needed = allocated_positions(self.len + n).max(CACHE_CHUNK);
        let capacity = match &self.buffers {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        if needed > capacity {
            let grown = |old: Option<&Tensor>, like: &Tensor| -> candle_core::Result<Tensor> {
                let mut dims = like.dims().to_vec();
                dims[2] = needed;
                let buffer = Tensor::zeros(dims, like.dtype(), like.device())?;
                if let Some(old) = old {
                    buffer.slice_set(old, 2, 0)?;
                }
                Ok(buffer)
            };
            let old = self.buffers.take();
            let (old_k, old_v) = (old.as_ref().map(|(k, _)| k), old.as_ref().map(|(_, v)| v));
            self.buffers = Some((grown(old_k, k)?, grown(old_v, v)?));
        }
        let (bk, bv) = self.buffers.as_ref().expect("the buffers were just made");
        bk.slice_set(k, 2, self.len)?;
        bv.slice_set(v, 2, self.len)?;
        self.len += n;
        let (k, v) = self.current()?.expect("the buffers were just written");
        Ok((k, v))
    }
}

impl SequenceCache {
    pub fn new(config: &LlamaConfig) -> Self {
        Self {
            layers: (0..config.n_layer).map(|_| LayerCache::default()).collect(),
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
        if layers.len() != config.n_layer {
            return Err(ModelError::Internal(format!(
                "values for {} layers, model has {}",
                layers.len(),
                config.n_layer
            )));
        }
        let mut layers = layers;
        let mut restore = CacheRestore::new(config, positions);
        restore.append(positions, |l| {
            let (k, v) = std::mem::take(&mut layers[l]);
            (k, v)
        })?;
        restore.finish(device)
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
            match layer.current()? {
                Some(kv) => out.push(kv),
                None => return Err(ModelError::Internal("an empty cache has no tensors".into())),
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

/// A cache being rebuilt from position-major values (a snapshot's pieces), written in place into
/// the host buffers the cache will keep: one buffer per layer for keys and one for values,
/// `(1, n_kv_head, capacity, head_dim)`, zeroed, of [`allocated_positions`] of the final length.
///
/// This is what keeps a restore's memory to the cache itself and whatever its caller holds of
/// one piece at a time: no buffer is copied and no buffer is grown. On the CPU the buffers
/// become the cache's tensors as they are ([`CacheRestore::finish`] moves them); on a GPU each is
/// copied to the device once and dropped, layer by layer, so the device holds the cache only.
#[derive(Debug)]
pub struct CacheRestore {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// Positions the buffers hold, [`allocated_positions`] of `positions`.
    capacity: usize,
    /// Positions the finished cache must hold.
    positions: usize,
    /// Positions written so far, from 0.
    len: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl CacheRestore {
    /// Buffers for a cache of `positions` positions of `config`'s shape. On the CPU, zeroed
    /// buffers this large come from the system untouched, so their pages cost memory only as
    /// the restore writes them; admission counts them whole all the same.
    pub fn new(config: &LlamaConfig, positions: usize) -> Self {
        let capacity = allocated_positions(positions).max(CACHE_CHUNK);
        let n = config.n_kv_head * capacity * config.head_dim;
        Self {
            layers: (0..config.n_layer).map(|_| (vec![0f32; n], vec![0f32; n])).collect(),
            capacity,
            positions,
            len: 0,
            n_kv_head: config.n_kv_head,
            head_dim: config.head_dim,
        }
    }

    /// Writes the next `n` positions of every layer: `layer(l)` gives layer `l`'s keys and
    /// values for them, position-major (`(n, n_kv_head, head_dim)`). Fails when they are more
    /// than the cache was made for or the values are not `n` positions' worth; the restore is
    /// then to be dropped.
    pub fn append<K, V>(&mut self, n: usize, mut layer: impl FnMut(usize) -> (K, V)) -> Result<(), ModelError>
    where
        K: IntoIterator<Item = f32>,
        V: IntoIterator<Item = f32>,
    {
        if self.len + n > self.positions {
            return Err(ModelError::Internal(format!(
                "restoring {n} positions after {} into a cache of {}",
                self.len, self.positions
            )));
        }
        let (from, heads, dim, capacity) = (self.len, self.n_kv_head, self.head_dim, self.capacity);
        // Position-major in, head-major out: the values of position `p`, head `h` go to row
        // `h * capacity + p` of the buffer. Returns whether the values filled every row.
        let scatter = |buffer: &mut [f32], values: &mut dyn Iterator<Item = f32>| -> bool {
            for p in from..from + n {
                for h in 0..heads {
                    let at = (h * capacity + p) * dim;
                    for slot in &mut buffer[at..at + dim] {
                        match values.next() {
                            Some(x) => *slot = x,
                            None => return false,
                        }
                    }
                }
            }
            true
        };
        for (l, (k, v)) in self.layers.iter_mut().enumerate() {
            let (keys, values) = layer(l);
            let (mut keys, mut values) = (keys.into_iter(), values.into_iter());
            let filled = scatter(k, &mut keys) && scatter(v, &mut values);
            if !filled || keys.next().is_some() || values.next().is_some() {
                return Err(ModelError::Internal(format!(
                    "layer {l} of a restore gave other than {n} positions of keys and values"
                )));
            }
        }
        self.len += n;
        Ok(())
    }

    /// The cache, on `device`, once every position has been written.
    pub fn finish(self, device: &Device) -> Result<SequenceCache, ModelError> {
        if self.len != self.positions {
            return Err(ModelError::Internal(format!(
                "a restore wrote {} of the {} positions",
                self.len, self.positions
            )));
        }
        let shape = (1, self.n_kv_head, self.capacity, self.head_dim);
        let len = self.len;
        let layers = self
            .layers
            .into_iter()
            .map(|(k, v)| {
                let buffers = (Tensor::from_vec(k, shape, device)?, Tensor::from_vec(v, shape, device)?);
                Ok(LayerCache {
                    buffers: Some(buffers),
                    len,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(SequenceCache { layers, len })
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

#[cfg(test)]
mod tests;
