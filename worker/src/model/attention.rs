//! Self-attention of each sequence's new positions over its own cache: Ferry's
//! (`ferry_kernels::attention`) with Ferry's kernels, candle's operations otherwise.

use candle_core::{DType, Device, Tensor};

use super::cache::LayerCache;
use super::llama::{BatchInput, LlamaWeights};
use super::ModelError;

impl LlamaWeights {
    /// Self-attention of one input's rows over its cache, which gets their keys and values
    /// appended: `q` and `k` rotated, `(n, heads, 1, head_dim)`, `v` `(1, n, heads * head_dim)`.
    /// Returns `(1, n, hidden)`.
    pub(super) fn attention(
        &self,
        part: &Part,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kv: &mut LayerCache,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let n = part.len;
        let heads = |t: &Tensor, h: usize| t.reshape((1, n, h, c.head_dim))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads(q, c.n_head)?, heads(k, c.n_kv_head)?, heads(v, c.n_kv_head)?);
        let (k, v) = kv.append(&k, &v)?;
        let n_rep = c.n_head / c.n_kv_head;
        let y = grouped_attention(&q, &k, &v, n_rep, part.mask.as_ref())?;
        Ok(y.transpose(1, 2)?.reshape((1, n, c.embedding_length))?)
    }

    /// Layer `l`'s self-attention for every input, on Ferry's attention (`ferry_kernels::attention`):
    /// each input's keys and values are appended to its cache, then its queries read the cache
    /// where it lies, and every output is written into one `(1, total, hidden)` activation. `q` and
    /// `k` rotated, `(total, heads, 1, head_dim)`, `v` `(1, total, kv heads * head_dim)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ferry_attention(
        &self,
        path: ferry_kernels::Path,
        parts: &[Part],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        inputs: &mut [BatchInput<'_>],
        l: usize,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let heads = ferry_kernels::Heads {
            query: c.n_head,
            kv: c.n_kv_head,
            dim: c.head_dim,
        };
        let total = q.dim(0)?;
        let queries = q.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = vec![0f32; queries.len()];
        let row = c.n_head * c.head_dim;
        for (part, input) in parts.iter().zip(inputs.iter_mut()) {
            let (at, n) = (part.offset, part.len);
            let by_head = |t: Tensor| {
                t.reshape((1, n, c.n_kv_head, c.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let kv = &mut input.cache.layers[l];
            kv.append(&by_head(k.narrow(0, at, n)?)?, &by_head(v.narrow(1, at, n)?)?)?;
            let len = kv.current_seq_len();
            let Some((keys, values)) = kv.buffers() else {
                return Err(ModelError::Internal("a cache with nothing appended".into()));
            };
            let (keys, key_layout) = keys.storage_and_layout();
            let (values, value_layout) = values.storage_and_layout();
            let (keys, stride) = cpu_f32(&keys, key_layout)?;
            let (values, value_stride) = cpu_f32(&values, value_layout)?;
            if stride != value_stride {
                return Err(ModelError::Internal("keys and values cached apart".into()));
            }
            let cached = ferry_kernels::Cached {
                keys,
                values,
                stride,
                len,
            };
            let span = at * row..(at + n) * row;
            ferry_kernels::attention(path, heads, &queries[span.clone()], cached, &mut out[span])
                .map_err(|e| ModelError::Internal(e.to_string()))?;
        }
        Ok(Tensor::from_vec(out, (1, total, c.embedding_length), &self.device)?)
    }
}

/// A cache buffer's values, `(1, kv heads, capacity, head_dim)` and contiguous as candle's
/// [`LayerCache`] allocates it on the CPU, from its first element, with the distance between heads.
fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Result<(&'a [f32], usize), ModelError> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((start, end)))
            if layout.dims().len() == 4 =>
        {
            Ok((&data[start..end], layout.stride()[1]))
        }
        _ => Err(ModelError::Internal(
            "Ferry's attention needs a contiguous f32 cache on the CPU".into(),
        )),
    }
}

/// Where one input's rows sit in the stacked activation, and what its attention needs.
pub(super) struct Part {
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) mask: Option<Tensor>,
}

/// Grouped-query attention of `q` `(1, n_head, n, head_dim)` over `k` and `v`
/// `(1, n_kv_head, positions, head_dim)`, as they lie in the cache, returning
/// `(1, n_head, n, head_dim)`. Query head `h` reads KV head `h / n_rep`, as with candle's
/// `repeat_kv`, but without copying the cache `n_rep` times each layer and token: the `n_rep`
/// query heads that share a KV head are stacked as rows of one matrix, `n_rep * n` rows per KV
/// head, query `i` of the `r`-th head of a group in row `r * n + i`.
fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_rep: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, n_head, n, head_dim) = q.dims4()?;
    let n_kv = n_head / n_rep;
    let q = q.reshape((b, n_kv, n_rep * n, head_dim))?;
    let att = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
    let att = match mask {
        None => att,
        Some(mask) => {
            let mask = mask.repeat((n_rep, 1))?.broadcast_as(att.shape())?;
            let neg_inf = Tensor::new(f32::NEG_INFINITY, att.device())?.broadcast_as(att.shape())?;
            mask.where_cond(&neg_inf, &att)?
        }
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.matmul(v)?.reshape((b, n_head, n, head_dim))
}

/// Repeats each KV head `n_rep` times so grouped-query attention can use one matmul, laid out
/// as candle's `repeat_kv` does: head `h` of the query reads KV head `h / n_rep`.
#[cfg(test)]
fn repeat_kv(x: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, n_kv, seq, hd) = x.dims4()?;
    Tensor::cat(&vec![&x; n_rep], 2)?.reshape((b, n_kv * n_rep, seq, hd))
}

/// The causal mask for `seq_len` new queries after `index_pos` cached positions: 1 where a query
/// must not look (a later position), 0 where it may.
///
/// ```text
///              cached 0..index_pos   new 0  new 1  new 2
/// query new 0:      0 … 0              0      1      1
/// query new 1:      0 … 0              0      0      1
/// query new 2:      0 … 0              0      0      0
/// ```
pub(super) fn causal_mask(seq_len: usize, index_pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let kv_len = index_pos + seq_len;
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..kv_len).map(move |j| u8::from(j > index_pos + i)))
        .collect();
    Tensor::from_slice(&mask, (seq_len, kv_len), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_blocks_only_later_positions() -> candle_core::Result<()> {
        let m: Vec<u8> = causal_mask(3, 2, &Device::Cpu)?.flatten_all()?.to_vec1()?;
        #[rustfmt::skip]
        assert_eq!(m, [
            0, 0,  0, 1, 1,
            0, 0,  0, 0, 1,
            0, 0,  0, 0, 0,
        ]);
        Ok(())
    }

    #[test]
    fn repeat_kv_maps_query_head_to_kv_head_by_division() -> candle_core::Result<()> {
        // Two KV heads holding 0 and 1; with n_rep = 3, query heads 0..3 read 0 and 3..6 read 1.
        let x = Tensor::new(&[0f32, 1.], &Device::Cpu)?.reshape((1, 2, 1, 1))?;
        let r: Vec<f32> = repeat_kv(x, 3)?.flatten_all()?.to_vec1()?;
        assert_eq!(r, [0., 0., 0., 1., 1., 1.]);
        Ok(())
    }

    #[test]
    fn grouped_attention_equals_attention_over_repeated_heads() -> candle_core::Result<()> {
        let dev = &Device::Cpu;
        let (n_head, n_kv, n, past, hd) = (9, 3, 5, 7, 64);
        let q = Tensor::randn(0f32, 1., (1, n_head, n, hd), dev)?;
        // A cache view as the cache gives it: positions narrowed out of a longer buffer.
        let k = Tensor::randn(0f32, 1., (1, n_kv, past + n + 4, hd), dev)?.narrow(2, 0, past + n)?;
        let v = Tensor::randn(0f32, 1., (1, n_kv, past + n + 4, hd), dev)?.narrow(2, 0, past + n)?;
        let mask = causal_mask(n, past, dev)?;
        let got = grouped_attention(&q, &k, &v, n_head / n_kv, Some(&mask))?;
        let (kr, vr) = (
            repeat_kv(k.contiguous()?, n_head / n_kv)?,
            repeat_kv(v.contiguous()?, n_head / n_kv)?,
        );
        let att = (q.matmul(&kr.t()?)? / (hd as f64).sqrt())?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as(att.shape())?;
        let att = mask.broadcast_as(att.shape())?.where_cond(&neg_inf, &att)?;
        let want = candle_nn::ops::softmax_last_dim(&att)?.matmul(&vr)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max difference {diff}");
        Ok(())
    }
}
