//! Recovery across processes with the real binaries, shared by the benches that measure it: a
//! broker, workers of one group, a long request; the worker generating it gets SIGTERM (drain)
//! or SIGKILL, and the rounds time the signal to the survivor's progress and count the tokens
//! computed twice. Included with `#[path]`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use ferry_schemas::{Reply, Request};
use ferry_worker::snapshot::format::request_prefix;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use ferry_testkit::{unique, ChildGuard, Cluster, Pipeline, WorkerArgs};

/// The workers snapshot this often, so a SIGKILL recomputes at most this many tokens.
pub const SNAPSHOT_EVERY_TOKENS: usize = 16;
/// The workers' session timeout: a SIGKILLed worker's partition moves after it.
pub const SESSION_TIMEOUT: &str = "6s";
const FAILOVER_MAX_TOKENS: u32 = 200;
/// The worker is interrupted once its snapshot holds at least this many tokens.
const INTERRUPT_AFTER: usize = 32;
/// A raw prompt the model continues greedily for hundreds of tokens without an end of sequence.
pub const COUNT_PROMPT: &str = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

pub fn count_request(id: &str, max_tokens: u32) -> anyhow::Result<Request> {
    let value = json!({ "id": id, "prompt": COUNT_PROMPT, "max_tokens": max_tokens, "temperature": 0.0 });
    Ok(serde_json::from_value(value)?)
}

/// One observed state of a request's snapshot manifest.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub tokens: usize,
    pub worker: String,
}

/// Generated tokens and writer of the manifest at `path`, read straight from the file store:
/// a first line `FERRY-SNAPSHOT-MANIFEST`, the JSON, and a checksum line of 8 hex digits.
fn read_manifest(path: &Path) -> Option<(usize, String)> {
    let m = ferry_worker::snapshot::format::Manifest::peek(&std::fs::read(path).ok()?).ok()?;
    Some((m.tokens.len(), m.worker))
}

/// Every change of one manifest, polled every few milliseconds (a write is a rename, so a
/// read never sees half of one).
pub struct Watch {
    path: PathBuf,
    pub seen: Vec<Seen>,
}

impl Watch {
    pub fn new(path: PathBuf) -> Self {
        Self { path, seen: Vec::new() }
    }

    fn poll(&mut self) {
        if let Some((tokens, worker)) = read_manifest(&self.path) {
            let last = self.seen.last();
            if last.is_none_or(|s| s.tokens != tokens || s.worker != worker) {
                self.seen.push(Seen {
                    at: Instant::now(),
                    tokens,
                    worker,
                });
            }
        }
    }

    /// Polls until `done` holds, for at most `timeout`. `tick` runs at every poll too.
    pub fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Seen]) -> bool,
        mut tick: impl FnMut(),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            tick();
            if done(&self.seen) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; manifests seen: {:?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn last(&self) -> anyhow::Result<&Seen> {
        self.seen.last().context("no manifest seen")
    }

    /// Manifests by `worker` seen after `t`.
    pub fn by(&self, worker: &str, t: Instant) -> Vec<&Seen> {
        self.seen.iter().filter(|s| s.worker == worker && s.at > t).collect()
    }
}

/// Generation speed from the first and last of `seen`, tokens/s.
pub fn rate(seen: &[&Seen]) -> Option<f64> {
    let (a, b) = (seen.first()?, seen.last()?);
    let dt = b.at.duration_since(a.at).as_secs_f64();
    (b.tokens > a.tokens && dt > 0.0).then(|| (b.tokens - a.tokens) as f64 / dt)
}

/// The first line of `log` after `since` that contains `needle`, as (seconds after `since`,
/// the line). Worker logs are text, each line starting with an RFC 3339 UTC timestamp.
pub fn log_event(log: &str, needle: &str, since: SystemTime) -> Option<(f64, String)> {
    let since = OffsetDateTime::from(since);
    log.lines().filter(|l| l.contains(needle)).find_map(|l| {
        let ts = OffsetDateTime::parse(l.split_whitespace().next()?, &Rfc3339).ok()?;
        let dt = (ts - since).as_seconds_f64();
        (dt >= 0.0).then(|| (dt, l.to_string()))
    })
}

/// The `tokens=N` field of a log line.
pub fn tokens_field(line: &str) -> Option<usize> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("tokens=")?.parse().ok())
}

fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// The cluster, the workers, and what the rounds share.
pub struct Rig {
    cluster: Cluster,
    store_dir: PathBuf,
    pipeline: Pipeline,
    args: WorkerArgs,
    pub workers: Vec<ChildGuard>,
    rt: tokio::runtime::Runtime,
    producer: rdkafka::producer::FutureProducer,
}

impl Rig {
    /// Two workers on a broker: the test binary's real Kafka, or with `mock` a mock broker.
    pub fn start(mock: bool) -> anyhow::Result<Self> {
        let worker_bin = PathBuf::from(env!("CARGO_BIN_EXE_ferry-worker"));
        let broker_bin = worker_bin.with_file_name("ferry");
        ensure!(
            broker_bin.exists() || std::env::var_os("FERRY_TEST_BOOTSTRAP_SERVERS").is_some(),
            "{} is missing: run `cargo build --release -p ferry -p ferry-worker` first",
            broker_bin.display()
        );
        let pipeline = Pipeline::new();
        let cluster = if mock {
            Cluster::start_mock(&pipeline.topics(), 1)
        } else {
            Cluster::start(&pipeline.topics())
        };
        let store = cluster.snapshot_store();
        let store_dir = cluster.snapshot_dir();
        let args = pipeline.args().set("--snapshot-store", store);
        let args = args
            .set("--snapshot-every-tokens", SNAPSHOT_EVERY_TOKENS.to_string())
            .set("--session-timeout", SESSION_TIMEOUT);
        // librdkafka's group log, to see when the group has settled and when a survivor is
        // handed the partition.
        let args = args
            .set("--kafka-property", "debug=cgrp")
            .set("--log", "info,librdkafka=debug");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let producer = cluster.producer();
        let mut rig = Self {
            cluster,
            store_dir,
            pipeline,
            args,
            workers: Vec::new(),
            rt,
            producer,
        };
        rig.add_worker("worker-a")?;
        rig.add_worker("worker-b")?;
        Ok(rig)
    }

    /// Starts a worker and waits until the group, with it, is settled: a request published
    /// before that could be reassigned mid-generation by the join.
    pub fn add_worker(&mut self, name: &str) -> anyhow::Result<()> {
        self.workers
            .push(self.cluster.start_worker(name, self.args.clone(), &[]));
        let workers = &self.workers;
        poll_until(
            Duration::from_secs(120),
            Duration::from_millis(50),
            "the consumer group to settle",
            || {
                // Each member reaches `steady` once a generation that includes it is assigned;
                // the newest worker's generation includes every earlier one.
                workers.iter().all(|w| w.log().contains("-> steady")).then_some(())
            },
        )
        .with_context(|| self.log_tails())
    }

    pub fn log_tails(&self) -> String {
        let tail = |s: String| {
            s.lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        self.workers
            .iter()
            .map(|w| format!("----- {} -----\n{}", w.name, tail(w.log())))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Publishes a long request and returns its id, offset and manifest watch.
    pub fn publish(&self, label: &str) -> anyhow::Result<(String, i64, Watch)> {
        let id = unique(label);
        let payload = serde_json::to_vec(&count_request(&id, FAILOVER_MAX_TOKENS)?)?;
        let offset = self.rt.block_on(
            self.cluster
                .publish(&self.producer, &self.pipeline.requests, &id, &payload),
        );
        let prefix = request_prefix(&self.pipeline.requests, &id, &self.pipeline.replies, &payload);
        Ok((id, offset, Watch::new(self.store_dir.join(prefix).join("manifest"))))
    }

    pub fn worker_index(&self, name: &str) -> anyhow::Result<usize> {
        self.workers
            .iter()
            .position(|w| w.name == name)
            .with_context(|| format!("no worker {name}"))
    }

    /// Waits until the request at `offset` is committed and returns its answer.
    pub fn answer(&self, id: &str, offset: i64) -> anyhow::Result<ferry_schemas::Response> {
        let reader = self.cluster.reader(&self.pipeline.group);
        poll_until(
            Duration::from_secs(180),
            Duration::from_millis(200),
            "the answer to be committed",
            || {
                self.cluster
                    .committed(&reader, &self.pipeline.requests)
                    .filter(|&c| c > offset)
            },
        )
        .with_context(|| self.log_tails())?;
        let answers: Vec<Reply> = self
            .cluster
            .read_all(&self.pipeline.replies)
            .iter()
            .filter_map(|(_, v, _)| serde_json::from_slice(v).ok())
            .collect();
        answers
            .into_iter()
            .find_map(|r| match r {
                Reply::Response(r) if r.id == id => Some(r),
                _ => None,
            })
            .with_context(|| format!("no response to {id}"))
    }
}

/// Waits for the survivor's first two new snapshots after `t0`, polling `tick` meanwhile.
fn survivor_progress(
    watch: &mut Watch,
    survivor: &str,
    t0: Instant,
    tick: impl FnMut(),
) -> anyhow::Result<(Seen, Option<f64>)> {
    watch.until(
        Duration::from_secs(180),
        "the survivor's new snapshots",
        |s| s.iter().filter(|m| m.worker == survivor && m.at > t0).count() >= 2,
        tick,
    )?;
    let new = watch.by(survivor, t0);
    let first = (*new.first().context("a new snapshot")?).clone();
    Ok((first, rate(&new)))
}

/// The survivor's timeline after a signal at `wall`, from its log.
fn survivor_log(rig: &Rig, survivor: &str, wall: SystemTime) -> anyhow::Result<serde_json::Value> {
    let log = rig.workers[rig.worker_index(survivor)?].log();
    let log = log.as_str();
    let assigned = log_event(log, "delegating assign of 1 partition(s)", wall).map(|e| e.0);
    let resumed = log_event(log, "resuming from snapshot", wall);
    Ok(json!({
        "signal_to_assigned_s": assigned,
        "signal_to_resume_found_s": resumed.as_ref().map(|e| e.0),
        "resume_found_tokens": resumed.as_ref().and_then(|e| tokens_field(&e.1)),
    }))
}

/// The signal to the survivor's first new token, estimated from its first new snapshot
/// (which lands `tokens - resumed - 1` tokens after that one) and its measured speed.
fn first_new_token_s(first: &Seen, resumed: usize, survivor_tps: Option<f64>, t0: Instant) -> Option<f64> {
    let later = first.tokens.checked_sub(resumed + 1)? as f64;
    Some(first.at.duration_since(t0).as_secs_f64() - later / survivor_tps?)
}

/// SIGTERM the worker generating a request; the other resumes it.
pub fn sigterm(rig: &mut Rig) -> anyhow::Result<serde_json::Value> {
    let (id, offset, mut watch) = rig.publish("bench-sigterm")?;
    watch.until(
        Duration::from_secs(180),
        "a first snapshot",
        |s| s.last().is_some_and(|m| m.tokens >= INTERRUPT_AFTER),
        || {},
    )?;
    let at_signal = watch.last()?.clone();
    let hi = rig.worker_index(&at_signal.worker)?;
    let survivor = rig
        .workers
        .iter()
        .find(|w| w.name != at_signal.worker)
        .context("a survivor")?
        .name
        .clone();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    rig.workers[hi].signal("TERM");
    let mut exited = None;
    let holder = &mut rig.workers[hi];
    let (first, survivor_tps) = survivor_progress(&mut watch, &survivor, t0, || {
        if exited.is_none() {
            exited = holder
                .wait_exit(Duration::ZERO)
                .map(|status| (t0.elapsed().as_secs_f64(), status));
        }
    })?;
    let (exit_s, status) = match exited {
        Some(e) => e,
        None => (
            f64::NAN,
            holder
                .wait_exit(Duration::from_secs(30))
                .context("the drained worker exits")?,
        ),
    };
    ensure!(status.success(), "the drained worker exited with {status}");
    let drained_log = log_event(&holder.log(), "suspended; snapshot written", wall);
    // Only live workers stay in the rig: the next round picks its survivor among them.
    rig.workers.remove(hi);
    // The drain snapshot is the drained worker's last manifest.
    let drained = watch
        .seen
        .iter()
        .filter(|s| s.worker == at_signal.worker)
        .map(|s| s.tokens)
        .max()
        .unwrap_or(0);
    let answer = rig.answer(&id, offset)?;
    let resumed = answer
        .resumed_from_token
        .context("the survivor resumed from a snapshot")? as usize;
    let recovery_s = first.at.duration_since(t0).as_secs_f64();
    Ok(json!({
        "drained_worker": at_signal.worker,
        "survivor": survivor,
        "answered_by": answer.worker,
        "attempt": answer.attempt,
        "tokens_in_snapshot_at_signal": at_signal.tokens,
        "drained_tokens": drained,
        "drained_tokens_from_log": drained_log.as_ref().and_then(|e| tokens_field(&e.1)),
        "resumed_from_token": resumed,
        "tokens_recomputed": drained as i64 - resumed as i64,
        "signal_to_drained_s": drained_log.map(|e| e.0),
        "signal_to_exit_s": exit_s,
        "survivor_log": survivor_log(rig, &survivor, wall)?,
        "first_new_snapshot_tokens": first.tokens,
        "signal_to_first_new_snapshot_s": recovery_s,
        "signal_to_first_new_token_est_s": first_new_token_s(&first, resumed, survivor_tps, t0),
        "survivor_tokens_per_s": survivor_tps,
    }))
}

/// SIGKILL the worker generating a request, at a random point between two snapshots; the
/// other resumes it once the group notices (the session timeout).
pub fn sigkill(rig: &mut Rig) -> anyhow::Result<serde_json::Value> {
    let (id, offset, mut watch) = rig.publish("bench-sigkill")?;
    // Two snapshots by the same worker give its speed; the kill comes after a third.
    watch.until(
        Duration::from_secs(180),
        "two snapshots",
        |s| s.last().is_some_and(|m| m.tokens >= INTERRUPT_AFTER) && s.len() >= 2,
        || {},
    )?;
    let n = watch.seen.len();
    watch.until(Duration::from_secs(60), "another snapshot", |s| s.len() > n, || {})?;
    let last = watch.last()?.clone();
    let own: Vec<&Seen> = watch.seen.iter().filter(|s| s.worker == last.worker).collect();
    let tps = rate(&own).context("the worker's speed")?;
    // Uniform within one snapshot interval after the write just seen.
    let delay = rand::random::<f64>() * SNAPSHOT_EVERY_TOKENS as f64 / tps;
    std::thread::sleep(Duration::from_secs_f64(delay));
    let hi = rig.worker_index(&last.worker)?;
    let survivor = rig
        .workers
        .iter()
        .find(|w| w.name != last.worker)
        .context("a survivor")?
        .name
        .clone();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    rig.workers[hi].signal("KILL");
    let since_write = t0.duration_since(last.at).as_secs_f64();
    let generated_est = last.tokens as f64 + tps * since_write;
    let (first, survivor_tps) = survivor_progress(&mut watch, &survivor, t0, || {})?;
    let answer = rig.answer(&id, offset)?;
    let resumed = answer
        .resumed_from_token
        .context("the survivor resumed from a snapshot")? as usize;
    let survivor_log = survivor_log(rig, &survivor, wall)?;
    // Only live workers stay in the rig: the next round picks its survivor among them.
    rig.workers.remove(hi);
    Ok(json!({
        "killed_worker": last.worker,
        "survivor": survivor,
        "answered_by": answer.worker,
        "attempt": answer.attempt,
        "last_snapshot_tokens": last.tokens,
        "killed_worker_tokens_per_s": tps,
        "s_from_last_snapshot_to_kill": since_write,
        "generated_at_kill_est": generated_est,
        "resumed_from_token": resumed,
        "tokens_recomputed_est": generated_est - resumed as f64,
        "survivor_log": survivor_log,
        "first_new_snapshot_tokens": first.tokens,
        "signal_to_first_new_snapshot_s": first.at.duration_since(t0).as_secs_f64(),
        "signal_to_first_new_token_est_s": first_new_token_s(&first, resumed, survivor_tps, t0),
        "survivor_tokens_per_s": survivor_tps,
    }))
}

/// `rounds` rounds of a SIGTERM and a SIGKILL on one broker, each interrupted worker replaced
/// before the next signal, so that two workers are always alive to fail over between.
pub fn run(mock: bool, rounds: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut rig = Rig::start(mock)?;
    let mut next = 0;
    let mut out = Vec::new();
    for _ in 0..rounds {
        let sigterm = sigterm(&mut rig).with_context(|| rig.log_tails())?;
        rig.add_worker(&format!("worker-{next}"))?;
        next += 1;
        let sigkill = sigkill(&mut rig).with_context(|| rig.log_tails())?;
        rig.add_worker(&format!("worker-{next}"))?;
        next += 1;
        out.push(json!({ "sigterm": sigterm, "sigkill": sigkill }));
    }
    Ok(out)
}
