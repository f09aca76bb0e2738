//! The portable path: plain Rust, one output at a time, with the x86 kernels' arithmetic
//! exactly (see the crate doc): each block's exact integer dot product, then one fused
//! multiply-add per block.

use std::ops::Range;

use super::{Activations, Weights, BLOCK};

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
            let mut acc = 0f32;
            for b in 0..blocks {
                let (wq, dw) = w.block(j, b);
                let (xq, dx) = a.block(i, b);
                let dot: i32 = wq.iter().zip(xq).map(|(&p, &q)| i32::from(p) * i32::from(q)).sum();
                acc = (dx * dw).mul_add(dot as f32, acc);
            }
            // SAFETY: in bounds (i < a.m, j < ldo) and this output is ours (the caller's contract).
            unsafe { *out.add(i * ldo + j) = acc };
        }
    }
}
