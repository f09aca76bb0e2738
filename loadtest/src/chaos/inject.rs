//! Applying a fault schedule to the real processes, and bringing workers back as a Deployment
//! would.
//!
//! One task ticks every [`TICK`]: it restarts workers whose restart delay has passed, thaws
//! frozen processes whose freeze has ended, restarts workers that exited on their own (and says
//! so), and applies the next step of the schedule once [`Step::is_due`] and the fleet allows it. New faults stop when
//! the load is done (`no_more_faults`); the task itself runs until `stop`, so replacements still
//! come and frozen processes are always thawed, then it thaws everything still frozen.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tokio_util::sync::CancellationToken;

use crate::faults::{pick_victims, Action, Observed, Step};
use crate::fleet::{Fleet, Signal, State};
use crate::metrics::Progress;
use crate::record::{FaultEvent, FaultKind, RequestRecord};
use crate::track::Tracker;
use crate::verify::{in_flight, recovered_since};

/// How often the injector looks at the run.
const TICK: Duration = Duration::from_millis(100);
/// A worker is a fault's candidate only once it has run this long: it has loaded the model and
/// joined the group, so it holds partitions and (under load) work to interrupt.
pub const SETTLE: Duration = Duration::from_secs(5);

/// What the injector needs from the run.
pub struct Injector {
    pub steps: Vec<Step>,
    pub fleet: Arc<Mutex<Fleet>>,
    pub events: Arc<Mutex<Vec<FaultEvent>>>,
    pub tracker: Tracker,
    pub progress: Progress,
    /// The fleet's size: a drill step waits for this many settled workers.
    pub workers: usize,
    pub restart_delay: Duration,
    pub seed: u64,
    /// When the load started: step times count from here.
    pub load_start: Instant,
}

/// What the injector did besides the faults it recorded as events.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcome {
    /// Steps skipped, with why (too few workers to spare one, a broker the harness does not own).
    pub skipped: Vec<String>,
    /// Workers that exited although nobody stopped them, with their status and log file.
    pub unexpected_exits: Vec<String>,
    /// Every worker sent SIGTERM by a fault: how long its drain took, and how it exited.
    pub drains: Vec<Drain>,
}

/// One graceful stop: a worker must drain and exit 0 (its `--drain-timeout` bounds it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Drain {
    pub worker: String,
    /// From SIGTERM to the process's exit.
    pub exit_ms: f64,
    pub exit_status: String,
    pub clean: bool,
}

/// Something to do later.
enum Pending {
    Restart,
    Thaw(String),
    ThawBroker,
    RestartBroker,
}

impl Injector {
    pub async fn run(self, no_more_faults: CancellationToken, stop: CancellationToken) -> Outcome {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0xfa17);
        let mut outcome = Outcome::default();
        let mut pending: Vec<(Instant, Pending)> = Vec::new();
        let mut next = 0;
        let mut last_fault_ms: Option<f64> = None;
        let mut draining: Vec<(String, Instant)> = Vec::new();
        while !stop.is_cancelled() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
            }
            let now = Instant::now();
            let due: Vec<Pending> = extract_due(&mut pending, now);
            let mut fleet = self.fleet.lock().expect("fleet lock: no panic while held");
            for p in due {
                self.apply_pending(&mut fleet, p);
            }
            draining.retain(|(name, since)| match fleet.state(name) {
                Some(State::Exited(status)) => {
                    outcome.drains.push(Drain {
                        worker: name.clone(),
                        exit_ms: since.elapsed().as_secs_f64() * 1e3,
                        exit_status: status.to_string(),
                        clean: status.success(),
                    });
                    if !status.success() {
                        self.progress
                            .println(format!("chaos: {name} exited with {status} after SIGTERM"));
                    }
                    false
                }
                _ => true,
            });
            for (name, status, log) in fleet.unexpected_exits() {
                let line = format!("{name} exited on its own with {status} (log: {})", log.display());
                self.progress.println(format!("chaos: {line}; a replacement follows"));
                outcome.unexpected_exits.push(line);
                pending.push((now + self.restart_delay, Pending::Restart));
            }
            let Some(step) = self.steps.get(next).copied() else {
                continue;
            };
            if no_more_faults.is_cancelled() {
                continue;
            }
            let records = self.tracker.records();
            let settled: Vec<String> = fleet
                .running()
                .into_iter()
                .filter(|w| fleet.uptime(w).is_some_and(|u| u >= SETTLE))
                .collect();
            let seen = Observed {
                elapsed: now.duration_since(self.load_start),
                in_flight: in_flight(&records),
                recovered: settled.len() >= self.workers
                    && last_fault_ms.is_none_or(|at| recovered_since(&records, at)),
            };
            if !step.is_due(&seen) {
                if step.is_expired(seen.elapsed) {
                    let why = "nothing was streaming during its slot";
                    self.progress
                        .println(format!("chaos: skipped {:?}: {why}", step.action));
                    outcome.skipped.push(format!(
                        "{:?} at {:.1}s: {why}",
                        step.action,
                        seen.elapsed.as_secs_f64()
                    ));
                    next += 1;
                }
                continue;
            }
            let victims = pick_victims(step.action, &settled, &busy(&records, self.tracker.now_ms()), &mut rng);
            let at_ms = self.tracker.now_ms();
            let event = |kind, workers: Vec<String>, until: Option<Duration>| FaultEvent {
                kind,
                at_ms,
                workers,
                until_ms: until.map(|d| at_ms + d.as_secs_f64() * 1e3),
            };
            let applied = match step.action {
                Action::BrokerOutage(_) | Action::BrokerCrash(_) if !fleet.owns_broker() => {
                    Err("the harness did not start the broker".into())
                }
                Action::BrokerCrash(_) if !fleet.broker_restartable() => {
                    Err("the mock broker keeps no data to restart with".into())
                }
                Action::BrokerCrash(d) => fleet
                    .crash_broker()
                    .map(|()| {
                        pending.push((now + d, Pending::RestartBroker));
                        event(FaultKind::BrokerCrash, Vec::new(), Some(d))
                    })
                    .map_err(|e| format!("{e:#}")),
                Action::BrokerOutage(d) => fleet
                    .signal_broker(Signal::Stop)
                    .map(|()| {
                        pending.push((now + d, Pending::ThawBroker));
                        event(FaultKind::BrokerOutage, Vec::new(), Some(d))
                    })
                    .map_err(|e| format!("{e:#}")),
                _ if victims.is_empty() => Err(format!("{} settled workers, one must be spared", settled.len())),
                Action::Freeze(d) => {
                    let r = fleet.signal(&victims[0], Signal::Stop).map_err(|e| format!("{e:#}"));
                    r.map(|()| {
                        pending.push((now + d, Pending::Thaw(victims[0].clone())));
                        event(FaultKind::Freeze, victims.clone(), Some(d))
                    })
                }
                Action::Evict | Action::Crash | Action::NodeDrain(_) => {
                    let (sig, kind) = match step.action {
                        Action::Crash => (Signal::Kill, FaultKind::Crash),
                        Action::NodeDrain(_) => (Signal::Term, FaultKind::NodeDrain),
                        _ => (Signal::Term, FaultKind::Evict),
                    };
                    let hit: Vec<String> = victims.into_iter().filter(|v| fleet.signal(v, sig).is_ok()).collect();
                    for v in &hit {
                        pending.push((now + self.restart_delay, Pending::Restart));
                        if sig == Signal::Term {
                            draining.push((v.clone(), now));
                        }
                    }
                    if hit.is_empty() {
                        Err("no victim could be signalled".into())
                    } else {
                        Ok(event(kind, hit, None))
                    }
                }
            };
            drop(fleet);
            match applied {
                Ok(e) => {
                    self.progress.println(format!(
                        "chaos: {:>6.1}s {:?} {}",
                        e.at_ms / 1e3,
                        e.kind,
                        e.workers.join(", ")
                    ));
                    last_fault_ms = Some(e.at_ms);
                    self.events.lock().expect("events lock: no panic while held").push(e);
                    next += 1;
                }
                // A step the fleet does not allow yet (too few settled workers) is retried
                // until its slot ends, then skipped.
                Err(why) if step.is_expired(seen.elapsed) => {
                    self.progress
                        .println(format!("chaos: skipped {:?}: {why}", step.action));
                    outcome
                        .skipped
                        .push(format!("{:?} at {:.1}s: {why}", step.action, at_ms / 1e3));
                    next += 1;
                }
                Err(_) => {}
            }
        }
        // Never leave a process frozen: the fleet's graceful stop and the reference need them.
        let mut fleet = self.fleet.lock().expect("fleet lock: no panic while held");
        for (_, p) in pending {
            if !matches!(p, Pending::Restart) {
                self.apply_pending(&mut fleet, p);
            }
        }
        outcome
    }

    fn apply_pending(&self, fleet: &mut Fleet, p: Pending) {
        let result = match p {
            Pending::Restart => fleet.start_worker().map(|name| {
                self.events
                    .lock()
                    .expect("events lock: no panic while held")
                    .push(FaultEvent {
                        kind: FaultKind::Start,
                        at_ms: self.tracker.now_ms(),
                        workers: vec![name],
                        until_ms: None,
                    });
            }),
            Pending::Thaw(name) => fleet.signal(&name, Signal::Cont),
            Pending::ThawBroker => fleet.signal_broker(Signal::Cont),
            Pending::RestartBroker => fleet.restart_broker(),
        };
        if let Err(e) = result {
            self.progress.println(format!("chaos: {e:#}"));
        }
    }
}

/// How recent an answer must be for its worker to count as busy.
const BUSY_WINDOW_MS: f64 = 10_000.0;

/// Workers that sent an answer in the last [`BUSY_WINDOW_MS`]: they hold partitions with
/// traffic, so a fault on them likely interrupts a stream (chunks do not name their worker).
fn busy(records: &[RequestRecord], now_ms: f64) -> Vec<String> {
    let mut busy: Vec<String> = records
        .iter()
        .flat_map(|r| &r.responses)
        .filter(|s| now_ms - s.at_ms <= BUSY_WINDOW_MS)
        .map(|s| s.response.worker.clone())
        .collect();
    busy.sort();
    busy.dedup();
    busy
}

fn extract_due(pending: &mut Vec<(Instant, Pending)>, now: Instant) -> Vec<Pending> {
    let mut due = Vec::new();
    let mut i = 0;
    while i < pending.len() {
        if pending[i].0 <= now {
            due.push(pending.swap_remove(i).1);
        } else {
            i += 1;
        }
    }
    due
}
