//! What `/metrics` reads when it is asked rather than counts as it happens: the lag gauges,
//! replaced wholesale (so a revoked partition disappears), and the snapshot writer's own
//! counters.

use super::*;

/// What is read when `/metrics` is asked, not counted as it happens.
#[derive(Debug, Default)]
pub(super) struct ScrapeTime {
    pub(super) commit_lag: Mutex<BTreeMap<TopicPartition, i64>>,
    pub(super) consumer_lag: Mutex<BTreeMap<TopicPartition, i64>>,
    pub(super) snapshots: OnceLock<Arc<SnapshotStats>>,
}

/// Writes one unlabelled value of `kind` (a counter or a gauge).
pub fn encode_value(e: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, v: i64) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(u64::try_from(v).unwrap_or(0)).encode(m),
        _ => ConstGauge::new(v).encode(m),
    }
}

impl Collector for ScrapeTime {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        lag_family(
            &mut e,
            "ferry_commit_lag_messages",
            "Messages received on a partition and not yet committed (running, or finished above a running one).",
            &lock(&self.commit_lag),
        )?;
        lag_family(
            &mut e,
            "ferry_consumer_lag_messages",
            "Messages on an assigned partition not yet fetched or committed, from librdkafka's statistics.",
            &lock(&self.consumer_lag),
        )?;
        self.encode_snapshots(&mut e)
    }
}

impl ScrapeTime {
    fn encode_snapshots(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let zero = SnapshotStats::default();
        let s = self.snapshots.get().map_or(&zero, |s| s.as_ref());
        let get = |c: &std::sync::atomic::AtomicU64| i64::try_from(c.load(Relaxed)).unwrap_or(i64::MAX);
        let counters = [
            (
                "ferry_snapshots_written",
                "Snapshots made durable (manifests written).",
                &s.written,
            ),
            (
                "ferry_snapshot_bytes",
                "Bytes written to the snapshot store, pieces and manifests.",
                &s.bytes,
            ),
            (
                "ferry_snapshots_skipped",
                "Snapshot points merged into a newer one because the store was still busy.",
                &s.skipped,
            ),
            (
                "ferry_snapshot_write_failures",
                "Snapshot writes that failed (retried with the next snapshot).",
                &s.failed,
            ),
            (
                "ferry_snapshots_discarded",
                "Snapshots found on resume that did not verify and were discarded.",
                &s.discarded,
            ),
            ("ferry_resumes", "Generations resumed from a snapshot.", &s.resumed),
            (
                "ferry_tokens_recomputed",
                "Tokens computed again on resume (tokens-mode snapshots).",
                &s.tokens_recomputed,
            ),
        ];
        for (name, help, value) in counters {
            encode_value(e, name, help, MetricType::Counter, get(value))?;
        }
        // A sum and a count without buckets: a histogram of the one `+Inf` bucket.
        let count = s.written.load(Relaxed) + s.failed.load(Relaxed);
        let sum = s.write_micros.load(Relaxed) as f64 / 1e6;
        e.encode_descriptor(
            "ferry_snapshot_write_seconds",
            "Time spent writing snapshots, and how many writes (made or failed) it covers.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            sum,
            count,
            &[(f64::INFINITY, count)],
            None,
        )?;
        let mut d = e.encode_descriptor(
            "ferry_snapshot_store_errors",
            "Snapshot store calls that failed, by op (get, put, delete, list, sweep) and kind: timeout (no answer within --snapshot-store-timeout), skipped (not tried: the store timed out or was unreachable moments ago), error (any other failure). Each was served around: the request went on without the store.",
            None,
            MetricType::Counter,
        )?;
        for op in StoreOp::ALL {
            for kind in FaultKind::ALL {
                let labels = [("op", op.as_str()), ("kind", kind.as_str())];
                ConstCounter::new(s.store_faults.count(op, kind)).encode(d.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn lag_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    lag: &BTreeMap<TopicPartition, i64>,
) -> std::fmt::Result {
    let mut d = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for ((topic, partition), n) in lag {
        let partition = partition.to_string();
        let labels = [("topic", topic.as_str()), ("partition", partition.as_str())];
        ConstGauge::new(*n).encode(d.encode_family(&labels)?)?;
    }
    Ok(())
}
