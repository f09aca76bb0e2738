//! `ferry broker --kafka`: a real single-node Apache Kafka (broker and KRaft controller in one
//! JVM), run as a child process on loopback ports.
//!
//! Start-up: make sure Java runs ([`jars::ensure_program`]), get the verified jars
//! ([`jars::ensure`]), write `server.properties` and a quiet log4j2 configuration into a fresh
//! temporary directory (or the kept `--kafka-dir`), copy formatted storage there unless it
//! holds some already, start `kafka.Kafka`, wait until the broker answers a metadata request, and
//! create the `--topic` topics through the Admin API. The bootstrap file is written by the caller
//! only after all of that, so a client that sees it can use every topic at once.
//!
//! # The JVM does not outlive ferry
//!
//! The JVM runs under a small `sh` wrapper ([`WRAPPER`]) whose stdin is a pipe from this process.
//! A watcher inside the wrapper reads that pipe; end of file, which the kernel delivers when
//! ferry closes the pipe *or dies in any way, SIGKILL included*, makes it send the JVM SIGTERM,
//! Kafka's own clean shutdown. Stopping is therefore one path: [`KafkaBroker::stop`] closes the
//! pipe and waits for the wrapper, and kills the JVM outright only if it outlives
//! [`STOP_GRACE`]. The wrapper runs in a process group of its own, so a Ctrl-C in a terminal
//! reaches only ferry, which then stops Kafka that way. When the watcher fired, the wrapper also
//! deletes the temporary directory after the JVM exits, so a killed ferry leaves no data behind.
//!
//! # Settings
//!
//! Auto-creation stays on (Kafka's default), as on the mock: producers create the topics they
//! write to, here with `--partitions` partitions (`num.partitions`), where the mock uses its
//! fixed 4. Internal topics (offsets, transactions, share groups) have replication factor 1, and
//! the offsets and transaction-state topics one partition each, so the first consumer group and
//! the first transactional producer do not wait for 50 partitions to be created. A transaction
//! left open by a dead producer is aborted within a second of its timeout (Kafka checks every
//! 10 s by default). A new group is assigned at once (`group.initial.rebalance.delay.ms=0`). Groups
//! of the new consumer protocol (KIP-848) get a 10 s session timeout and a 1 s heartbeat, as a
//! classic Ferry worker has by default, instead of Kafka's 45 s and 5 s. A restarted broker
//! re-registers within seconds (`broker.session.timeout.ms=3000`, against Kafka's 9 s).
//!
//! # Storage
//!
//! Formatted once per jar directory and copied into each new broker ([`storage_template`]).
//! With `--kafka-dir` the directory is kept: configuration, `data/`, `kafka.log`, `jvm.pid` (the
//! JVM, for whoever wants to stop or kill the broker itself) and `ports`, so a second start on
//! it is the same broker restarted, on the same ports. A JVM that dies while serving (SIGKILL,
//! a crash) makes `ferry broker` exit with an error and the log's tail.
//!
//! # Limits
//!
//! - Without `--kafka-dir`, data lives in a temporary directory and is deleted on exit.
//! - The ports are picked by binding port 0 and releasing it just before Kafka starts; another
//!   process could take one in between, in which case Kafka exits and start-up reports it.
//! - The first start fetches about 45 MB of jars from Maven Central.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;
use tracing::{info, warn};

use super::jars::{self, JarsError};
use crate::topics::{self, ClusterKind, TopicError};

/// How long the JVM gets to shut down cleanly after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often start-up checks whether the broker's port accepts connections.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// JVM options for the broker: a small heap, since a development broker holds little.
const BROKER_JVM_OPTIONS: &[&str] = &["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"];

/// JVM options for the short-lived storage formatter: a quick start matters, not throughput.
const TOOL_JVM_OPTIONS: &[&str] = &["-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"];

/// Runs `"$@"` (the JVM) in the background and sends it SIGTERM when stdin reaches end of file
/// (see the module documentation). `$1` is the working directory, `$2` whether it is kept
/// (`keep`) or removed once the JVM stopped (`remove`). A non-interactive shell gives
/// a background job /dev/null as stdin, so the watcher reads a duplicate (fd 3) made first.
const WRAPPER: &str = r#"dir=$1; keep=$2; shift 2
rm -f "$dir/stop-requested"
exec 3<&0
"$@" </dev/null >>"$dir/kafka.log" 2>&1 &
jvm=$!
echo "$jvm" >"$dir/jvm.pid"
{ cat >/dev/null; : >"$dir/stop-requested"; kill -TERM "$jvm" 2>/dev/null; } <&3 &
exec 3<&- </dev/null
wait "$jvm"; code=$?
if [ -e "$dir/stop-requested" ] && [ "$keep" = remove ]; then rm -rf "$dir"; fi
exit "$code"
"#;

/// What `--kafka` needs from the command line.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// Partitions of the `--topic` topics and of auto-created ones.
    pub partitions: i32,
    /// Where the jars are cached; `None` for [`jars::default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// How long the JVM may take to answer metadata requests, once the jars are there.
    pub start_timeout: Duration,
    /// A directory of its own that outlives the broker (`--kafka-dir`): its data, ports and
    /// configuration are kept on exit and reused by the next start, so a broker killed and
    /// started again comes back at the same address with its topics, records and committed
    /// offsets. `None` for a temporary directory deleted on exit.
    pub dir: Option<PathBuf>,
}

/// Why the real Kafka broker could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum KafkaBrokerError {
    /// Java, Maven or the jars are missing and could not be had.
    #[error(transparent)]
    Jars(#[from] JarsError),
    /// The working directory or a file in it could not be made.
    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No free loopback port could be found.
    #[error("could not pick a free loopback port")]
    Port(#[source] io::Error),
    /// A JVM could not be spawned.
    #[error("could not run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    /// `kafka.tools.StorageTool format` failed.
    #[error("formatting Kafka's storage failed ({status}):\n{output}")]
    Format { status: String, output: String },
    /// The JVM exited before it was ready; the log's last lines say why.
    #[error("Kafka exited during start-up ({status}); last lines of its log:\n{log}")]
    Exited { status: String, log: String },
    /// The broker did not answer within `--kafka-start-timeout`.
    #[error("Kafka did not answer at {bootstrap_servers} within {waited:.1?}; last lines of its log:\n{log}")]
    NotReady {
        bootstrap_servers: String,
        waited: Duration,
        log: String,
    },
    /// The JVM exited while serving (killed, out of memory, its disk full); the log says why.
    #[error("Kafka exited while serving ({status}); last lines of its log:\n{log}")]
    Died { status: String, log: String },
    /// Something other than Kafka answered on the port that was picked for it.
    #[error("the broker at {0} is not the Kafka that was started")]
    Impostor(String),
    /// A `--topic` topic could not be created.
    #[error(transparent)]
    Topic(#[from] TopicError),
}

/// A running single-node Kafka. Dropping it without [`KafkaBroker::stop`] still stops the JVM
/// (the pipe closes), just without waiting for it.
pub struct KafkaBroker {
    /// The `sh` wrapper around the JVM; it exits when the JVM does.
    wrapper: Child,
    /// The pipe the wrapper watches; closing it asks the JVM to shut down.
    stdin: Option<ChildStdin>,
    /// Configuration, storage and log; removed once the JVM is gone.
    dir: WorkDir,
    /// `127.0.0.1:<port>` of the PLAINTEXT listener.
    bootstrap_servers: String,
}

impl KafkaBroker {
    /// Installs what is missing, starts Kafka, waits until it answers, and creates `topics`.
    pub async fn start(options: &KafkaOptions, topics: &[String]) -> Result<Self, KafkaBrokerError> {
        jars::ensure_program("java").await?;
        let jars = jars::ensure(options.cache_dir.as_deref()).await?;
        let classpath = format!("{}/*", jars.display());
        let dir = match &options.dir {
            Some(path) => WorkDir::keep(path)?,
            None => WorkDir::create()?,
        };
        let (port, controller_port) = dir.ports()?;
        let bootstrap_servers = format!("127.0.0.1:{port}");
        let properties = dir.0.join("server.properties");
        let log4j = dir.0.join("log4j2.properties");
        let data = dir.0.join("data");
        dir.write(
            &properties,
            &server_properties(&data, port, controller_port, options.partitions),
        )?;
        dir.write(&log4j, LOG4J2)?;
        let log4j_option = format!("-Dlog4j2.configurationFile={}", log4j.display());
        let started = std::time::Instant::now();
        if !data.join("meta.properties").exists() {
            let template = storage_template(&jars, &classpath, &log4j_option).await?;
            copy_tree(&template, &data)?;
        }

        let mut wrapper = Command::new("sh")
            .args(["-c", WRAPPER, "ferry-kafka"])
            .arg(&dir.0)
            .arg(if dir.1 { "keep" } else { "remove" })
            .arg("java")
            .args(BROKER_JVM_OPTIONS)
            .args([
                "-Djava.awt.headless=true",
                &log4j_option,
                "-cp",
                &classpath,
                "kafka.Kafka",
            ])
            .arg(&properties)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| KafkaBrokerError::Spawn { program: "sh", source })?;
        let stdin = wrapper.stdin.take();
        let mut broker = KafkaBroker {
            wrapper,
            stdin,
            dir,
            bootstrap_servers,
        };
        // On any error below, dropping `broker` closes the pipe and the JVM shuts down.
        broker.wait_until_ready(port, options.start_timeout).await?;
        info!(
            bootstrap_servers = broker.bootstrap_servers,
            version = jars::KAFKA_VERSION,
            seconds = started.elapsed().as_secs_f64(),
            "Kafka answers"
        );
        for topic in topics {
            topics::create_topic(
                &broker.bootstrap_servers,
                topic,
                options.partitions,
                options.start_timeout,
            )
            .await?;
        }
        Ok(broker)
    }

    /// Where clients connect.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Completes when the JVM exits without being asked to (SIGKILLed, crashed), with why.
    pub async fn died(&mut self) -> KafkaBrokerError {
        let status = match self.wrapper.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        };
        KafkaBrokerError::Died {
            status,
            log: self.dir.log_tail(),
        }
    }

    /// Waits until the PLAINTEXT port accepts connections and a metadata request is answered
    /// with a real cluster id, or fails with the log's tail if the JVM exits first.
    async fn wait_until_ready(&mut self, port: u16, timeout: Duration) -> Result<(), KafkaBrokerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.wrapper.try_wait() {
                return Err(KafkaBrokerError::Exited {
                    status: status.to_string(),
                    log: self.dir.log_tail(),
                });
            }
            // A loopback connect is accepted or refused at once, so it may block this thread.
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            if std::net::TcpStream::connect_timeout(&addr, POLL_INTERVAL).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(timeout));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match topics::cluster_kind(&self.bootstrap_servers, left).await {
            Ok(ClusterKind::Kafka) => Ok(()),
            Ok(ClusterKind::Mock) => Err(KafkaBrokerError::Impostor(self.bootstrap_servers.clone())),
            Err(TopicError::Unreachable { .. }) => Err(self.not_ready(timeout)),
            Err(e) => Err(e.into()),
        }
    }

    fn not_ready(&self, waited: Duration) -> KafkaBrokerError {
        KafkaBrokerError::NotReady {
            bootstrap_servers: self.bootstrap_servers.clone(),
            waited,
            log: self.dir.log_tail(),
        }
    }

    /// Asks Kafka to shut down (SIGTERM through the wrapper), waits up to [`STOP_GRACE`], kills
    /// it if it is still running then, and removes its directory.
    pub async fn stop(mut self) -> Result<(), KafkaBrokerError> {
        let started = std::time::Instant::now();
        drop(self.stdin.take());
        match tokio::time::timeout(STOP_GRACE, self.wrapper.wait()).await {
            Ok(Ok(status)) => {
                info!(%status, seconds = started.elapsed().as_secs_f64(), "Kafka stopped");
                return Ok(());
            }
            Ok(Err(e)) => warn!(error = %e, "could not wait for Kafka; killing it"),
            Err(_) => warn!(grace = ?STOP_GRACE, "Kafka did not stop after SIGTERM; killing it"),
        }
        if let Some(pid) = self.dir.jvm_pid() {
            // The wrapper is still waiting on the JVM, so this pid is still the JVM's.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.wrapper.kill().await;
        Ok(())
    }
}

mod storage;
use storage::{copy_tree, server_properties, storage_template, WorkDir, LOG4J2};

#[cfg(test)]
mod tests;
