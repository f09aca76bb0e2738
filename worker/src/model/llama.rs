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

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::kv_cache::KvCache;

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
        let embedding_length = u("embedding_length")?;
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
            n_kv_head: u("attention.head_count_kv")?,
            head_dim: u("rope.dimension_count").unwrap_or(embedding_length / n_head),
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

/// Keys and values of every layer for a range of positions, each position-major
/// (`(positions, n_kv_head, head_dim)` flattened): how snapshots carry the cache.
pub type LayerValues = Vec<(Vec<f32>, Vec<f32>)>;

/// The format matrix weights are kept in after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightFormat {
    /// Exactly as stored in the GGUF file.
    Native,
    /// Q4_0/Q4_1/Q5_x weights re-quantised to Q8_0 at load. candle has SIMD kernels for Q8_0 but
    /// only scalar code for Q4_1, so this is about 2x faster in decode and 5x in prefill on CPU,
    /// at twice the memory of 4-bit weights (still small next to the KV cache of a long context).
    Q8_0,
}

/// Which code runs the matrix products of Q8_0 weights on the CPU (`--kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Ferry's kernels on the fastest path this CPU runs.
    #[default]
    Auto,
    /// candle's `QMatMul`: its tiled kernels with AVX-512 VNNI, and a whole pass over the
    /// weights for each row of a product on AVX2. For comparison and as a way out.
    Candle,
    /// Ferry's kernels on this path; loading fails if the CPU cannot run it.
    Ferry(ferry_kernels::Path),
}

impl std::str::FromStr for Kernels {
    type Err = String;

    /// `auto`, `candle`, or a path of Ferry's kernels (`avx512vnni`, `avxvnni`, `avx2`,
    /// `portable`). Whether the CPU runs the path is checked at load.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "" => Ok(Kernels::Auto),
            "candle" => Ok(Kernels::Candle),
            name => ferry_kernels::Path::named(name).map(Kernels::Ferry).ok_or_else(|| {
                format!("unknown kernels {name:?}: auto, candle, avx512vnni, avxvnni, avx2 or portable")
            }),
        }
    }
}

impl Kernels {
    /// The choice `FERRY_KERNELS` names, as the worker's `--kernels` reads it (`auto` when unset):
    /// for tests and benches, which load the model themselves.
    pub fn from_env() -> Result<Kernels, String> {
        std::env::var("FERRY_KERNELS").map_or(Ok(Kernels::Auto), |s| s.parse())
    }

    /// What runs the products under this choice on this CPU: `candle`, or the path of Ferry's
    /// kernels (`auto` resolved), as reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Auto => ferry_kernels::Path::detect().name(),
            Kernels::Candle => "candle",
            Kernels::Ferry(path) => path.name(),
        }
    }

    /// The path of Ferry's kernels this choice runs on this CPU, or `None` for candle's.
    fn resolve(self) -> Result<Option<ferry_kernels::Path>, ModelError> {
        match self {
            Kernels::Auto => Ok(Some(ferry_kernels::Path::detect())),
            Kernels::Candle => Ok(None),
            Kernels::Ferry(path) => path.usable().map(Some).map_err(|e| ModelError::Kernels(e.to_string())),
        }
    }
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

/// A matrix weight, and the kernels that multiply by it.
///
/// On the CPU, Q8_0 weights go to Ferry's own kernels (`ferry_kernels`): tiles of activation rows
/// against blocks of weights, so the rows of a prompt or of a batch share each weight load
/// (candle's AVX2 Q8_0 product reads the whole matrix again for every row), on the fastest
/// instruction set the CPU has. Their products are bit-identical whatever the batch, the tile
/// or the path. Other formats (the reference test's native Q4_1) and devices use candle's
/// `QMatMul`.
enum Linear {
    Candle(QMatMul),
    Ferry {
        w: ferry_kernels::Weights,
        path: ferry_kernels::Path,
    },
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(w) => w.forward(x),
            Linear::Ferry { w, path } => {
                let a = quantize_rows(x, w.cols())?;
                ferry_product(x, w, *path, &a)
            }
        }
    }

    /// `x` through each of `ws` (projections of one input, such as q, k and v), quantising `x`
    /// once for all of them when the kernels allow it.
    fn forward_shared<const N: usize>(ws: [&Linear; N], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let ferry: Option<Vec<_>> = ws
            .iter()
            .map(|l| match l {
                Linear::Ferry { w, path } => Some((w, *path)),
                Linear::Candle(_) => None,
            })
            .collect();
        match ferry {
            Some(ferry) if ferry.iter().all(|(w, _)| w.cols() == ferry[0].0.cols()) => {
                let a = quantize_rows(x, ferry[0].0.cols())?;
                ferry
                    .into_iter()
                    .map(|(w, path)| ferry_product(x, w, path, &a))
                    .collect()
            }
            _ => ws.iter().map(|w| w.forward(x)).collect(),
        }
    }
}

/// The rows of `x` (its last dimension `k`) quantised for Ferry's kernels.
fn quantize_rows(x: &Tensor, k: usize) -> candle_core::Result<ferry_kernels::Activations> {
    if x.dim(D::Minus1)? != k {
        candle_core::bail!("input width {} against a matrix of {k} columns", x.dim(D::Minus1)?);
    }
    let values = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    ferry_kernels::Activations::quantize(&values, k).map_err(candle_core::Error::wrap)
}

/// `x` (quantised as `a`) times the transpose of `w`, shaped as `x` with its last dimension
/// the matrix's rows.
fn ferry_product(
    x: &Tensor,
    w: &ferry_kernels::Weights,
    path: ferry_kernels::Path,
    a: &ferry_kernels::Activations,
) -> candle_core::Result<Tensor> {
    let out = ferry_kernels::matmul(path, w, a).map_err(candle_core::Error::wrap)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = w.rows();
    }
    Tensor::from_vec(out, dims, x.device())
}

/// The token embedding table.
///
/// A Q8_0 table on the CPU stays as stored and only the rows a pass needs are dequantised:
/// SmolLM2's is 30 MiB so, against 113 MiB as f32. The values are the ones the f32 table held,
/// bit for bit: a row is dequantised exactly as candle dequantises the whole table (each value
/// `q as f32 * d`, `d` the block's f16 scale). Other formats and devices use the f32 table.
enum Embeddings {
    Q8_0 {
        /// The table's blocks as stored: per block of 32 values, the f16 scale (little endian)
        /// then 32 signed bytes.
        blocks: Vec<u8>,
        dim: usize,
        device: Device,
    },
    Dense(candle_nn::Embedding),
}

/// Bytes of one Q8_0 block: the f16 scale and 32 quantised values.
const Q8_0_BLOCK_BYTES: usize = 2 + 32;

impl Embeddings {
    fn new(t: &QTensor, dim: usize, device: &Device) -> Result<Self, ModelError> {
        if device.is_cpu() && t.dtype() == GgmlDType::Q8_0 && dim.is_multiple_of(32) {
            let blocks = t.data()?.into_owned();
            let rows = t.shape().dims()[0];
            if blocks.len() == rows * dim / 32 * Q8_0_BLOCK_BYTES {
                return Ok(Self::Q8_0 {
                    blocks,
                    dim,
                    device: device.clone(),
                });
            }
        }
        Ok(Self::Dense(candle_nn::Embedding::new(t.dequantize(device)?, dim)))
    }

    /// The rows of `tokens` (also given as the `(1, n)` tensor `input`), `(1, n, dim)`.
    fn forward(&self, tokens: &[u32], input: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Self::Dense(e) => Ok(e.forward(input)?),
            Self::Q8_0 { blocks, dim, device } => {
                let row_bytes = dim / 32 * Q8_0_BLOCK_BYTES;
                let mut out = Vec::with_capacity(tokens.len() * dim);
                for &token in tokens {
                    let start = token as usize * row_bytes;
                    let row = blocks
                        .get(start..start + row_bytes)
                        .ok_or_else(|| ModelError::Internal(format!("token {token} is outside the embedding table")))?;
                    for block in row.chunks_exact(Q8_0_BLOCK_BYTES) {
                        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                        out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
                    }
                }
                Ok(Tensor::from_vec(out, (1, tokens.len(), *dim), device)?)
            }
        }
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
    device: Device,
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

/// The KV cache of one sequence: for every layer, the keys and values of every position so far,
/// shaped `(1, n_kv_head, positions, head_dim)`.
///
/// Not `Clone`: candle's cache writes new positions into its buffer in place, so a shallow copy
/// would share that buffer with the original. [`SequenceCache::deep_copy`] makes a real copy.
#[derive(Debug)]
pub struct SequenceCache {
    layers: Vec<KvCache>,
    len: usize,
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

    /// Keys and values of every layer for positions `[from, to)`, position-major
    /// (`(to - from, n_kv_head, head_dim)` flattened), as snapshot pieces hold them.
    pub fn range_values(&self, from: usize, to: usize) -> Result<LayerValues, ModelError> {
        if from >= to || to > self.len {
            return Err(ModelError::Internal(format!(
                "cache range [{from}, {to}) of {}",
                self.len
            )));
        }
        let take = |t: Tensor| -> Result<Vec<f32>, ModelError> {
            Ok(t.narrow(2, from, to - from)?
                .transpose(1, 2)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
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

    /// Self-attention of one input's rows over its cache, which gets their keys and values
    /// appended: `q` and `k` rotated, `(n, heads, 1, head_dim)`, `v` `(1, n, heads * head_dim)`.
    /// Returns `(1, n, hidden)`.
    fn attention(
        &self,
        part: &Part,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kv: &mut KvCache,
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
    fn ferry_attention(
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
            let (keys, values) = match (kv.k_cache().all_data(), kv.v_cache().all_data()) {
                (Some(keys), Some(values)) => (keys, values),
                _ => return Err(ModelError::Internal("a cache with nothing appended".into())),
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
/// `KvCache` allocates it on the CPU, from its first element, with the distance between heads.
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

/// One sequence's part of a batched forward pass: new tokens, and the cache they extend.
#[derive(Debug)]
pub struct BatchInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
}

/// Where one input's rows sit in the stacked activation, and what its attention needs.
struct Part {
    offset: usize,
    len: usize,
    mask: Option<Tensor>,
}

/// One matrix weight, re-quantised as `format` asks, for Ferry's kernels on `kernels` when it is
/// Q8_0 and they run (see [`Linear`]).
fn linear(
    t: QTensor,
    format: WeightFormat,
    kernels: Option<ferry_kernels::Path>,
    device: &Device,
) -> Result<Linear, ModelError> {
    let dtype = match (format, t.dtype()) {
        (WeightFormat::Q8_0, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1) => GgmlDType::Q8_0,
        (_, dtype) => dtype,
    };
    let t = if dtype != t.dtype() {
        QTensor::quantize(&t.dequantize(device)?, dtype)?
    } else {
        t
    };
    let (n, k) = t.shape().dims2()?;
    match kernels {
        Some(path) if dtype == GgmlDType::Q8_0 && k % ferry_kernels::BLOCK == 0 => {
            let w = ferry_kernels::Weights::from_q8_0(&t.data()?, n, k)
                .map_err(|e| ModelError::Unsupported(format!("a Q8_0 matrix: {e}")))?;
            Ok(Linear::Ferry { w, path })
        }
        _ => Ok(Linear::Candle(QMatMul::from_qtensor(t)?)),
    }
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
fn causal_mask(seq_len: usize, index_pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let kv_len = index_pos + seq_len;
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..kv_len).map(move |j| u8::from(j > index_pos + i)))
        .collect();
    Tensor::from_slice(&mask, (seq_len, kv_len), device)
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

    #[test]
    fn q8_0_embedding_rows_equal_the_dequantised_table() -> Result<(), ModelError> {
        let dev = &Device::Cpu;
        let (rows, dim) = (40, 96);
        let table = Tensor::randn(0f32, 1., (rows, dim), dev)?;
        let q = QTensor::quantize(&table, GgmlDType::Q8_0)?;
        let emb = Embeddings::new(&q, dim, dev)?;
        assert!(matches!(emb, Embeddings::Q8_0 { .. }));
        let dense = Embeddings::Dense(candle_nn::Embedding::new(q.dequantize(dev)?, dim));
        let tokens = [0u32, 39, 7, 7, 21];
        let input = Tensor::new(&tokens, dev)?.unsqueeze(0)?;
        let got: Vec<f32> = emb.forward(&tokens, &input)?.flatten_all()?.to_vec1()?;
        let want: Vec<f32> = dense.forward(&tokens, &input)?.flatten_all()?.to_vec1()?;
        assert_eq!(got.len(), tokens.len() * dim);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(emb.forward(&[40], &Tensor::new(&[40u32], dev)?.unsqueeze(0)?).is_err());
        Ok(())
    }

    #[test]
    fn ferry_kernels_give_candles_product() -> Result<(), ModelError> {
        let dev = &Device::Cpu;
        let ramp = |n: usize, step: f64| {
            Tensor::arange(0u32, n as u32, dev)?
                .to_dtype(DType::F32)?
                .affine(step, 0.)
        };
        let w = ramp(40 * 576, 0.37)?.sin()?.reshape((40, 576))?;
        let x = ramp(3 * 576, 0.11)?.cos()?.reshape((1, 3, 576))?;
        let q = || QTensor::quantize(&w, GgmlDType::Q8_0);
        let candle = linear(q()?, WeightFormat::Q8_0, None, dev)?;
        assert!(matches!(candle, Linear::Candle(_)));
        let magnitude = x
            .abs()?
            .broadcast_matmul(&w.abs()?.t()?)?
            .max_all()?
            .to_scalar::<f32>()?;
        let want = candle.forward(&x)?;
        for path in ferry_kernels::Path::ALL.into_iter().filter(|p| p.available()) {
            let ferry = linear(q()?, WeightFormat::Q8_0, Some(path), dev)?;
            assert!(matches!(ferry, Linear::Ferry { .. }));
            let got = ferry.forward(&x)?;
            assert_eq!(got.dims(), [1, 3, 40]);
            // candle quantises the inputs with f16 scales and Ferry with f32 ones, so the two
            // differ by rounding: a small fraction of the sum of the products' magnitudes. A
            // column out of place would be off by a sizeable part of it.
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-3 * magnitude,
                "{}: max difference {diff}, products sum to {magnitude}",
                path.name()
            );
            // The fused call gives the same bits as one call per matrix.
            let fused = Linear::forward_shared([&ferry, &ferry], &x)?;
            let a: Vec<f32> = fused[1].flatten_all()?.to_vec1()?;
            let b: Vec<f32> = got.flatten_all()?.to_vec1()?;
            assert_eq!(a, b);
        }
        Ok(())
    }

    #[test]
    fn a_kernel_path_this_cpu_cannot_run_is_a_kernels_error() {
        for path in ferry_kernels::Path::ALL {
            match Kernels::Ferry(path).resolve() {
                Ok(resolved) => assert!(path.available() && resolved == Some(path), "{path:?}"),
                Err(e) => {
                    assert!(!path.available(), "{path:?}: {e}");
                    assert!(matches!(e, ModelError::Kernels(_)), "{path:?}: {e:?}");
                    assert!(e.to_string().contains("this CPU cannot run"), "{e}");
                }
            }
        }
    }

    #[test]
    fn rope_table_starts_at_identity() -> candle_core::Result<()> {
        let (cos, sin) = rope_tables(4, 10_000.0, 3, &Device::Cpu)?;
        assert_eq!(cos.dims(), [3, 2]);
        let c0: Vec<f32> = cos.i(0)?.to_vec1()?;
        let s0: Vec<f32> = sin.i(0)?.to_vec1()?;
        assert_eq!((c0, s0), (vec![1., 1.], vec![0., 0.]));
        Ok(())
    }
}
