//! `ferry broker`: librdkafka's mock cluster, hosted in this process, serving other processes.
//!
//! [`MockCluster`] is librdkafka's own in-memory implementation of the Kafka protocol. Hosted
//! here, it serves any Kafka client over TCP: produce (idempotent too), fetch, list offsets,
//! metadata, and consumer groups with offset commits and rebalancing. That is enough to run
//! Ferry end to end, workers included, with nothing installed.
//!
//! # Topics
//!
//! Topics named by `--topic` are created at start-up with `--partitions` partitions. The mock
//! does not implement the CreateTopics API: an `AdminClient::create_topics` call against it gets
//! no answer and fails with `OperationTimedOut` after the request timeout (60 s by default). It
//! does create a topic when a client asks for its metadata with auto-creation allowed (every
//! producer does; consumers do not by default), but always with 4 partitions, a default fixed
//! inside librdkafka that no public API changes. [`crate::topics::create_topic`] therefore
//! recognises the mock by its cluster id and uses auto-creation there and `CreateTopics`
//! elsewhere; a test that needs an exact partition count on the mock names its topic here.
//!
//! # Limits
//!
//! - Everything is in memory and lost on exit; nothing is ever deleted by retention.
//! - It listens on 127.0.0.1 only, on ports the kernel picks: MockCluster offers no way to
//!   choose the address, so there is no `--listen` flag and other hosts cannot connect.
//! - A new consumer group waits 3 s (the mock's `group.initial.rebalance.delay.ms`) before its
//!   first assignment, and the delay is not configurable through rdkafka's API.
//! - The mock does not call a consumer's commit callback for manual commits.

use std::future::Future;
use std::io::{self, Write};

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::bootstrap::{self, BootstrapError};
use crate::cli::BrokerArgs;

/// Why `ferry broker` could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A `--topic` is not a valid Kafka topic name.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic { topic: String, reason: &'static str },
    /// librdkafka could not create the mock cluster (it could not bind a port, for example).
    #[error("could not start the mock cluster")]
    Start(#[source] KafkaError),
    /// The mock cluster refused to create a topic.
    #[error("could not create topic {topic}")]
    CreateTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The bootstrap line could not be written to stdout.
    #[error("could not write the bootstrap servers to stdout")]
    Stdout(#[source] io::Error),
    /// The bootstrap file could not be written.
    #[error(transparent)]
    BootstrapFile(#[from] BootstrapError),
    /// The SIGTERM or SIGINT handler could not be installed.
    #[error("could not listen for shutdown signals")]
    Signal(#[source] io::Error),
}

/// A running mock cluster with its topics created. Dropping it stops the cluster.
pub struct Broker {
    /// The cluster; it serves on librdkafka's own threads for as long as this value lives.
    cluster: MockCluster<'static, DefaultProducerContext>,
    /// Where clients connect, as `host:port[,host:port...]`.
    bootstrap_servers: String,
}

impl Broker {
    /// Starts the cluster and creates the topics the arguments name.
    pub fn start(args: &BrokerArgs) -> Result<Self, BrokerError> {
        let mut topics: Vec<&str> = Vec::new();
        for topic in &args.topics {
            check_topic_name(topic)?;
            if !topics.contains(&topic.as_str()) {
                topics.push(topic);
            }
        }
        let cluster = MockCluster::new(args.brokers).map_err(BrokerError::Start)?;
        // The mock's own default for auto-created topics; a factor above the broker count
        // would leave partitions without enough replicas.
        let replication = args.brokers.min(3);
        for topic in topics {
            cluster
                .create_topic(topic, args.partitions, replication)
                .map_err(|source| BrokerError::CreateTopic {
                    topic: topic.to_string(),
                    source,
                })?;
        }
        let bootstrap_servers = cluster.bootstrap_servers();
        Ok(Broker {
            cluster,
            bootstrap_servers,
        })
    }

    /// Where clients connect.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The cluster itself, for fault injection (broker down, request errors) in tests.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}

/// Runs `ferry broker`: starts the cluster, announces it on stdout (first line, flushed) and in
/// the bootstrap file, and serves until `shutdown` completes. The file is removed on the way out
/// so that no later reader mistakes it for a live broker.
pub async fn serve(args: &BrokerArgs, shutdown: io::Result<impl Future<Output = ()>>) -> Result<(), BrokerError> {
    // The signal handlers are installed by the caller before this starts, so a SIGTERM sent the
    // moment the bootstrap line appears is already caught rather than killing the process.
    let shutdown = shutdown.map_err(BrokerError::Signal)?;
    let broker = Broker::start(args)?;
    let servers = broker.bootstrap_servers();
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{servers}")
            .and_then(|()| stdout.flush())
            .map_err(BrokerError::Stdout)?;
    }
    if let Some(path) = &args.bootstrap_file {
        bootstrap::write_atomically(path, servers)?;
    }
    info!(
        bootstrap_servers = servers,
        brokers = args.brokers,
        partitions = args.partitions,
        topics = ?args.topics,
        "mock broker ready"
    );
    shutdown.await;
    info!("mock broker shutting down");
    if let Some(path) = &args.bootstrap_file {
        // Only remove the file while it still names this broker; another broker may have taken
        // the path over since.
        if std::fs::read_to_string(path).is_ok_and(|text| text.trim() == servers) {
            let _ = std::fs::remove_file(path);
        }
    }
    drop(broker);
    Ok(())
}

/// Installs SIGTERM and SIGINT handlers now and returns a future that completes on the first
/// of them. Must be called inside a Tokio runtime.
pub fn terminate_signal() -> io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "shutdown requested"),
            _ = int.recv() => info!(signal = "SIGINT", "shutdown requested"),
        }
    })
}

/// Kafka's topic-name rule: 1 to 249 characters of `[a-zA-Z0-9._-]`, and not `.` or `..`.
fn check_topic_name(topic: &str) -> Result<(), BrokerError> {
    let invalid = |reason| {
        Err(BrokerError::InvalidTopic {
            topic: topic.to_string(),
            reason,
        })
    };
    if topic.is_empty() || topic.len() > ferry_schemas::MAX_TOPIC_LEN {
        return invalid("a topic name has 1 to 249 characters");
    }
    if topic == "." || topic == ".." {
        return invalid("`.` and `..` are not topic names");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("a topic name may only hold letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(topics: &[&str]) -> BrokerArgs {
        BrokerArgs {
            brokers: 1,
            partitions: 2,
            topics: topics.iter().map(|t| t.to_string()).collect(),
            bootstrap_file: None,
        }
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check_topic_name("ferry.requests-1_a").is_ok());
        for bad in ["", ".", "..", "has space", "slash/", &"x".repeat(250)] {
            assert!(check_topic_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn start_creates_named_topics_once_each() -> anyhow::Result<()> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let broker = Broker::start(&args(&["a", "b", "a"]))?;
        assert!(broker.bootstrap_servers().starts_with("127.0.0.1:"));
        // A consumer does not auto-create topics, so the topics it sees were made by `start`.
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .create()?;
        let metadata = consumer.fetch_metadata(None, std::time::Duration::from_secs(10))?;
        let mut topics: Vec<_> = metadata
            .topics()
            .iter()
            .map(|t| (t.name(), t.partitions().len()))
            .collect();
        topics.sort();
        assert_eq!(topics, [("a", 2), ("b", 2)]);
        Ok(())
    }

    #[test]
    fn invalid_topic_is_refused_before_start() {
        assert!(matches!(
            Broker::start(&args(&["bad topic"])),
            Err(BrokerError::InvalidTopic { .. })
        ));
    }
}
