//! `ferry broker`: a local Kafka-protocol broker that serves other processes, in one of two
//! kinds behind the same contract.
//!
//! - [`mock`] (the default): librdkafka's in-memory mock cluster, hosted in this process.
//!   Nothing to install, ready in milliseconds, but not Kafka: see its limits.
//! - [`kafka`] (`--kafka`): a real single-node Apache Kafka, the version pinned in
//!   `producer/kafka/pom.xml`, run as a child JVM with its jars fetched once into a cache and
//!   checked against `producer/kafka/jars.lock` ([`jars`]).
//!
//! Both create the `--topic` topics with `--partitions` partitions, print the bootstrap servers
//! as the first line of stdout, write them to `--bootstrap-file`, and serve until SIGTERM or
//! SIGINT, after which the file is removed and the broker stopped.

pub mod jars;
pub mod kafka;
pub mod mock;

use std::future::Future;
use std::io::{self, Write};

use rdkafka::error::KafkaError;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::bootstrap::{self, BootstrapError};
use crate::cli::BrokerArgs;
pub use mock::Broker;

/// Why `ferry broker` could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A `--topic` is not a valid Kafka topic name.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic { topic: String, reason: &'static str },
    /// `--kafka` runs exactly one node.
    #[error("--kafka runs a single-node Kafka: --brokers must be 1, not {0}")]
    KafkaBrokers(i32),
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
    /// The real Kafka broker could not be installed, started or stopped.
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaBrokerError),
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

/// The broker being served, of either kind.
// One value per process, so the size of its larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Running {
    Mock(Broker),
    Kafka(kafka::KafkaBroker),
}

impl Running {
    fn bootstrap_servers(&self) -> &str {
        match self {
            Running::Mock(broker) => broker.bootstrap_servers(),
            Running::Kafka(broker) => broker.bootstrap_servers(),
        }
    }

    /// Completes if the broker stops serving by itself: a Kafka JVM that was killed or crashed.
    /// The mock lives in this process and never does.
    async fn died(&mut self) -> BrokerError {
        match self {
            Running::Mock(_) => std::future::pending().await,
            Running::Kafka(broker) => broker.died().await.into(),
        }
    }
}

/// Runs `ferry broker`: starts the broker, announces it on stdout (first line, flushed) and in
/// the bootstrap file, and serves until `shutdown` completes. The file is removed on the way out
/// so that no later reader mistakes it for a live broker.
pub async fn serve(args: &BrokerArgs, shutdown: io::Result<impl Future<Output = ()>>) -> Result<(), BrokerError> {
    // The signal handlers are installed by the caller before this starts, so a SIGTERM sent the
    // moment the bootstrap line appears is already caught rather than killing the process.
    let shutdown = shutdown.map_err(BrokerError::Signal)?;
    let stdin_closed = if args.stop_on_stdin_eof {
        Some(stdin_closed())
    } else {
        None
    };
    let shutdown = async move {
        match stdin_closed {
            Some(closed) => tokio::select! {
                () = shutdown => {}
                _ = closed => info!("stdin closed: shutting down"),
            },
            None => shutdown.await,
        }
    };
    tokio::pin!(shutdown);
    let topics = distinct_topics(&args.topics)?;
    let kind = if args.kafka { "kafka" } else { "mock" };
    let mut broker = if args.kafka {
        if args.brokers != 1 {
            return Err(BrokerError::KafkaBrokers(args.brokers));
        }
        // A first start can spend minutes fetching jars; a signal meanwhile ends it. Dropping
        // the unfinished start kills what it had spawned (see `kafka`).
        let options = kafka_options(args);
        tokio::select! {
            started = kafka::KafkaBroker::start(&options, &topics) => Running::Kafka(started?),
            () = &mut shutdown => return Ok(()),
        }
    } else {
        Running::Mock(Broker::start(args.brokers, args.partitions, &topics)?)
    };
    let servers = broker.bootstrap_servers().to_string();
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{servers}")
            .and_then(|()| stdout.flush())
            .map_err(BrokerError::Stdout)?;
    }
    if let Some(path) = &args.bootstrap_file {
        bootstrap::write_atomically(path, &servers)?;
    }
    info!(
        bootstrap_servers = servers,
        kind,
        brokers = args.brokers,
        partitions = args.partitions,
        topics = ?topics,
        "broker ready"
    );
    let died = tokio::select! {
        () = &mut shutdown => None,
        died = broker.died() => Some(died),
    };
    info!(kind, "broker shutting down");
    if let Some(path) = &args.bootstrap_file {
        // Only remove the file while it still names this broker; another broker may have taken
        // the path over since.
        if std::fs::read_to_string(path).is_ok_and(|text| text.trim() == servers) {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(died) = died {
        return Err(died);
    }
    match broker {
        Running::Mock(broker) => drop(broker),
        Running::Kafka(broker) => broker.stop().await?,
    }
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

/// Completes when stdin reaches end of file (or cannot be read): the process that started this
/// broker with a pipe as its stdin closed it, or died in any way. A plain thread reads, not a
/// Tokio task, because a blocking read would keep the runtime from shutting down.
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut stdin = io::stdin();
        while matches!(io::Read::read(&mut stdin, &mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    rx
}

/// The topics to create: each name checked, the first of any repeats kept.
fn distinct_topics(names: &[String]) -> Result<Vec<String>, BrokerError> {
    let mut topics: Vec<String> = Vec::new();
    for topic in names {
        check_topic_name(topic)?;
        if !topics.contains(topic) {
            topics.push(topic.clone());
        }
    }
    Ok(topics)
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

/// The settings `--kafka` uses.
fn kafka_options(args: &BrokerArgs) -> kafka::KafkaOptions {
    kafka::KafkaOptions {
        partitions: args.partitions,
        cache_dir: args.kafka_cache.clone(),
        start_timeout: args.kafka_start_timeout,
        dir: args.kafka_dir.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check_topic_name("ferry.requests-1_a").is_ok());
        for bad in ["", ".", "..", "has space", "slash/", &"x".repeat(250)] {
            assert!(check_topic_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repeated_topics_are_created_once() -> anyhow::Result<()> {
        let names = ["a", "b", "a"].map(String::from);
        assert_eq!(distinct_topics(&names)?, ["a", "b"]);
        Ok(())
    }

    #[test]
    fn invalid_topic_is_refused_before_start() {
        assert!(matches!(
            distinct_topics(&["bad topic".to_string()]),
            Err(BrokerError::InvalidTopic { .. })
        ));
    }
}
