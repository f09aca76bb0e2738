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
    let specs = topics
        .iter()
        .map(|t| TopicSpec {
            name: t.to_string(),
            partitions,
            replicas: None,
            config: Vec::new(),
        })
        .collect();
    create(bootstrap, specs);
}

/// Creates `topic` with one partition whose replicas are on the brokers `replicas` (the first
/// its preferred leader), with the topic-level `config`.
pub fn create_topic_on(bootstrap: &str, topic: &str, replicas: &[i32], config: &[(&str, &str)]) {
    let spec = TopicSpec {
        name: topic.to_string(),
        partitions: 1,
        replicas: Some(replicas.to_vec()),
        config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    create(bootstrap, vec![spec]);
}

/// A topic to create, owned, so that it can go to the admin client's thread.
struct TopicSpec {
    name: String,
    partitions: i32,
    /// The brokers of its one partition's replicas; `None`: the broker's default replication.
    replicas: Option<Vec<i32>>,
    config: Vec<(String, String)>,
}

fn create(bootstrap: &str, specs: Vec<TopicSpec>) {
    if specs.is_empty() {
        return;
    }
    let bootstrap = bootstrap.to_string();
    let created = std::thread::spawn(move || {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("admin client");
        let assignments: Vec<[&[i32]; 1]> = specs
            .iter()
            .map(|t| [t.replicas.as_deref().unwrap_or_default()])
            .collect();
        let new: Vec<NewTopic> = specs
            .iter()
            .zip(&assignments)
            .map(|(t, assignment)| {
                let replication = match t.replicas {
                    Some(_) => TopicReplication::Variable(assignment),
                    None => TopicReplication::Fixed(-1),
                };
                t.config
                    .iter()
                    .fold(NewTopic::new(&t.name, t.partitions, replication), |n, (k, v)| {
                        n.set(k, v)
                    })
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
