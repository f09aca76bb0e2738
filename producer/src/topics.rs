//! Creating and deleting topics the same way on librdkafka's mock cluster and on real Kafka.
//!
//! A real cluster creates topics through the CreateTopics API; the mock does not implement it
//! (a `create_topics` call there waits out its whole request timeout and fails). The mock does
//! create a topic when a producer-type client asks for its metadata, but always with 4
//! partitions ([`MOCK_AUTO_CREATE_PARTITIONS`]). So [`create_topic`] first asks for the
//! cluster id, which the mock reports as `mockCluster<hex>`, and then:
//!
//! - on the mock, triggers auto-creation with a metadata request and returns the partition
//!   count the topic actually got (4 for a new topic, whatever was asked);
//! - elsewhere, calls CreateTopics with the broker's default replication factor (so a cluster
//!   whose `min.insync.replicas` is above 1 still accepts `acks=all` writes), accepts a topic
//!   that already exists, and waits until every partition has a leader.
//!
//! A test that needs an exact partition count on the mock passes the topic to `ferry broker
//! --topic NAME --partitions N` instead. [`delete_topic`] does nothing on the mock, which has no
//! DeleteTopics either; its topics end with the broker process.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::time::Instant;
use tracing::debug;

/// How the mock cluster's id starts (librdkafka's `rdkafka_mock.c`).
pub const MOCK_CLUSTER_ID_PREFIX: &str = "mockCluster";

/// Partitions of a topic the mock creates on demand: librdkafka's fixed default.
pub const MOCK_AUTO_CREATE_PARTITIONS: i32 = 4;

/// How long to wait before asking again whether a new topic is ready.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Which kind of cluster answers at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// librdkafka's mock cluster, as hosted by `ferry broker`.
    Mock,
    /// Anything else that speaks Kafka: Apache Kafka, Redpanda, a managed service.
    Kafka,
}

/// Why a topic could not be created or deleted.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// librdkafka refused the configuration.
    #[error("could not create the Kafka admin client")]
    Config(#[source] KafkaError),
    /// No broker answered with a cluster id before the deadline.
    #[error("no Kafka cluster answered at {bootstrap_servers} within {waited:.1?}")]
    Unreachable {
        bootstrap_servers: String,
        waited: Duration,
    },
    /// The admin request itself failed (timed out, for example).
    #[error("admin request for topic {topic} failed")]
    Admin {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The cluster refused to create the topic.
    #[error("could not create topic {topic}: {code}")]
    Create { topic: String, code: RDKafkaErrorCode },
    /// The cluster refused to delete the topic.
    #[error("could not delete topic {topic}: {code}")]
    Delete { topic: String, code: RDKafkaErrorCode },
    /// The topic did not have a leader for every partition before the deadline.
    #[error("topic {topic} was not ready within {waited:.1?}")]
    NotReady { topic: String, waited: Duration },
    /// A blocking metadata call panicked or was cancelled.
    #[error("a background Kafka task failed")]
    Task(#[from] tokio::task::JoinError),
}

type Admin = Arc<AdminClient<DefaultClientContext>>;

fn admin_client(bootstrap_servers: &str) -> Result<Admin, TopicError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .create()
        .map(Arc::new)
        .map_err(TopicError::Config)
}

/// Tells the mock from a real cluster by its cluster id.
pub async fn cluster_kind(bootstrap_servers: &str, timeout: Duration) -> Result<ClusterKind, TopicError> {
    kind_of(&admin_client(bootstrap_servers)?, bootstrap_servers, timeout).await
}

async fn kind_of(admin: &Admin, bootstrap_servers: &str, timeout: Duration) -> Result<ClusterKind, TopicError> {
    let admin = Arc::clone(admin);
    // Blocks inside librdkafka until a broker answers or the timeout passes.
    let id = tokio::task::spawn_blocking(move || admin.inner().fetch_cluster_id(timeout)).await?;
    match id {
        Some(id) if id.starts_with(MOCK_CLUSTER_ID_PREFIX) => Ok(ClusterKind::Mock),
        Some(_) => Ok(ClusterKind::Kafka),
        None => Err(TopicError::Unreachable {
            bootstrap_servers: bootstrap_servers.to_string(),
            waited: timeout,
        }),
    }
}

/// Creates `topic` (see the module documentation) and returns its partition count once every
/// partition has a leader. An existing topic is accepted as it is.
pub async fn create_topic(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<usize, TopicError> {
    create_topic_with_config(bootstrap_servers, topic, partitions, &[], timeout).await
}

/// [`create_topic`] with topic settings such as `("cleanup.policy", "compact")`. They apply
/// when the topic is created on a real cluster; an existing topic keeps its own, and the mock
/// ignores them (it keeps everything in memory and never compacts).
pub async fn create_topic_with_config(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
    timeout: Duration,
) -> Result<usize, TopicError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let admin = admin_client(bootstrap_servers)?;
    if kind_of(&admin, bootstrap_servers, timeout).await? == ClusterKind::Kafka {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let options = AdminOptions::new()
            .request_timeout(Some(remaining))
            .operation_timeout(Some(remaining));
        let new_topic = config.iter().fold(
            NewTopic::new(topic, partitions, TopicReplication::Fixed(-1)),
            |new_topic, (key, value)| new_topic.set(key, value),
        );
        let results = admin
            .create_topics(&[new_topic], &options)
            .await
            .map_err(|source| TopicError::Admin {
                topic: topic.to_string(),
                source,
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(TopicError::Create { topic, code }),
            }
        }
    }
    // On the mock this metadata request is what creates the topic: the admin client is a
    // producer-type client, and those allow auto-creation.
    let ready = wait_until_ready(admin, topic.to_string(), deadline.into_std()).await?;
    let count = ready.ok_or_else(|| TopicError::NotReady {
        topic: topic.to_string(),
        waited: started.elapsed(),
    })?;
    if usize::try_from(partitions).ok() != Some(count) {
        debug!(
            topic,
            asked = partitions,
            got = count,
            "topic has another partition count than asked"
        );
    }
    Ok(count)
}

/// Polls metadata until every partition of `topic` has a leader; `None` at the deadline.
async fn wait_until_ready(
    admin: Admin,
    topic: String,
    deadline: std::time::Instant,
) -> Result<Option<usize>, TopicError> {
    let ready = tokio::task::spawn_blocking(move || loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        if let Ok(metadata) = admin.inner().fetch_metadata(Some(&topic), remaining) {
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions())
                .unwrap_or_default();
            if !partitions.is_empty() && partitions.iter().all(|p| p.error().is_none() && p.leader() >= 0) {
                return Some(partitions.len());
            }
        }
        if std::time::Instant::now() + POLL_INTERVAL >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    })
    .await?;
    Ok(ready)
}

/// Deletes `topic` from a real cluster; a topic that does not exist is not an error. On the
/// mock this does nothing: it has no DeleteTopics, and its topics end with the broker process.
pub async fn delete_topic(bootstrap_servers: &str, topic: &str, timeout: Duration) -> Result<(), TopicError> {
    let admin = admin_client(bootstrap_servers)?;
    if kind_of(&admin, bootstrap_servers, timeout).await? == ClusterKind::Mock {
        return Ok(());
    }
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let results = admin
        .delete_topics(&[topic], &options)
        .await
        .map_err(|source| TopicError::Admin {
            topic: topic.to_string(),
            source,
        })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(TopicError::Delete { topic, code }),
        }
    }
    Ok(())
}
