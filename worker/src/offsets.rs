//! Which offset a partition may commit when requests finish out of order.
//!
//! A worker with several requests in flight finishes them in any order, but Kafka commits one
//! position per partition: everything below it counts as done. So the position may only move to
//! the lowest offset still running (or just past the highest finished one when nothing runs).
//! Committing further would lose the unfinished request below it if the worker died.
//!
//! Pure bookkeeping, no I/O; the consumer's `InFlight` holds one.

use std::collections::{BTreeSet, HashMap};

/// A topic and partition.
pub type TopicPartition = (String, i32);

#[derive(Debug, Default, Clone)]
struct PartitionState {
    /// Offsets started and not yet finished.
    running: BTreeSet<i64>,
    /// One past the highest offset finished so far.
    finished_end: Option<i64>,
    /// The last position returned for committing.
    committed: Option<i64>,
}

impl PartitionState {
    /// The position everything below which is finished.
    fn safe_position(&self) -> Option<i64> {
        match self.running.first() {
            Some(&lowest) => Some(lowest),
            None => self.finished_end,
        }
    }
}

/// Offsets in flight per partition, and the position each may commit.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that work on `offset` started. Offsets of a partition start in increasing order,
    /// as the consumer delivers them.
    pub fn start(&mut self, tp: &TopicPartition, offset: i64) {
        // The group's position is at least the first offset it delivered: committing that is no
        // progress, so it counts as committed.
        let state = self.partitions.entry(tp.clone()).or_insert_with(|| PartitionState {
            committed: Some(offset),
            ..PartitionState::default()
        });
        state.running.insert(offset);
    }

    /// Records that `offset` finished (answered or dead-lettered) and returns the new position
    /// to commit, if it moved past the last one returned.
    pub fn finish(&mut self, tp: &TopicPartition, offset: i64) -> Option<i64> {
        let state = self.partitions.get_mut(tp)?;
        if !state.running.remove(&offset) {
            return None;
        }
        state.finished_end = Some(state.finished_end.map_or(offset + 1, |e| e.max(offset + 1)));
        let position = state.safe_position()?;
        if state.committed.is_some_and(|c| c >= position) {
            return None;
        }
        state.committed = Some(position);
        Some(position)
    }

    /// Forgets a partition (revoked): its running work is no longer this worker's to commit.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// The lowest offset still running on a partition.
    pub fn lowest_running(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp).and_then(|s| s.running.first().copied())
    }

    /// Offsets still running on a partition.
    pub fn running(&self, tp: &TopicPartition) -> usize {
        self.partitions.get(tp).map_or(0, |s| s.running.len())
    }

    /// For every tracked partition, how many offsets were received and are not yet committed:
    /// from the last position returned for committing to one past the highest offset started.
    /// The running ones and those finished above a running one; 0 once everything is committed.
    pub fn uncommitted(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .map(|(tp, s)| {
                let end = s.running.last().map(|o| o + 1).max(s.finished_end);
                let from = s.committed.or(s.running.first().copied());
                let lag = match (end, from) {
                    (Some(end), Some(from)) => (end - from).max(0),
                    _ => 0,
                };
                (tp.clone(), lag)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn tp() -> TopicPartition {
        ("t".to_string(), 0)
    }

    #[test]
    fn commits_only_below_the_lowest_running_offset() {
        let mut t = OffsetTracker::new();
        for o in 10..14 {
            t.start(&tp(), o);
        }
        assert_eq!(t.finish(&tp(), 12), None, "10 and 11 still run");
        assert_eq!(t.finish(&tp(), 10), Some(11));
        assert_eq!(t.finish(&tp(), 13), None, "11 still runs");
        assert_eq!(t.finish(&tp(), 11), Some(14));
        assert_eq!(t.running(&tp()), 0);
    }

    #[test]
    fn uncommitted_counts_running_and_finished_above_running() {
        let mut t = OffsetTracker::new();
        for o in 10..14 {
            t.start(&tp(), o);
        }
        assert_eq!(t.uncommitted(), [(tp(), 4)]);
        t.finish(&tp(), 12);
        assert_eq!(
            t.uncommitted(),
            [(tp(), 4)],
            "12 is finished but 10 and 11 hold the commit"
        );
        t.finish(&tp(), 10);
        assert_eq!(t.uncommitted(), [(tp(), 3)], "committed up to 11");
        t.finish(&tp(), 11);
        t.finish(&tp(), 13);
        assert_eq!(t.uncommitted(), [(tp(), 0)]);
        t.revoke(&tp());
        assert!(t.uncommitted().is_empty());
    }

    #[test]
    fn unknown_or_revoked_offsets_commit_nothing() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.finish(&tp(), 3), None);
        t.start(&tp(), 3);
        t.revoke(&tp());
        assert_eq!(t.finish(&tp(), 3), None);
    }

    /// Against a reference model: after every finish, the committed position is exactly the
    /// length of the longest finished prefix of the started offsets, and it never goes back.
    #[test]
    fn matches_the_reference_model_in_random_orders() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..500 {
            let base: i64 = rng.random_range(0..1000);
            let n = rng.random_range(1..40);
            let offsets: Vec<i64> = (base..base + n).collect();
            let mut t = OffsetTracker::new();
            let mut finished = vec![false; n as usize];
            let mut last: Option<i64> = None;
            let mut started = 0usize;
            let mut order: Vec<usize> = Vec::new();
            // Start offsets in order, finish them in a random order interleaved with starts.
            while started < offsets.len() || !order.is_empty() {
                if started < offsets.len() && (order.is_empty() || rng.random_bool(0.5)) {
                    t.start(&tp(), offsets[started]);
                    order.push(started);
                    started += 1;
                    continue;
                }
                order.shuffle(&mut rng);
                let i = order.pop().expect("something runs");
                finished[i] = true;
                let got = t.finish(&tp(), offsets[i]);
                // Reference: the first offset not finished among those started, or one past the
                // highest started when all are finished.
                let prefix = finished[..started].iter().take_while(|&&f| f).count();
                let expected_position = if prefix == 0 { None } else { Some(base + prefix as i64) };
                let moved = expected_position.filter(|&p| last.is_none_or(|l| p > l));
                assert_eq!(got, moved, "offsets {offsets:?}, finished {finished:?}");
                if let Some(p) = got {
                    last = Some(p);
                }
            }
            assert_eq!(last, Some(base + n));
        }
    }
}
