//! What the worker has in flight, shared by the Kafka loop, the request tasks and librdkafka's
//! rebalance callbacks.
//!
//! A request is *registered* from the moment it starts until its offset is settled: committed,
//! covered by a done marker, or left uncommitted on purpose (suspended for a drain or a
//! revocation). A revocation waits, within its deadline, for the registered requests of the
//! revoked partitions to settle, after telling them to suspend: that is how "snapshot, stop,
//! commit what is finished" happens before the partitions change hands.
//!
//! Each partition has an *epoch*, bumped when it is revoked. A request remembers the epoch it
//! started in; if it settles in another epoch, the partition was revoked (and maybe handed back)
//! meanwhile, and it must not touch the offset tracker, whose state now belongs to the new
//! assignment.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use tracing::{info, warn};

use super::commits::CommitGate;
use crate::engine::JobControl;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::ops::Ops;

/// Whether a request may commit now (exactly-once delivery, see [`super::transaction`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// It is the lowest offset its partition runs: everything below it is committed.
    Ready,
    /// A lower offset still runs.
    Wait,
    /// Its partition was revoked since it started.
    Gone,
}

/// Runs a blocking call from async code: on a multi-threaded runtime the thread's queued tasks
/// move to another worker thread meanwhile (they may be what the call waits for).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A request that has started and not yet settled.
#[derive(Debug)]
struct Registered {
    offset: i64,
    control: Arc<JobControl>,
}

#[derive(Debug, Default)]
pub struct State {
    pub tracker: OffsetTracker,
    registered: HashMap<TopicPartition, Vec<Registered>>,
    epochs: HashMap<TopicPartition, u64>,
    /// Snapshot prefixes of requests finished above a running one, deleted once the committed
    /// position passes them.
    pending_deletes: HashMap<TopicPartition, Vec<(i64, String)>>,
    /// Commits that failed (the group was rebalancing), retried by the loop until one succeeds
    /// or the partition is revoked: the position and the prefixes it makes deletable.
    deferred: HashMap<TopicPartition, (i64, Vec<String>)>,
    /// Partitions revoked since the Kafka loop last looked: their waiting messages are dropped.
    revoked: Vec<TopicPartition>,
    /// Topics whose partitions the loop paused because their lane is full.
    pub paused_topics: HashSet<String>,
}

/// The state, and how long a revocation may wait for it.
#[derive(Debug)]
pub struct InFlight {
    state: Mutex<State>,
    revoke_timeout: Duration,
    /// Set when the worker exits without settling what is in flight (a second signal, the drain
    /// deadline, a fatal error): closing the consumer then revokes without waiting.
    abandoned: AtomicBool,
    /// Every commit goes through it, so a partition's commits are made one at a time and its
    /// position never moves back (see [`super::commits`]).
    pub commits: CommitGate,
}

impl InFlight {
    pub fn new(revoke_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            revoke_timeout,
            abandoned: AtomicBool::new(false),
            commits: CommitGate::default(),
        }
    }

    /// From now on revocations do not wait for requests to settle (the worker is exiting).
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; carrying on with it is
        // better than taking the worker down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request the loop is about to start; returns the partition's epoch.
    pub fn start(&self, tp: &TopicPartition, offset: i64, control: Arc<JobControl>) -> u64 {
        let mut s = self.lock();
        s.tracker.start(tp, offset);
        s.registered
            .entry(tp.clone())
            .or_default()
            .push(Registered { offset, control });
        s.epochs.get(tp).copied().unwrap_or(0)
    }

    /// Whether the partition is still in the epoch a request started in.
    #[cfg(test)]
    pub fn same_epoch(&self, tp: &TopicPartition, epoch: u64) -> bool {
        self.lock().epochs.get(tp).copied().unwrap_or(0) == epoch
    }

    /// Whether `offset` of `tp`, started in `epoch`, may commit now.
    pub fn turn(&self, tp: &TopicPartition, offset: i64, epoch: u64) -> Turn {
        let s = self.lock();
        if s.epochs.get(tp).copied().unwrap_or(0) != epoch {
            return Turn::Gone;
        }
        match s.tracker.lowest_running(tp) {
            Some(lowest) if lowest == offset => Turn::Ready,
            Some(lowest) if lowest < offset => Turn::Wait,
            _ => Turn::Gone,
        }
    }

    /// Runs `f` under the lock if the partition is still in `epoch`: a revocation, which
    /// changes the epoch under the same lock, cannot happen meanwhile.
    pub fn while_same_epoch<T>(&self, tp: &TopicPartition, epoch: u64, f: impl FnOnce() -> T) -> Option<T> {
        let s = self.lock();
        (s.epochs.get(tp).copied().unwrap_or(0) == epoch).then(f)
    }

    /// Records that `offset` is finished. Returns the position to commit, if it moved, with the
    /// snapshot prefixes that commit makes deletable. `None` when an earlier offset still runs,
    /// or the partition changed epoch: the caller then keeps a done marker instead.
    pub fn finish(
        &self,
        tp: &TopicPartition,
        offset: i64,
        epoch: u64,
        prefix: Option<&str>,
    ) -> Option<(i64, Vec<String>)> {
        let mut s = self.lock();
        if s.epochs.get(tp).copied().unwrap_or(0) != epoch {
            return None;
        }
        match s.tracker.finish(tp, offset) {
            Some(position) => {
                let pending = s.pending_deletes.entry(tp.clone()).or_default();
                let (done, rest): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(o, _)| *o < position);
                *pending = rest;
                let mut prefixes: Vec<String> = done.into_iter().map(|(_, p)| p).collect();
                prefixes.extend(prefix.map(str::to_string));
                Some((position, prefixes))
            }
            None => {
                if let Some(p) = prefix {
                    s.pending_deletes
                        .entry(tp.clone())
                        .or_default()
                        .push((offset, p.to_string()));
                }
                None
            }
        }
    }

    /// Keeps a commit that failed, for [`InFlight::take_deferred`] to retry (merged with any
    /// earlier one of the partition: positions only grow).
    pub fn defer(&self, tp: &TopicPartition, epoch: u64, position: i64, prefixes: Vec<String>) {
        let mut s = self.lock();
        if s.epochs.get(tp).copied().unwrap_or(0) != epoch {
            return;
        }
        let entry = s.deferred.entry(tp.clone()).or_insert((position, Vec::new()));
        entry.0 = entry.0.max(position);
        entry.1.extend(prefixes);
    }

    pub fn has_deferred(&self) -> bool {
        !self.lock().deferred.is_empty()
    }

    /// The deferred commits, to retry.
    pub fn take_deferred(&self) -> Vec<(TopicPartition, u64, i64, Vec<String>)> {
        let mut s = self.lock();
        let deferred = std::mem::take(&mut s.deferred);
        deferred
            .into_iter()
            .map(|(tp, (position, prefixes))| {
                let epoch = s.epochs.get(&tp).copied().unwrap_or(0);
                (tp, epoch, position, prefixes)
            })
            .collect()
    }

    /// Removes a settled request from the registry.
    pub fn settle(&self, tp: &TopicPartition, offset: i64) {
        let mut s = self.lock();
        if let Some(list) = s.registered.get_mut(tp) {
            list.retain(|r| r.offset != offset);
            if list.is_empty() {
                s.registered.remove(tp);
            }
        }
    }

    /// Tells every registered request of these partitions (all when `None`) to suspend.
    pub fn suspend(&self, tps: Option<&[TopicPartition]>) -> usize {
        let s = self.lock();
        let mut n = 0;
        for (tp, list) in &s.registered {
            if tps.is_none_or(|t| t.contains(tp)) {
                for r in list {
                    r.control.suspend.store(true, Ordering::Release);
                    n += 1;
                }
            }
        }
        n
    }

    /// Registered requests of these partitions (all when `None`).
    pub fn registered(&self, tps: Option<&[TopicPartition]>) -> usize {
        let s = self.lock();
        s.registered
            .iter()
            .filter(|(tp, _)| tps.is_none_or(|t| t.contains(tp)))
            .map(|(_, l)| l.len())
            .sum()
    }

    /// Handles a revocation: suspend the partitions' requests, wait (blocking, within the
    /// revoke timeout) for them to settle, then forget the partitions. Runs on the thread that
    /// polls the consumer, which is why it may block: the rebalance waits for it, as Kafka
    /// intends, while the requests settle on other threads.
    /// Returns the deferred commits of the revoked partitions, with the epoch they belong to,
    /// for the callback to make while the partitions are still this worker's.
    pub fn revoke_blocking(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, u64, i64)> {
        let suspended = self.suspend(Some(tps));
        let deadline = Instant::now() + self.revoke_timeout;
        let wait = || {
            let mut left = self.registered(Some(tps));
            while left > 0 && Instant::now() < deadline && !self.abandoned.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
                left = self.registered(Some(tps));
            }
            left
        };
        // The requests being waited for may be queued on this very thread.
        let left = blocking(wait);
        if left > 0 {
            warn!(
                left,
                "revoke deadline passed; those requests stay uncommitted and move on"
            );
        } else if suspended > 0 {
            info!(suspended, "revoked partitions' requests snapshotted and settled");
        }
        let mut s = self.lock();
        let mut last_commits = Vec::new();
        for tp in tps {
            let epoch = s.epochs.entry(tp.clone()).or_insert(0);
            let old = *epoch;
            *epoch += 1;
            if let Some((position, _)) = s.deferred.remove(tp) {
                last_commits.push((tp.clone(), old, position));
            }
            s.tracker.revoke(tp);
            s.pending_deletes.remove(tp);
            s.revoked.push(tp.clone());
        }
        last_commits
    }

    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<TopicPartition> {
        std::mem::take(&mut self.lock().revoked)
    }

    /// Per partition, offsets received and not yet committed (read-only, for metrics).
    pub fn commit_lag(&self) -> Vec<(TopicPartition, i64)> {
        self.lock().tracker.uncommitted()
    }
}

/// Consumer callbacks: revocations go through [`InFlight::revoke_blocking`]; newly assigned
/// partitions start paused or fetching according to their lane; librdkafka's statistics feed
/// the consumer-lag metric.
pub struct WorkerContext {
    pub inflight: Arc<InFlight>,
    pub ops: Arc<Ops>,
}

impl ClientContext for WorkerContext {
    /// Every `--kafka-stats-interval`: the consumer lag of each assigned partition, and the
    /// group's state (a member in the `steady` join state has its assignment, possibly empty,
    /// which makes the worker ready even if no rebalance callback said so).
    fn stats(&self, statistics: Statistics) {
        self.ops.metrics.set_consumer_lag(consumer_lag(&statistics));
        if let Some(cgrp) = &statistics.cgrp {
            self.ops
                .metrics
                .set_assigned_partitions(i64::from(cgrp.assignment_size));
            if cgrp.state == "up" && cgrp.join_state == "steady" {
                self.ops.health.set_consuming();
            }
        }
    }
}

/// The consumer lag of every partition librdkafka knows it (`-1` and the internal partition -1
/// are left out: unknown).
fn consumer_lag(statistics: &Statistics) -> Vec<(TopicPartition, i64)> {
    statistics
        .topics
        .iter()
        .flat_map(|(topic, t)| {
            t.partitions
                .iter()
                .filter(|(p, s)| **p >= 0 && s.consumer_lag >= 0)
                .map(move |(p, s)| ((topic.clone(), *p), s.consumer_lag))
        })
        .collect()
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps = partitions(tpl);
            info!(partitions = ?tps, "partitions revoked");
            let last = self.inflight.revoke_blocking(&tps);
            if last.is_empty() {
                return;
            }
            // One partition at a time, through the commit gate: a request task may be committing
            // a higher position of the same partition right now. A failure here leaves the
            // answers to their done markers.
            let mut made = 0;
            for ((t, p), epoch, position) in &last {
                let sent = self.inflight.commits.commit(&(t.clone(), *p), *epoch, *position, || {
                    let mut commit = TopicPartitionList::new();
                    if let Err(e) = commit.add_partition_offset(t, *p, rdkafka::Offset::Offset(*position)) {
                        warn!(error = %e, "cannot build the commit");
                        return false;
                    }
                    match consumer.commit(&commit, rdkafka::consumer::CommitMode::Sync) {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(topic = %t, partition = p, error = %e, "deferred commit failed; redeliveries will publish the stored answers");
                            false
                        }
                    }
                });
                made += usize::from(sent);
            }
            if made > 0 {
                info!(
                    partitions = made,
                    "deferred commits made before giving the partitions up"
                );
            }
        }
    }

    /// librdkafka keeps an application's pause across a revoke and a re-assign, so a partition
    /// handed (back) to this worker is explicitly resumed, or paused when its lane is full.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let tps = partitions(tpl);
                info!(partitions = ?tps, "partitions assigned");
                self.ops.health.set_consuming();
                let paused = self.inflight.lock().paused_topics.clone();
                let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
                for (t, p) in &tps {
                    if paused.contains(t) {
                        pause.add_partition(t, *p);
                    } else {
                        resume.add_partition(t, *p);
                    }
                }
                if pause.count() > 0 {
                    if let Err(e) = consumer.pause(&pause) {
                        warn!(error = %e, "cannot pause newly assigned partitions");
                    }
                }
                if resume.count() > 0 {
                    if let Err(e) = consumer.resume(&resume) {
                        warn!(error = %e, "cannot resume newly assigned partitions");
                    }
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

#[cfg(test)]
mod tests;
