//! Times Ferry's kernels on SmolLM2-135M's matrix shapes, each product repeated (so its weights are
//! in the cache: decoding one sequence streams them from memory instead), for 1, 8 and 64
//! activation rows: `cargo run --release -p ferry-kernels --example shapes`.
use std::time::Instant;

use ferry_kernels::{matmul, Activations, Path, Weights, BLOCK, Q8_0_BLOCK_BYTES};

fn main() {
    let shapes = [
        (576usize, 576usize, 2),
        (192, 576, 4),
        (576, 576, 2),
        (1536, 576, 2),
        (576, 1536, 1),
        (49152, 576, 0),
    ];
    let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available()).collect();
    for m in [1usize, 8, 64] {
        for &path in &paths {
            let mut total = 0.0;
            for &(n, k, per_layer) in &shapes {
                let blocks: Vec<u8> = (0..n * k / BLOCK * Q8_0_BLOCK_BYTES)
                    .map(|i| {
                        if i % Q8_0_BLOCK_BYTES == 1 {
                            0x20
                        } else if i % Q8_0_BLOCK_BYTES == 0 {
                            0
                        } else {
                            (i * 7 % 200) as u8
                        }
                    })
                    .collect();
                let w = Weights::from_q8_0(&blocks, n, k).unwrap();
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 100) as f32 - 50.0) / 25.0).collect();
                let reps = 20;
                let t = Instant::now();
                for _ in 0..reps {
                    let a = Activations::quantize(&x, k).unwrap();
                    std::hint::black_box(matmul(path, &w, &a).unwrap());
                }
                let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
                let count = if per_layer == 0 { 1.0 } else { 30.0 * per_layer as f64 };
                total += us * count;
                println!(
                    "m={m:>2} {:>10} {n:>5}x{k:<5} {us:>9.1} us  GMAC/s {:.2}",
                    path.name(),
                    (m * n * k) as f64 / us / 1e3
                );
            }
            println!(
                "m={m:>2} {:>10} per token-forward products: {:.2} ms ({:.2} ms per row)",
                path.name(),
                total / 1e3,
                total / 1e3 / m as f64
            );
        }
    }
}
