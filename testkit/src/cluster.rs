//! The broker a test runs against, with the test's topics, its workers and its producer.
//!
//! Which broker, by [`BrokerChoice::from_env`]:
//! - by default, a real single-node Apache Kafka (`ferry broker --kafka`), one per test binary,
//!   started by the first test that asks and shared by all of them; it stops when the test
//!   binary exits, however it exits (it watches a pipe from this process,
//!   `--stop-on-stdin-eof`);
//! - with `FERRY_TEST_BOOTSTRAP_SERVERS`, that cluster;
//! - with `FERRY_TEST_BROKER=mock`, a `ferry broker` (librdkafka's mock cluster) per test: no
//!   Java needed, but not Kafka (see `ferry::broker::mock`).
//!
//! Topics are created with the admin API, each test with fresh random topic and group names, so
//! tests sharing a broker never see each other's messages. A test that kills its broker asks
//! for one of its own ([`Cluster::start_dedicated`]).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::broker::{create_topics, shared_kafka, BrokerChoice, BrokerProcess};
use crate::process::{bin, ChildGuard};
use crate::worker::WorkerArgs;

/// A broker to test against, with the test's topics.
pub struct Cluster {
    pub bootstrap: String,
    /// The test's own directory: worker logs, snapshot stores.
    pub dir: tempfile::TempDir,
    broker: Option<BrokerProcess>,
}

impl Cluster {
    /// A broker holding `topics`, each with one partition.
    pub fn start(topics: &[&str]) -> Self {
        Self::start_with_partitions(topics, 1)
    }

    /// A broker holding `topics`, each with `partitions` partitions: the test binary's shared
    /// Kafka, unless [`BrokerChoice::from_env`] says otherwise.
    pub fn start_with_partitions(topics: &[&str], partitions: i32) -> Self {
        let bootstrap = match BrokerChoice::from_env() {
            BrokerChoice::External(bootstrap) => bootstrap,
            BrokerChoice::Kafka => shared_kafka(),
            BrokerChoice::Mock => return Self::own_broker(topics, partitions, false),
        };
        create_topics(&bootstrap, topics, partitions);
        Self {
            bootstrap,
            dir: tempfile::tempdir().expect("tempdir"),
            broker: None,
        }
    }

    /// A broker of this test's own, which it may kill ([`Cluster::kill_broker`]): a real Kafka
    /// unless `FERRY_TEST_BROKER=mock`. `None` on an external cluster, which a test cannot kill.
    pub fn start_dedicated(topics: &[&str], partitions: i32) -> Option<Self> {
        match BrokerChoice::from_env() {
            BrokerChoice::External(_) => None,
            BrokerChoice::Kafka => Some(Self::own_broker(topics, partitions, true)),
            BrokerChoice::Mock => Some(Self::own_broker(topics, partitions, false)),
        }
    }

    /// A mock `ferry broker` of this test's own, whatever [`BrokerChoice::from_env`] says: for
    /// figures taken on both brokers side by side.
    pub fn start_mock(topics: &[&str], partitions: i32) -> Self {
        Self::own_broker(topics, partitions, false)
    }

    /// A cluster the test hosts itself at `bootstrap` (an in-process `MockCluster`, whose faults
    /// the test then sets directly): its topics are the test's to create.
    pub fn hosted(bootstrap: String) -> Self {
        Self {
            bootstrap,
            dir: tempfile::tempdir().expect("tempdir"),
            broker: None,
        }
    }

    fn own_broker(topics: &[&str], partitions: i32, kafka: bool) -> Self {
        let broker = BrokerProcess::start(topics, partitions, kafka);
        Self {
            bootstrap: broker.bootstrap(),
            dir: tempfile::tempdir().expect("tempdir"),
            broker: Some(broker),
        }
    }

    /// Kills the broker this cluster started (on a shared or external cluster, does nothing): the
    /// fault of a broker that is gone for good.
    pub fn kill_broker(&mut self) {
        if let Some(b) = self.broker.take() {
            b.process().signal("KILL");
        }
    }

    /// The bootstrap file of the broker this cluster started; `None` on a shared or external
    /// cluster.
    pub fn bootstrap_file(&self) -> Option<PathBuf> {
        self.broker.as_ref().map(BrokerProcess::bootstrap_file)
    }

    /// The folder of [`Cluster::snapshot_store`], in the test's directory, created if missing.
    pub fn snapshot_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("snapshots");
        std::fs::create_dir_all(&dir).expect("store dir");
        dir
    }

    /// A `file://` snapshot store in the test's directory, created empty.
    pub fn snapshot_store(&self) -> String {
        format!("file://{}", self.snapshot_dir().display())
    }

    /// Starts a worker on this cluster with the test model and `args`: one compute thread unless
    /// `args` sets `--threads` (the cores are shared).
    pub fn worker<S: AsRef<str>>(&self, name: &str, args: &[S]) -> ChildGuard {
        self.worker_with_env(name, args, &[])
    }

    /// [`Cluster::worker`], with extra environment variables (fault injection, for one).
    pub fn worker_with_env<S: AsRef<str>>(&self, name: &str, args: &[S], env: &[(&str, &str)]) -> ChildGuard {
        self.start_worker(name, WorkerArgs::new().extra(args), env)
    }

    /// Starts a worker named `name` with `args`, and with this cluster, the test model, its name
    /// and one compute thread where `args` does not set them; its log goes to the test's
    /// directory. The worker inherits the environment (`FERRY_KERNELS`, for one, runs every test
    /// on one path) plus `env`.
    pub fn start_worker(&self, name: &str, args: WorkerArgs, env: &[(&str, &str)]) -> ChildGuard {
        let args = args
            .or_set("--bootstrap-servers", &self.bootstrap)
            .or_set("--model", crate::model::model_path().display().to_string())
            .or_set("--worker-id", name)
            .or_set("--threads", "1");
        let mut cmd = Command::new(bin("ferry-worker"));
        cmd.envs(env.iter().copied()).args(args.build());
        ChildGuard::spawn(name, &mut cmd, self.dir.path().join(format!("{name}.log")))
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("enable.idempotence", "true")
            .create()
            .expect("producer")
    }

    /// Publishes `payload` keyed by `key` and returns its offset.
    pub async fn publish(&self, producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) -> i64 {
        send(producer, FutureRecord::to(topic).key(key).payload(payload)).await
    }

    /// Publishes `payload` keyed by `key` with Kafka `headers` and returns its offset.
    pub async fn publish_with_headers(
        &self,
        producer: &FutureProducer,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> i64 {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        send(producer, FutureRecord::to(topic).key(key).payload(payload).headers(h)).await
    }

    /// Publishes `payload` to one partition of `topic` and returns its offset.
    pub async fn publish_to(
        &self,
        producer: &FutureProducer,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
    ) -> i64 {
        send(
            producer,
            FutureRecord::to(topic).partition(partition).key(key).payload(payload),
        )
        .await
    }

    /// A consumer outside any group, for reading topics and asking about a group's offsets.
    pub fn reader(&self, group: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer")
    }

    /// The group's committed offset for partition 0 of `topic`, if it has one.
    pub fn committed(&self, group_reader: &BaseConsumer, topic: &str) -> Option<i64> {
        self.committed_in(group_reader, topic, 0)
    }

    /// The group's committed offset for `partition` of `topic`, if it has one.
    pub fn committed_in(&self, group_reader: &BaseConsumer, topic: &str, partition: i32) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let c = group_reader.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
        match c.find_partition(topic, partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}

async fn send(producer: &FutureProducer, record: FutureRecord<'_, str, [u8]>) -> i64 {
    producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("published")
        .offset
}
