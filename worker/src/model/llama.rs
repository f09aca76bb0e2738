//! The llama forward pass, with the KV cache as an explicit value owned by each sequence.
//!
//! candle's `quantized_llama` keeps its cache inside the layers, where nothing outside can read
//! or replace it. Here the weights are shared and immutable ([`LlamaWeights`]) and every
//! sequence brings its own [`SequenceCache`], so a cache can be serialised, restored into another
//! process, and continue the generation token for token (the snapshot machinery relies on it).
//!
//! The arithmetic is `quantized_llama`'s, except that grouped-query attention reads the cache in
//! place instead of copying each KV head once per query head; `tests/engine.rs` checks the logits
//! against candle's (to the noise floor that the quantised matrix products allow, see there).
//!
//! Rotary embeddings use the interleaved (GGML "NORM") convention that llama models use: the
//! pairs rotated together are dimensions `(2i, 2i + 1)`, hence `rope_i`.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor};

use super::attention::{causal_mask, Part};
use super::cache::SequenceCache;
use super::linear::{linear, Embeddings, Kernels, Linear, WeightFormat};
use super::ModelError;

/// The hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub embedding_length: usize,
    pub context_length: usize,
    pub rms_norm_eps: f64,
    pub rope_freq_base: f32,
    pub vocab_size: usize,
}

impl LlamaConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, ModelError> {
        let arch = md_string(ct, "general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "architecture {arch:?}; this engine runs llama-architecture models"
            )));
        }
        let u = |k: &str| md_u32(ct, &format!("llama.{k}")).map(|v| v as usize);
        let n_head = u("attention.head_count")?;
        let n_kv_head = u("attention.head_count_kv")?;
        let embedding_length = u("embedding_length")?;
        // The width of a head is given (`rope.dimension_count`, read as before: a value of
        // another type falls back), or else the embedding's share of one query head.
        let head_dim = u("rope.dimension_count").ok();
        let head_dim = heads(n_head, n_kv_head, embedding_length, head_dim)?;
        if ct.metadata.contains_key("llama.expert_count") {
            return Err(ModelError::Unsupported("mixture-of-experts llama models".into()));
        }
        let vocab_size = match ct.metadata.get("llama.vocab_size") {
            Some(v) => v.to_u32()? as usize,
            None => md(ct, "tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        Ok(Self {
            n_layer: u("block_count")?,
            n_head,
            n_kv_head,
            head_dim,
            embedding_length,
            context_length: u("context_length")?,
            rms_norm_eps: f64::from(md(ct, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?),
            rope_freq_base: ct
                .metadata
                .get("llama.rope.freq_base")
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(10_000.0),
            vocab_size,
        })
    }
}

/// The width of a head, `given` or else `embedding_length / n_head`, once the counts are checked:
/// none is zero, the KV heads divide the query heads (each KV head serves a whole group of
/// them), the query heads divide the embedding when it gives their width, and the width is even
/// (rotary embeddings turn pairs of dimensions). A file that breaks one would otherwise panic
/// at load on a division, or fail every request later.
fn heads(n_head: usize, n_kv_head: usize, embedding_length: usize, given: Option<usize>) -> Result<usize, ModelError> {
    let invalid = |key: &str, value: usize, why: String| ModelError::InvalidMetadata {
        key: format!("llama.{key}"),
        value,
        why,
    };
    for (key, value) in [
        ("embedding_length", embedding_length),
        ("attention.head_count", n_head),
        ("attention.head_count_kv", n_kv_head),
    ] {
        if value == 0 {
            return Err(invalid(key, 0, "and a model needs at least one".into()));
        }
    }
    if !n_head.is_multiple_of(n_kv_head) {
        return Err(invalid(
            "attention.head_count_kv",
            n_kv_head,
            format!("which does not divide llama.attention.head_count ({n_head})"),
        ));
    }
    // The key a wrong width is blamed on: the one that gave it.
    let (head_dim, key, value) = match given {
        Some(d) => (d, "rope.dimension_count", d),
        None if embedding_length.is_multiple_of(n_head) => (embedding_length / n_head, "attention.head_count", n_head),
        None => {
            return Err(invalid(
                "attention.head_count",
                n_head,
                format!(
                    "which does not divide llama.embedding_length ({embedding_length}), and no \
                     llama.rope.dimension_count gives the heads' width"
                ),
            ))
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(
            key,
            value,
            format!("which makes heads {head_dim} wide, and rotary embeddings need an even, non-zero width"),
        ));
    }
    Ok(head_dim)
}

pub(crate) fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, ModelError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
}

pub(crate) fn md_u32(ct: &gguf_file::Content, key: &str) -> Result<u32, ModelError> {
    Ok(md(ct, key)?.to_u32()?)
}

pub(crate) fn md_string(ct: &gguf_file::Content, key: &str) -> Result<String, ModelError> {
    Ok(md(ct, key)?.to_string()?.clone())
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

struct Layer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: RmsNorm,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// The weights of a llama model: immutable, shared by every sequence.
pub struct LlamaWeights {
    pub config: LlamaConfig,
    tok_embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    /// Rotary tables for every position of the context, `(context_length, head_dim / 2)`.
    cos: Tensor,
    sin: Tensor,
    pub(super) device: Device,
    /// The path of Ferry's kernels, when they run the matrix products (see [`Linear`]).
    kernels: Option<ferry_kernels::Path>,
}

impl std::fmt::Debug for LlamaWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaWeights")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LlamaWeights {
    /// Loads the weights from a GGUF file, converting matrix weights to `format`, their products
    /// on `kernels` (Q8_0 on the CPU; candle's otherwise).
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        format: WeightFormat,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(ct)?;
        // Native weights stay exactly as stored, on candle's kernels (the reference test relies
        // on it).
        let kernels = if format == WeightFormat::Q8_0 && device.is_cpu() {
            kernels.resolve()?
        } else {
            None
        };
        let matrix = |reader: &mut R, name: &str| linear(ct.tensor(reader, name, device)?, format, kernels, device);
        let eps = config.rms_norm_eps as f32;
        let norm = |reader: &mut R, name: &str| -> Result<RmsNorm, ModelError> {
            Ok(RmsNorm {
                weight: ct.tensor(reader, name, device)?.dequantize(device)?,
                eps,
            })
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: norm(reader, &format!("{p}.attn_norm.weight"))?,
                wq: matrix(reader, &format!("{p}.attn_q.weight"))?,
                wk: matrix(reader, &format!("{p}.attn_k.weight"))?,
                wv: matrix(reader, &format!("{p}.attn_v.weight"))?,
                wo: matrix(reader, &format!("{p}.attn_output.weight"))?,
                ffn_norm: norm(reader, &format!("{p}.ffn_norm.weight"))?,
                w_gate: matrix(reader, &format!("{p}.ffn_gate.weight"))?,
                w_up: matrix(reader, &format!("{p}.ffn_up.weight"))?,
                w_down: matrix(reader, &format!("{p}.ffn_down.weight"))?,
            });
        }
        let final_norm = norm(reader, "output_norm.weight")?;
        let embd_q = ct.tensor(reader, "token_embd.weight", device)?;
        let tok_embeddings = Embeddings::new(&embd_q, config.embedding_length, device)?;
        // Models with tied embeddings have no `output.weight`: the embedding matrix is the output
        // projection too.
        let output = if ct.tensor_infos.contains_key("output.weight") {
            matrix(reader, "output.weight")?
        } else {
            linear(embd_q, format, kernels, device)?
        };
        let (cos, sin) = rope_tables(config.head_dim, config.rope_freq_base, config.context_length, device)?;
        Ok(Self {
            config,
            tok_embeddings,
            layers,
            norm: final_norm,
            output,
            cos,
            sin,
            device: device.clone(),
            kernels,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Names the kernels the forward pass runs on, where they are not implied by the device and
    /// weight format: Ferry's kernels and candle's round differently, so a snapshot taken on one
    /// must not be continued on the other (its continuation would not be what either alone
    /// produces). Ferry's paths give the same bits, but each is named all the same: a resume
    /// must never rest on more than the tests prove. `attn`: attention runs on Ferry's code too
    /// (`ferry_kernels::attention`), whose sums and exponential differ from candle's. Empty for
    /// candle's kernels.
    pub fn kernels(&self) -> &'static str {
        match self.kernels {
            Some(ferry_kernels::Path::Avx512Vnni) => "ferry-q8-attn-avx512vnni",
            Some(ferry_kernels::Path::AvxVnni) => "ferry-q8-attn-avxvnni",
            Some(ferry_kernels::Path::Avx2) => "ferry-q8-attn-avx2",
            Some(ferry_kernels::Path::Portable) => "ferry-q8-attn-portable",
            None => "",
        }
    }

    /// The path of Ferry's kernels, when they run the matrix products.
    pub fn kernel_path(&self) -> Option<ferry_kernels::Path> {
        self.kernels
    }

    /// Runs `tokens` through the model at the positions after those already in `cache`, appends
    /// their keys and values to it, and returns the logits of the last token, `(vocab,)` in f32.
    /// A batch of one: see [`LlamaWeights::forward_batch`].
    pub fn forward(&self, tokens: &[u32], cache: &mut SequenceCache) -> Result<Tensor, ModelError> {
        let mut logits = self.forward_batch(&mut [BatchInput { tokens, cache }])?;
        logits
            .pop()
            .ok_or_else(|| ModelError::Internal("a batch of one gave no logits".into()))
    }

    /// Runs several sequences' tokens through the model in one pass: for each input, its tokens
    /// at the positions after those already in its cache. Appends their keys and values to each
    /// cache and returns, for each input in order, the logits of its last token, `(vocab,)` in f32.
    ///
    /// The rows of all inputs are stacked into one `(1, total, hidden)` activation, so every
    /// weight matrix is multiplied once per pass for the whole batch, and so are the rotary
    /// embeddings; the cache append and attention run per input, over its own cache, each query
    /// seeing the positions up to its own (on Ferry's kernels, `ferry_kernels::attention`, into
    /// one output for the batch; on candle's, with a causal mask within its tokens). Every
    /// operation on the stacked rows (RMS norm, the matrix products, SiLU) computes each output
    /// row from its own input row alone, so an input's logits and cache are bit-identical
    /// whatever else shares its batch (`tests/batch.rs` checks it).
    ///
    /// Every input is checked (not empty, fits the context) before any compute, so a bad input
    /// leaves every cache untouched. An error during the pass can leave caches partly appended.
    pub fn forward_batch(&self, inputs: &mut [BatchInput<'_>]) -> Result<Vec<Tensor>, ModelError> {
        // On candle's own thread pool, the many short parallel sections of a pass (softmax,
        // rotary embeddings, ...) run on its threads directly: called from outside a pool, each
        // one wakes a parked rayon thread and waits for it, which at one thread cost a tenth of
        // decode time.
        self.device.with_context(|| self.forward_batch_in_pool(inputs))
    }

    fn forward_batch_in_pool(&self, inputs: &mut [BatchInput<'_>]) -> Result<Vec<Tensor>, ModelError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        for input in inputs.iter() {
            if input.tokens.is_empty() {
                return Err(ModelError::Internal("forward pass over no tokens".into()));
            }
            if input.cache.len + input.tokens.len() > self.config.context_length {
                return Err(ModelError::ContextFull {
                    context_length: self.config.context_length,
                });
            }
        }
        let all: Vec<u32> = inputs.iter().flat_map(|i| i.tokens.iter().copied()).collect();
        let total = all.len();
        // Each input's offset among the stacked rows, and its own mask.
        let mut parts = Vec::with_capacity(inputs.len());
        let mut offset = 0;
        for input in inputs.iter() {
            let (n, index_pos) = (input.tokens.len(), input.cache.len);
            // Ferry's attention limits each query to its own positions without a mask.
            let mask = if n == 1 || self.kernels.is_some() {
                None
            } else {
                Some(causal_mask(n, index_pos, &self.device)?)
            };
            parts.push(Part { offset, len: n, mask });
            offset += n;
        }
        // Every row's rotary tables, `(rows, 1, head_dim / 2)`: each row is rotated as a batch
        // element of one position of its own, all rows of all inputs in one operation per layer
        // for the queries and one for the keys. Per element the arithmetic is the same as with
        // one table per input (candle's `rope_i` computes each pair alike either way), so the
        // bits are too.
        let positions: Vec<u32> = inputs
            .iter()
            .flat_map(|i| (i.cache.len..i.cache.len + i.tokens.len()).map(|p| p as u32))
            .collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(&positions, 0)?.unsqueeze(1)?;
        let c = &self.config;
        let input = Tensor::new(all.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = self.tok_embeddings.forward(&all, &input)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v]: [Tensor; 3] = Linear::forward_shared([&layer.wq, &layer.wk, &layer.wv], &h)?
                .try_into()
                .map_err(|_| ModelError::Internal("q, k and v projections".into()))?;
            // `(rows, heads, 1, head_dim)`: the same memory as `(1, rows, heads * head_dim)`.
            let q = candle_nn::rotary_emb::rope_i(&q.reshape((total, c.n_head, 1, c.head_dim))?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k.reshape((total, c.n_kv_head, 1, c.head_dim))?, &cos, &sin)?;
            let y = match self.kernels {
                Some(path) => self.ferry_attention(path, &parts, &q, &k, &v, inputs, l)?,
                None => {
                    let mut ys = Vec::with_capacity(inputs.len());
                    for (part, input) in parts.iter().zip(inputs.iter_mut()) {
                        let (q, k) = (q.narrow(0, part.offset, part.len)?, k.narrow(0, part.offset, part.len)?);
                        let v = v.narrow(1, part.offset, part.len)?;
                        ys.push(self.attention(part, &q, &k, &v, &mut input.cache.layers[l])?);
                    }
                    if ys.len() == 1 {
                        ys.remove(0)
                    } else {
                        Tensor::cat(&ys, 1)?
                    }
                }
            };
            let x1 = (layer.wo.forward(&y)? + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let [gate, up]: [Tensor; 2] = Linear::forward_shared([&layer.w_gate, &layer.w_up], &h)?
                .try_into()
                .map_err(|_| ModelError::Internal("gate and up projections".into()))?;
            let gate = candle_nn::ops::silu(&gate)?;
            x = (layer.w_down.forward(&(gate * up)?)? + &x1)?;
        }
        for input in inputs.iter_mut() {
            input.cache.len += input.tokens.len();
        }
        // Only each input's last row needs the output projection.
        let last: Vec<u32> = parts.iter().map(|p| (p.offset + p.len - 1) as u32).collect();
        debug_assert!(last.last().is_some_and(|&l| l as usize == total - 1));
        let x = self.norm.forward(&x)?.squeeze(0)?;
        let x = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let logits = self.output.forward(&x)?.to_dtype(DType::F32)?;
        (0..parts.len()).map(|i| Ok(logits.i(i)?)).collect()
    }
}

/// One sequence's part of a batched forward pass: new tokens, and the cache they extend.
#[derive(Debug)]
pub struct BatchInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
}

/// cos and sin of `position * theta_i` for every position of the context, with
/// `theta_i = base^(-2i / head_dim)`.
fn rope_tables(head_dim: usize, base: f32, positions: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx_theta = Tensor::arange(0, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx_theta.cos()?, idx_theta.sin()?))
}

#[cfg(test)]
mod tests;
