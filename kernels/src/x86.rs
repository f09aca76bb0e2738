//! The x86 paths: AVX2, AVX-VNNI and AVX-512 VNNI, on 256-bit registers, one Q8_0 block per
//! register. They differ only in the instruction that makes a block's integer dot product into
//! eight lanes of four byte products each (`vpmaddubsw` + `vpmaddwd`, or `vpdpbusd`); those
//! lanes are exact integers, so every path gives the same bits.
//!
//! The unsigned-by-signed byte products use the sign trick: `|x| * (w * sign(x))` is `x * w`,
//! with `|x|` computed once per product (`Activations::abs`) and the sign moved onto the weight
//! with `vpsignb`. A product of two bytes of at most 127 in magnitude, two of them summed, fits
//! an i16 without saturating, which is why weights are clamped to -127 at load.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Activations, Path, Weights, BLOCK, GROUP};

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

/// The fixed lane-summing tree of the crate doc (`sum_lanes`), on a register.
#[inline(always)]
unsafe fn sum_lanes(v: __m256) -> f32 {
    // SAFETY: AVX is implied by every caller's features.
    unsafe {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
        _mm_cvtss_f32(s1)
    }
}

/// One path's kernels: `$features` enabled, `$dot(ax, sw)` the block's eight i32 lanes, tiles of
/// `$mr` activation rows by a group of four weight rows (see [`Weights`]).
macro_rules! path_kernels {
    ($module:ident, $features:literal, $mr:literal, |$ax:ident, $sw:ident| $dot:expr) => {
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
                let mut acc = [[_mm256_setzero_ps(); GROUP]; MR];
                // SAFETY: every pointer below is to a block inside `w` or `a` (rows i0..i0+MR
                // of `a`; the group of `j0`, stored whole, of `w`; blocks 0..blocks), and the
                // outputs are the caller's.
                unsafe {
                    let first = j0 / GROUP * blocks * GROUP;
                    let wq = w.quants.as_ptr().add(first * BLOCK);
                    let ws = w.scales.as_ptr().add(first);
                    let (xq, xa) = (a.quants.as_ptr(), a.abs.as_ptr());
                    for b in 0..blocks {
                        let mut wv = [_mm256_setzero_si256(); GROUP];
                        let mut dw = [0f32; GROUP];
                        for r in 0..GROUP {
                            wv[r] = _mm256_loadu_si256(wq.add((b * GROUP + r) * BLOCK).cast());
                            dw[r] = *ws.add(b * GROUP + r);
                        }
                        for i in 0..MR {
                            let row = (i0 + i) * a.k + b * BLOCK;
                            let x = _mm256_loadu_si256(xq.add(row).cast());
                            let $ax = _mm256_loadu_si256(xa.add(row).cast());
                            let dx = *a.scales.get_unchecked((i0 + i) * blocks + b);
                            for r in 0..GROUP {
                                let $sw = _mm256_sign_epi8(wv[r], x);
                                let p = _mm256_cvtepi32_ps($dot);
                                acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dw[r]), p, acc[i][r]);
                            }
                        }
                    }
                    for i in 0..MR {
                        for r in 0..GROUP {
                            if j0 + r < j_end {
                                *out.add((i0 + i) * ldo + j0 + r) = sum_lanes(acc[i][r]);
                            }
                        }
                    }
                }
            }

            /// `MR` rows from `i0` by columns `cols` (starting at a multiple of `GROUP`), a
            /// group at a time.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn strip<const MR: usize>(
                w: &Weights,
                a: &Activations,
                i0: usize,
                cols: Range<usize>,
                out: *mut f32,
                ldo: usize,
            ) {
                // SAFETY: the caller's contract, tile by tile.
                unsafe {
                    for j in cols.clone().step_by(GROUP) {
                        tile::<MR>(w, a, i0, j, cols.end, out, ldo);
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
                    let strip_cols = c..(c + 16).min(cols.end);
                    let mut i = rows.start;
                    // SAFETY: the caller's contract, strip by strip.
                    unsafe {
                        while i + $mr <= rows.end {
                            strip::<$mr>(w, a, i, strip_cols.clone(), out, ldo);
                            i += $mr;
                        }
                        while i + 2 <= rows.end {
                            strip::<2>(w, a, i, strip_cols.clone(), out, ldo);
                            i += 2;
                        }
                        if i < rows.end {
                            strip::<1>(w, a, i, strip_cols.clone(), out, ldo);
                        }
                    }
                    c = strip_cols.end;
                }
            }
        }
    };
}

// AVX2 has 16 registers: 2 rows by a group of 4 keeps its 8 accumulators, the group's 4 weight
// blocks, the activation block and its absolute value in registers.
path_kernels!(avx2, "avx2,fma", 2, |ax, sw| _mm256_madd_epi16(
    _mm256_maddubs_epi16(ax, sw),
    _mm256_set1_epi16(1)
));
// AVX-512 VL gives 32 256-bit registers: 4 by 4.
path_kernels!(avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", 4, |ax, sw| {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw)
});
path_kernels!(avxvnni, "avx2,fma,avxvnni", 2, |ax, sw| _mm256_dpbusd_avx_epi32(
    _mm256_setzero_si256(),
    ax,
    sw
));
