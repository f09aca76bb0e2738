use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// `n` rows of `k` random values as Q8_0 blocks (scale `max / 127`, f16), the way GGUF and
/// candle store them; and the same values dequantised.
fn random_q8_0(rng: &mut ChaCha8Rng, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut values = Vec::new();
    for _ in 0..n * k / BLOCK {
        let x: Vec<f32> = (0..BLOCK).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        // A scale that f16 holds exactly: 2^-7 steps.
        let d16 = f32_to_f16_round_down(amax / 127.0);
        let d = f16_to_f32(d16);
        bytes.extend(d16.to_le_bytes());
        for v in x {
            let q = (v / d).round().clamp(-127.0, 127.0) as i8;
            bytes.push(q as u8);
            values.push(f32::from(q) * d);
        }
    }
    (bytes, values)
}

/// An f16 at or below `v` (positive, normal range): its top mantissa bits.
fn f32_to_f16_round_down(v: f32) -> u16 {
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "{v} outside the normal f16 range");
    ((exp as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

fn random_rows(rng: &mut ChaCha8Rng, m: usize, k: usize) -> Vec<f32> {
    (0..m * k).map(|_| rng.random_range(-3.0f32..3.0)).collect()
}

/// The product in f64 of the quantised values: what the kernels compute, before f32 rounding.
fn exact(w: &Weights, a: &Activations) -> Vec<f64> {
    let blocks = w.k / BLOCK;
    let mut out = vec![0f64; a.m * w.n];
    for i in 0..a.m {
        for j in 0..w.n {
            let mut s = 0f64;
            for b in 0..blocks {
                let (wq, dw) = w.block(j, b);
                let (xq, dx) = a.block(i, b);
                let dot: i32 = wq.iter().zip(xq).map(|(&p, &q)| i32::from(p) * i32::from(q)).sum();
                s += f64::from(dx) * f64::from(dw) * f64::from(dot);
            }
            out[i * w.n + j] = s;
        }
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn paths() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.available()).collect()
}

#[test]
fn every_path_gives_the_exact_product_to_f32_rounding() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (m, n, k) in [(1, 7, 32), (3, 33, 64), (9, 50, 576), (64 + 5, 19, 96)] {
        let (blocks, _) = random_q8_0(&mut rng, n, k);
        let w = Weights::from_q8_0(&blocks, n, k).expect("weights");
        let a = Activations::quantize(&random_rows(&mut rng, m, k), k).expect("activations");
        let want = exact(&w, &a);
        for path in paths() {
            let got = matmul(path, &w, &a).expect("product");
            for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                // Each block adds one rounding of a value no larger than the sum of magnitudes.
                let bound = 1e-5 * (1.0 + e.abs()) * (k / BLOCK) as f64;
                assert!(
                    (f64::from(*g) - e).abs() <= bound,
                    "{} ({m}x{n}x{k}) output {idx}: {g} against {e}",
                    path.name()
                );
            }
        }
    }
}

#[test]
fn paths_tiles_and_threads_give_the_same_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (m, n, k) = (11, 70, 192);
    let (blocks, _) = random_q8_0(&mut rng, n, k);
    let w = Weights::from_q8_0(&blocks, n, k).expect("weights");
    let x = random_rows(&mut rng, m, k);
    let all = Activations::quantize(&x, k).expect("activations");
    let reference = bits(&matmul(Path::Portable, &w, &all).expect("product"));
    for path in paths() {
        // The whole batch, on one thread and on three.
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let got = pool.install(|| matmul(path, &w, &all)).expect("product");
            assert_eq!(bits(&got), reference, "{} on {threads} threads", path.name());
        }
        // Each row alone, and every run of rows from it (another tile shape each time).
        for start in 0..m {
            for len in 1..=(m - start).min(6) {
                let rows = Activations::quantize(&x[start * k..(start + len) * k], k).expect("activations");
                let got = matmul(path, &w, &rows).expect("product");
                assert_eq!(
                    bits(&got),
                    reference[start * n..(start + len) * n],
                    "{}: rows {start}..{}",
                    path.name(),
                    start + len
                );
            }
        }
    }
}

#[test]
fn the_product_approximates_the_float_product() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (m, n, k) = (4, 16, 576);
    let (blocks, values) = random_q8_0(&mut rng, n, k);
    let w = Weights::from_q8_0(&blocks, n, k).expect("weights");
    let x = random_rows(&mut rng, m, k);
    let got = matmul(Path::detect(), &w, &Activations::quantize(&x, k).expect("activations")).expect("product");
    for i in 0..m {
        for j in 0..n {
            let row = &x[i * k..(i + 1) * k];
            let col = &values[j * k..(j + 1) * k];
            let want: f32 = row.iter().zip(col).map(|(a, b)| a * b).sum();
            let magnitude: f32 = row.iter().zip(col).map(|(a, b)| (a * b).abs()).sum();
            // Activations are quantised to 8 bits: off by a small part of the magnitudes.
            assert!(
                (got[i * n + j] - want).abs() <= 0.01 * magnitude,
                "output ({i}, {j}): {} against {want}",
                got[i * n + j]
            );
        }
    }
}

#[test]
fn bad_shapes_and_odd_values_are_handled() {
    assert_eq!(
        Weights::from_q8_0(&[0; 34], 1, 33).unwrap_err(),
        Error::NotBlocks { k: 33 }
    );
    assert!(matches!(Weights::from_q8_0(&[0; 33], 1, 32), Err(Error::Size { .. })));
    assert!(matches!(Activations::quantize(&[0.0; 48], 32), Err(Error::Size { .. })));
    assert_eq!(
        Activations::quantize(&[0.0; 32], 0).err(),
        Some(Error::NotBlocks { k: 0 })
    );
    // A weight of -128 is clamped; a block of zeros, an infinity and a NaN quantise without
    // panicking, and zeros give zeros.
    let mut blocks = vec![0u8; 34];
    blocks[..2].copy_from_slice(&0x3c00u16.to_le_bytes()); // 1.0
    blocks[2] = 0x80; // -128
    let w = Weights::from_q8_0(&blocks, 1, 32).expect("weights");
    let (q, d) = w.block(0, 0);
    assert_eq!((q[0], &q[1..], d), (-127, &[0i8; 31][..], 1.0));
    let mut x = vec![0f32; 96];
    x[32] = f32::INFINITY;
    x[64] = f32::NAN;
    let a = Activations::quantize(&x, 32).expect("activations");
    for path in paths() {
        let out = matmul(path, &w, &a).expect("product");
        assert_eq!(out[0], 0.0, "{}", path.name());
    }
    let other = Weights::from_q8_0(&[0; 68], 1, 64).expect("weights");
    assert!(matmul(Path::Portable, &other, &a).is_err());
}

#[test]
fn activations_round_half_to_even() {
    // Scale 127 / 127 = 1: the values are their own quotients.
    let mut x = vec![0f32; BLOCK];
    let cases = [
        (127.0, 127),
        (0.5, 0),
        (1.5, 2),
        (2.5, 2),
        (-0.5, 0),
        (-1.5, -2),
        (-2.5, -2),
        (3.49, 3),
        (-3.51, -4),
    ];
    for (t, (v, _)) in cases.iter().enumerate() {
        x[t] = *v;
    }
    let a = Activations::quantize(&x, BLOCK).expect("activations");
    let (q, d) = a.block(0, 0);
    assert_eq!(d, 1.0);
    for (t, (v, want)) in cases.iter().enumerate() {
        assert_eq!(i32::from(q[t]), *want, "{v}");
        assert_eq!(a.abs[t], q[t].unsigned_abs());
        assert_eq!(i32::from(a.shifted[t]), i32::from(q[t]) + 128);
    }
}

#[test]
fn half_floats_convert_exactly() {
    for (h, f) in [
        (0x0000u16, 0.0f32),
        (0x8000, -0.0),
        (0x3c00, 1.0),
        (0xc000, -2.0),
        (0x7bff, 65504.0),
        (0x0001, 2f32.powi(-24)),
        (0x0200, 2f32.powi(-15)),
        (0x03ff, 1023.0 * 2f32.powi(-24)),
        (0x0400, 2f32.powi(-14)),
        (0x7c00, f32::INFINITY),
    ] {
        assert_eq!(f16_to_f32(h).to_bits(), f.to_bits(), "{h:#06x}");
    }
    assert!(f16_to_f32(0x7e00).is_nan());
}

#[test]
fn the_path_can_be_named() {
    assert!(Path::Portable.available());
    assert!(Path::detect().available());
    for p in Path::ALL {
        assert_eq!(Path::ALL.into_iter().find(|q| q.name() == p.name()), Some(p));
        match Path::from_name(p.name()) {
            Ok(q) => assert!(q == p && p.available()),
            Err(e) => assert!(!p.available() && e.to_string().contains("cannot run"), "{e}"),
        }
    }
    assert!(Path::from_name("avx1024").is_err_and(|e| e.to_string().contains("unknown")));
}

#[test]
fn activations_quantise_alike_on_every_instruction_set() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut x = random_rows(&mut rng, 7, 96);
    for (i, odd) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-40, 3e38]
        .into_iter()
        .enumerate()
    {
        x[i * 37] = odd;
    }
    // Halves exactly between two steps, to exercise the rounding.
    x[300..332]
        .iter_mut()
        .enumerate()
        .for_each(|(t, v)| *v = t as f32 + 0.5 - 16.0);
    let a = Activations::quantize(&x, 96).expect("activations");
    let mut plain = Activations::quantize(&vec![0f32; x.len()], 96).expect("activations");
    plain.fill(&x);
    assert_eq!(a.quants, plain.quants);
    assert_eq!(a.abs, plain.abs);
    assert_eq!(a.shifted, plain.shifted);
    assert_eq!(bits(&a.scales), bits(&plain.scales));
}

#[test]
fn matmul_and_attention_refuse_a_path_whose_features_the_probe_denies() {
    // This CPU may have every feature: the probe is made to deny them, so that the check at
    // the entries is what is tested (see `cpu`).
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (m, n, k) = (2, 9, 64);
    let (blocks, _) = random_q8_0(&mut rng, n, k);
    let w = Weights::from_q8_0(&blocks, n, k).expect("weights");
    let a = Activations::quantize(&random_rows(&mut rng, m, k), k).expect("activations");
    let heads = Heads {
        query: 2,
        kv: 1,
        dim: 16,
    };
    let (keys, values) = (vec![0.5f32; 3 * 16], vec![0.25f32; 3 * 16]);
    let cache = Cached {
        keys: &keys,
        values: &values,
        stride: 3 * 16,
        len: 3,
    };
    let q = vec![1f32; 2 * 16];
    for (path, feature) in [
        (Path::Avx512Vnni, Feature::Avx512Vnni),
        (Path::Avx512Vnni, Feature::Avx512Vl),
        (Path::AvxVnni, Feature::AvxVnni),
        (Path::Avx2, Feature::Fma),
        (Path::Avx2, Feature::Avx2),
    ] {
        cpu::tests::without(&[feature], || {
            assert!(!path.available(), "{} without {feature:?}", path.name());
            let refused = matmul(path, &w, &a).expect_err("matmul on a path the CPU lacks");
            assert!(refused.to_string().contains("cannot run"), "{refused}");
            let mut out = vec![0f32; q.len()];
            let refused = attention(path, heads, &q, cache, &mut out).expect_err("attention on a path the CPU lacks");
            assert!(refused.to_string().contains("cannot run"), "{refused}");
            // The portable path needs nothing and still runs.
            assert!(matmul(Path::Portable, &w, &a).is_ok());
        });
    }
    // Denying AVX2 denies every x86 path, since each needs it.
    cpu::tests::without(&[Feature::Avx2], || {
        assert_eq!(Path::detect(), Path::Portable);
    });
}

#[test]
fn weight_shapes_whose_sizes_overflow_are_an_error() {
    for (n, k) in [
        (usize::MAX / 2, 64),
        (1 << 40, 1 << 40),
        // n * k fits, but not the bytes of its blocks (34 for every 32 values).
        (1, usize::MAX / BLOCK * BLOCK),
        // The blocks' bytes fit, but not the values of the rows padded to a whole group.
        (1, usize::MAX / Q8_0_BLOCK_BYTES * BLOCK),
        (usize::MAX - 3, 0),
    ] {
        assert_eq!(
            Weights::from_q8_0(&[0; 68], n, k).unwrap_err(),
            Error::TooLarge { n, k },
            "{n} x {k}"
        );
    }
    // A shape whose buffers could be sized but whose data is not there is a size error.
    let n = usize::MAX / Q8_0_BLOCK_BYTES;
    assert!(matches!(
        Weights::from_q8_0(&[0; 68], n, BLOCK),
        Err(Error::Size { got: 68, .. })
    ));
}

#[test]
fn an_output_too_large_to_count_is_an_error() {
    // No machine holds inputs this large: the values are made up, with empty buffers, to reach
    // the output's size computation (nothing reads the buffers before it).
    let (m, n) = (1usize << 40, 1usize << 40);
    let w = Weights {
        n,
        k: BLOCK,
        quants: Vec::new(),
        scales: Vec::new(),
        corrections: Vec::new(),
    };
    let a = Activations {
        m,
        k: BLOCK,
        quants: Vec::new(),
        abs: Vec::new(),
        shifted: Vec::new(),
        scales: Vec::new(),
    };
    assert_eq!(
        matmul(Path::Portable, &w, &a).unwrap_err(),
        Error::TooLarge { n: m, k: n }
    );
}
