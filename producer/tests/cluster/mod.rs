//! The Kafka cluster an integration test runs against, and small Kafka tools for tests.
//!
//! The broker is `ferry_testkit::Cluster`'s: the cluster `FERRY_TEST_BOOTSTRAP_SERVERS` names,
//! one real Apache Kafka shared by the test binary (the default), or with
//! `FERRY_TEST_BROKER=mock` a `ferry broker` (librdkafka's mock cluster) of each test's own,
//! killed when the [`TestCluster`] is dropped. Every test makes its own random topics with
//! [`TestCluster::topic`] (three partitions, through the producer's own admin calls); on a
//! shared or external cluster they are deleted on drop, on the mock they end with the broker
//! process.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context as _};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::time::Instant;

pub use ferry_testkit::PATIENCE;

/// The `ferry` binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A `ferry` command that does not inherit the developer's `FERRY_*` settings (only this
/// harness's own), so only the flags a test passes count.
pub fn ferry_command() -> tokio::process::Command {
    let mut command = tokio::process::Command::from(ferry_testkit::process::command(ferry_bin()));
    command.env("FERRY_LOG", "warn").kill_on_drop(true);
    command
}

/// The cluster a test runs against, plus the topics it made.
pub struct TestCluster {
    /// The broker: the shared Kafka, an external cluster, or a mock of this test's own.
    cluster: ferry_testkit::Cluster,
    /// Topics to delete on drop (on a shared or external cluster).
    topics: Mutex<Vec<String>>,
}

impl TestCluster {
    /// The external cluster named by `FERRY_TEST_BOOTSTRAP_SERVERS`, this binary's shared
    /// Kafka, or with `FERRY_TEST_BROKER=mock` a fresh mock `ferry broker`.
    pub async fn start() -> anyhow::Result<Self> {
        // The shared Kafka may take minutes to start the first time: off the runtime's threads.
        let cluster = tokio::task::spawn_blocking(|| ferry_testkit::Cluster::start(&[])).await?;
        Ok(TestCluster {
            cluster,
            topics: Mutex::default(),
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.cluster.bootstrap
    }

    /// The bootstrap file of the spawned broker; `None` on an external cluster.
    pub fn bootstrap_file(&self) -> Option<PathBuf> {
        self.cluster.bootstrap_file()
    }

    /// Creates a topic with a random name that starts with `label`, ready for use.
    pub async fn topic(&self, label: &str) -> anyhow::Result<String> {
        let name = format!("ferry-test-{label}-{}", uuid::Uuid::new_v4());
        ferry::topics::create_topic(&self.cluster.bootstrap, &name, 3, PATIENCE).await?;
        if let Ok(mut topics) = self.topics.lock() {
            topics.push(name.clone());
        }
        Ok(name)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let topics = self.topics.get_mut().map(std::mem::take).unwrap_or_default();
        if self.cluster.bootstrap_file().is_some() || topics.is_empty() {
            return;
        }
        // A runtime of its own on a thread of its own: drop may run inside the test's runtime,
        // where blocking on another future would stall it.
        let servers = self.cluster.bootstrap.clone();
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

/// A stand-in worker: answers every request on `request_topic` with the replies `answer` gives
/// for it, in order, on the request's `reply_to`, keyed by its id. Aborted on drop.
pub struct Responder(tokio::task::JoinHandle<anyhow::Result<()>>);

impl Responder {
    pub fn start(
        bootstrap_servers: &str,
        request_topic: &str,
        answer: impl Fn(&ferry_schemas::Request) -> Vec<serde_json::Value> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let consumer = consumer_from_beginning(bootstrap_servers, request_topic)?;
        let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .create()?;
        Ok(Responder(tokio::spawn(async move {
            loop {
                let message = consumer.recv().await?;
                let request: ferry_schemas::Request = serde_json::from_slice(message.payload().unwrap_or_default())?;
                let topic = request.reply_to.clone().context("requests here name reply_to")?;
                for reply in answer(&request) {
                    let payload = serde_json::to_vec(&reply)?;
                    let record = rdkafka::producer::FutureRecord::to(&topic)
                        .key(&request.id)
                        .payload(&payload);
                    producer.send(record, PATIENCE).await.map_err(|(e, _)| e)?;
                }
            }
        })))
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A stand-in worker's response to request `id` with `text`, built as JSON rather than as
/// structs so that the tests state the wire format themselves.
pub fn response(id: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "response", "version": 1, "id": id, "model": "echo", "text": text,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "timings": {"queued_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "total_ms": 0.0},
        "worker": "responder", "attempt": 1, "resumed_from_token": null
    })
}
