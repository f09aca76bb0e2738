use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

fn paths() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.available()).collect()
}

fn random(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A cache of `len` positions in buffers with room for `cap` (the gap is filled with values
/// that would spoil any output that read them).
struct Buffers {
    keys: Vec<f32>,
    values: Vec<f32>,
    stride: usize,
    len: usize,
}

impl Buffers {
    fn random(rng: &mut ChaCha8Rng, heads: Heads, len: usize, cap: usize) -> Self {
        let stride = cap * heads.dim;
        let mut keys = random(rng, heads.kv * stride, 2.0);
        let mut values = random(rng, heads.kv * stride, 1.0);
        for g in 0..heads.kv {
            for x in g * stride + len * heads.dim..(g + 1) * stride {
                keys[x] = f32::NAN;
                values[x] = f32::NAN;
            }
        }
        Self {
            keys,
            values,
            stride,
            len,
        }
    }

    fn cached(&self, len: usize) -> Cached<'_> {
        Cached {
            keys: &self.keys,
            values: &self.values,
            stride: self.stride,
            len,
        }
    }
}

/// Attention in f64 with the C library's exponential.
fn reference(heads: Heads, q: &[f32], c: &Buffers) -> Vec<f64> {
    let (row, group) = (heads.query * heads.dim, heads.query / heads.kv);
    let n = q.len() / row;
    let mut out = vec![0f64; q.len()];
    for i in 0..n {
        let visible = c.len - n + i + 1;
        for h in 0..heads.query {
            let g = h / group;
            let qv = &q[i * row + h * heads.dim..][..heads.dim];
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let k = &c.keys[g * c.stride + j * heads.dim..][..heads.dim];
                    let dot: f64 = qv.iter().zip(k).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    dot / (heads.dim as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..heads.dim {
                out[i * row + h * heads.dim + d] = (0..visible)
                    .map(|j| weights[j] * f64::from(c.values[g * c.stride + j * heads.dim + d]))
                    .sum::<f64>()
                    / total;
            }
        }
    }
    out
}

const SHAPES: [Heads; 4] = [
    Heads {
        query: 9,
        kv: 3,
        dim: 64,
    },
    Heads {
        query: 4,
        kv: 4,
        dim: 16,
    },
    Heads {
        query: 6,
        kv: 2,
        dim: 20,
    },
    Heads {
        query: 2,
        kv: 1,
        dim: 7,
    },
];

#[test]
fn attention_matches_a_float64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for heads in SHAPES {
        for (n, len) in [(1, 1), (1, 37), (5, 5), (4, 70)] {
            let c = Buffers::random(&mut rng, heads, len, len + 3);
            let q = random(&mut rng, n * heads.query * heads.dim, 1.5);
            let want = reference(heads, &q, &c);
            for path in paths() {
                let mut got = vec![0f32; q.len()];
                attention(path, heads, &q, c.cached(len), &mut got).expect("attention");
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(*g) - e).abs() <= 2e-6 * (1.0 + e.abs()),
                        "{path:?} {heads:?} n={n} len={len} [{idx}]: {g} against {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn paths_rows_and_threads_give_the_same_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("pool");
    for heads in SHAPES {
        // Enough work for the pool to split it (see SERIAL_WORK).
        let (n, len) = (64, 160);
        assert!(n * heads.query * len * heads.dim >= SERIAL_WORK || heads.dim < 64);
        let c = Buffers::random(&mut rng, heads, len, len);
        let q = random(&mut rng, n * heads.query * heads.dim, 1.5);
        let row = heads.query * heads.dim;
        let mut first: Option<Vec<u32>> = None;
        for path in paths() {
            for threads in [false, true] {
                let mut all = vec![0f32; q.len()];
                let mut run = || attention(path, heads, &q, c.cached(len), &mut all);
                if threads { pool.install(run) } else { run() }.expect("attention");
                let bits: Vec<u32> = all.iter().map(|x| x.to_bits()).collect();
                match &first {
                    None => first = Some(bits),
                    Some(b) => assert!(b == &bits, "{path:?} threads={threads} {heads:?}"),
                }
            }
            // Each row alone, over the cache up to its position, as a decode step sees it.
            for i in [0, 17, n - 1] {
                let mut one = vec![0f32; row];
                let cached = c.cached(len - n + i + 1);
                attention(path, heads, &q[i * row..(i + 1) * row], cached, &mut one).expect("row");
                let bits: Vec<u32> = one.iter().map(|x| x.to_bits()).collect();
                assert!(
                    first.as_ref().is_some_and(|b| b[i * row..(i + 1) * row] == bits[..]),
                    "{path:?} row {i} alone {heads:?}"
                );
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let heads = Heads {
        query: 4,
        kv: 2,
        dim: 8,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let c = Buffers::random(&mut rng, heads, 3, 4);
    let q = vec![0.5f32; 2 * 32];
    let mut out = vec![0f32; q.len()];
    let path = Path::Portable;
    let bad_heads = Heads { query: 3, ..heads };
    assert!(attention(path, bad_heads, &q, c.cached(3), &mut out).is_err());
    assert!(attention(path, heads, &q[..31], c.cached(3), &mut out[..31]).is_err());
    assert!(attention(path, heads, &q, c.cached(3), &mut out[..32]).is_err());
    assert!(
        attention(path, heads, &q, c.cached(1), &mut out).is_err(),
        "more queries than positions"
    );
    let short = Cached {
        keys: &c.keys[..40],
        ..c.cached(3)
    };
    assert!(attention(path, heads, &q, short, &mut out).is_err());
    let overlapping = Cached {
        stride: 8,
        ..c.cached(3)
    };
    assert!(attention(path, heads, &q, overlapping, &mut out).is_err());
    assert!(attention(path, heads, &q, c.cached(3), &mut out).is_ok());
}

#[test]
fn exp_is_within_two_ulp() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 * i as f32 / 200_000.0;
        let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 2.4e-7, "relative error {worst}");
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(f32::NEG_INFINITY) < 2e-38);
    assert!(exp(f32::NAN).is_nan());
}
