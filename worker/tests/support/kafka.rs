//! A Kafka-protocol broker and worker processes for integration tests.
#![allow(dead_code)] // Each test binary uses its own subset of these helpers.
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

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// A child process killed (and reaped) when dropped. On a failing test, its log is printed.
pub struct ChildGuard {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = File::create(&log).expect("log file");
        let child = cmd
            .stdout(Stdio::from(out.try_clone().expect("dup log")))
            .stderr(Stdio::from(out))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill -{name} {} failed", self.pid());
    }

    /// Waits for the process to exit, returning its status, or `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
    }
}

/// The directory the workspace's binaries are built into.
pub fn bin(name: &str) -> PathBuf {
    let worker = Path::new(env!("CARGO_BIN_EXE_ferry-worker"));
    let path = worker.with_file_name(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A unique name for a test's topic or group.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A message as read back: key, value and headers (as text).
pub struct Record {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// A broker to test against, with the test's topics.
pub struct Cluster {
    pub bootstrap: String,
    pub dir: tempfile::TempDir,
    _broker: Option<ChildGuard>,
}

impl Cluster {
    /// A broker holding `topics`, each with one partition.
    pub fn start(topics: &[&str]) -> Self {
        Self::start_with_partitions(topics, 1)
    }

    /// Kills the broker this cluster started (on a real cluster, does nothing): the fault of a
    /// broker that is gone for good.
    pub fn kill_broker(&mut self) {
        if let Some(b) = self._broker.take() {
            b.signal("KILL");
        }
    }

    /// Starts a worker on this cluster with the test model and `args`.
    pub fn worker(&self, name: &str, args: &[&str]) -> ChildGuard {
        self.worker_with_env(name, args, &[])
    }

    /// [`Cluster::worker`], with extra environment variables (fault injection, for one).
    pub fn worker_with_env(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> ChildGuard {
        let mut cmd = Command::new(bin("ferry-worker"));
        cmd.envs(env.iter().copied());
        cmd.arg("--bootstrap-servers")
            .arg(&self.bootstrap)
            .arg("--model")
            .arg(super::model::model_path())
            .arg("--worker-id")
            .arg(name);
        // One compute thread unless the caller sets its own (the cores are shared).
        if !args.contains(&"--threads") {
            cmd.arg("--threads").arg("1");
        }
        cmd.args(args);
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
        let rec = FutureRecord::to(topic).key(key).payload(payload);
        producer
            .send(rec, Duration::from_secs(10))
            .await
            .expect("published")
            .offset
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
        let rec = FutureRecord::to(topic).key(key).payload(payload).headers(h);
        producer
            .send(rec, Duration::from_secs(10))
            .await
            .expect("published")
            .offset
    }

    /// Every message of partition 0 of `topic` up to its current end, with its headers.
    pub fn read_all_with_headers(&self, topic: &str) -> Vec<Record> {
        let c = self.reader(&unique("reader"));
        let (_, high) = c
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .expect("watermarks");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning).expect("tpl");
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < high as usize {
            assert!(
                Instant::now() < deadline,
                "read {} of {high} messages of {topic}",
                out.len()
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                let v = x.value.map(|v| String::from_utf8_lossy(v).into_owned());
                                (x.key.to_string(), v.unwrap_or_default())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    key,
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
        out
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
        let rec = FutureRecord::to(topic).partition(partition).key(key).payload(payload);
        producer
            .send(rec, Duration::from_secs(10))
            .await
            .expect("published")
            .offset
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

    /// Every message of partition 0 of `topic` up to its current end, as (key, value, offset).
    pub fn read_all(&self, topic: &str) -> Vec<(String, Vec<u8>, i64)> {
        let c = self.reader(&unique("reader"));
        let (_, high) = c
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .expect("watermarks");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning).expect("tpl");
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < high as usize {
            assert!(
                Instant::now() < deadline,
                "read {} of {high} messages of {topic}",
                out.len()
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                out.push((key, m.payload().unwrap_or_default().to_vec(), m.offset()));
            }
        }
        out
    }

    /// The group's committed offset for partition 0 of `topic`, if it has one.
    pub fn committed(&self, group_reader: &BaseConsumer, topic: &str) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, 0);
        let c = group_reader.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
        match c.find_partition(topic, 0)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}

/// Polls `f` until it gives a value, failing the test after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first line of a file that contains `needle`, if any.
#[allow(dead_code)]
pub fn find_line(path: &Path, needle: &str) -> Option<String> {
    let f = File::open(path).ok()?;
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains(needle))
}

/// Helpers for tests whose topics have several partitions, so that several workers of one group
/// share the load. The readers above keep to partition 0; these cover every one.
impl Cluster {
    /// A broker holding `topics`, each with `partitions` partitions: the test binary's shared
    /// Kafka, unless [`BrokerChoice::from_env`] says otherwise.
    pub fn start_with_partitions(topics: &[&str], partitions: i32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = match BrokerChoice::from_env() {
            BrokerChoice::External(bootstrap) => bootstrap,
            BrokerChoice::Kafka => shared_kafka(),
            BrokerChoice::Mock => return Self::spawn_broker(dir, topics, partitions, false),
        };
        create_topics(&bootstrap, topics, partitions);
        Self {
            bootstrap,
            dir,
            _broker: None,
        }
    }

    /// A broker of this test's own, which it may kill ([`Cluster::kill_broker`]): a real Kafka
    /// unless `FERRY_TEST_BROKER=mock`. `None` on an external cluster, which a test cannot kill.
    pub fn start_dedicated(topics: &[&str], partitions: i32) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        match BrokerChoice::from_env() {
            BrokerChoice::External(_) => None,
            BrokerChoice::Kafka => Some(Self::spawn_broker(dir, topics, partitions, true)),
            BrokerChoice::Mock => Some(Self::spawn_broker(dir, topics, partitions, false)),
        }
    }

    /// A mock `ferry broker` of this test's own, whatever [`BrokerChoice::from_env`] says: for
    /// figures taken on both brokers side by side.
    pub fn start_mock(topics: &[&str], partitions: i32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::spawn_broker(dir, topics, partitions, false)
    }

    fn spawn_broker(dir: tempfile::TempDir, topics: &[&str], partitions: i32, kafka: bool) -> Self {
        let file = dir.path().join("bootstrap");
        let mut cmd = Command::new(bin("ferry"));
        cmd.arg("broker")
            .arg("--partitions")
            .arg(partitions.to_string())
            .arg("--bootstrap-file")
            .arg(&file);
        if kafka {
            cmd.arg("--kafka");
        }
        for t in topics {
            cmd.arg("--topic").arg(t);
        }
        let mut broker = ChildGuard::spawn("ferry broker", &mut cmd, dir.path().join("broker.log"));
        let bootstrap = wait_for_bootstrap(&file, &mut broker.child, &broker.log);
        Self {
            bootstrap,
            dir,
            _broker: Some(broker),
        }
    }

    /// The high watermark (the offset the next message will get) of every partition of `topic`,
    /// indexed by partition.
    pub fn high_watermarks(&self, reader: &BaseConsumer, topic: &str) -> Vec<i64> {
        let md = reader
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        assert!(partitions > 0, "topic {topic} has no partitions");
        (0..partitions as i32)
            .map(|p| {
                reader
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .collect()
    }

    /// Every message of every partition of `topic` up to its current end, as
    /// (partition, key, value, offset), partition by partition in offset order.
    pub fn read_all_partitions(&self, topic: &str) -> Vec<(i32, String, Vec<u8>, i64)> {
        let c = self.reader(&unique("reader"));
        let highs = self.high_watermarks(&c, topic);
        let mut tpl = TopicPartitionList::new();
        for p in 0..highs.len() as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let total: i64 = highs.iter().sum();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (out.len() as i64) < total {
            assert!(
                Instant::now() < deadline,
                "read {} of {total} messages of {topic}",
                out.len()
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                // Messages published after the watermarks were read are not asked for.
                if m.offset() >= highs[m.partition() as usize] {
                    continue;
                }
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                out.push((m.partition(), key, m.payload().unwrap_or_default().to_vec(), m.offset()));
            }
        }
        out.sort_by_key(|(p, _, _, o)| (*p, *o));
        out
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

/// The broker the integration tests run against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// `FERRY_TEST_BOOTSTRAP_SERVERS`: a cluster someone else runs.
    External(String),
    /// The default: real Apache Kafka started by the tests.
    Kafka,
    /// `FERRY_TEST_BROKER=mock`: librdkafka's mock cluster, one per test.
    Mock,
}

impl BrokerChoice {
    pub fn from_env() -> Self {
        if let Some(servers) = shared::external() {
            return BrokerChoice::External(servers);
        }
        match std::env::var("FERRY_TEST_BROKER").as_deref() {
            Ok("kafka") | Ok("") | Err(_) => BrokerChoice::Kafka,
            Ok(_) if shared::mock_requested() => BrokerChoice::Mock,
            Ok(other) => panic!("FERRY_TEST_BROKER={other:?}: expected kafka or mock"),
        }
    }

    /// Whether the tests run on librdkafka's mock cluster rather than on a real broker.
    pub fn is_mock() -> bool {
        Self::from_env() == BrokerChoice::Mock
    }
}

#[path = "../../../testing/shared_kafka.rs"]
mod shared;

/// The bootstrap servers of this test binary's real Kafka, started on first use.
pub fn shared_kafka() -> String {
    shared::bootstrap_servers(&bin("ferry")).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits for a starting `ferry broker` to write its bootstrap file, failing with its log if it
/// exits first or takes too long.
fn wait_for_bootstrap(file: &Path, child: &mut Child, log: &Path) -> String {
    shared::wait_for_bootstrap(file, child, log).unwrap_or_else(|e| panic!("{e}"))
}

fn create_topics(bootstrap: &str, topics: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for r in rt
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .expect("create topics")
    {
        if let Err((t, e)) = r {
            assert_eq!(
                e,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "cannot create topic {t}"
            );
        }
    }
}
