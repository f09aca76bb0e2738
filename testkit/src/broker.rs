//! Which broker the tests run on, `ferry broker` processes of a test's own, and topics.

use std::path::PathBuf;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::process::{bin, command, ChildGuard};
use crate::shared_kafka;

/// The broker the integration tests run against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// `FERRY_TEST_BOOTSTRAP_SERVERS`: a cluster someone else runs.
    External(String),
    /// The default: real Apache Kafka started by the tests, one per test binary.
    Kafka,
    /// `FERRY_TEST_BROKER=mock`: librdkafka's mock cluster, one per test.
    Mock,
}

impl BrokerChoice {
    pub fn from_env() -> Self {
        // `FERRY_TEST_BOOTSTRAP_SERVERS`, when set and not blank, wins.
        if let Some(servers) = std::env::var("FERRY_TEST_BOOTSTRAP_SERVERS")
            .ok()
            .filter(|s| !s.trim().is_empty())
        {
            return BrokerChoice::External(servers);
        }
        match std::env::var("FERRY_TEST_BROKER").as_deref() {
            Ok("kafka") | Ok("") | Err(_) => BrokerChoice::Kafka,
            Ok("mock") => BrokerChoice::Mock,
            Ok(other) => panic!("FERRY_TEST_BROKER={other:?}: expected kafka or mock"),
        }
    }

    /// Whether the tests run on librdkafka's mock cluster rather than on a real broker.
    pub fn is_mock() -> bool {
        Self::from_env() == BrokerChoice::Mock
    }

    /// How a report names this broker.
    pub fn describe(&self) -> &'static str {
        match self {
            BrokerChoice::External(_) => "FERRY_TEST_BOOTSTRAP_SERVERS",
            BrokerChoice::Kafka => "ferry broker --kafka",
            BrokerChoice::Mock => "ferry broker (mock)",
        }
    }
}

/// The bootstrap servers of this test binary's real Kafka (`ferry broker --kafka`), started on
/// first use and stopped when the test binary exits, however it exits.
pub fn shared_kafka() -> String {
    shared_kafka::bootstrap_servers(&bin("ferry")).unwrap_or_else(|e| panic!("{e}"))
}

/// A `ferry broker` process of a test's own, writing its bootstrap servers to a file in a
/// directory of its own, killed when dropped.
pub struct BrokerProcess {
    process: ChildGuard,
    /// Holds the bootstrap file and the log; removed after the process is gone (fields drop in
    /// order).
    dir: tempfile::TempDir,
}

impl BrokerProcess {
    /// Starts `ferry broker --bootstrap-file <dir>/bootstrap` with `args`, without waiting for
    /// it to be ready ([`BrokerProcess::wait_ready`]). The developer's `FERRY_*` settings are
    /// not passed on.
    pub fn spawn(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = command(bin("ferry"));
        cmd.arg("broker")
            .arg("--bootstrap-file")
            .arg(dir.path().join("bootstrap"))
            .args(args)
            .env("FERRY_LOG", "warn");
        let process = ChildGuard::spawn("ferry broker", &mut cmd, dir.path().join("broker.log"));
        Self { process, dir }
    }

    /// A broker with `topics` of `partitions` partitions each, ready: a real Kafka when `kafka`,
    /// else the mock.
    pub fn start(topics: &[&str], partitions: i32, kafka: bool) -> Self {
        let mut args = vec!["--partitions".to_string(), partitions.to_string()];
        if kafka {
            args.push("--kafka".into());
        }
        for t in topics {
            args.extend(["--topic".to_string(), t.to_string()]);
        }
        let mut broker = Self::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        broker.wait_ready();
        broker
    }

    /// Waits for the broker to write its bootstrap servers and returns them; panics with its log
    /// if it exits first or is not ready within the first start's allowance.
    pub fn wait_ready(&mut self) -> String {
        let file = self.bootstrap_file();
        let log = self.process.log_path().to_path_buf();
        shared_kafka::wait_for_bootstrap(&file, self.process.child_mut(), &log).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Where the broker writes its bootstrap servers.
    pub fn bootstrap_file(&self) -> PathBuf {
        self.dir.path().join("bootstrap")
    }

    /// The bootstrap servers the broker wrote, once ready.
    pub fn bootstrap(&self) -> String {
        std::fs::read_to_string(self.bootstrap_file())
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The child itself, for tests of the broker's own life cycle.
    pub fn child(&mut self) -> &mut std::process::Child {
        self.process.child_mut()
    }

    pub fn process(&self) -> &ChildGuard {
        &self.process
    }
}

/// Creates `topics` with `partitions` partitions each through the admin API (one that already
/// exists is fine). Runs on a thread of its own, so it may be called from inside a runtime.
pub fn create_topics(bootstrap: &str, topics: &[&str], partitions: i32) {
    create_topics_with_config(bootstrap, topics, partitions, &[]);
}

/// [`create_topics`], each topic with the topic-level `config` (`min.insync.replicas`, say).
pub fn create_topics_with_config(bootstrap: &str, topics: &[&str], partitions: i32, config: &[(&str, &str)]) {
    if topics.is_empty() {
        return;
    }
    let config: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let bootstrap = bootstrap.to_string();
    let new: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    let created = std::thread::spawn(move || {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("admin client");
        let new: Vec<NewTopic> = new
            .iter()
            .map(|t| {
                config.iter().fold(
                    NewTopic::new(t, partitions, TopicReplication::Fixed(-1)),
                    |n, (k, v)| n.set(k, v),
                )
            })
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
    })
    .join();
    if let Err(panic) = created {
        std::panic::resume_unwind(panic);
    }
}

/// Creates `topic` with one partition whose replicas are on the brokers `replicas` (the first
/// its preferred leader), with the topic-level `config`.
pub fn create_topic_on(bootstrap: &str, topic: &str, replicas: &[i32], config: &[(&str, &str)]) {
    let (bootstrap, topic, replicas) = (bootstrap.to_string(), topic.to_string(), replicas.to_vec());
    let config: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let created = std::thread::spawn(move || {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("admin client");
        let assignment = [replicas.as_slice()];
        let new = config.iter().fold(
            NewTopic::new(&topic, 1, TopicReplication::Variable(&assignment)),
            |n, (k, v)| n.set(k, v),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for r in rt
            .block_on(admin.create_topics(&[new], &AdminOptions::new()))
            .expect("create topics")
        {
            if let Err((t, e)) = r {
                panic!("cannot create topic {t}: {e}");
            }
        }
    })
    .join();
    if let Err(panic) = created {
        std::panic::resume_unwind(panic);
    }
}
