//! How far the caller's consumer group may commit on each reply partition.
//!
//! A committed offset is a promise that nothing below it is needed again. Two kinds of reply
//! messages are still needed after they have been read, so they are *held*:
//!
//! - a final reply for a pending request, until its `answered` record is in the journal: a
//!   caller that dies before that must read the reply again;
//! - the first chunk of a streamed answer, until the request is finished: a caller that dies
//!   mid-stream reads the stream again from its start, so a restarted stream has all its text.
//!
//! A partition's commit position is the lowest held offset, or one past the highest offset read
//! when nothing is held. Messages for other callers, and for requests already finished, are
//! never held, so the position moves past them as soon as they are read. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

/// Read and held offsets per partition of the reply topic.
#[derive(Debug, Default)]
pub struct CommitTracker {
    partitions: BTreeMap<i32, Partition>,
}

#[derive(Debug)]
struct Partition {
    /// One past the highest offset read, or where reading starts.
    next: i64,
    /// Offsets read but still needed.
    held: BTreeSet<i64>,
}

impl CommitTracker {
    /// Reading `partition` starts at `offset` (the group's committed offset).
    pub fn start(&mut self, partition: i32, offset: i64) {
        self.partitions.insert(
            partition,
            Partition {
                next: offset,
                held: BTreeSet::new(),
            },
        );
    }

    /// `offset` of `partition` was read; `hold` keeps the position from passing it until
    /// [`CommitTracker::release`].
    pub fn read(&mut self, partition: i32, offset: i64, hold: bool) {
        let p = self.partitions.entry(partition).or_insert_with(|| Partition {
            next: offset,
            held: BTreeSet::new(),
        });
        p.next = p.next.max(offset + 1);
        if hold {
            p.held.insert(offset);
        }
    }

    /// `offset` of `partition` is no longer needed. Releasing an offset twice is harmless.
    pub fn release(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.held.remove(&offset);
        }
    }

    /// The offset the group may commit for `partition`.
    pub fn position(&self, partition: i32) -> Option<i64> {
        let p = self.partitions.get(&partition)?;
        Some(p.held.first().map_or(p.next, |&held| held.min(p.next)))
    }

    /// Every partition's commit position.
    pub fn positions(&self) -> Vec<(i32, i64)> {
        self.partitions
            .keys()
            .filter_map(|&partition| Some((partition, self.position(partition)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_follows_reads_until_something_is_held() {
        let mut t = CommitTracker::default();
        t.start(0, 10);
        assert_eq!(t.position(0), Some(10));
        t.read(0, 10, false);
        t.read(0, 11, false);
        assert_eq!(t.position(0), Some(12));
        t.read(0, 12, true); // a first chunk
        t.read(0, 13, false);
        t.read(0, 14, true); // a final reply being journaled
        t.read(0, 15, false);
        assert_eq!(t.position(0), Some(12));
        t.release(0, 14);
        assert_eq!(t.position(0), Some(12), "the first chunk still holds");
        t.release(0, 12);
        assert_eq!(t.position(0), Some(16));
        t.release(0, 12);
        assert_eq!(t.position(0), Some(16), "a second release changes nothing");
    }

    #[test]
    fn holds_released_out_of_order_keep_the_lowest() {
        let mut t = CommitTracker::default();
        t.start(1, 0);
        for offset in 0..6 {
            t.read(1, offset, offset % 2 == 0);
        }
        assert_eq!(t.position(1), Some(0));
        t.release(1, 4);
        t.release(1, 2);
        assert_eq!(t.position(1), Some(0));
        t.release(1, 0);
        assert_eq!(t.position(1), Some(6));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = CommitTracker::default();
        t.start(0, 5);
        t.start(1, 7);
        t.read(0, 5, true);
        t.read(1, 7, false);
        assert_eq!(t.positions(), [(0, 5), (1, 8)]);
        assert_eq!(t.position(2), None);
    }

    /// Against a reference that keeps every offset with its state: the position is the first
    /// offset not read or still held. Deterministic pseudo-random sequences.
    #[test]
    fn matches_a_reference_model() {
        let mut seed = 0x2545_f491_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut t = CommitTracker::default();
            t.start(0, 100);
            let mut held: Vec<i64> = Vec::new();
            let mut read_up_to = 100;
            for _ in 0..50 {
                if next() % 3 == 0 && !held.is_empty() {
                    let i = (next() % held.len() as u64) as usize;
                    t.release(0, held.swap_remove(i));
                } else {
                    let hold = next() % 2 == 0;
                    t.read(0, read_up_to, hold);
                    if hold {
                        held.push(read_up_to);
                    }
                    read_up_to += 1;
                }
                let expected = held.iter().copied().min().unwrap_or(read_up_to);
                assert_eq!(t.position(0), Some(expected));
            }
        }
    }
}
