//! Fault schedules: what the chaos harness does to the fleet, and when.
//!
//! A schedule is a list of [`Step`]s, each an [`Action`] (evict, crash, freeze, drain a node,
//! cut the broker off) with the condition that releases it: a time since the load started,
//! optionally also "some request is streaming" and "the previous fault has recovered". This
//! module does no I/O: it builds schedules from a seed, decides when a step is due from what the
//! harness has observed, and picks the victims among the workers that are running, so every
//! rule (never below one running worker, only running workers, the drill's order) is tested
//! directly. `chaos` applies the steps to real processes.
//!
//! Limit: the victims are picked without knowing which worker holds which request (chunks do
//! not name their worker; only the final answer does). Workers seen answering lately are hit
//! first, as the likeliest to hold work; a fault that still interrupted nothing is reported with
//! no recovery time rather than a zero.

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A named fault schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// After a warm-up, an eviction or a crash every `--fault-every` (alternating, the first one
    /// chosen by the seed), plus one freeze, one node drain, one broker outage and one broker
    /// crash at seeded places among the first faults.
    Default,
    /// The classic disruption drill: delete one of three replicas while requests are in flight,
    /// wait until it has recovered, then drain a node (two replicas evicted at once).
    Drill,
    /// No faults: a baseline under the same load.
    None,
}

/// What a step does to the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// SIGTERM one worker (a Kubernetes eviction: graceful drain); a replacement follows.
    Evict,
    /// SIGKILL one worker (node loss, OOM kill); a replacement follows.
    Crash,
    /// SIGSTOP one worker, SIGCONT it after this long; no replacement (the pod is still there).
    Freeze(Duration),
    /// SIGTERM this many workers at once (a node drained); a replacement follows for each.
    NodeDrain(usize),
    /// SIGSTOP the broker, SIGCONT it after this long (only for a broker the harness started).
    BrokerOutage(Duration),
    /// SIGKILL the broker and start it again on its data this long after (only for a real
    /// Kafka the harness started: the mock keeps nothing across a restart).
    BrokerCrash(Duration),
}

/// One fault and the condition that releases it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    /// Not before this long after the load started.
    pub not_before: Duration,
    /// Given up (skipped) if it could not be applied by this time: the default schedule's
    /// slot ends where the next begins. `None`: the step waits as long as it takes.
    pub until: Option<Duration>,
    /// Only once some request is streaming (has chunks and no final reply), so the fault has
    /// work to interrupt.
    pub when_in_flight: bool,
    /// Only once the previous step has recovered: every request it interrupted has made
    /// progress again and the fleet is back to its size.
    pub after_recovery: bool,
}

/// What the harness has observed when it asks whether the next step is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Time since the load started.
    pub elapsed: Duration,
    /// Requests streaming right now.
    pub in_flight: usize,
    /// Whether the previous step (if any) has recovered.
    pub recovered: bool,
}

impl Step {
    /// Whether the step may be applied now.
    pub fn is_due(&self, seen: &Observed) -> bool {
        seen.elapsed >= self.not_before
            && (!self.when_in_flight || seen.in_flight > 0)
            && (!self.after_recovery || seen.recovered)
    }

    /// Whether the step's slot has passed without it being applied.
    pub fn is_expired(&self, elapsed: Duration) -> bool {
        self.until.is_some_and(|until| elapsed >= until)
    }
}

/// Parameters of the seeded default schedule.
#[derive(Debug, Clone, Copy)]
pub struct DefaultSpec {
    /// No fault before this (workers load the model and join the group; streams start).
    pub warmup: Duration,
    /// Time between two faults.
    pub every: Duration,
    /// Steps are generated up to this time; the harness stops applying them once the load is
    /// done, so this only needs to exceed any run.
    pub horizon: Duration,
    pub seed: u64,
}

/// How long a frozen worker stays stopped: shorter than the 6 s session timeout the harness
/// gives its workers, so the group keeps it and its requests simply stall, then continue.
pub const FREEZE_FOR: Duration = Duration::from_secs(4);
/// How long the broker stays unreachable: shorter than the session timeout too, so the group
/// survives it and the workers' clients reconnect and flush what they buffered.
pub const OUTAGE_FOR: Duration = Duration::from_secs(4);
/// How long a crashed broker stays down before it is started again (its start adds several
/// seconds more, during which clients are refused).
pub const BROKER_DOWN_FOR: Duration = Duration::from_secs(2);
/// Workers a node drain evicts at once.
pub const NODE_DRAIN_WORKERS: usize = 2;
/// The special faults of the default schedule go among its first this many slots (after the
/// first, which is always an eviction or a crash), so even a short run meets each once.
const SPECIAL_SLOTS: usize = 6;

/// The steps of `scenario`. `spec` shapes the default; the drill takes only its warm-up.
pub fn schedule(scenario: Scenario, spec: &DefaultSpec) -> Vec<Step> {
    match scenario {
        Scenario::None => Vec::new(),
        Scenario::Drill => drill(spec.warmup),
        Scenario::Default => default_schedule(spec),
    }
}

fn drill(warmup: Duration) -> Vec<Step> {
    vec![
        Step {
            action: Action::Evict,
            not_before: warmup,
            until: None,
            when_in_flight: true,
            after_recovery: false,
        },
        Step {
            action: Action::NodeDrain(NODE_DRAIN_WORKERS),
            not_before: warmup,
            until: None,
            when_in_flight: true,
            after_recovery: true,
        },
    ]
}

fn default_schedule(spec: &DefaultSpec) -> Vec<Step> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
    let every = spec.every.max(Duration::from_millis(100));
    let count = ((spec.horizon.saturating_sub(spec.warmup)).as_secs_f64() / every.as_secs_f64()).floor() as usize + 1;
    // Which of the first slots get the freeze, the node drain, the broker outage and the broker
    // crash.
    let mut slots: Vec<usize> = (1..=SPECIAL_SLOTS).collect();
    slots.shuffle(&mut rng);
    let special = [
        (slots[0], Action::Freeze(FREEZE_FOR)),
        (slots[1], Action::NodeDrain(NODE_DRAIN_WORKERS)),
        (slots[2], Action::BrokerOutage(OUTAGE_FOR)),
        (slots[3], Action::BrokerCrash(BROKER_DOWN_FOR)),
    ];
    let mut crash_next: bool = rng.random();
    (0..count)
        .map(|i| {
            let action = match special.iter().find(|(slot, _)| *slot == i) {
                Some((_, action)) => *action,
                None => {
                    let a = if crash_next { Action::Crash } else { Action::Evict };
                    crash_next = !crash_next;
                    a
                }
            };
            let not_before = spec.warmup + every * i as u32;
            Step {
                action,
                not_before,
                until: Some(not_before + every),
                // A fault when nothing streams measures nothing: each waits, within its slot,
                // for a request to be streaming.
                when_in_flight: true,
                after_recovery: false,
            }
        })
        .collect()
}

/// The steps of `steps` whose action `keep` accepts, at most `max` of them, moved up into the
/// slots of the steps before them: the `i`-th step kept takes the times of the `i`-th step of the
/// whole schedule. So `--fault-kinds evict,crash` still means a fault every `--fault-every` after
/// the warm-up, not gaps where the other kinds would have been (a short run would otherwise end
/// before its second fault, however many it asked for).
pub fn keep(steps: &[Step], keep: impl Fn(Action) -> bool, max: usize) -> Vec<Step> {
    steps
        .iter()
        .filter(|s| keep(s.action))
        .zip(steps)
        .take(max)
        .map(|(kept, slot)| Step {
            action: kept.action,
            not_before: slot.not_before,
            until: slot.until,
            ..*kept
        })
        .collect()
}

/// The workers `action` hits, picked with `rng` among `running` (workers alive, not frozen and
/// not already stopping), those in `busy` first (workers seen answering lately, so likely to hold
/// work the fault interrupts). At least one of `running` is always left alone; an action that
/// would need to hit them all hits fewer (a node drain) or none (an empty list: the step waits
/// or is skipped). Broker outages hit no worker.
pub fn pick_victims<R: Rng + ?Sized>(action: Action, running: &[String], busy: &[String], rng: &mut R) -> Vec<String> {
    let wanted = match action {
        Action::Evict | Action::Crash | Action::Freeze(_) => 1,
        Action::NodeDrain(n) => n,
        Action::BrokerOutage(_) | Action::BrokerCrash(_) => return Vec::new(),
    };
    let n = wanted.min(running.len().saturating_sub(1));
    let (mut first, mut rest): (Vec<String>, Vec<String>) = running.iter().cloned().partition(|w| busy.contains(w));
    first.shuffle(rng);
    rest.shuffle(rng);
    first.into_iter().chain(rest).take(n).collect()
}

/// Whether `action` needs at least one worker hit to mean anything (all but the broker's).
pub fn hits_workers(action: Action) -> bool {
    !matches!(action, Action::BrokerOutage(_) | Action::BrokerCrash(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64) -> DefaultSpec {
        DefaultSpec {
            warmup: Duration::from_secs(10),
            every: Duration::from_secs(8),
            horizon: Duration::from_secs(200),
            seed,
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}")).collect()
    }

    #[test]
    fn default_schedule_is_seeded_and_spaced() {
        let a = schedule(Scenario::Default, &spec(7));
        assert_eq!(a, schedule(Scenario::Default, &spec(7)), "same seed, same schedule");
        assert_eq!(a.len(), 24, "(200 - 10) / 8 + 1 slots");
        for (i, s) in a.iter().enumerate() {
            assert_eq!(s.not_before, Duration::from_secs(10 + 8 * i as u64));
            assert_eq!(
                s.until,
                Some(s.not_before + Duration::from_secs(8)),
                "its slot ends where the next begins"
            );
            assert!(s.when_in_flight && !s.after_recovery);
        }
        let differs = (0..20).any(|seed| schedule(Scenario::Default, &spec(seed)) != a);
        assert!(differs, "the seed changes the schedule");
    }

    #[test]
    fn default_schedule_has_each_special_fault_once_early_and_alternates_the_rest() {
        for seed in 0..50 {
            let steps = schedule(Scenario::Default, &spec(seed));
            let first_slots = &steps[..=SPECIAL_SLOTS];
            let count = |f: fn(&Action) -> bool| steps.iter().filter(|s| f(&s.action)).count();
            assert_eq!(count(|a| matches!(a, Action::Freeze(_))), 1);
            assert_eq!(count(|a| matches!(a, Action::NodeDrain(2))), 1);
            assert_eq!(count(|a| matches!(a, Action::BrokerOutage(_))), 1);
            assert_eq!(count(|a| matches!(a, Action::BrokerCrash(_))), 1);
            let specials = first_slots
                .iter()
                .filter(|s| !matches!(s.action, Action::Evict | Action::Crash))
                .count();
            assert_eq!(
                specials, 4,
                "seed {seed}: the special faults come among the first slots"
            );
            assert!(matches!(steps[0].action, Action::Evict | Action::Crash));
            let plain: Vec<Action> = steps
                .iter()
                .map(|s| s.action)
                .filter(|a| matches!(a, Action::Evict | Action::Crash))
                .collect();
            assert!(
                plain.windows(2).all(|w| w[0] != w[1]),
                "seed {seed}: evictions and crashes alternate"
            );
        }
    }

    #[test]
    fn the_seed_picks_whether_an_eviction_or_a_crash_comes_first() {
        let firsts: std::collections::HashSet<_> = (0..20)
            .map(|seed| schedule(Scenario::Default, &spec(seed))[0].action)
            .collect();
        assert_eq!(firsts.len(), 2);
    }

    #[test]
    fn drill_evicts_one_in_flight_then_drains_a_node_after_recovery() {
        let steps = schedule(Scenario::Drill, &spec(1));
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].action, Action::Evict);
        assert!(steps[0].when_in_flight && !steps[0].after_recovery);
        assert_eq!(steps[1].action, Action::NodeDrain(2));
        assert!(steps[1].when_in_flight && steps[1].after_recovery);
        assert!(
            steps.iter().all(|s| s.until.is_none()),
            "drill steps wait as long as it takes"
        );
        assert!(schedule(Scenario::None, &spec(1)).is_empty());
    }

    #[test]
    fn a_step_is_due_only_when_every_condition_holds() {
        let step = schedule(Scenario::Drill, &spec(1))[1];
        let seen = |secs, in_flight, recovered| Observed {
            elapsed: Duration::from_secs(secs),
            in_flight,
            recovered,
        };
        assert!(step.is_due(&seen(11, 2, true)));
        assert!(!step.is_due(&seen(9, 2, true)), "too early");
        assert!(!step.is_due(&seen(11, 0, true)), "nothing in flight");
        assert!(!step.is_due(&seen(11, 2, false)), "previous fault not recovered");
        assert!(!step.is_expired(Duration::from_secs(1_000)));
        let timed = schedule(Scenario::Default, &spec(1))[0];
        assert!(!timed.is_expired(Duration::from_secs(17)) && timed.is_expired(Duration::from_secs(18)));
    }

    #[test]
    fn kept_kinds_move_up_into_the_first_slots() {
        for seed in 0..50 {
            let all = schedule(Scenario::Default, &spec(seed));
            let plain = |a: Action| matches!(a, Action::Evict | Action::Crash);
            let kept = keep(&all, plain, 4);
            assert_eq!(kept.len(), 4);
            for (i, s) in kept.iter().enumerate() {
                assert!(plain(s.action));
                assert_eq!(s.not_before, all[i].not_before, "seed {seed}: step {i} in slot {i}");
                assert_eq!(s.until, all[i].until);
            }
            let order: Vec<Action> = all.iter().map(|s| s.action).filter(|&a| plain(a)).take(4).collect();
            assert_eq!(kept.iter().map(|s| s.action).collect::<Vec<_>>(), order, "order kept");
            assert_eq!(keep(&all, |_| true, usize::MAX), all, "keeping all changes nothing");
        }
        let drill = schedule(Scenario::Drill, &spec(1));
        let drained = keep(&drill, |a| matches!(a, Action::NodeDrain(_)), usize::MAX);
        assert_eq!(drained.len(), 1);
        assert!(drained[0].after_recovery && drained[0].until.is_none());
    }

    #[test]
    fn busy_workers_are_hit_first() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let running = names(4);
        let busy = ["worker-2".to_string(), "worker-9".to_string()];
        for _ in 0..20 {
            assert_eq!(pick_victims(Action::Crash, &running, &busy, &mut rng), ["worker-2"]);
            let drained = pick_victims(Action::NodeDrain(2), &running, &busy, &mut rng);
            assert_eq!(drained[0], "worker-2", "busy first, then any other running worker");
            assert!(drained[1] != "worker-2" && running.contains(&drained[1]));
        }
        // Even when only busy workers run, one of them is spared.
        let all_busy = names(2);
        assert_eq!(
            pick_victims(Action::NodeDrain(2), &all_busy, &all_busy, &mut rng).len(),
            1
        );
    }

    #[test]
    fn victims_are_running_workers_and_one_is_always_spared() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for n in 0..5 {
            let running = names(n);
            for action in [
                Action::Evict,
                Action::Crash,
                Action::Freeze(FREEZE_FOR),
                Action::NodeDrain(2),
                Action::NodeDrain(9),
            ] {
                let victims = pick_victims(action, &running, &[], &mut rng);
                assert!(victims.iter().all(|v| running.contains(v)), "only running workers");
                assert!(n == 0 || victims.len() < n, "{action:?} on {n}: one worker is spared");
                let mut unique = victims.clone();
                unique.dedup();
                assert_eq!(unique.len(), victims.len());
            }
        }
        assert!(
            pick_victims(Action::Crash, &names(1), &[], &mut rng).is_empty(),
            "the last worker is spared"
        );
        assert_eq!(pick_victims(Action::NodeDrain(2), &names(2), &[], &mut rng).len(), 1);
        assert_eq!(pick_victims(Action::NodeDrain(2), &names(3), &[], &mut rng).len(), 2);
        assert!(pick_victims(Action::BrokerOutage(OUTAGE_FOR), &names(3), &[], &mut rng).is_empty());
        assert!(pick_victims(Action::BrokerCrash(BROKER_DOWN_FOR), &names(3), &[], &mut rng).is_empty());
    }
}
