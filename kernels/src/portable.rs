//! The portable path: plain Rust, one output at a time, with the x86 kernels' arithmetic
//! exactly (see the crate doc): eight lanes of four byte products each, one fused
//! multiply-add per lane and block, the lanes summed by [`sum_lanes`].

use std::ops::Range;

use super::{sum_lanes, Activations, Weights, BLOCK};

/// Rows `rows` by columns `cols` of the output.
///
/// # Safety
/// `out` must hold `a.m * ldo` elements, and nothing else may touch these outputs meanwhile.
pub(crate) unsafe fn columns(
    w: &Weights,
    a: &Activations,
    rows: Range<usize>,
    cols: Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    let blocks = w.k / BLOCK;
    for j in cols {
        for i in rows.clone() {
            let mut acc = [0f32; 8];
            for b in 0..blocks {
                let (wq, dw) = w.block(j, b);
                let (xq, _, dx) = a.block(i, b);
                let d = dx * dw;
                for (l, lane) in acc.iter_mut().enumerate() {
                    let p: i32 = (4 * l..4 * l + 4).map(|t| i32::from(xq[t]) * i32::from(wq[t])).sum();
                    *lane = d.mul_add(p as f32, *lane);
                }
            }
            // SAFETY: in bounds (i < a.m, j < ldo) and this output is ours (the caller's contract).
            unsafe { *out.add(i * ldo + j) = sum_lanes(acc) };
        }
    }
}
