use super::*;
use crate::snapshot::format::Piece;

#[test]
fn auto_mode_picks_the_cheaper_resume() {
    let stats = SnapshotStats::default();
    // Unmeasured: keep the cache, which never recomputes.
    assert!(stats.use_cache(ResumeMode::Auto, 46_080));
    assert!(stats.use_cache(ResumeMode::Cache, 46_080));
    assert!(!stats.use_cache(ResumeMode::Tokens, 46_080));
    // 50 tokens/s decode (20 ms a token) against a 100 MB/s store (0.46 ms a token): cache.
    stats.record_decode_speed(50.0);
    SnapshotStats::record_rate(&stats.store_bps_bits, 100e6);
    assert!(stats.use_cache(ResumeMode::Auto, 46_080));
    // Against a 1 MB/s store (46 ms a token), recomputing is cheaper.
    let slow = SnapshotStats::default();
    slow.record_decode_speed(50.0);
    SnapshotStats::record_rate(&slow.store_bps_bits, 1e6);
    assert!(!slow.use_cache(ResumeMode::Auto, 46_080));
}

/// A store that never answers (`hangs`), or fails every call at once.
#[derive(Debug)]
struct Sick {
    hangs: bool,
}

#[async_trait::async_trait]
impl SnapshotStore for Sick {
    async fn put(&self, _: &str, _: Bytes) -> Result<(), crate::snapshot::store::StoreError> {
        if self.hangs {
            std::future::pending::<()>().await;
        }
        Err(crate::snapshot::store::StoreError::Timeout {
            op: "put",
            after: Duration::ZERO,
        })
    }
    async fn get(&self, _: &str, _: usize) -> Result<Option<Bytes>, crate::snapshot::store::StoreError> {
        unreachable!("a writer only writes")
    }
    async fn delete(&self, _: &str) -> Result<(), crate::snapshot::store::StoreError> {
        Ok(())
    }
    async fn delete_prefix(&self, _: &str) -> Result<(), crate::snapshot::store::StoreError> {
        Ok(())
    }
    async fn list(&self, _: &str) -> Result<Vec<String>, crate::snapshot::store::StoreError> {
        Ok(Vec::new())
    }
    async fn sweep_expired(&self, _: &str, _: Duration) -> Result<usize, crate::snapshot::store::StoreError> {
        Ok(0)
    }
}

// Paused time: the bounds are checked in virtual time, the same on every machine.
#[tokio::test(start_paused = true)]
async fn stopping_never_waits_past_its_deadline_for_a_sick_store() {
    let timeout = Duration::from_secs(2);
    for (hangs, flush) in [(true, false), (true, true), (false, false), (false, true)] {
        let store = Arc::new(Sick { hangs });
        let policy = SnapshotPolicy {
            every_tokens: 1,
            every: None,
            mode: ResumeMode::Tokens,
            max_pieces: 8,
        };
        let id = SnapshotIdentity {
            prefix: "ferry/ab/".into(),
            model: "m".into(),
            request: "r".into(),
            prompt_len: 3,
            attempt: 1,
            worker: "w".into(),
        };
        let shape = KvShape {
            n_layer: 1,
            n_kv_head: 1,
            head_dim: 2,
        };
        let (writer, _sink) = SnapshotWriter::start(
            store.clone(),
            Arc::default(),
            policy,
            shape,
            id,
            ChainStart::default(),
            timeout,
        );
        writer.shared.slot.lock().expect("slot").pending = Some(Delta {
            tokens: vec![1, 2],
            kv: None,
        });
        writer.shared.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let started = tokio::time::Instant::now();
        if flush {
            writer.flush_and_stop().await;
        } else {
            writer.stop().await;
        }
        let bound = if flush { timeout * FLUSH_CALLS } else { timeout };
        assert!(
            started.elapsed() <= bound,
            "hangs {hangs}, flush {flush}: waited {:?}",
            started.elapsed()
        );
        // The write task is gone (aborted, or it gave up), and with it its hold on the store.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(Arc::strong_count(&store), 1, "hangs {hangs}, flush {flush}");
    }
}

fn piece(from: u32, to: u32) -> Piece {
    Piece {
        from,
        to,
        layers: vec![(
            (from..to).map(|x| x as f32).collect(),
            (from..to).map(|x| -(x as f32)).collect(),
        )],
    }
}

/// [`piece`]'s positions as the engine thread captures them: on the device (here the CPU), one
/// KV head of dimension 1.
fn captured(from: u32, to: u32) -> Captured {
    let p = piece(from, to);
    let t = |x: &Vec<f32>| {
        candle_core::Tensor::from_vec(x.clone(), (1, 1, x.len(), 1), &candle_core::Device::Cpu).expect("tensor")
    };
    Captured::new(from, to, p.layers.iter().map(|(k, v)| (t(k), t(v))).collect())
}

fn read_back(c: Option<Captured>) -> Option<Piece> {
    c.map(|c| c.to_piece().expect("reads back"))
}

#[test]
fn merging_keeps_the_chain_contiguous_and_the_newest_tokens() {
    let older = Delta {
        tokens: vec![1, 2],
        kv: Some(captured(0, 3)),
    };
    let newer = Delta {
        tokens: vec![1, 2, 3, 4],
        kv: Some(captured(3, 5)),
    };
    let m = Delta::merge(older, newer);
    assert_eq!(m.tokens, [1, 2, 3, 4]);
    assert_eq!(read_back(m.kv), Some(piece(0, 5)));
    // A newer full copy replaces everything before it.
    let older = Delta {
        tokens: vec![1],
        kv: Some(captured(4, 6)),
    };
    let full = Delta {
        tokens: vec![1, 2, 3],
        kv: Some(captured(0, 8)),
    };
    assert_eq!(read_back(Delta::merge(older, full).kv), Some(piece(0, 8)));
}
