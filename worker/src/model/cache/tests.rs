use candle_nn::kv_cache::KvCache;

use super::*;

fn config() -> LlamaConfig {
    LlamaConfig {
        n_layer: 3,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 8,
        embedding_length: 32,
        context_length: 2048,
        rms_norm_eps: 1e-5,
        rope_freq_base: 10_000.0,
        vocab_size: 100,
    }
}

/// Keys (or values, `sign` -1) of `n` positions from `from` of layer `l`, `(1, heads, n, dim)`:
/// distinct, deterministic, and not round numbers.
fn kv(c: &LlamaConfig, l: usize, from: usize, n: usize, sign: f32) -> Tensor {
    let values: Vec<f32> = (0..c.n_kv_head * n * c.head_dim)
        .map(|i| {
            let (h, p, d) = (i / (n * c.head_dim), from + (i / c.head_dim) % n, i % c.head_dim);
            sign * ((l * 1009 + h * 101 + p * 7 + d) as f32 * 0.37).sin()
        })
        .collect();
    Tensor::from_vec(values, (1, c.n_kv_head, n, c.head_dim), &Device::Cpu).expect("tensor")
}

/// A cache built as the engine builds one: the prompt in chunks of 64, then one token at a time.
fn generated(c: &LlamaConfig, prompt: usize, tokens: usize) -> SequenceCache {
    let mut cache = SequenceCache::new(c);
    let mut steps: Vec<usize> = (0..prompt).step_by(64).map(|at| (prompt - at).min(64)).collect();
    steps.extend(std::iter::repeat_n(1, tokens));
    for n in steps {
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            layer
                .append(&kv(c, l, cache.len, n, 1.0), &kv(c, l, cache.len, n, -1.0))
                .expect("append");
        }
        cache.len += n;
    }
    cache
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .expect("flatten")
        .to_vec1::<f32>()
        .expect("values")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Two caches hold the same bits in the same layout: length, capacity, strides, and every
/// value of the buffers, the zeros past the length included.
fn assert_identical(a: &SequenceCache, b: &SequenceCache) {
    assert_eq!(a.len(), b.len());
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        assert_eq!(x.current_seq_len(), y.current_seq_len(), "layer {l}");
        let ((xk, xv), (yk, yv)) = (x.buffers().expect("buffers"), y.buffers().expect("buffers"));
        for (p, q) in [(xk, yk), (xv, yv)] {
            assert_eq!(p.dims(), q.dims(), "layer {l}: capacity");
            assert_eq!(p.stride(), q.stride(), "layer {l}: strides");
            assert!(bits(p) == bits(q), "layer {l}: values");
        }
    }
}

#[test]
fn a_layer_grows_in_whole_chunks_exactly_as_candles_cache() {
    let c = config();
    let mut ours = LayerCache::default();
    let mut candles = KvCache::new(2, CACHE_CHUNK);
    let mut len = 0;
    for n in [64, 64, 64, 63, 1, 1, 300, 1, 30] {
        let (k, v) = (kv(&c, 0, len, n, 1.0), kv(&c, 0, len, n, -1.0));
        let (ok, ov) = ours.append(&k, &v).expect("ours");
        let (ck, cv) = candles.append(&k, &v).expect("candle's");
        len += n;
        assert_eq!(ours.current_seq_len(), len);
        assert!(bits(&ok) == bits(&ck) && bits(&ov) == bits(&cv), "at {len}");
        let (buffer, theirs) = (ours.buffers().expect("buffers").0, candles.k_cache().all_data());
        let theirs = theirs.as_ref().expect("candle's buffer");
        assert_eq!(buffer.dims(), theirs.dims(), "capacity at {len}");
        assert_eq!(buffer.dim(2).expect("capacity"), allocated_positions(len));
        assert!(bits(buffer) == bits(theirs), "buffer at {len}");
    }
}

#[test]
fn a_restored_cache_is_the_generated_one_bit_for_bit_and_in_layout() {
    let c = config();
    for (prompt, tokens) in [(5, 3), (200, 56), (256, 1), (300, 250)] {
        let original = generated(&c, prompt, tokens);
        let len = original.len();
        // Pieces as snapshots leave them: a first one, then smaller ones.
        let cuts = [0, len / 2, len / 2 + len / 5, len];
        let mut restore = CacheRestore::new(&c, len);
        for w in cuts.windows(2).filter(|w| w[1] > w[0]) {
            let values = values_of(&original.range_tensors(w[0], w[1]).expect("range")).expect("values");
            restore
                .append(w[1] - w[0], |l| (values[l].0.clone(), values[l].1.clone()))
                .expect("append");
        }
        let restored = restore.finish(&Device::Cpu).expect("finish");
        assert_identical(&original, &restored);
        // And it goes on as the original does.
        let (mut a, mut b) = (original, restored);
        for cache in [&mut a, &mut b] {
            for (l, layer) in cache.layers.iter_mut().enumerate() {
                let at = cache.len;
                layer
                    .append(&kv(&c, l, at, 1, 1.0), &kv(&c, l, at, 1, -1.0))
                    .expect("append");
            }
            cache.len += 1;
        }
        assert_identical(&a, &b);
    }
}

#[test]
fn a_deep_copy_is_identical_and_independent() {
    let c = config();
    let original = generated(&c, 100, 200);
    let mut copy = original.deep_copy(&c).expect("copy");
    assert_identical(&original, &copy);
    let before = bits(original.layers[0].buffers().expect("buffers").0);
    copy.layers[0]
        .append(&kv(&c, 0, 300, 1, 9.0), &kv(&c, 0, 300, 1, 9.0))
        .expect("append");
    assert!(
        bits(original.layers[0].buffers().expect("buffers").0) == before,
        "the copy shares a buffer"
    );
}

#[test]
fn a_restore_holds_the_cache_and_refuses_what_does_not_fit() {
    let c = config();
    let restore = CacheRestore::new(&c, 300);
    let held: usize = restore.layers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert_eq!(
        held,
        allocated_positions(300) * c.n_kv_head * c.head_dim * 2 * c.n_layer,
        "whole chunks, nothing more"
    );
    let per = |n: usize| vec![0.5f32; n * c.n_kv_head * c.head_dim];
    let mut restore = CacheRestore::new(&c, 10);
    assert!(
        restore.append(11, |_| (per(11), per(11))).is_err(),
        "more positions than made for"
    );
    assert!(restore.append(4, |_| (per(4), per(3))).is_err(), "values short");
    let mut restore = CacheRestore::new(&c, 10);
    assert!(restore.append(4, |_| (per(5), per(4))).is_err(), "keys long");
    let mut restore = CacheRestore::new(&c, 10);
    restore.append(4, |_| (per(4), per(4))).expect("append");
    assert!(restore.finish(&Device::Cpu).is_err(), "6 positions missing");
}
