//! Ferry's quantised matrix products on the CPU.
//!
//! A product multiplies `m` activation rows by the `n` rows of a Q8_0 weight matrix (each row
//! `k` values, in blocks of 32 that share one scale). The activations are quantised once per
//! product, to the same 8-bit blocks; then each output is the sum over blocks of
//! `scale_x * scale_w * (integer dot product of the block)`.
//!
//! The work is done in *tiles*: a few activation rows against a few weight rows, so that every
//! block of weights loaded from memory serves all the rows of the tile. Decoding one sequence
//! is bound by the weights' memory traffic; a batch of sequences, or the rows of a prompt,
//! share that traffic, so each extra row costs only its arithmetic. (candle's Q8_0 product on
//! AVX2 reads the whole matrix again for each row, which is what this crate replaces.)
//!
//! # Kernel paths and exactness
//!
//! The path is picked at run time from the CPU's features ([`Path::detect`]), or named
//! ([`Path::from_name`]; the worker's `--kernels`): AVX-512 VNNI, AVX-VNNI, AVX2 with FMA, or portable Rust.
//! A [`Path`] is a plain value, so [`matmul`] and [`attention`] check at entry that this CPU
//! runs the one they are given, and refuse it otherwise: no safe call runs an instruction set
//! the CPU lacks.
//!
//! Every path computes every output with the same operations in the same order: the integer
//! dot product of each block (exact, in 32 bits), then, block after block, one fused
//! multiply-add of it by the product of the two scales into an f32 accumulator that starts at
//! zero. So an output does not depend on the tile it was computed in, on how many rows share the
//! product, on the thread count, nor on the path: the same request alone or in a batch gives the
//! same bits, and the tests check all of it.
//!
//! The limit: weights are taken as Q8_0 (the worker re-quantises 4- and 5-bit GGUF weights to
//! it at load), and a weight of -128 is clamped to -127 at load, as the sign trick of the AVX2
//! kernel needs (no quantiser this crate meets writes -128).
//!
//! This crate knows nothing of candle's tensors: it takes and returns plain slices.

use std::fmt;

use cpu::Feature;

mod attention;
mod cpu;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{attention, Cached, Heads};

/// Values per quantisation block.
pub const BLOCK: usize = 32;

/// Bytes of a Q8_0 block as GGUF and candle store it: an f16 scale (little endian), then 32
/// signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 2 + BLOCK;

/// The instruction set a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// AVX-512 VNNI on 256-bit registers (`vpdpbusd` with AVX-512 VL).
    Avx512Vnni,
    /// AVX-VNNI: the same instruction, VEX-encoded (Alder Lake and later, Zen 5).
    AvxVnni,
    /// AVX2 and FMA: `vpmaddubsw` then `vpmaddwd` for the integer dot products.
    Avx2,
    /// Plain Rust, for every other CPU.
    Portable,
}

/// Why a product cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The inner dimension is not a whole number of blocks.
    NotBlocks { k: usize },
    /// The data does not hold `n` rows of `k` values.
    Size { expected: usize, got: usize },
    /// A matrix of `n` rows by `k` columns (weights from a model file, or a product's output)
    /// whose size in values or bytes does not fit a `usize`.
    TooLarge { n: usize, k: usize },
    /// An unknown path, or one this CPU cannot run.
    Path(String),
    /// Attention's inputs do not fit together.
    Shape(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotBlocks { k } => write!(f, "inner dimension {k} is not a multiple of {BLOCK}"),
            Error::Size { expected, got } => write!(f, "expected {expected} values or bytes, got {got}"),
            Error::TooLarge { n, k } => write!(f, "a matrix of {n} rows by {k} columns is too large to hold"),
            Error::Path(why) => write!(f, "kernels: {why}"),
            Error::Shape(why) => write!(f, "attention: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl Path {
    /// Every path, fastest first.
    pub const ALL: [Path; 4] = [Path::Avx512Vnni, Path::AvxVnni, Path::Avx2, Path::Portable];

    /// The fastest path this CPU runs.
    pub fn detect() -> Path {
        Self::ALL.into_iter().find(|p| p.available()).unwrap_or(Path::Portable)
    }

    /// The path called `name` (`avx512vnni`, `avxvnni`, `avx2`, `portable`), whether or not
    /// this CPU runs it.
    pub fn named(name: &str) -> Option<Path> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The path called `name`, if this CPU runs it. An unknown name, or a path this CPU cannot
    /// run, is an error rather than a silent fallback: a benchmark that asked for a path must
    /// get it.
    pub fn from_name(name: &str) -> Result<Path, Error> {
        Self::named(name)
            .ok_or_else(|| Error::Path(format!("unknown kernel path {name:?}")))?
            .usable()
    }

    /// This path, if this CPU runs it.
    pub fn usable(self) -> Result<Path, Error> {
        if self.available() {
            Ok(self)
        } else {
            Err(Error::Path(format!("this CPU cannot run {}", self.name())))
        }
    }

    /// Its name, as `--kernels` (`FERRY_KERNELS`), logs and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            Path::Avx512Vnni => "avx512vnni",
            Path::AvxVnni => "avxvnni",
            Path::Avx2 => "avx2",
            Path::Portable => "portable",
        }
    }

    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        self.needs().iter().all(|&f| cpu::has(f))
    }

    /// The CPU features its instructions need.
    fn needs(self) -> &'static [Feature] {
        use Feature::*;
        match self {
            Path::Avx512Vnni => &[Avx2, Fma, Avx512F, Avx512Vl, Avx512Vnni],
            Path::AvxVnni => &[Avx2, Fma, AvxVnni],
            Path::Avx2 => &[Avx2, Fma],
            Path::Portable => &[],
        }
    }
}

/// Weight rows stored together (see [`Weights`]): the kernels' tiles take this many weight rows
/// at a time, one per lane of a 256-bit register of f32 or i32.
pub const GROUP: usize = 8;

/// Bytes of one weight row side by side with those of the other rows of its group (see
/// [`Weights`]): the four bytes one 32-bit lane multiplies and adds.
const STEP: usize = 4;

/// A Q8_0 weight matrix of `n` rows by `k` columns, laid out for the kernels.
///
/// Rows go in groups of [`GROUP`] (eight), stored block by block. Within a group's block, the
/// first four values of each of the eight rows come first (32 bytes: row 0's four, row 1's
/// four, ...), then the next four of each, and so on: each 32-byte load holds four values of
/// each of eight rows, so one multiply-add instruction against four activation values
/// (broadcast) advances eight dot products at once, and a tile reads its weights as one
/// sequential stream that the hardware prefetcher follows. Scales (as f32) are stored in the
/// same order, eight to a group's block, and so is each row's block sum times -128 (the VNNI
/// kernels' correction, see `x86`). A last group of fewer than eight rows is filled with zero
/// rows, whose outputs are never written.
pub struct Weights {
    n: usize,
    k: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// `-128 * sum(block)` for each row and block.
    corrections: Vec<i32>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Weights")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl Weights {
    /// From Q8_0 blocks as GGUF and candle store them (see [`Q8_0_BLOCK_BYTES`]), `n` rows of
    /// `k` values.
    ///
    /// The shape comes from a model file: one whose sizes do not fit a `usize` is
    /// [`Error::TooLarge`], and data of another length than the shape's is [`Error::Size`],
    /// before anything is allocated.
    pub fn from_q8_0(blocks: &[u8], n: usize, k: usize) -> Result<Self, Error> {
        if !k.is_multiple_of(BLOCK) {
            return Err(Error::NotBlocks { k });
        }
        let per_row = k / BLOCK;
        let too_large = Error::TooLarge { n, k };
        let expected = n
            .checked_mul(per_row)
            .and_then(|b| b.checked_mul(Q8_0_BLOCK_BYTES))
            .ok_or(too_large.clone())?;
        let padded = n.checked_next_multiple_of(GROUP).ok_or(too_large.clone())?;
        let values = padded.checked_mul(k).ok_or(too_large)?;
        // `padded * per_row` is at most `values`.
        let padded_blocks = padded * per_row;
        if blocks.len() != expected {
            return Err(Error::Size {
                expected,
                got: blocks.len(),
            });
        }
        let mut quants = vec![0i8; values];
        let mut scales = vec![0f32; padded_blocks];
        let mut corrections = vec![0i32; padded_blocks];
        for (idx, block) in blocks.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
            let (j, b) = (idx / per_row, idx % per_row);
            let at = Self::index(j, b, per_row);
            scales[at] = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
            let mut sum = 0i32;
            for (t, &byte) in block[2..].iter().enumerate() {
                let q = (byte as i8).max(-127);
                quants[Self::position(j, b, t, per_row)] = q;
                sum += i32::from(q);
            }
            corrections[at] = -128 * sum;
        }
        Ok(Self {
            n,
            k,
            quants,
            scales,
            corrections,
        })
    }

    /// Where row `j`'s block `b` is counted among the blocks (its scale's index).
    #[inline(always)]
    fn index(j: usize, b: usize, per_row: usize) -> usize {
        (j / GROUP * per_row + b) * GROUP + j % GROUP
    }

    /// Where value `t` of row `j`'s block `b` is stored (see [`Weights`]).
    #[inline(always)]
    fn position(j: usize, b: usize, t: usize, per_row: usize) -> usize {
        (j / GROUP * per_row + b) * GROUP * BLOCK + t / STEP * GROUP * STEP + j % GROUP * STEP + t % STEP
    }

    /// Rows (outputs of a product).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Columns (the inner dimension).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `j`, block `b`: its 32 values and its scale.
    #[inline(always)]
    fn block(&self, j: usize, b: usize) -> ([i8; BLOCK], f32) {
        let per_row = self.k / BLOCK;
        let values = std::array::from_fn(|t| self.quants[Self::position(j, b, t, per_row)]);
        (values, self.scales[Self::index(j, b, per_row)])
    }
}

/// 1.5 * 2^23: added to an f32 of magnitude at most 2^22 and subtracted again, it leaves the
/// value rounded to an integer, ties to even (IEEE's default rounding of the sum).
const ROUNDER: f32 = 12_582_912.0;

/// `m` activation rows of `k` values, quantised to 8-bit blocks once per product: the values,
/// their absolute values (the AVX2 kernel's unsigned operand), the values plus 128 (the VNNI
/// kernels' unsigned operand), and each block's scale.
pub struct Activations {
    m: usize,
    k: usize,
    quants: Vec<i8>,
    abs: Vec<u8>,
    shifted: Vec<u8>,
    scales: Vec<f32>,
}

impl Activations {
    /// Quantises `x`, rows of `k` values: each block of 32 gets the scale `max |x| / 127` and
    /// values `x / scale` rounded half to even (0 for a block of zeros). The rounding adds and
    /// subtracts 1.5 * 2^23, which rounds to the nearest integer, ties to even, in every value
    /// of at most 2^22 (these are clamped to 127 first); it vectorises with the baseline SSE2,
    /// where `f32::round` and `round_ties_even` are a call per value (a tenth of a batched
    /// decode).
    pub fn quantize(x: &[f32], k: usize) -> Result<Self, Error> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(Error::NotBlocks { k });
        }
        if !x.len().is_multiple_of(k) {
            return Err(Error::Size {
                expected: x.len().next_multiple_of(k),
                got: x.len(),
            });
        }
        let mut a = Self {
            m: x.len() / k,
            k,
            quants: vec![0i8; x.len()],
            abs: vec![0u8; x.len()],
            shifted: vec![0u8; x.len()],
            scales: vec![0f32; x.len() / BLOCK],
        };
        // The same operations, each exactly rounded by IEEE, on wider registers where the CPU
        // has them: the same values.
        #[cfg(target_arch = "x86_64")]
        if Path::Avx2.available() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { a.fill_avx2(x) };
            return Ok(a);
        }
        a.fill(x);
        Ok(a)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_avx2(&mut self, x: &[f32]) {
        self.fill(x)
    }

    /// Quantises `x` into `self`'s buffers, which have its size (see [`Activations::quantize`]).
    #[inline(always)]
    fn fill(&mut self, x: &[f32]) {
        let Self {
            quants,
            abs,
            shifted,
            scales,
            ..
        } = self;
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            // In eight lanes, so that it vectorises (a maximum, unlike a sum, does not depend on
            // the order); `max` skips NaN.
            let mut lanes = [0f32; 8];
            for c in block.chunks_exact(8) {
                for l in 0..8 {
                    lanes[l] = lanes[l].max(c[l].abs());
                }
            }
            let amax = lanes.into_iter().fold(0f32, f32::max);
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            scales[b] = d;
            let at = b * BLOCK..(b + 1) * BLOCK;
            let (q, a, s) = (&mut quants[at.clone()], &mut abs[at.clone()], &mut shifted[at]);
            for t in 0..BLOCK {
                let r = ((block[t] * id).clamp(-127.0, 127.0) + ROUNDER) - ROUNDER;
                // NaN (from a broken input) becomes 0. Then a whole number in -127..=127, which
                // converts exactly with the plain instruction (a saturating `as` goes lane by lane).
                let r = if r.is_nan() { 0.0 } else { r };
                // SAFETY: `r` is finite and within i32's range (just above).
                let v = unsafe { r.to_int_unchecked::<i32>() } as i8;
                q[t] = v;
                a[t] = v.unsigned_abs();
                s[t] = (v as u8) ^ 0x80;
            }
        }
    }

    #[inline(always)]
    fn block(&self, i: usize, b: usize) -> (&[i8], f32) {
        let start = i * self.k + b * BLOCK;
        (
            &self.quants[start..start + BLOCK],
            self.scales[i * (self.k / BLOCK) + b],
        )
    }
}

/// `a` times the transpose of `w`: `(m, n)` row-major, `out[i * n + j]` the product of
/// activation row `i` and weight row `j`. Columns are split across the current rayon pool.
///
/// A `path` this CPU cannot run is an error ([`Error::Path`]): it is checked here, on every
/// call, because a `Path` is a plain value that names an instruction set, and running one the
/// CPU lacks would be undefined behaviour. The check is a few loads of the standard library's
/// cached feature bits, nothing beside a product.
pub fn matmul(path: Path, w: &Weights, a: &Activations) -> Result<Vec<f32>, Error> {
    if a.k != w.k {
        return Err(Error::Size {
            expected: w.k,
            got: a.k,
        });
    }
    let path = path.usable()?;
    let (m, n) = (a.m, w.n);
    // The output, an `(m, n)` matrix, is reported as one.
    let len = m.checked_mul(n).ok_or(Error::TooLarge { n: m, k: n })?;
    let mut out = vec![0f32; len];
    let threads = rayon::current_num_threads().max(1);
    // A few chunks per thread, each a multiple of 16 columns so that groups never straddle two.
    let chunk = n.div_ceil(threads * 4).next_multiple_of(16).max(16);
    let out_ptr = SharedOut(out.as_mut_ptr());
    let run = |c0: usize| {
        let c1 = (c0 + chunk).min(n);
        // SAFETY: this CPU runs `path` (checked above); each call writes only columns c0..c1 of
        // each row of `out`, and the column ranges of the calls are disjoint; `out` outlives
        // them all.
        unsafe { columns(path, w, a, c0, c1, out_ptr.get(), n) };
    };
    if threads == 1 || n <= chunk {
        (0..n).step_by(chunk).for_each(run);
    } else {
        use rayon::prelude::*;
        (0..n).into_par_iter().step_by(chunk).for_each(run);
    }
    Ok(out)
}

/// The output's pointer, sent to the threads that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the threads write disjoint elements (see `matmul`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Activation rows at a time held in the cache while a block of columns goes past them.
const ROW_BLOCK: usize = 64;

/// Columns `c0..c1` of every output row, `ldo` the output's row length.
///
/// # Safety
/// This CPU must run `path`; `out` must hold `a.m * ldo` elements, and nothing else may touch columns `c0..c1` meanwhile.
unsafe fn columns(path: Path, w: &Weights, a: &Activations, c0: usize, c1: usize, out: *mut f32, ldo: usize) {
    for r0 in (0..a.m).step_by(ROW_BLOCK) {
        let r1 = (r0 + ROW_BLOCK).min(a.m);
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni | Path::AvxVnni | Path::Avx2 => x86::columns(path, w, a, r0..r1, c0..c1, out, ldo),
            _ => portable::columns(w, a, r0..r1, c0..c1, out, ldo),
        }
    }
}

/// IEEE half to single precision (exact: every f16 is an f32).
fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

#[cfg(test)]
mod tests;
