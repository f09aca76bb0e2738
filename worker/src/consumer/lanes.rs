//! Priority lanes: messages waiting for a slot, one queue per request topic, served by weight.
//!
//! When several lanes have work waiting, each free slot goes to the lane chosen by smooth
//! weighted round robin (the nginx algorithm): with weights 4 and 1 and both lanes busy, four of
//! every five slots go to the first, interleaved rather than in bursts, and a lane with nothing
//! waiting gives its share to the others. Pure bookkeeping, no I/O.

use std::collections::VecDeque;

/// One request topic's queue.
#[derive(Debug)]
struct Lane<M> {
    topic: String,
    weight: i64,
    /// The lane's running credit in the round robin.
    current: i64,
    queue: VecDeque<M>,
}

/// The waiting messages of every lane.
#[derive(Debug)]
pub struct Lanes<M> {
    lanes: Vec<Lane<M>>,
    /// Messages a lane may hold before its partitions are paused.
    capacity: usize,
}

impl<M> Lanes<M> {
    /// Lanes for `(topic, weight)` pairs; each holds up to `capacity` messages before
    /// [`Lanes::is_full`] says to pause it.
    pub fn new<'a>(topics: impl IntoIterator<Item = (&'a str, u32)>, capacity: usize) -> Self {
        Self {
            lanes: topics
                .into_iter()
                .map(|(topic, weight)| Lane {
                    topic: topic.to_string(),
                    weight: i64::from(weight.max(1)),
                    current: 0,
                    queue: VecDeque::new(),
                })
                .collect(),
            capacity,
        }
    }

    /// Queues a message read from `topic`. A topic that is not a lane goes to the first lane
    /// (it cannot happen with a subscription to the lanes' topics).
    pub fn push(&mut self, topic: &str, message: M) {
        let i = self.index(topic).unwrap_or(0);
        self.lanes[i].queue.push_back(message);
    }

    /// The next message to start, by weight among the lanes that have one.
    pub fn pop(&mut self) -> Option<M> {
        let total: i64 = self
            .lanes
            .iter()
            .filter(|l| !l.queue.is_empty())
            .map(|l| l.weight)
            .sum();
        if total == 0 {
            return None;
        }
        for lane in self.lanes.iter_mut().filter(|l| !l.queue.is_empty()) {
            lane.current += lane.weight;
        }
        let best = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.queue.is_empty())
            .max_by_key(|(i, l)| (l.current, std::cmp::Reverse(*i)))
            .map(|(i, _)| i)?;
        let lane = &mut self.lanes[best];
        lane.current -= total;
        lane.queue.pop_front()
    }

    /// Whether `topic`'s lane holds as many messages as it may.
    pub fn is_full(&self, topic: &str) -> bool {
        self.index(topic)
            .is_some_and(|i| self.lanes[i].queue.len() >= self.capacity)
    }

    /// Drops the waiting messages for which `keep` is false (their partition was revoked).
    pub fn retain(&mut self, mut keep: impl FnMut(&M) -> bool) {
        for lane in &mut self.lanes {
            lane.queue.retain(&mut keep);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.queue.len()).sum()
    }

    /// The lanes' topics.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.lanes.iter().map(|l| l.topic.as_str())
    }

    fn index(&self, topic: &str) -> Option<usize> {
        self.lanes.iter().position(|l| l.topic == topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(weights: &[(&str, u32)]) -> Lanes<(String, u32)> {
        Lanes::new(weights.iter().copied(), 100)
    }

    fn fill(l: &mut Lanes<(String, u32)>, topic: &str, n: u32) {
        for i in 0..n {
            l.push(topic, (topic.to_string(), i));
        }
    }

    #[test]
    fn busy_lanes_share_by_weight_interleaved() {
        let mut l = lanes(&[("high", 4), ("normal", 1)]);
        fill(&mut l, "high", 40);
        fill(&mut l, "normal", 40);
        let first: Vec<String> = (0..10).map(|_| l.pop().expect("work waits").0).collect();
        assert_eq!(first.iter().filter(|t| *t == "high").count(), 8);
        // Never more than four high ones in a row: normal work keeps moving.
        let runs = first.split(|t| t == "normal").map(<[String]>::len).max();
        assert!(runs <= Some(4), "{first:?}");
    }

    #[test]
    fn an_idle_lane_gives_its_share_away_and_order_within_a_lane_holds() {
        let mut l = lanes(&[("high", 4), ("normal", 1)]);
        fill(&mut l, "normal", 5);
        let got: Vec<u32> = std::iter::from_fn(|| l.pop()).map(|(_, i)| i).collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        // An urgent message that arrives behind a backlog is next.
        fill(&mut l, "normal", 10);
        l.pop();
        l.push("high", ("high".into(), 99));
        assert_eq!(l.pop(), Some(("high".into(), 99)));
    }

    #[test]
    fn weights_hold_over_long_runs() {
        let mut l = lanes(&[("a", 3), ("b", 2), ("c", 1)]);
        for t in ["a", "b", "c"] {
            fill(&mut l, t, 600);
        }
        let mut counts = std::collections::HashMap::new();
        for _ in 0..600 {
            *counts.entry(l.pop().expect("work").0).or_insert(0) += 1;
        }
        assert_eq!((counts["a"], counts["b"], counts["c"]), (300, 200, 100));
    }

    #[test]
    fn fullness_and_revocation() {
        let mut l: Lanes<(String, u32)> = Lanes::new([("t", 1)], 2);
        l.push("t", ("t".into(), 0));
        assert!(!l.is_full("t"));
        l.push("t", ("t".into(), 1));
        assert!(l.is_full("t"));
        l.retain(|m| m.1 != 0);
        assert_eq!(l.len(), 1);
        assert!(!l.is_full("t"));
        assert!(!l.is_full("unknown"));
    }
}
