//! Memory a snapshot restore holds at its peak, as a multiple of the cache it rebuilds:
//! `MALLOC_MMAP_THRESHOLD_=65536 cargo run -p ferry-worker --example restore_memory [positions]`.
//!
//! Writes snapshots of a SmolLM2-135M-shaped cache (30 layers, 3 KV heads of 64) to a file store
//! in a temporary folder, in the shapes a writer leaves them (one compacted piece, equal pieces,
//! a compacted piece and the small ones after it), and restores each with `resume::load` on the
//! CPU, as a survivor does. The peak is the growth of the process's peak resident set
//! (`VmHWM`, reset through `/proc/self/clear_refs`) over its resident set before the restore,
//! so it counts what was touched, not what was reserved.
//!
//! Limits: glibc keeps freed small blocks for reuse, so without `MALLOC_MMAP_THRESHOLD_` (every
//! block of 64 KiB or more its own mapping, returned when freed) a restore can reuse memory a
//! previous one freed and the figures come out low. The file store reads a piece into one buffer
//! of its size; other backends may buffer differently.

use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use ferry_worker::model::LlamaConfig;
use ferry_worker::snapshot::format::{KvShape, Manifest, Piece, PieceRef, FORMAT_VERSION};
use ferry_worker::snapshot::resume;
use ferry_worker::snapshot::store::{self, SnapshotStore};

/// A field of `/proc/self/status`, in bytes.
fn status(field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kb: u64 = line[field.len()..]
        .split_whitespace()
        .next()
        .context("no value")?
        .parse()?;
    Ok(kb * 1024)
}

/// Writes a snapshot of `splits` consecutive pieces under `prefix`, and returns its manifest.
async fn write(store: &dyn SnapshotStore, prefix: &str, shape: KvShape, splits: &[u32]) -> anyhow::Result<Manifest> {
    let mut pieces = Vec::new();
    let mut at = 0u32;
    for (i, &n) in splits.iter().enumerate() {
        let per = shape.values_per_tensor(n);
        let value = |layer: usize, j: usize| ((layer * 7919 + j) as f32 * 1e-3).sin();
        let piece = Piece {
            from: at,
            to: at + n,
            layers: (0..shape.n_layer as usize)
                .map(|l| {
                    let k = (0..per).map(|j| value(l, j)).collect();
                    let v = (0..per).map(|j| -value(l, j)).collect();
                    (k, v)
                })
                .collect(),
        };
        let body = piece.encode(shape);
        let crc = u32::from_le_bytes(body[body.len() - 4..].try_into()?);
        let name = format!("piece-{i:06}");
        pieces.push(PieceRef {
            name: name.clone(),
            from: at,
            to: at + n,
            bytes: body.len() as u64,
            crc32: crc,
        });
        store.put(&format!("{prefix}{name}"), body.into()).await?;
        at += n;
    }
    // 16 generated tokens; the pieces cover all positions but the last token's.
    let tokens: Vec<u32> = (0..16).collect();
    let manifest = Manifest {
        version: FORMAT_VERSION,
        model: "model".into(),
        request: "request".into(),
        prompt_len: at + 1 - tokens.len() as u32,
        tokens,
        pieces,
        attempt: 1,
        worker: "example".into(),
        seq: 1,
    };
    store
        .put(&format!("{prefix}manifest"), manifest.encode().into())
        .await?;
    Ok(manifest)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let positions: u32 = match std::env::args().nth(1) {
        Some(p) => p.parse().context("positions")?,
        None => 4000,
    };
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        eprintln!("MALLOC_MMAP_THRESHOLD_ is not set: the figures may come out low (see the module doc)");
    }
    let config = LlamaConfig {
        n_layer: 30,
        n_head: 9,
        n_kv_head: 3,
        head_dim: 64,
        embedding_length: 576,
        context_length: 8192,
        rms_norm_eps: 1e-5,
        rope_freq_base: 100_000.0,
        vocab_size: 49_152,
    };
    let shape = KvShape {
        n_layer: config.n_layer as u32,
        n_kv_head: config.n_kv_head as u32,
        head_dim: config.head_dim as u32,
    };
    let dir = tempfile::tempdir()?;
    let store = store::open(&format!("file://{}", dir.path().display()), Duration::from_secs(3600)).await?;
    let cache = positions as u64 * shape.bytes_per_position() as u64;
    let eighth = positions / 8;
    let compacted = positions - positions % 256;
    let mut tail = vec![16; ((positions - compacted) / 16) as usize];
    tail.push(positions - compacted - 16 * tail.len() as u32);
    tail.retain(|&n| n > 0);
    let shapes: [(&str, Vec<u32>); 3] = [
        ("one piece (compacted)", vec![positions]),
        ("8 equal pieces", {
            let mut v = vec![eighth; 7];
            v.push(positions - 7 * eighth);
            v
        }),
        (
            "a compacted piece, then pieces of 16",
            std::iter::once(compacted).chain(tail).collect(),
        ),
    ];
    println!(
        "cache of {positions} positions: {:.1} MiB ({} bytes a position)",
        cache as f64 / (1 << 20) as f64,
        shape.bytes_per_position()
    );
    for (i, (name, splits)) in shapes.iter().enumerate() {
        let prefix = format!("ferry/example{i}/");
        write(store.as_ref(), &prefix, shape, splits).await?;
        std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak resident set")?;
        let before = status("VmRSS:")?;
        let restored = resume::load(&store, &prefix, "model", "request", &config, &Device::Cpu)
            .await?
            .context("no snapshot")?;
        let peak = status("VmHWM:")?.saturating_sub(before);
        let held = status("VmRSS:")?.saturating_sub(before);
        anyhow::ensure!(
            restored.cache.as_ref().map(|c| c.len()) == Some(positions as usize),
            "restored the wrong number of positions"
        );
        drop(restored);
        println!(
            "{name} ({} pieces): peak {:.2}x the cache, {:.2}x held after",
            splits.len(),
            peak as f64 / cache as f64,
            held as f64 / cache as f64
        );
    }
    Ok(())
}
