//! What load to send, and sending it: open loop (Poisson arrivals at a rate) or closed loop (a
//! fixed number of requests in flight), for a number of requests or a duration.
//!
//! Everything that decides *what* is sent is a pure function of the seed and the request's
//! number `n`: its arrival time ([`poisson_arrivals`]), its prompt ([`prompt_index`]), its id
//! ([`request_id`]) and its sampling seed ([`request_seed`]). Two runs with the same seed send the
//! same requests; only when they are answered differs.
//!
//! Open loop models independent callers: arrivals do not wait for answers, so a fleet that falls
//! behind sees its queue grow, which is what sizing needs to show. When the sender itself falls
//! behind the schedule (a broker outage stalling acknowledgements), it catches up by sending at
//! once, since every publish runs in its own task. Closed loop models a fixed pool of callers
//! that each wait for their answer before asking again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::Progress;
use crate::prompts::PromptSet;
use crate::track::Tracker;

/// How long a closed-loop caller waits for its answer before it gives up on it and sends the next
/// request. A lost request must not stop its caller for good; it shows in the report as
/// unanswered. Long enough for a takeover after a crash (the session timeout plus a resume).
pub const CLOSED_LOOP_PATIENCE: Duration = Duration::from_secs(120);

/// The load to send.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    pub mode: Mode,
    pub limit: Limit,
    /// Seeds the arrivals, the order of prompts and each request's sampling seed.
    pub seed: u64,
    /// Ask for streamed chunks (and so measure time to first token).
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Poisson arrivals at this mean rate, whatever the answers do.
    Open { rate_per_s: f64 },
    /// This many requests in flight, each sent when another is answered.
    Closed { concurrency: usize },
}

pub use crate::metrics::Limit;

/// The arrival times of an open loop, as offsets from its start: exponentially distributed gaps
/// with mean `1 / rate_per_s`, drawn from a generator seeded by `seed`. Endless; empty if the
/// rate is not a positive number.
pub fn poisson_arrivals(rate_per_s: f64, seed: u64) -> impl Iterator<Item = Duration> {
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(seed ^ 0xa441_7e5e_ed00_0001));
    let valid = rate_per_s.is_finite() && rate_per_s > 0.0;
    let mut at_s = 0.0_f64;
    std::iter::from_fn(move || {
        if !valid {
            return None;
        }
        // `random` draws from [0, 1); 1 - u is in (0, 1], so its logarithm is finite.
        let u: f64 = rng.random();
        at_s += -(1.0 - u).ln() / rate_per_s;
        Some(Duration::from_secs_f64(at_s))
    })
}

/// The prompt of request `n`: the prompts in a shuffled order, each used once per round of `len`
/// requests, with a fresh shuffle every round. `len` must be at least 1.
pub fn prompt_index(seed: u64, n: usize, len: usize) -> usize {
    let round = (n / len) as u64;
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(splitmix64(seed ^ splitmix64(round))));
    order[n % len]
}

/// The sampling seed of request `n` (used when its prompt has no seed of its own).
pub fn request_seed(seed: u64, n: usize) -> u64 {
    splitmix64(seed ^ splitmix64(n as u64 ^ 0x5eed_5eed_5eed_5eed))
}

/// The id of request `n`.
pub fn request_id(prefix: &str, n: usize) -> String {
    format!("{prefix}-{n:05}")
}

/// SplitMix64's finaliser: a cheap bijection that spreads nearby inputs far apart.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Everything a publishing task needs, shared by the tasks of one [`drive`].
struct Plan {
    spec: LoadSpec,
    prompts: PromptSet,
    tracker: Tracker,
    request_topic: String,
    reply_topic: String,
    id_prefix: String,
    progress: Option<Progress>,
}

impl Plan {
    /// Builds and publishes request `n`; true if the broker acknowledged it.
    async fn send(&self, n: usize) -> bool {
        let i = prompt_index(self.spec.seed, n, self.prompts.len());
        let request = self.prompts.request(
            i,
            request_id(&self.id_prefix, n),
            request_seed(self.spec.seed, n),
            self.spec.stream,
            &self.reply_topic,
        );
        match self.tracker.publish(&self.request_topic, request, i).await {
            Ok(()) => true,
            Err(e) => {
                let line = format!("publish failed: {e:#}");
                match &self.progress {
                    Some(p) => p.println(&line),
                    None => eprintln!("{line}"),
                }
                false
            }
        }
    }
}

/// Sends the load `spec` describes and returns how many requests the broker acknowledged. It
/// returns when the last request is acknowledged, not answered: waiting for stragglers is the
/// caller's choice ([`Tracker::wait_answered`]). A request that cannot be published is reported
/// on `progress` (or stderr) and counted by the tracker; the run goes on.
pub async fn drive(
    spec: &LoadSpec,
    prompts: &PromptSet,
    tracker: &Tracker,
    request_topic: &str,
    reply_topic: &str,
    id_prefix: &str,
    progress: Option<&Progress>,
) -> anyhow::Result<usize> {
    match spec.mode {
        Mode::Open { rate_per_s } if !(rate_per_s.is_finite() && rate_per_s > 0.0) => {
            bail!("the open-loop rate must be a positive number of requests per second, got {rate_per_s}")
        }
        Mode::Closed { concurrency: 0 } => bail!("the closed-loop concurrency must be at least 1"),
        _ => {}
    }
    let plan = Arc::new(Plan {
        spec: spec.clone(),
        prompts: prompts.clone(),
        tracker: tracker.clone(),
        request_topic: request_topic.to_string(),
        reply_topic: reply_topic.to_string(),
        id_prefix: id_prefix.to_string(),
        progress: progress.cloned(),
    });
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    match spec.mode {
        Mode::Open { rate_per_s } => {
            for (n, offset) in poisson_arrivals(rate_per_s, spec.seed).enumerate() {
                let past_limit = match spec.limit {
                    Limit::Requests(max) => n >= max,
                    Limit::Duration(d) => offset >= d,
                };
                if past_limit {
                    break;
                }
                tokio::time::sleep_until(start + offset).await;
                let plan = plan.clone();
                tasks.spawn(async move { usize::from(plan.send(n).await) });
            }
        }
        Mode::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..concurrency {
                let (plan, next) = (plan.clone(), next.clone());
                tasks.spawn(async move { closed_loop_caller(&plan, &next, start).await });
            }
        }
    }
    let mut sent = 0;
    while let Some(result) = tasks.join_next().await {
        sent += result?;
    }
    Ok(sent)
}

/// One caller of a closed loop: claims the next request number, sends it, waits for its answer
/// (or the end of the run, or [`CLOSED_LOOP_PATIENCE`]), and repeats. Returns how many it sent.
async fn closed_loop_caller(plan: &Plan, next: &AtomicUsize, start: Instant) -> usize {
    let end = match plan.spec.limit {
        Limit::Duration(d) => Some(start + d),
        Limit::Requests(_) => None,
    };
    let mut sent = 0;
    loop {
        if end.is_some_and(|end| Instant::now() >= end) {
            return sent;
        }
        let n = next.fetch_add(1, Ordering::Relaxed);
        if matches!(plan.spec.limit, Limit::Requests(max) if n >= max) {
            return sent;
        }
        if !plan.send(n).await {
            continue;
        }
        sent += 1;
        let mut patience = CLOSED_LOOP_PATIENCE;
        if let Some(end) = end {
            patience = patience.min(end.saturating_duration_since(Instant::now()));
        }
        plan.tracker.wait_for(&request_id(&plan.id_prefix, n), patience).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_have_the_requested_mean_rate() {
        for (rate, seed) in [(5.0, 1), (0.5, 2), (200.0, 3)] {
            let n = 20_000;
            let last = poisson_arrivals(rate, seed).take(n).last().map(|d| d.as_secs_f64());
            let measured = n as f64 / last.unwrap_or(f64::NAN);
            // The mean of 20,000 exponential gaps is within 3% of its expectation with
            // overwhelming probability (its standard deviation is 0.7%).
            assert!((measured / rate - 1.0).abs() < 0.03, "rate {rate}: measured {measured}");
        }
    }

    #[test]
    fn arrivals_are_increasing_and_exponential() {
        let times: Vec<f64> = poisson_arrivals(10.0, 7)
            .take(10_000)
            .map(|d| d.as_secs_f64())
            .collect();
        let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|&g| g >= 0.0));
        // For an exponential distribution the fraction of gaps above the mean is 1/e.
        let above = gaps.iter().filter(|&&g| g > 0.1).count() as f64 / gaps.len() as f64;
        assert!((above - (-1.0_f64).exp()).abs() < 0.02, "{above}");
    }

    #[test]
    fn arrivals_depend_only_on_the_seed() {
        let a: Vec<Duration> = poisson_arrivals(3.0, 42).take(100).collect();
        let b: Vec<Duration> = poisson_arrivals(3.0, 42).take(100).collect();
        let c: Vec<Duration> = poisson_arrivals(3.0, 43).take(100).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn invalid_rates_give_no_arrivals() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(poisson_arrivals(rate, 1).next(), None, "{rate}");
        }
    }

    #[test]
    fn every_prompt_is_used_once_per_round() {
        let len = 37;
        for round in 0..3 {
            let mut seen: Vec<usize> = (0..len).map(|k| prompt_index(9, round * len + k, len)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..len).collect::<Vec<_>>(), "round {round}");
        }
        let first: Vec<usize> = (0..len).map(|n| prompt_index(9, n, len)).collect();
        let second: Vec<usize> = (len..2 * len).map(|n| prompt_index(9, n, len)).collect();
        let other_seed: Vec<usize> = (0..len).map(|n| prompt_index(10, n, len)).collect();
        assert_ne!(first, second, "each round is shuffled anew");
        assert_ne!(first, other_seed);
        assert_eq!(first, (0..len).map(|n| prompt_index(9, n, len)).collect::<Vec<_>>());
    }

    #[test]
    fn ids_and_seeds_are_unique_and_deterministic() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|n| request_id("lt", n)).collect();
        assert_eq!(ids.len(), 1000);
        assert_eq!(request_id("lt", 7), "lt-00007");
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|n| request_seed(5, n)).collect();
        assert_eq!(seeds.len(), 1000);
        assert_eq!(request_seed(5, 3), request_seed(5, 3));
        assert_ne!(request_seed(5, 3), request_seed(6, 3));
    }
}
