//! The matrix weights and the kernels that multiply by them: Ferry's (`ferry_kernels`) for Q8_0
//! on the CPU, candle's otherwise; and the token embedding table.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use super::ModelError;

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
    pub(super) fn resolve(self) -> Result<Option<ferry_kernels::Path>, ModelError> {
        match self {
            Kernels::Auto => Ok(Some(ferry_kernels::Path::detect())),
            Kernels::Candle => Ok(None),
            Kernels::Ferry(path) => path.usable().map(Some).map_err(|e| ModelError::Kernels(e.to_string())),
        }
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
pub(super) enum Linear {
    Candle(QMatMul),
    Ferry {
        w: ferry_kernels::Weights,
        path: ferry_kernels::Path,
    },
}

impl Linear {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
    pub(super) fn forward_shared<const N: usize>(ws: [&Linear; N], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
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
pub(super) enum Embeddings {
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
    pub(super) fn new(t: &QTensor, dim: usize, device: &Device) -> Result<Self, ModelError> {
        if device.is_cpu() && t.dtype() == GgmlDType::Q8_0 && dim.is_multiple_of(32) {
            let blocks = t.data()?.into_owned();
            let rows = t.shape().dims()[0];
            // `dim` is the file's `embedding_length`, not the table's width: a product that
            // overflows cannot be the table's size either.
            let expected = rows.checked_mul(dim / 32).and_then(|b| b.checked_mul(Q8_0_BLOCK_BYTES));
            if expected == Some(blocks.len()) {
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
    pub(super) fn forward(&self, tokens: &[u32], input: &Tensor) -> Result<Tensor, ModelError> {
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

/// One matrix weight, re-quantised as `format` asks, for Ferry's kernels on `kernels` when it is
/// Q8_0 and they run (see [`Linear`]).
pub(super) fn linear(
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn an_embedding_width_whose_table_size_overflows_is_not_taken_for_q8_0_rows() -> Result<(), ModelError> {
        let dev = &Device::Cpu;
        let q = QTensor::quantize(&Tensor::ones((40, 96), DType::F32, dev)?, GgmlDType::Q8_0)?;
        // The width comes from the file's metadata (`llama.embedding_length`), the rows from the
        // tensor: 40 rows of 2^60 values cannot be the table's blocks.
        let emb = Embeddings::new(&q, 1 << 60, dev)?;
        assert!(matches!(emb, Embeddings::Dense(_)));
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
    fn a_q8_0_matrix_whose_shape_overflows_is_a_load_error() -> Result<(), ModelError> {
        let dev = &Device::Cpu;
        // Two blocks of data under a shape a hostile file could declare: candle takes the shape
        // as given, and Ferry's kernels size their buffers from it.
        let small = QTensor::quantize(&Tensor::ones((1, 64), DType::F32, dev)?, GgmlDType::Q8_0)?;
        let storage = candle_core::quantized::QStorage::from_data(small.data()?, dev, GgmlDType::Q8_0)?;
        let hostile = QTensor::new(storage, (1usize << 60, 64))?;
        match linear(hostile, WeightFormat::Native, Some(ferry_kernels::Path::Portable), dev) {
            Err(e @ ModelError::Unsupported(_)) => assert!(e.to_string().contains("too large"), "{e}"),
            Err(e) => panic!("another error: {e:?}"),
            Ok(_) => panic!("a matrix of 2^60 rows loaded"),
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
}
