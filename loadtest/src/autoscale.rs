//! Autoscaling as KEDA's Kafka scaler does it, so scale-out and scale-in under load (with
//! requests in flight on the workers that are scaled in) are exercised by the chaos run.
//!
//! [`desired_replicas`] is the rule, pure: KEDA's `kafka` trigger reports the group's total lag
//! (latest offset minus committed offset, per partition, summed), capped at
//! `partitions × lagThreshold` unless `allowIdleConsumers`; the HPA asks for
//! `ceil(lag / lagThreshold)` replicas (the metric's target is an average value per replica);
//! below `activationLagThreshold` the trigger is inactive and KEDA scales to `minReplicaCount`;
//! the result is clamped to `[minReplicaCount, maxReplicaCount]`. [`read_lag`] asks the broker
//! for the numbers and [`run_loop`] applies the rule to the fleet every few seconds.
//!
//! # The group that never committed
//!
//! A partition the group has no committed offset for does not count its backlog: with
//! `offsetResetPolicy: latest` (KEDA's default) it counts as lag 1 (0 with
//! `scaleToZeroOnInvalidOffset`), however many requests wait in it. Ferry's workers read from
//! the earliest offset when they have none, so a fresh group, or a fleet scaled to zero before
//! it ever committed, has a backlog KEDA does not see: it may never scale out (or never from
//! zero). Set `offsetResetPolicy: earliest`, which counts such a partition's whole backlog
//! (its latest offset), as [`OffsetResetPolicy::Earliest`] does here.
//!
//! Limits: the HPA's 10 % tolerance and its scale-down stabilisation window (300 s by default)
//! are not modelled; [`run_loop`] instead scales in only after the rule has asked for fewer
//! replicas on [`SCALE_IN_AFTER`] checks in a row, so the run sees scale-in within minutes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::record::{FaultEvent, FaultKind};

/// KEDA's `offsetResetPolicy`: how a partition without a committed offset counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OffsetResetPolicy {
    /// KEDA's default: such a partition counts as lag 1 (see the module documentation).
    Latest,
    /// Such a partition counts its whole backlog, as Ferry's workers would read it.
    Earliest,
}

/// The trigger's settings, named as in a KEDA `ScaledObject`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerSpec {
    /// `lagThreshold`: the lag one replica is meant to absorb.
    pub lag_threshold: u64,
    /// `activationLagThreshold`: the trigger is active only above this total lag.
    pub activation_lag_threshold: u64,
    pub offset_reset_policy: OffsetResetPolicy,
    /// `scaleToZeroOnInvalidOffset`: with `latest`, count a partition with no commit as 0, not 1.
    pub scale_to_zero_on_invalid_offset: bool,
    /// `allowIdleConsumers`: allow more replicas than partitions (they would sit idle).
    pub allow_idle_consumers: bool,
    /// `minReplicaCount` and `maxReplicaCount`.
    pub min_replicas: usize,
    pub max_replicas: usize,
}

/// One partition's offsets as the scaler sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// The high watermark: the offset the next message will get.
    pub latest: i64,
    /// The group's committed offset, `None` when it never committed on this partition.
    pub committed: Option<i64>,
}

/// A partition's lag under `spec`'s rules for a missing commit.
pub fn partition_lag(p: PartitionLag, spec: &ScalerSpec) -> u64 {
    match (p.committed, spec.offset_reset_policy) {
        (Some(c), _) => (p.latest - c).max(0) as u64,
        (None, OffsetResetPolicy::Latest) => u64::from(!spec.scale_to_zero_on_invalid_offset),
        (None, OffsetResetPolicy::Earliest) => p.latest.max(0) as u64,
    }
}

/// The replicas KEDA (through the HPA) would ask for, given every partition of the topic.
pub fn desired_replicas(partitions: &[PartitionLag], spec: &ScalerSpec) -> usize {
    let threshold = spec.lag_threshold.max(1);
    let mut lag: u64 = partitions.iter().map(|p| partition_lag(*p, spec)).sum();
    let active = lag > spec.activation_lag_threshold;
    if !spec.allow_idle_consumers {
        // KEDA caps the reported lag so that it never asks for more replicas than partitions.
        lag = lag.min(partitions.len() as u64 * threshold);
    }
    let wanted = if active { lag.div_ceil(threshold) as usize } else { 0 };
    wanted.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas))
}

/// Reads the group's committed offsets and the high watermarks of every partition of `topic`.
/// Blocking: call it from `spawn_blocking`.
pub fn read_lag(bootstrap: &str, topic: &str, group: &str, timeout: Duration) -> anyhow::Result<Vec<PartitionLag>> {
    // A consumer that never subscribes: it only asks the group coordinator about `group`.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let count = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut tpl = TopicPartitionList::new();
    for p in 0..count as i32 {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    (0..count as i32)
        .map(|p| {
            let (_, high) = consumer.fetch_watermarks(topic, p, timeout)?;
            let committed = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            Ok(PartitionLag {
                latest: high,
                committed,
            })
        })
        .collect()
}

/// How often [`run_loop`] checks the lag.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Consecutive checks asking for fewer replicas before one is scaled in.
pub const SCALE_IN_AFTER: usize = 2;

/// Where the autoscaler reads the lag and whom it scales.
#[derive(Debug, Clone)]
pub struct Target {
    pub bootstrap: String,
    pub topic: String,
    pub group: String,
}

/// Every [`CHECK_EVERY`] until `stop`: reads the lag, applies [`desired_replicas`], starts
/// workers to scale out and SIGTERMs the newest to scale in (one per check), recording each
/// change as a [`FaultKind::Start`] or [`FaultKind::ScaleIn`] event at `t0`-relative times.
pub async fn run_loop(
    spec: ScalerSpec,
    target: Target,
    fleet: Arc<Mutex<Fleet>>,
    events: Arc<Mutex<Vec<FaultEvent>>>,
    t0: Instant,
    stop: CancellationToken,
) {
    let mut lower_for = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let t = target.clone();
        let lag = tokio::task::spawn_blocking(move || read_lag(&t.bootstrap, &t.topic, &t.group, CHECK_EVERY)).await;
        let partitions = match lag {
            Ok(Ok(p)) if !p.is_empty() => p,
            Ok(Err(e)) => {
                eprintln!("autoscale: cannot read the lag: {e:#}");
                continue;
            }
            _ => continue,
        };
        let desired = desired_replicas(&partitions, &spec);
        let at_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut fleet = fleet
            .lock()
            .expect("the fleet lock is never poisoned: no panics while held");
        let running = fleet.running();
        let event = if desired > running.len() {
            lower_for = 0;
            match fleet.start_worker() {
                Ok(name) => Some(FaultEvent {
                    kind: FaultKind::Start,
                    at_ms,
                    workers: vec![name],
                    until_ms: None,
                }),
                Err(e) => {
                    eprintln!("autoscale: cannot start a worker: {e:#}");
                    None
                }
            }
        } else if desired < running.len() {
            lower_for += 1;
            match running.last() {
                Some(newest) if lower_for >= SCALE_IN_AFTER => {
                    lower_for = 0;
                    let newest = newest.clone();
                    match fleet.signal(&newest, crate::fleet::Signal::Term) {
                        Ok(()) => Some(FaultEvent {
                            kind: FaultKind::ScaleIn,
                            at_ms,
                            workers: vec![newest],
                            until_ms: None,
                        }),
                        Err(e) => {
                            eprintln!("autoscale: cannot stop {newest}: {e:#}");
                            None
                        }
                    }
                }
                _ => None,
            }
        } else {
            lower_for = 0;
            None
        };
        drop(fleet);
        if let Some(e) = event {
            eprintln!(
                "autoscale: {:?} {:?} (lag {:?}, desired {desired})",
                e.kind,
                e.workers,
                lag_sum(&partitions, &spec)
            );
            events.lock().expect("the events lock is never poisoned").push(e);
        }
    }
}

fn lag_sum(partitions: &[PartitionLag], spec: &ScalerSpec) -> u64 {
    partitions.iter().map(|p| partition_lag(*p, spec)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScalerSpec {
        ScalerSpec {
            lag_threshold: 4,
            activation_lag_threshold: 0,
            offset_reset_policy: OffsetResetPolicy::Earliest,
            scale_to_zero_on_invalid_offset: false,
            allow_idle_consumers: false,
            min_replicas: 1,
            max_replicas: 10,
        }
    }

    fn committed(latest: i64, committed: i64) -> PartitionLag {
        PartitionLag {
            latest,
            committed: Some(committed),
        }
    }

    fn never(latest: i64) -> PartitionLag {
        PartitionLag {
            latest,
            committed: None,
        }
    }

    #[test]
    fn lag_is_latest_minus_committed_summed_over_partitions() {
        let p = [committed(10, 7), committed(5, 5), committed(9, 1)];
        assert_eq!(lag_sum(&p, &spec()), 3 + 8);
        // 11 / 4 rounds up to 3 replicas.
        assert_eq!(desired_replicas(&p, &spec()), 3);
    }

    #[test]
    fn a_partition_without_a_commit_counts_per_the_offset_reset_policy() {
        let s = spec();
        assert_eq!(partition_lag(never(50), &s), 50, "earliest: the whole backlog");
        let latest = ScalerSpec {
            offset_reset_policy: OffsetResetPolicy::Latest,
            ..s
        };
        assert_eq!(partition_lag(never(50), &latest), 1, "latest: lag 1, whatever waits");
        let zero = ScalerSpec {
            scale_to_zero_on_invalid_offset: true,
            ..latest
        };
        assert_eq!(partition_lag(never(50), &zero), 0);
    }

    #[test]
    fn the_group_that_never_committed_looks_idle_under_latest() {
        // 150 requests wait in a fresh group's three partitions: KEDA's default sees lag 3.
        let p = [never(50), never(50), never(50)];
        let latest = ScalerSpec {
            offset_reset_policy: OffsetResetPolicy::Latest,
            min_replicas: 0,
            ..spec()
        };
        assert_eq!(
            desired_replicas(&p, &latest),
            1,
            "ceil(3 / 4): one replica for 150 requests"
        );
        assert_eq!(
            desired_replicas(&p, &spec()),
            3,
            "earliest sees the backlog (capped at 3 partitions)"
        );
    }

    #[test]
    fn replicas_are_capped_by_the_partition_count_unless_idle_consumers_are_allowed() {
        let p = [committed(100, 0), committed(100, 0)];
        assert_eq!(desired_replicas(&p, &spec()), 2, "two partitions, two replicas");
        let idle = ScalerSpec {
            allow_idle_consumers: true,
            ..spec()
        };
        assert_eq!(
            desired_replicas(&p, &idle),
            10,
            "ceil(200 / 4) = 50, capped by max replicas"
        );
    }

    #[test]
    fn below_activation_the_fleet_goes_to_min_replicas() {
        let p = [committed(3, 0), committed(0, 0)];
        let s = ScalerSpec {
            activation_lag_threshold: 5,
            min_replicas: 0,
            ..spec()
        };
        assert_eq!(
            desired_replicas(&p, &s),
            0,
            "lag 3 is not above the activation threshold 5"
        );
        let s = ScalerSpec {
            activation_lag_threshold: 2,
            ..s
        };
        assert_eq!(desired_replicas(&p, &s), 1);
        let s = ScalerSpec {
            activation_lag_threshold: 5,
            min_replicas: 2,
            ..s
        };
        assert_eq!(desired_replicas(&p, &s), 2, "inactive still means min replicas");
    }

    #[test]
    fn min_and_max_replicas_bound_the_result() {
        let none = [committed(0, 0), committed(0, 0), committed(0, 0)];
        assert_eq!(desired_replicas(&none, &spec()), 1, "no lag: min replicas");
        let lots = [committed(1000, 0), committed(1000, 0), committed(1000, 0)];
        let s = ScalerSpec {
            max_replicas: 2,
            ..spec()
        };
        assert_eq!(desired_replicas(&lots, &s), 2);
        let s = ScalerSpec {
            lag_threshold: 0,
            ..spec()
        };
        assert_eq!(
            desired_replicas(&lots, &s),
            3,
            "a zero threshold is treated as 1, not a division by zero"
        );
    }

    #[test]
    fn a_commit_past_the_watermark_counts_as_no_lag() {
        assert_eq!(partition_lag(committed(5, 9), &spec()), 0);
    }
}
