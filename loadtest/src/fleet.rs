//! The processes of a chaos run: one `ferry broker` (or an existing cluster to attach to) and
//! named `ferry-worker` processes, each logging to its own file.
//!
//! Workers are named `worker-0`, `worker-1`, ... in start order, and a replacement always gets a
//! new name, as a Deployment's new pod does, so every reply's `worker` field and every log file
//! points at one process. Signals go through the `kill` command (the crate forbids `unsafe`,
//! and so raw `libc::kill`). Every process still running is killed and reaped when the fleet is
//! dropped, so an error or a panic in the harness leaves nothing behind; [`Fleet::stop_all`] is
//! the graceful way (SIGTERM, wait for the drains, then SIGKILL what is left).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_testkit::{ChildGuard, WorkerArgs};

/// A signal the harness sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Graceful stop: a worker drains, the broker shuts down.
    Term,
    /// Immediate death.
    Kill,
    /// Freeze: the process stops being scheduled, its sockets stay open.
    Stop,
    /// Thaw a frozen process.
    Cont,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
        }
    }
}

/// Where a worker process stands, as far as the harness knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    /// SIGSTOPped and not yet continued.
    Frozen,
    /// SIGTERMed (or SIGKILLed) and not yet reaped.
    Stopping,
    Exited(ExitStatus),
}

/// One process the fleet started.
struct Proc {
    name: String,
    process: ChildGuard,
    state: State,
    started: Instant,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let process = ChildGuard::try_spawn(name, cmd, log).map_err(anyhow::Error::msg)?;
        Ok(Self {
            name: name.to_string(),
            process,
            state: State::Running,
            started: Instant::now(),
        })
    }

    fn log(&self) -> PathBuf {
        self.process.log_path().to_path_buf()
    }

    fn signal(&mut self, sig: Signal) -> anyhow::Result<()> {
        self.reap();
        if let State::Exited(_) = self.state {
            anyhow::bail!("{} has already exited", self.name);
        }
        self.process.try_signal(sig.name()).map_err(anyhow::Error::msg)?;
        self.state = match sig {
            Signal::Term | Signal::Kill => State::Stopping,
            Signal::Stop => State::Frozen,
            Signal::Cont if self.state == State::Frozen => State::Running,
            Signal::Cont => self.state,
        };
        Ok(())
    }

    /// Notes an exit without blocking.
    fn reap(&mut self) {
        if !matches!(self.state, State::Exited(_)) {
            if let Some(status) = self.process.exited() {
                self.state = State::Exited(status);
            }
        }
    }
}

/// What every worker gets on its command line.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub model: PathBuf,
    pub weights: String,
    pub topic: String,
    pub reply_topic: String,
    pub group_id: String,
    /// `file://` store shared by all workers.
    pub snapshot_dir: PathBuf,
    /// Flags the harness sets (`--flag`, value), each dropped when `extra` sets it too.
    pub defaults: Vec<(String, String)>,
    /// `--worker-arg`s, passed as they are.
    pub extra: Vec<String>,
}

impl WorkerSpec {
    /// The arguments of a worker named `name`: the harness's flags, each dropped where `extra`
    /// sets it too (clap refuses a flag given twice), then `extra` as it is.
    pub fn args(&self, name: &str, bootstrap: &str) -> Vec<String> {
        let args = WorkerArgs::new()
            .set("--bootstrap-servers", bootstrap)
            .set("--model", self.model.display().to_string())
            .set("--weights", &self.weights)
            .set("--topic", &self.topic)
            .set("--reply-topic", &self.reply_topic)
            .set("--group-id", &self.group_id)
            .set("--worker-id", name)
            .set("--snapshot-store", format!("file://{}", self.snapshot_dir.display()));
        self.defaults
            .iter()
            .fold(args, |args, (flag, value)| args.set(flag, value.clone()))
            .extra(&self.extra)
            .build()
    }
}

/// Which broker the harness starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    /// A real single-node Apache Kafka (`ferry broker --kafka`), on a directory kept in the
    /// logs, so that a crashed broker can be started again on its data.
    Kafka,
    /// librdkafka's in-process mock cluster (`ferry broker`): no Java, but not Kafka, and it
    /// keeps nothing across a restart.
    Mock,
}

/// How long a first start of Kafka may take: on a fresh machine it fetches its jars first.
const KAFKA_FIRST_START: Duration = Duration::from_secs(600);
/// How long the broker gets to stop cleanly at the end of a run.
const BROKER_STOP_GRACE: Duration = Duration::from_secs(30);

/// The broker and the workers of a run.
pub struct Fleet {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    bootstrap: String,
    /// `None` when attached to a cluster the harness did not start.
    broker: Option<Proc>,
    /// The `ferry broker` arguments, to start it again after a crash.
    broker_args: Vec<String>,
    /// Kafka's kept directory (`--kafka-dir`): `jvm.pid` there names the process that the
    /// broker's faults signal. `None` for the mock, whose process is the broker itself.
    kafka_dir: Option<PathBuf>,
    /// Whether the broker is SIGSTOPped now.
    broker_frozen: bool,
    /// Starts of the broker so far, the first included.
    broker_starts: usize,
    workers: Vec<Proc>,
    next_index: usize,
    spec: WorkerSpec,
}

impl Fleet {
    /// Starts `ferry broker` of `kind` with `topics` of `partitions` partitions each and waits
    /// for it to write its bootstrap servers.
    pub fn start_broker(
        bin_dir: &Path,
        log_dir: &Path,
        topics: &[String],
        partitions: u32,
        kind: BrokerKind,
        spec: WorkerSpec,
    ) -> anyhow::Result<Self> {
        let file = log_dir.join("bootstrap");
        let _ = std::fs::remove_file(&file);
        let mut args: Vec<String> = vec![
            "broker".into(),
            "--partitions".into(),
            partitions.to_string(),
            "--bootstrap-file".into(),
            file.display().to_string(),
        ];
        for t in topics {
            args.extend(["--topic".to_string(), t.clone()]);
        }
        let kafka_dir = (kind == BrokerKind::Kafka).then(|| log_dir.join("kafka"));
        if let Some(dir) = &kafka_dir {
            // A directory left by an earlier run would restart that run's broker.
            let _ = std::fs::remove_dir_all(dir);
            args.extend([
                "--kafka".to_string(),
                "--kafka-dir".to_string(),
                dir.display().to_string(),
            ]);
        }
        let mut cmd = Command::new(bin(bin_dir, "ferry")?);
        cmd.args(&args);
        let mut broker = Proc::spawn("broker", &mut cmd, log_dir.join("broker.log"))?;
        let wait = match kind {
            BrokerKind::Kafka => KAFKA_FIRST_START,
            BrokerKind::Mock => Duration::from_secs(30),
        };
        let deadline = Instant::now() + wait;
        let bootstrap = loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if !text.trim().is_empty() {
                    break text.trim().to_string();
                }
            }
            broker.reap();
            if let State::Exited(status) = broker.state {
                anyhow::bail!("ferry broker exited with {status}: see {}", broker.log().display());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "ferry broker wrote no bootstrap file within {wait:?}: see {}",
                broker.log().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut fleet = Self::new(bin_dir, log_dir, bootstrap, Some(broker), spec);
        fleet.broker_args = args;
        fleet.kafka_dir = kafka_dir;
        Ok(fleet)
    }

    /// Uses the cluster at `bootstrap` (its topics must exist).
    pub fn attach(bin_dir: &Path, log_dir: &Path, bootstrap: &str, spec: WorkerSpec) -> Self {
        Self::new(bin_dir, log_dir, bootstrap.to_string(), None, spec)
    }

    fn new(bin_dir: &Path, log_dir: &Path, bootstrap: String, broker: Option<Proc>, spec: WorkerSpec) -> Self {
        Self {
            bin_dir: bin_dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            broker_starts: usize::from(broker.is_some()),
            bootstrap,
            broker,
            broker_args: Vec::new(),
            kafka_dir: None,
            broker_frozen: false,
            workers: Vec::new(),
            next_index: 0,
            spec,
        }
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Whether the harness started the broker (and so may freeze it).
    pub fn owns_broker(&self) -> bool {
        self.broker.is_some()
    }

    /// Starts the next worker and returns its name.
    pub fn start_worker(&mut self) -> anyhow::Result<String> {
        let name = format!("worker-{}", self.next_index);
        self.next_index += 1;
        let mut cmd = Command::new(bin(&self.bin_dir, "ferry-worker")?);
        cmd.args(self.spec.args(&name, &self.bootstrap));
        let log = self.log_dir.join(format!("{name}.log"));
        self.workers.push(Proc::spawn(&name, &mut cmd, log)?);
        Ok(name)
    }

    /// Sends `sig` to the worker `name`.
    pub fn signal(&mut self, name: &str, sig: Signal) -> anyhow::Result<()> {
        let w = self
            .workers
            .iter_mut()
            .find(|w| w.name == name)
            .with_context(|| format!("no worker named {name}"))?;
        w.signal(sig)
    }

    /// Whether the broker is a real Kafka the harness started, which can crash and come back.
    pub fn broker_restartable(&self) -> bool {
        self.broker.is_some() && self.kafka_dir.is_some()
    }

    /// Sends `sig` to the broker (Kafka's JVM, or the mock's process); an error when the harness
    /// did not start it.
    pub fn signal_broker(&mut self, sig: Signal) -> anyhow::Result<()> {
        let broker = self
            .broker
            .as_mut()
            .context("attached to a cluster the harness did not start")?;
        match &self.kafka_dir {
            None => broker.signal(sig)?,
            Some(dir) => {
                let pid_file = dir.join("jvm.pid");
                let pid = std::fs::read_to_string(&pid_file)
                    .with_context(|| format!("cannot read {}", pid_file.display()))?;
                let ok = Command::new("kill")
                    .arg(format!("-{}", sig.name()))
                    .arg(pid.trim())
                    .stderr(Stdio::null())
                    .status()
                    .context("cannot run `kill`")?
                    .success();
                anyhow::ensure!(ok, "kill -{} {} (Kafka's JVM) failed", sig.name(), pid.trim());
            }
        }
        match sig {
            Signal::Stop => self.broker_frozen = true,
            Signal::Cont | Signal::Kill => self.broker_frozen = false,
            Signal::Term => {}
        }
        Ok(())
    }

    /// SIGKILLs Kafka's JVM: the broker crashes, its data stays; `ferry broker` exits with it.
    pub fn crash_broker(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.broker_restartable(),
            "only a real Kafka the harness started can crash and restart"
        );
        self.signal_broker(Signal::Kill)
    }

    /// Starts `ferry broker` again on the same directory (so the same address, topics, records
    /// and committed offsets) after [`Fleet::crash_broker`]. Does not wait for it to be ready:
    /// clients reconnect by themselves, as they would to a real broker coming back.
    pub fn restart_broker(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.broker_restartable(), "no broker to restart");
        if let Some(old) = self.broker.as_mut() {
            // The old `ferry broker` exits as soon as its JVM is gone; never run two at once.
            wait_or_kill(std::slice::from_mut(old), Duration::from_secs(5));
        }
        self.broker_starts += 1;
        let log = self.log_dir.join(format!("broker-{}.log", self.broker_starts));
        let mut cmd = Command::new(bin(&self.bin_dir, "ferry")?);
        cmd.args(&self.broker_args);
        self.broker = Some(Proc::spawn("broker", &mut cmd, log)?);
        Ok(())
    }

    /// Workers running (not frozen, not stopping), oldest first. Reaps exited ones on the way.
    pub fn running(&mut self) -> Vec<String> {
        self.workers.iter_mut().for_each(Proc::reap);
        self.workers
            .iter()
            .filter(|w| w.state == State::Running)
            .map(|w| w.name.clone())
            .collect()
    }

    /// Workers alive in any state but exited.
    pub fn alive(&mut self) -> usize {
        self.workers.iter_mut().for_each(Proc::reap);
        self.workers
            .iter()
            .filter(|w| !matches!(w.state, State::Exited(_)))
            .count()
    }

    /// The state of `name`, reaping it if it has exited.
    pub fn state(&mut self, name: &str) -> Option<State> {
        let w = self.workers.iter_mut().find(|w| w.name == name)?;
        w.reap();
        Some(w.state)
    }

    /// Workers that exited although the harness never stopped them: a bad flag, a crash of
    /// their own. Each with its status and log file.
    pub fn unexpected_exits(&mut self) -> Vec<(String, ExitStatus, PathBuf)> {
        let mut out = Vec::new();
        for w in &mut self.workers {
            if w.state == State::Running || w.state == State::Frozen {
                w.reap();
                if let State::Exited(status) = w.state {
                    out.push((w.name.clone(), status, w.log()));
                }
            }
        }
        out
    }

    /// How long `name` has been running.
    pub fn uptime(&self, name: &str) -> Option<Duration> {
        self.workers
            .iter()
            .find(|w| w.name == name)
            .map(|w| w.started.elapsed())
    }

    /// SIGTERMs every worker (thawing frozen ones first), waits up to `grace` for them to drain
    /// and exit, SIGKILLs the rest, then stops the broker the same way. Returns the workers that
    /// had to be killed.
    pub fn stop_all(&mut self, grace: Duration) -> Vec<String> {
        for w in &mut self.workers {
            w.reap();
            if w.state == State::Frozen {
                let _ = w.signal(Signal::Cont);
            }
            if w.state == State::Running {
                let _ = w.signal(Signal::Term);
            }
        }
        let killed = wait_or_kill(&mut self.workers, grace);
        if self.broker_frozen {
            let _ = self.signal_broker(Signal::Cont);
        }
        if let Some(b) = self.broker.as_mut() {
            let _ = b.signal(Signal::Term);
            wait_or_kill(std::slice::from_mut(b), BROKER_STOP_GRACE);
        }
        killed
    }
}

/// Waits until every process in `procs` has exited or `grace` has passed, then SIGKILLs and
/// reaps the rest; returns their names.
fn wait_or_kill(procs: &mut [Proc], grace: Duration) -> Vec<String> {
    let deadline = Instant::now() + grace;
    loop {
        procs.iter_mut().for_each(Proc::reap);
        let left = procs.iter().filter(|p| !matches!(p.state, State::Exited(_))).count();
        if left == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut killed = Vec::new();
    for p in procs.iter_mut().filter(|p| !matches!(p.state, State::Exited(_))) {
        let _ = p.process.child_mut().kill();
        if let Ok(status) = p.process.child_mut().wait() {
            p.state = State::Exited(status);
        }
        killed.push(p.name.clone());
    }
    killed
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // SIGKILL ends stopped processes too, so frozen ones need no SIGCONT first.
        wait_or_kill(&mut self.workers, Duration::ZERO);
        // A JVM left stopped would never act on the SIGTERM its wrapper sends it.
        if self.broker_frozen {
            let _ = self.signal_broker(Signal::Cont);
        }
        if let Some(b) = self.broker.as_mut() {
            wait_or_kill(std::slice::from_mut(b), Duration::ZERO);
        }
    }
}

/// The path of binary `name` in `dir`, checked to exist.
pub fn bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found: build the workspace's binaries (`cargo build --workspace --bins`) or pass --bin-dir",
        path.display()
    );
    Ok(path)
}

/// The directory of the running executable: where cargo puts the workspace's other binaries.
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    // Test binaries live one level down, in `deps/`.
    Ok(if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    }
    .to_path_buf())
}

#[cfg(test)]
mod tests;
