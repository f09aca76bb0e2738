//! The x86 paths: AVX2, AVX-VNNI and AVX-512 VNNI, on 256-bit registers. A tile is a few
//! activation rows by a group of eight weight rows (see [`Weights`]): each instruction multiplies
//! four activation values, broadcast to all eight lanes, by four values of each of the eight
//! rows and adds them up in that row's i32 lane, so a block's eight dot products take eight
//! such steps and come out exact. Then one conversion to f32 and one fused multiply-add by the
//! scales per block and activation row, as the crate doc says every path does.
//!
//! The paths differ only in the byte products, which take an unsigned operand and a signed one.
//! VNNI (`vpdpbusd`) takes the activation plus 128 and starts from `-128 * sum(block)` of each
//! weight row, stored at load. AVX2 (`vpmaddubsw`, whose i16 pairs would saturate on that) uses
//! the sign trick: `|x| * (w * sign(x))` is `x * w`, with `|x|` computed once per product and the
//! sign moved onto the weights with `vpsignb`; a product of two bytes of at most 127 in
//! magnitude, two of them summed, fits an i16, which is why weights are clamped to -127 at load.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Activations, Path, Weights, BLOCK, GROUP, STEP};

/// Rows `rows` by columns `cols` of the output, on `path` (an x86 one).
///
/// # Safety
/// `path` must be available on this CPU; `out` must hold `a.m * ldo` elements, and nothing
/// else may touch these outputs meanwhile.
pub(crate) unsafe fn columns(
    path: Path,
    w: &Weights,
    a: &Activations,
    rows: Range<usize>,
    cols: Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    // SAFETY: the caller checked the path's features; the rest is its contract.
    unsafe {
        match path {
            Path::Avx512Vnni => avx512vnni::columns(w, a, rows, cols, out, ldo),
            Path::AvxVnni => avxvnni::columns(w, a, rows, cols, out, ldo),
            _ => avx2::columns(w, a, rows, cols, out, ldo),
        }
    }
}

/// Writes the eight lanes of `acc` (a group's rows `j0..j0 + 8`) to row `i` of the output, those
/// before `j_end` only.
#[inline(always)]
unsafe fn store(acc: __m256, i: usize, j0: usize, j_end: usize, out: *mut f32, ldo: usize) {
    let mut lanes = [0f32; GROUP];
    // SAFETY: `lanes` holds eight f32; the outputs written are the caller's.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        for (r, v) in lanes.iter().enumerate().take(j_end.saturating_sub(j0)) {
            *out.add(i * ldo + j0 + r) = *v;
        }
    }
}

/// One path's kernels: `$features` enabled, tiles of `$mr` activation rows by a group of eight
/// weight rows (see [`Weights`]), `$block` the exact i32 dot products of activation row `i`'s
/// block `b` with the group's eight rows (see the two below).
macro_rules! path_kernels {
    ($module:ident, $features:literal, $mr:literal, $block:ident) => {
        mod $module {
            use super::*;

            /// `MR` activation rows from `i0` by the group of weight rows from `j0` (a multiple
            /// of `GROUP`); outputs of rows at or past `j_end` are not written.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn tile<const MR: usize>(
                w: &Weights,
                a: &Activations,
                i0: usize,
                j0: usize,
                j_end: usize,
                out: *mut f32,
                ldo: usize,
            ) {
                let blocks = w.k / BLOCK;
                let mut acc = [_mm256_setzero_ps(); MR];
                // SAFETY: every pointer below is to a block inside `w` or `a` (rows i0..i0+MR
                // of `a`; the group of `j0`, stored whole, of `w`; blocks 0..blocks), and the
                // outputs are the caller's.
                unsafe {
                    let first = j0 / GROUP * blocks;
                    for b in 0..blocks {
                        let at = (first + b) * GROUP;
                        let wq = w.quants.as_ptr().add(at * BLOCK);
                        let dw = _mm256_loadu_ps(w.scales.as_ptr().add(at));
                        let corr = _mm256_loadu_si256(w.corrections.as_ptr().add(at).cast());
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let row = (i0 + i) * a.k + b * BLOCK;
                            let dot = $block(wq, a, row, corr);
                            let dx = _mm256_set1_ps(*a.scales.get_unchecked((i0 + i) * blocks + b));
                            *acc = _mm256_fmadd_ps(_mm256_mul_ps(dx, dw), _mm256_cvtepi32_ps(dot), *acc);
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        store(*acc, i0 + i, j0, j_end, out, ldo);
                    }
                }
            }

            /// See [`super::columns`]. Columns go in strips of 16, and each strip meets every
            /// row, so its weights stay in the cache while the rows go past.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn columns(
                w: &Weights,
                a: &Activations,
                rows: Range<usize>,
                cols: Range<usize>,
                out: *mut f32,
                ldo: usize,
            ) {
                debug_assert!(cols.start % GROUP == 0);
                let mut c = cols.start;
                while c < cols.end {
                    let strip = c..(c + 16).min(cols.end);
                    let mut i = rows.start;
                    while i < rows.end {
                        // Tiles of $mr rows, then of 4, 2 and 1 for what is left.
                        let left = rows.end - i;
                        let take = [$mr, 4, 2, 1].into_iter().find(|&t| t <= left).unwrap_or(1);
                        for j in strip.clone().step_by(GROUP) {
                            // SAFETY: the caller's contract, tile by tile.
                            unsafe {
                                if take == $mr {
                                    tile::<$mr>(w, a, i, j, strip.end, out, ldo);
                                } else if take == 4 {
                                    tile::<4>(w, a, i, j, strip.end, out, ldo);
                                } else if take == 2 {
                                    tile::<2>(w, a, i, j, strip.end, out, ldo);
                                } else {
                                    tile::<1>(w, a, i, j, strip.end, out, ldo);
                                }
                            }
                        }
                        i += take;
                    }
                    c = strip.end;
                }
            }
        }
    };
}

/// The block dot products with VNNI (`vpdpbusd`, `$dpbusd`): the activation plus 128 (unsigned)
/// times the weights (signed), four values at a time broadcast against the group's eight rows,
/// starting from the rows' corrections (`-128 * sum(block)`), so the result is the exact dot
/// product. Two chains, added at the end, keep two multiply-adds in flight.
macro_rules! vnni_block {
    ($name:ident, $features:literal, $dpbusd:ident) => {
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $name(wq: *const i8, a: &Activations, row: usize, corr: __m256i) -> __m256i {
            // SAFETY: `wq` points at a group's block (256 bytes) and `row` at an activation
            // block (32 bytes), both inside their buffers (the caller's contract).
            unsafe {
                let x = a.shifted.as_ptr().add(row);
                let mut even = corr;
                let mut odd = _mm256_setzero_si256();
                for s in (0..BLOCK / STEP).step_by(2) {
                    let x0 = _mm256_set1_epi32(x.add(s * STEP).cast::<i32>().read_unaligned());
                    let x1 = _mm256_set1_epi32(x.add((s + 1) * STEP).cast::<i32>().read_unaligned());
                    let w0 = _mm256_loadu_si256(wq.add(s * GROUP * STEP).cast());
                    let w1 = _mm256_loadu_si256(wq.add((s + 1) * GROUP * STEP).cast());
                    even = $dpbusd(even, x0, w0);
                    odd = $dpbusd(odd, x1, w1);
                }
                _mm256_add_epi32(even, odd)
            }
        }
    };
}

vnni_block!(
    block_avx512vnni,
    "avx2,fma,avx512f,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32
);
vnni_block!(block_avxvnni, "avx2,fma,avxvnni", _mm256_dpbusd_avx_epi32);

/// The block dot products with AVX2: `vpmaddubsw` takes the activation's absolute value
/// (unsigned) against the weights with the activation's sign moved onto them (`vpsignb`; two
/// products of at most 127 in magnitude fit an i16), then `vpmaddwd` by ones makes the eight
/// lanes of four products, added up exactly in i32.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block_avx2(wq: *const i8, a: &Activations, row: usize, _corr: __m256i) -> __m256i {
    // SAFETY: as for the VNNI blocks.
    unsafe {
        let (xq, xa) = (a.quants.as_ptr().add(row), a.abs.as_ptr().add(row));
        let ones = _mm256_set1_epi16(1);
        let mut chains = [_mm256_setzero_si256(); 2];
        for s in 0..BLOCK / STEP {
            let x = _mm256_set1_epi32(xq.add(s * STEP).cast::<i32>().read_unaligned());
            let ax = _mm256_set1_epi32(xa.add(s * STEP).cast::<i32>().read_unaligned());
            let w = _mm256_loadu_si256(wq.add(s * GROUP * STEP).cast());
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), ones);
            chains[s % 2] = _mm256_add_epi32(chains[s % 2], p);
        }
        let [even, odd] = chains;
        _mm256_add_epi32(even, odd)
    }
}

// AVX2 has 16 registers: two activation rows at a time beside the group's loads and the chains
// (four measured no better).
path_kernels!(avx2, "avx2,fma", 2, block_avx2);
// AVX-512 VL gives 32 256-bit registers: 8 rows, two chains each (faster than 4 or 6 rows with
// 8 and 64 rows in all; measured with `examples/shapes`).
path_kernels!(avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", 8, block_avx512vnni);
path_kernels!(avxvnni, "avx2,fma,avxvnni", 2, block_avxvnni);
