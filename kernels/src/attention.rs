//! Grouped-query attention of a sequence's new positions over its cached keys and values, in
//! f32.
//!
//! Query head `h` reads KV head `h / (query heads / KV heads)`, and each query sees the
//! positions up to its own (causal). For each query and each visible position, the score is
//! the dot product of query and key divided by `sqrt(dim)`; the weights are the scores'
//! softmax; the output is the weighted sum of the values.
//!
//! # Exactness
//!
//! Every sum is kept in [`LANES`] partial sums, term `t` going to partial sum `t % LANES` by a
//! fused multiply-add (or an add), and the partial sums are then added in one fixed order; the
//! exponential is a polynomial of fused multiply-adds (see [`exp`]), not the C library's. So
//! every path (the instruction set only widens the registers) gives the same bits, and a
//! query's output depends only on its own vector and the cache up to its position: not on how
//! many queries share the call (one token of decode or a prompt chunk), nor on the thread
//! count. A generation resumed from a snapshot therefore continues bit for bit.

use rayon::prelude::*;

use crate::{Error, Path};

/// Partial sums per reduction (see the module doc).
const LANES: usize = 16;

/// Work (multiply-adds) under which a call runs on the calling thread alone: a token of decode
/// is a few microseconds of work, less than handing it to the pool.
const SERIAL_WORK: usize = 1 << 18;

/// The heads of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub query: usize,
    /// Key and value heads, each shared by `query / kv` query heads.
    pub kv: usize,
    /// Values per head.
    pub dim: usize,
}

/// One sequence's cached keys and values, `len` positions of each KV head: the key of position
/// `p` of head `g` is `keys[g * stride + p * dim..][..dim]`, its value likewise in `values`.
#[derive(Debug, Clone, Copy)]
pub struct Cached<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub stride: usize,
    pub len: usize,
}

/// Attention of `n` new positions, the last `n` of `cache` (whose keys and values it already
/// holds): `q` is `(n, heads.query, heads.dim)` row-major, and so is `out`, which it fills.
/// The query of row `i` sees positions `0..=cache.len - n + i`.
pub fn attention(path: Path, heads: Heads, q: &[f32], cache: Cached<'_>, out: &mut [f32]) -> Result<(), Error> {
    let Heads { query, kv, dim } = heads;
    if dim == 0 || kv == 0 || query == 0 || !query.is_multiple_of(kv) {
        return Err(Error::Shape(format!("{query} query heads over {kv} KV heads of {dim}")));
    }
    let row = query * dim;
    if q.is_empty() || !q.len().is_multiple_of(row) || out.len() != q.len() {
        return Err(Error::Shape(format!(
            "queries of {} values and output of {} for rows of {row}",
            q.len(),
            out.len()
        )));
    }
    let n = q.len() / row;
    let need = (kv - 1) * cache.stride + cache.len * dim;
    if n > cache.len || cache.stride < cache.len * dim || cache.keys.len() < need || cache.values.len() < need {
        return Err(Error::Shape(format!(
            "{n} queries over a cache of {} positions (stride {}, {} keys, {} values)",
            cache.len,
            cache.stride,
            cache.keys.len(),
            cache.values.len()
        )));
    }
    let path = path.usable()?;
    let group = query / kv;
    let first = cache.len - n;
    // One unit: one row's queries of one KV head, `group` heads side by side in `q` and `out`.
    let unit = |u: usize, out: &mut [f32], scores: &mut Vec<f32>| {
        let (i, g) = (u / kv, u % kv);
        let at = i * row + g * group * dim;
        let one = Unit {
            q: &q[at..at + group * dim],
            keys: &cache.keys[g * cache.stride..],
            values: &cache.values[g * cache.stride..],
            visible: first + i + 1,
            dim,
        };
        // SAFETY: `path` is usable on this CPU (checked above).
        unsafe { run(path, &one, out, scores) };
    };
    let work = n * query * (first + n) * dim;
    if work < SERIAL_WORK || rayon::current_num_threads() == 1 {
        let mut scores = Vec::new();
        for (u, out) in out.chunks_exact_mut(group * dim).enumerate() {
            unit(u, out, &mut scores);
        }
    } else {
        out.par_chunks_exact_mut(group * dim)
            .enumerate()
            .for_each_init(Vec::new, |scores, (u, out)| unit(u, out, scores));
    }
    Ok(())
}

/// The queries of one KV head for one row.
struct Unit<'a> {
    /// `group` query vectors of `dim` values.
    q: &'a [f32],
    /// The head's keys and values from position 0.
    keys: &'a [f32],
    values: &'a [f32],
    /// Positions the queries see.
    visible: usize,
    dim: usize,
}

/// [`compute`] on `path`'s instruction set.
///
/// # Safety
/// The CPU must run `path`.
unsafe fn run(path: Path, u: &Unit<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    match path {
        // SAFETY: the CPU has these features (the caller's contract).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => unsafe { compute_avx512(u, out, scores) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Path::AvxVnni | Path::Avx2 => unsafe { compute_avx2(u, out, scores) },
        _ => compute::<Plain>(u, out, scores),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn compute_avx512(u: &Unit<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    compute::<x86::Avx512>(u, out, scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn compute_avx2(u: &Unit<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    compute::<x86::Avx2>(u, out, scores)
}

/// One unit's attention: scores for every query of the group against every visible key (each
/// key read once for the whole group), then per query the softmax and the weighted sum of the
/// values (each value read once for the whole group). The model's usual shapes get a copy with
/// the sizes known, whose sums stay in registers; the arithmetic is the same.
#[inline(always)]
fn compute<K: Dot>(u: &Unit<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    match (u.dim, u.q.len() / u.dim) {
        (64, 1) => fixed::<K, 64, 1>(u, out, scores),
        (64, 2) => fixed::<K, 64, 2>(u, out, scores),
        (64, 3) => fixed::<K, 64, 3>(u, out, scores),
        (64, 4) => fixed::<K, 64, 4>(u, out, scores),
        (128, 1) => fixed::<K, 128, 1>(u, out, scores),
        (128, 2) => fixed::<K, 128, 2>(u, out, scores),
        (128, 4) => fixed::<K, 128, 4>(u, out, scores),
        _ => general::<K>(u, out, scores),
    }
}

/// [`compute`] for `G` queries of `D` values.
#[inline(always)]
fn fixed<K: Dot, const D: usize, const G: usize>(u: &Unit<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    let visible = u.visible;
    let scale = 1.0 / (D as f32).sqrt();
    scores.clear();
    scores.resize(G * visible, 0.0);
    let q = &u.q[..G * D];
    for (j, key) in u.keys[..visible * D].chunks_exact(D).enumerate() {
        for r in 0..G {
            scores[r * visible + j] = K::dot(&q[r * D..(r + 1) * D], key) * scale;
        }
    }
    // Loops, not closures: a closure does not inherit the caller's target features, and its
    // fused multiply-adds would become calls.
    let mut totals = [0f32; G];
    for (r, total) in totals.iter_mut().enumerate() {
        *total = softmax_weights(&mut scores[r * visible..(r + 1) * visible]);
    }
    let mut acc = [[0f32; D]; G];
    for (j, value) in u.values[..visible * D].chunks_exact(D).enumerate() {
        for r in 0..G {
            let p = scores[r * visible + j];
            for d in 0..D {
                acc[r][d] = p.mul_add(value[d], acc[r][d]);
            }
        }
    }
    for r in 0..G {
        for d in 0..D {
            out[r * D + d] = acc[r][d] / totals[r];
        }
    }
}

/// [`compute`] for any shape.
fn general<K: Dot>(u: &Unit<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    let (dim, visible) = (u.dim, u.visible);
    let group = u.q.len() / dim;
    let scale = 1.0 / (dim as f32).sqrt();
    scores.clear();
    scores.resize(group * visible, 0.0);
    for (j, key) in u.keys[..visible * dim].chunks_exact(dim).enumerate() {
        for r in 0..group {
            scores[r * visible + j] = K::dot(&u.q[r * dim..(r + 1) * dim], key) * scale;
        }
    }
    let mut totals = vec![0f32; group];
    for (r, total) in totals.iter_mut().enumerate() {
        *total = softmax_weights(&mut scores[r * visible..(r + 1) * visible]);
    }
    out.fill(0.0);
    for (j, value) in u.values[..visible * dim].chunks_exact(dim).enumerate() {
        for r in 0..group {
            let p = scores[r * visible + j];
            for (o, &v) in out[r * dim..(r + 1) * dim].iter_mut().zip(value) {
                *o = p.mul_add(v, *o);
            }
        }
    }
    for (r, &total) in totals.iter().enumerate() {
        for o in &mut out[r * dim..(r + 1) * dim] {
            *o /= total;
        }
    }
}

/// The dot product of two vectors, in [`LANES`] partial sums added by [`reduce`]: [`dot`], or
/// the same arithmetic in an instruction set's registers.
trait Dot {
    fn dot(a: &[f32], b: &[f32]) -> f32;
}

/// [`dot`] as written, for the portable path.
struct Plain;

impl Dot for Plain {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

/// [`dot`] in AVX-512 and AVX2 registers (the compiler splits it into pairs of lanes): the 16
/// partial sums are one 512-bit register or two 256-bit ones, and the reduction's steps are the
/// halves of [`reduce`]. Vectors whose length is not a multiple of 16 take [`dot`].
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Dot, LANES};

    pub(super) struct Avx512;
    pub(super) struct Avx2;

    /// Lanes `l` and `l + 4`, then `l + 2`, then `l + 1` of eight partial sums, as [`super::reduce`]
    /// after its first step.
    #[inline(always)]
    unsafe fn reduce8(x: __m256) -> f32 {
        // SAFETY: the caller runs with AVX2 (every function of this module is called from one
        // compiled for it).
        unsafe {
            let x = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            let x = _mm_add_ss(x, _mm_movehdup_ps(x));
            _mm_cvtss_f32(x)
        }
    }

    impl Dot for Avx512 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            if !a.len().is_multiple_of(LANES) || a.len() != b.len() {
                return super::dot(a, b);
            }
            // SAFETY: called only from `compute_avx512`, compiled for AVX-512 F; loads stay
            // within `a` and `b` (whole chunks of 16).
            unsafe {
                let mut acc = _mm512_setzero_ps();
                for c in 0..a.len() / LANES {
                    let x = _mm512_loadu_ps(a.as_ptr().add(c * LANES));
                    let y = _mm512_loadu_ps(b.as_ptr().add(c * LANES));
                    acc = _mm512_fmadd_ps(x, y, acc);
                }
                let lo = _mm512_castps512_ps256(acc);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
                reduce8(_mm256_add_ps(lo, hi))
            }
        }
    }

    impl Dot for Avx2 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            if !a.len().is_multiple_of(LANES) || a.len() != b.len() {
                return super::dot(a, b);
            }
            // SAFETY: called only from `compute_avx2`, compiled for AVX2 and FMA; loads stay
            // within `a` and `b` (whole chunks of 16).
            unsafe {
                let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for c in 0..a.len() / LANES {
                    let (pa, pb) = (a.as_ptr().add(c * LANES), b.as_ptr().add(c * LANES));
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), lo);
                    hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), hi);
                }
                reduce8(_mm256_add_ps(lo, hi))
            }
        }
    }
}

/// The dot product of `a` and `b`, in [`LANES`] partial sums.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[l] = x.mul_add(y, acc[l]);
    }
    reduce(acc)
}

/// The partial sums added in a fixed order: halves, then quarters, and so on.
#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Turns scores into unnormalised softmax weights, `exp(score - max)`, in place, and returns
/// their sum (in [`LANES`] partial sums).
#[inline(always)]
fn softmax_weights(s: &mut [f32]) -> f32 {
    // In lanes, so that it vectorises. A NaN score (a broken model) makes every weight NaN, as
    // the softmax of a NaN would.
    let mut top = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            top[l] = if c[l] > top[l] || c[l].is_nan() { c[l] } else { top[l] };
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        top[l] = if x > top[l] || x.is_nan() { x } else { top[l] };
    }
    let max = top
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m || x.is_nan() { x } else { m });
    let mut acc = [0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - max);
            acc[l] += c[l];
        }
    }
    for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x = exp(*x - max);
        acc[l] += *x;
    }
    reduce(acc)
}

/// `e^x` for `x <= 0` (and NaN), within 2 ulp, in operations that vectorise: `x = n ln 2 + r`
/// with `n` an integer and `|r| <= ln 2 / 2`, `e^r` by a polynomial (Cephes' `expf`
/// coefficients) and `2^n` built in the exponent bits. Below -87 it gives `e^-87` (about
/// 1.6e-38), a weight of nothing beside the maximum's 1.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // NaN fails the comparison and stays NaN.
    let x = if x < -87.0 { -87.0 } else { x };
    // Rounded to the nearest integer: 1.5 * 2^23 added and taken away (see `ROUNDER`); the
    // sum's low bits hold `n` too.
    let shifted = x.mul_add(LOG2E, crate::ROUNDER);
    let n = shifted - crate::ROUNDER;
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r) + 1.0;
    // `n` from the sum's bits: its mantissa is 2^22 + n (n is in -126..=0).
    let n = (shifted.to_bits() as i32).wrapping_sub(crate::ROUNDER.to_bits() as i32);
    p * f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

#[cfg(test)]
mod tests;
