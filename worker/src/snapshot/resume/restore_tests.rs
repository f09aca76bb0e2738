use std::time::Duration;

use super::*;
use crate::model::cache::values_of;
use crate::snapshot::format::{Piece, PieceRef, FORMAT_VERSION};
use crate::snapshot::store;

fn config() -> LlamaConfig {
    LlamaConfig {
        n_layer: 2,
        n_head: 6,
        n_kv_head: 3,
        head_dim: 4,
        embedding_length: 24,
        context_length: 2048,
        rms_norm_eps: 1e-5,
        rope_freq_base: 10_000.0,
        vocab_size: 100,
    }
}

fn shape(c: &LlamaConfig) -> KvShape {
    KvShape {
        n_layer: c.n_layer as u32,
        n_kv_head: c.n_kv_head as u32,
        head_dim: c.head_dim as u32,
    }
}

/// Values of positions `[from, to)` as a piece holds them: distinct, and not round numbers.
fn piece(c: &LlamaConfig, from: u32, to: u32) -> Piece {
    let per = shape(c).values_per_tensor(to - from);
    let value = |l: usize, i: usize| ((l * 7919 + from as usize * 97 + i) as f32 * 0.61).sin();
    let layers = (0..c.n_layer)
        .map(|l| {
            (
                (0..per).map(|i| value(l, i)).collect(),
                (0..per).map(|i| -value(l, i)).collect(),
            )
        })
        .collect();
    Piece { from, to, layers }
}

/// Stores a snapshot of `pieces` under `prefix`, 4 generated tokens, and returns the pieces.
async fn put(store: &Arc<dyn SnapshotStore>, prefix: &str, c: &LlamaConfig, cuts: &[u32]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut refs = Vec::new();
    for (i, w) in cuts.windows(2).enumerate() {
        let p = piece(c, w[0], w[1]);
        let body = p.encode(shape(c));
        let name = format!("piece-{i}");
        refs.push(PieceRef {
            name: name.clone(),
            from: p.from,
            to: p.to,
            bytes: body.len() as u64,
            crc32: u32::from_le_bytes(body[body.len() - 4..].try_into().expect("4 bytes")),
        });
        store.put(&format!("{prefix}{name}"), body.into()).await.expect("put");
        pieces.push(p);
    }
    let tokens = vec![7, 8, 9, 10];
    let manifest = Manifest {
        version: FORMAT_VERSION,
        model: "m".into(),
        request: "r".into(),
        prompt_len: cuts[cuts.len() - 1] + 1 - tokens.len() as u32,
        tokens,
        pieces: refs,
        attempt: 1,
        worker: "w".into(),
        seq: 1,
    };
    store
        .put(
            &format!("{prefix}{}", super::super::format::MANIFEST),
            manifest.encode().into(),
        )
        .await
        .expect("put");
    pieces
}

async fn memory() -> Arc<dyn SnapshotStore> {
    store::open("memory://", Duration::from_secs(3600))
        .await
        .expect("store")
}

#[tokio::test]
async fn a_snapshot_restores_every_value_of_every_piece() {
    let c = config();
    let store = memory().await;
    let cuts = [0, 300, 301, 317];
    let pieces = put(&store, "ferry/a/", &c, &cuts).await;
    let restored = load(&store, "ferry/a/", "m", "r", &c, &Device::Cpu)
        .await
        .expect("loads")
        .expect("found");
    let cache = restored.cache.expect("a cache");
    assert_eq!(cache.len(), 317);
    for p in &pieces {
        let back = values_of(&cache.range_tensors(p.from as usize, p.to as usize).expect("range")).expect("values");
        assert!(back == p.layers, "positions [{}, {})", p.from, p.to);
    }
}

#[tokio::test]
async fn a_restore_that_needs_more_than_its_allowance_recomputes_the_cache() {
    let c = config();
    let store = memory().await;
    put(&store, "ferry/b/", &c, &[0, 40, 50]).await;
    let manifest = load(&store, "ferry/b/", "m", "r", &c, &Device::Cpu)
        .await
        .expect("loads")
        .expect("found")
        .manifest;
    let largest = restore_overhead_bytes(&manifest);
    assert_eq!(largest, manifest.pieces[0].bytes, "the first piece is the larger");
    let within = |allowance| {
        let (store, c) = (store.clone(), c.clone());
        async move {
            load_within(&store, "ferry/b/", "m", "r", &c, &Device::Cpu, allowance)
                .await
                .expect("loads")
                .expect("found")
        }
    };
    assert!(within(largest).await.cache.is_some(), "exactly the allowance");
    let short = within(largest - 1).await;
    assert!(short.cache.is_none(), "the cache is recomputed, not restored");
    assert_eq!(short.manifest.tokens, [7, 8, 9, 10], "from the snapshot's tokens");
}

#[test]
fn a_restore_peaks_at_its_cache_in_chunks_and_its_largest_piece() {
    let per = 46_080;
    assert_eq!(restore_peak_bytes(0, 0, per), 0);
    assert_eq!(restore_peak_bytes(1, 100, per), 256 * per + 100);
    assert_eq!(
        restore_peak_bytes(4000, 4000 * per + 36, per),
        4096 * per + 4000 * per + 36
    );
    // Against the cache itself, a compacted snapshot's restore holds about twice as much.
    let cache = 4096 * per;
    let peak = restore_peak_bytes(4096, 4096 * per + 36, per);
    assert!(peak > 2 * cache && peak < 2 * cache + 1024);
}
