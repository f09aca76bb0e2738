//! The Kafka cluster an integration test runs against, and small Kafka tools for tests.
//!
//! With `FERRY_TEST_BOOTSTRAP_SERVERS` set, tests use that cluster and spawn nothing. By
//! default they share one real Apache Kafka per test binary (`ferry broker --kafka`, started by
//! the first test that asks, stopped when the test binary exits: it watches a pipe from this
//! process, `--stop-on-stdin-eof`). With `FERRY_TEST_BROKER=mock`, each test spawns its own
//! `ferry broker` (librdkafka's mock cluster) and kills it when the [`TestCluster`] is dropped.
//! Every test makes its own random topics with [`TestCluster::topic`]; on a real cluster they
//! are deleted on drop, on the mock they end with the broker process.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::time::Instant;

/// Generous bound for anything that should take milliseconds on the mock and seconds on a
/// loaded real cluster; a test that hits it has found a bug, not a slow machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The `ferry` binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A `ferry` command that does not inherit the developer's `FERRY_*` settings (only this
/// harness's own), so only the flags a test passes count.
pub fn ferry_command() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(ferry_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FERRY_") {
            command.env_remove(name);
        }
    }
    command.env("FERRY_LOG", "warn").kill_on_drop(true);
    command
}

/// A `ferry broker` child process, killed and reaped on drop.
pub struct BrokerProcess {
    /// The child; killed in `drop` so that a failing test leaves no broker behind.
    child: Child,
    /// Holds the bootstrap file; deleted after the child is gone.
    dir: tempfile::TempDir,
}

impl BrokerProcess {
    /// Spawns `ferry broker --bootstrap-file <tempdir>/bootstrap` plus `extra_args`.
    pub fn spawn(extra_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(ferry_bin());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("FERRY_") {
                command.env_remove(name);
            }
        }
        let child = command
            .arg("broker")
            .arg("--bootstrap-file")
            .arg(dir.path().join("bootstrap"))
            .args(extra_args)
            .env("FERRY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("could not spawn ferry broker")?;
        Ok(BrokerProcess { child, dir })
    }

    /// Where the broker writes its bootstrap servers.
    pub fn bootstrap_file(&self) -> PathBuf {
        self.dir.path().join("bootstrap")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, for tests of the broker's own life cycle.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        // Already exited is fine; anything else is a leak worth a message but not a panic.
        if let Err(e) = self.child.kill() {
            if e.kind() != std::io::ErrorKind::InvalidInput {
                eprintln!("could not kill ferry broker {}: {e}", self.child.id());
            }
        }
        let _ = self.child.wait();
    }
}

/// The cluster a test runs against, plus the topics it made.
pub struct TestCluster {
    bootstrap_servers: String,
    /// `None` on an external cluster.
    broker: Option<BrokerProcess>,
    /// Topics to delete on drop (external cluster only).
    topics: Mutex<Vec<String>>,
}

impl TestCluster {
    /// The external cluster named by `FERRY_TEST_BOOTSTRAP_SERVERS`, this binary's shared
    /// Kafka, or with `FERRY_TEST_BROKER=mock` a fresh mock `ferry broker`.
    pub async fn start() -> anyhow::Result<Self> {
        let servers = match shared::external() {
            Some(servers) => Some(servers),
            None if shared::mock_requested() => None,
            None => Some(tokio::task::spawn_blocking(shared_kafka).await??),
        };
        if let Some(servers) = servers {
            return Ok(TestCluster {
                bootstrap_servers: servers,
                broker: None,
                topics: Mutex::default(),
            });
        }
        let broker = BrokerProcess::spawn(&[])?;
        let servers = ferry::bootstrap::wait_for_file(&broker.bootstrap_file(), PATIENCE).await?;
        Ok(TestCluster {
            bootstrap_servers: servers,
            broker: Some(broker),
            topics: Mutex::default(),
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The bootstrap file of the spawned broker; `None` on an external cluster.
    pub fn bootstrap_file(&self) -> Option<PathBuf> {
        self.broker.as_ref().map(BrokerProcess::bootstrap_file)
    }

    /// Creates a topic with a random name that starts with `label`, ready for use.
    pub async fn topic(&self, label: &str) -> anyhow::Result<String> {
        let name = format!("ferry-test-{label}-{}", uuid::Uuid::new_v4());
        ferry::topics::create_topic(&self.bootstrap_servers, &name, 3, PATIENCE).await?;
        if let Ok(mut topics) = self.topics.lock() {
            topics.push(name.clone());
        }
        Ok(name)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let topics = self.topics.get_mut().map(std::mem::take).unwrap_or_default();
        if self.broker.is_some() || topics.is_empty() {
            return;
        }
        // A runtime of its own on a thread of its own: drop may run inside the test's runtime,
        // where blocking on another future would stall it.
        let servers = self.bootstrap_servers.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                for topic in topics {
                    ferry::topics::delete_topic(&servers, &topic, PATIENCE).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not delete test topics: {e:#}"),
            Err(_) => eprintln!("topic cleanup panicked"),
        }
    }
}

#[path = "../../../testing/shared_kafka.rs"]
mod shared;

/// The bootstrap servers of this test binary's real Kafka, started on first use.
pub fn shared_kafka() -> anyhow::Result<String> {
    shared::bootstrap_servers(Path::new(ferry_bin())).map_err(anyhow::Error::msg)
}

/// A consumer that reads `topic` from the beginning of every partition, without a group.
pub fn consumer_from_beginning(bootstrap_servers: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", format!("ferry-test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), PATIENCE)?;
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            assignment.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    if assignment.count() == 0 {
        bail!("topic {topic} has no partitions");
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Reads exactly `count` messages from the start of `topic`, failing at `PATIENCE`.
pub async fn read_messages(bootstrap_servers: &str, topic: &str, count: usize) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer = consumer_from_beginning(bootstrap_servers, topic)?;
    let deadline = Instant::now() + PATIENCE;
    let mut messages = Vec::with_capacity(count);
    while messages.len() < count {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| format!("only {} of {count} messages arrived on {topic}", messages.len()))??;
        messages.push(message.detach());
    }
    Ok(messages)
}

/// The sum of the high watermarks of `topic`: how many messages it has ever held.
pub fn message_count(bootstrap_servers: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer = consumer_from_beginning(bootstrap_servers, topic)?;
    let metadata = consumer.fetch_metadata(Some(topic), PATIENCE)?;
    let mut total = 0;
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            total += consumer.fetch_watermarks(topic, p.id(), PATIENCE)?.1;
        }
    }
    Ok(total)
}

/// The message key as text.
pub fn key_of(message: &OwnedMessage) -> Option<String> {
    message.key().map(|k| String::from_utf8_lossy(k).into_owned())
}

/// Writes `servers` where a `--bootstrap-file` flag can read it, for tests of that flag that
/// must also run against an external cluster.
pub fn write_bootstrap_file(dir: &Path, servers: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("bootstrap");
    ferry::bootstrap::write_atomically(&path, servers)?;
    Ok(path)
}
