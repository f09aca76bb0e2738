//! Choosing the next token from the logits: a pure function of the logits, the sampling
//! parameters, the seed and the position.
//!
//! The random number for the token at position `n` of a completion is drawn from a ChaCha8
//! stream selected by `n` under the request's seed, never from a generator that advances as
//! tokens go by. So a generation stopped after any token and resumed elsewhere (with the same
//! logits, which the restored KV cache gives) draws exactly what the uninterrupted run drew.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to choose tokens. `temperature == 0` is greedy decoding, and then the rest is ignored;
/// so is any temperature too small to divide by in f32, where sampling happens (see
/// [`SamplingParams::is_greedy`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Nucleus: keep the most likely tokens until their probability reaches this (1 keeps all).
    pub top_p: f64,
    /// Keep this many most likely tokens (0 keeps all).
    pub top_k: usize,
    pub seed: u64,
}

impl SamplingParams {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };

    /// Greedy when the temperature, as the f32 the logits are divided by, is not a normal
    /// positive number: zero, below zero, or so small that it rounds to zero or is subnormal in
    /// f32 (below about 1.2e-38). Dividing by such a number makes the logits infinite or NaN,
    /// which would sample nonsense (the least likely token, once); in the limit a tiny
    /// temperature *is* greedy, which is what a caller asking for one expects.
    pub fn is_greedy(&self) -> bool {
        let t = self.temperature as f32;
        !(t.is_normal() && t > 0.0)
    }
}

/// The token to emit at completion position `position`.
///
/// Ties between equally likely tokens go to the lower id, so the choice does not depend on
/// sort stability or on the platform.
pub fn sample(logits: &[f32], params: &SamplingParams, position: u64) -> u32 {
    if params.is_greedy() || logits.len() < 2 {
        return argmax(logits);
    }
    // Candidates ordered by logit, highest first; NaN logits (a broken model) sort last.
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        let (la, lb) = (logits[a as usize], logits[b as usize]);
        lb.partial_cmp(&la)
            .unwrap_or_else(|| la.is_nan().cmp(&lb.is_nan()))
            .then(a.cmp(&b))
    });
    if params.top_k > 0 {
        order.truncate(params.top_k.max(1));
    }
    let t = params.temperature as f32;
    let max = logits[order[0] as usize];
    // A NaN logit (a broken model) or an infinite one gives a NaN weight here: it counts as
    // nothing, and if nothing is left, the most likely token is the answer.
    let mut probs: Vec<f32> = order
        .iter()
        .map(|&i| ((logits[i as usize] - max) / t).exp())
        .map(|p| if p.is_finite() { p } else { 0.0 })
        .collect();
    let total: f32 = probs.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return order[0];
    }
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cum = 0f32;
        let keep = probs
            .iter()
            .position(|&p| {
                cum += p;
                f64::from(cum) >= params.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let kept: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
    }
    let u: f32 = draw(params.seed, position);
    let mut cum = 0f32;
    for (&id, &p) in order.iter().zip(&probs) {
        cum += p;
        if u < cum {
            return id;
        }
    }
    // Rounding can leave the cumulative sum a hair under 1: the last token that has any weight.
    order
        .iter()
        .zip(&probs)
        .rev()
        .find(|(_, &p)| p > 0.0)
        .map_or(order[0], |(&id, _)| id)
}

/// The uniform number in `[0, 1)` for `position` under `seed`.
fn draw(seed: u64, position: u64) -> f32 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(position);
    rng.random::<f32>()
}

/// The first index of the largest logit that is not NaN; the last index if all are NaN.
///
/// Kept in lanes (each the first index of the largest value among every `LANES`-th logit), then
/// the lanes compared, so that the compiler vectorises the scan over the vocabulary: greedy
/// decoding runs it for every token of every sequence.
fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 8;
    let mut value = [f32::NAN; LANES];
    let mut index = [0u32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        for l in 0..LANES {
            // Greater, or the first value this lane sees that is a number.
            if chunk[l] > value[l] || (value[l].is_nan() && !chunk[l].is_nan()) {
                value[l] = chunk[l];
                index[l] = (c * LANES + l) as u32;
            }
        }
    }
    let base = logits.len() - rest.len();
    let mut best: Option<(f32, u32)> = None;
    let tail = rest.iter().enumerate().map(|(l, &v)| (v, (base + l) as u32));
    for (v, i) in value.into_iter().zip(index).chain(tail) {
        if v.is_nan() {
            continue;
        }
        best = match best {
            Some((bv, bi)) if bv > v || (bv == v && bi < i) => Some((bv, bi)),
            _ => Some((v, i)),
        };
    }
    best.map_or(logits.len().saturating_sub(1) as u32, |(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sample(&[0.1, 3.0, 3.0, -1.0], &SamplingParams::GREEDY, 0), 1);
        assert_eq!(sample(&[f32::NAN, 1.0], &SamplingParams::GREEDY, 0), 1);
    }

    #[test]
    fn argmax_in_lanes_equals_the_plain_scan() {
        // The scan it replaces: the first maximum, NaN never chosen over a number.
        fn plain(logits: &[f32]) -> u32 {
            let mut best = 0usize;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] || logits[best].is_nan() {
                    best = i;
                }
            }
            best as u32
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let pool = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -0.0, 0.0, 1.0, 2.0, -3.0];
        for len in 1..70 {
            for _ in 0..200 {
                let logits: Vec<f32> = (0..len)
                    .map(|_| {
                        if rng.random_bool(0.5) {
                            pool[rng.random_range(0..pool.len())]
                        } else {
                            rng.random_range(-4.0..4.0)
                        }
                    })
                    .collect();
                assert_eq!(argmax(&logits), plain(&logits), "{logits:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN; 20]), 19);
    }

    #[test]
    fn same_inputs_same_token_at_any_position_in_any_order() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = params(0.9, 0.95, 40, 1234);
        let forward: Vec<u32> = (0..50).map(|n| sample(&logits, &p, n)).collect();
        let backward: Vec<u32> = (0..50).rev().map(|n| sample(&logits, &p, n)).collect();
        assert_eq!(forward, backward.into_iter().rev().collect::<Vec<_>>());
        // And the draws actually vary with the position, or this test proves nothing.
        assert!(forward.iter().any(|&t| t != forward[0]));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.5, 2.0, 1.9, 0.0];
        for n in 0..20 {
            assert_eq!(sample(&logits, &params(1.5, 1.0, 1, 9), n), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass at t=1; with top_p 0.5 nothing else may be drawn.
        let logits = [4.0, 2.0, 0.0, 0.0];
        for n in 0..200 {
            assert_eq!(sample(&logits, &params(1.0, 0.5, 0, 5), n), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens at probabilities e/(1+e) = 0.731 and 0.269.
        let logits = [1.0, 0.0];
        let hits = (0..4000)
            .filter(|&n| sample(&logits, &params(1.0, 1.0, 0, 77), n) == 0)
            .count();
        let share = hits as f64 / 4000.0;
        assert!((share - 0.731).abs() < 0.03, "share {share}");
    }

    #[test]
    fn temperatures_too_small_for_f32_are_greedy() {
        // The most likely token is 2; token 0 is the least likely.
        let logits = [-3.0, 0.5, 4.0, 1.0];
        for t in [
            1e-45,                              // rounds to f32's smallest subnormal
            1e-39,                              // subnormal in f32
            f64::from(f32::MIN_POSITIVE) / 2.0, // subnormal in f32
            1e-50,                              // rounds to 0 in f32
            f64::MIN_POSITIVE,                  // the smallest positive f64
        ] {
            let p = params(t, 1.0, 0, 3);
            assert!(p.is_greedy(), "{t:e}");
            for n in 0..20 {
                assert_eq!(sample(&logits, &p, n), 2, "temperature {t:e}, position {n}");
            }
        }
        // The smallest normal f32 samples, and is as sharp as greedy.
        let p = params(f64::from(f32::MIN_POSITIVE), 1.0, 0, 3);
        assert!(!p.is_greedy());
        assert!((0..20).all(|n| sample(&logits, &p, n) == 2));
    }

    #[test]
    fn broken_logits_never_pick_the_least_likely_token() {
        // NaN and infinite logits give NaN weights: they count as nothing.
        let p = params(0.8, 1.0, 0, 11);
        let with_nan = [0.0, f32::NAN, 5.0, -1.0];
        assert!((0..50).all(|n| sample(&with_nan, &p, n) != 1));
        let with_inf = [f32::INFINITY, 1.0, f32::INFINITY, 0.0];
        for n in 0..50 {
            assert_eq!(
                sample(&with_inf, &p, n),
                0,
                "nothing finite is left: the first most likely"
            );
        }
    }

    #[test]
    fn different_seeds_differ() {
        let logits: Vec<f32> = vec![0.0; 50];
        let a: Vec<u32> = (0..20).map(|n| sample(&logits, &params(1.0, 1.0, 0, 1), n)).collect();
        let b: Vec<u32> = (0..20).map(|n| sample(&logits, &params(1.0, 1.0, 0, 2), n)).collect();
        assert_ne!(a, b);
    }
}
