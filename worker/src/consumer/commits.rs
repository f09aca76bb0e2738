//! Commits of one partition in order: never two at once, never one that moves the committed
//! position back.
//!
//! Several tasks commit: every request task that finishes the lowest running offset of its
//! partition, the task that retries deferred commits, and the revocation callback. The offset
//! tracker hands out positions in increasing order, but two tasks that got `p1 < p2` from it can
//! reach the broker in the order `p2, p1`, and Kafka stores whatever it is sent last: the
//! committed offset would go back to `p1`, and a crash then would redeliver, and answer again,
//! everything from `p1`. So each partition's commits go through its own lock, which remembers
//! the highest position committed in the current assignment epoch (see [`super::inflight`]); a
//! commit at or below it is already covered and is not sent.
//!
//! Limit: the epoch a caller passes is the one its request started in. A commit from a request
//! whose partition was revoked and handed back meanwhile is refused only once the new epoch has
//! committed; before that, the revocation waits for the request to settle (within
//! `--revoke-timeout`), so its commit lands before the partition changes hands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::offsets::TopicPartition;

/// The highest position committed for a partition, and in which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub epoch: u64,
    pub position: i64,
}

/// What to do with a commit of `position` in `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it: it moves the position forward, or it is the first of a newer epoch.
    Commit,
    /// An equal or higher position of the same epoch is committed already: nothing to send,
    /// and what it would have made safe is safe.
    Covered,
    /// It belongs to an epoch older than one that has committed: the partition was revoked
    /// since, and its offsets are no longer this request's to commit.
    Stale,
}

/// The rule, on its own.
pub fn decide(last: Option<Committed>, epoch: u64, position: i64) -> Decision {
    match last {
        Some(c) if epoch < c.epoch => Decision::Stale,
        Some(c) if epoch == c.epoch && position <= c.position => Decision::Covered,
        _ => Decision::Commit,
    }
}

/// Per-partition commit locks with the last committed position of each.
#[derive(Debug, Default)]
pub struct CommitGate {
    partitions: Mutex<HashMap<TopicPartition, Arc<Mutex<Option<Committed>>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain bookkeeping behind the lock: a panic elsewhere leaves nothing inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CommitGate {
    /// Commits `position` with `send` (which reports whether the broker took it) unless
    /// [`decide`] says otherwise, holding the partition's lock throughout, so a commit of the
    /// partition issued meanwhile waits for this one. Returns whether `position` is committed:
    /// by this call, or covered by an earlier one. `send` blocks (a synchronous commit), so a
    /// caller on an async runtime blocks its thread as it did before, for as long as one commit.
    pub fn commit(&self, tp: &TopicPartition, epoch: u64, position: i64, send: impl FnOnce() -> bool) -> bool {
        let cell = lock(&self.partitions).entry(tp.clone()).or_default().clone();
        let mut last = lock(&cell);
        match decide(*last, epoch, position) {
            Decision::Stale => false,
            Decision::Covered => true,
            Decision::Commit => {
                let sent = send();
                if sent {
                    *last = Some(Committed { epoch, position });
                }
                sent
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn tp() -> TopicPartition {
        ("t".to_string(), 0)
    }

    #[test]
    fn positions_only_move_forward_within_an_epoch() {
        let c = |epoch, position| Some(Committed { epoch, position });
        assert_eq!(decide(None, 0, 5), Decision::Commit);
        assert_eq!(decide(c(0, 5), 0, 6), Decision::Commit);
        assert_eq!(decide(c(0, 5), 0, 5), Decision::Covered);
        assert_eq!(decide(c(0, 5), 0, 4), Decision::Covered);
        assert_eq!(
            decide(c(1, 9), 2, 3),
            Decision::Commit,
            "a newer assignment starts afresh"
        );
        assert_eq!(decide(c(1, 9), 0, 12), Decision::Stale);
    }

    #[test]
    fn a_lower_position_after_a_higher_one_is_not_sent() {
        let gate = CommitGate::default();
        let mut sent = Vec::new();
        assert!(gate.commit(&tp(), 0, 12, || {
            sent.push(12);
            true
        }));
        assert!(gate.commit(&tp(), 0, 11, || {
            sent.push(11);
            true
        }));
        assert_eq!(sent, [12], "11 is covered by 12");
        // A failed commit leaves the last one in place, so the retry is sent.
        assert!(!gate.commit(&tp(), 0, 13, || false));
        assert!(gate.commit(&tp(), 0, 13, || {
            sent.push(13);
            true
        }));
        assert_eq!(sent, [12, 13]);
        // An older epoch's commit is refused once a newer one has committed.
        assert!(gate.commit(&tp(), 1, 2, || true));
        assert!(!gate.commit(&tp(), 0, 20, || panic!("stale: never sent")));
        // Partitions are independent.
        assert!(gate.commit(&("t".to_string(), 1), 0, 1, || true));
    }

    /// Two tasks that got 11 and 12 from the tracker, the one with 12 first at the broker: the
    /// one with 11 waits on the partition's lock, and then finds 11 covered.
    #[test]
    fn concurrent_commits_of_a_partition_are_serialised() {
        let gate = Arc::new(CommitGate::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (inside_tx, inside_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let high = {
            let (gate, log) = (gate.clone(), log.clone());
            std::thread::spawn(move || {
                gate.commit(&tp(), 0, 12, || {
                    inside_tx.send(()).expect("test alive");
                    release_rx.recv().expect("released");
                    lock(&log).push(12);
                    true
                })
            })
        };
        inside_rx.recv().expect("the high commit is being sent");
        let low = {
            let (gate, log) = (gate.clone(), log.clone());
            std::thread::spawn(move || {
                gate.commit(&tp(), 0, 11, || {
                    lock(&log).push(11);
                    true
                })
            })
        };
        release_tx.send(()).expect("high waits");
        assert!(high.join().expect("high"));
        assert!(low.join().expect("low"));
        assert_eq!(*lock(&log), [12], "the committed position never went back to 11");
    }
}
