//! A small Kafka client for callers of Ferry: publish a request keyed by its id, or publish it
//! and wait for the reply keyed by the same id.
//!
//! Requests go out through an idempotent producer (`enable.idempotence`, so `acks=all` and no
//! duplicates from the producer's own retries), and every publish awaits its delivery report,
//! so a returned [`Published`] means the broker has the message.
//!
//! # Never missing a fast reply
//!
//! A worker can answer before a caller that subscribes after publishing would be ready to read,
//! so [`Client::request`] sets up its [`ReplyListener`] first. The listener reads the high
//! watermark of every partition of the reply topic and assigns each partition at exactly that
//! offset; the reply is produced after the request, so it lands at or beyond those offsets and
//! is read whichever partition the worker's partitioner picks. The listener joins no consumer
//! group and commits nothing (librdkafka's `assign` wants a `group.id`, so it gets a unique,
//! unused one), so any number of callers can share a reply topic without rebalancing each other.
//!
//! The limit: each listener reads every reply on the topic and skips those for other ids. That
//! is fine for a command-line tool and for tests; a caller with many requests in flight should
//! keep one consumer and route replies by key itself.

use std::time::Duration;

use ferry_schemas::{headers, Reply, Request};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long to wait before asking again for metadata or offsets that a broker could not give
/// yet (a partition still electing its leader, for example).
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Where the cluster is and how patient to be with it.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` pairs.
    pub bootstrap_servers: String,
    /// How long the producer retries a message before reporting it undeliverable
    /// (librdkafka's `message.timeout.ms`).
    pub delivery_timeout: Duration,
}

/// Where a message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub partition: i32,
    pub offset: i64,
}

/// Why a publish or a request-and-wait failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// librdkafka refused the configuration.
    #[error("could not create the Kafka client")]
    Config(#[source] KafkaError),
    /// The request could not be serialised (it holds a value JSON cannot express).
    #[error("could not serialise request {id}")]
    Serialize {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// The broker did not take the message before the delivery timeout, or refused it.
    #[error("could not deliver a message to topic {topic}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The request has no `reply_to`, so there is no topic to wait on.
    #[error("request {id} has no reply_to topic, so its reply cannot be awaited")]
    MissingReplyTo { id: String },
    /// The reply topic does not exist; consumers do not create topics.
    #[error("topic {topic} does not exist; create it first (see ferry::topics::create_topic)")]
    UnknownTopic { topic: String },
    /// The reply topic's partitions or offsets could not be read before the deadline.
    #[error("could not read the partitions and offsets of topic {topic}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The deadline passed before the request was delivered.
    #[error("request {id} could not be delivered to topic {topic} within {waited:.1?}")]
    PublishTimeout {
        id: String,
        topic: String,
        waited: Duration,
    },
    /// The deadline passed before a reply arrived.
    #[error("no reply to request {id} on topic {topic} within {waited:.1?}")]
    Timeout {
        id: String,
        topic: String,
        waited: Duration,
    },
    /// A message keyed by the request id is not a valid reply.
    #[error("the message for request {id} at {topic}/{partition}@{offset} is not a valid reply")]
    InvalidReply {
        id: String,
        topic: String,
        partition: i32,
        offset: i64,
        #[source]
        source: serde_json::Error,
    },
    /// A reply keyed by the request id names another id in its body.
    #[error("the reply keyed {id} names request {body_id} in its body")]
    ReplyIdMismatch { id: String, body_id: String },
    /// A blocking metadata call panicked or was cancelled.
    #[error("a background Kafka task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// The settings of every producer the library makes: idempotent (`acks=all`, no duplicates or
/// reordering from its own retries), giving up after the configured delivery timeout, and
/// sending at once rather than lingering to batch.
pub(crate) fn idempotent_producer(config: &KafkaConfig) -> ClientConfig {
    // librdkafka reads 0 as "no timeout", the opposite of what a zero duration means.
    let delivery_ms = config.delivery_timeout.as_millis().clamp(1, i32::MAX as u128);
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", delivery_ms.to_string())
        .set("linger.ms", "0");
    c
}

/// Publishes requests; creates a [`ReplyListener`] per awaited reply.
pub struct Client {
    /// One idempotent producer for every publish; it is thread-safe and batches on its own.
    producer: FutureProducer,
    /// Kept to configure the reply consumers the same way.
    config: KafkaConfig,
}

impl Client {
    /// Creates the producer. It connects lazily, so this succeeds without a reachable broker.
    pub fn new(config: KafkaConfig) -> Result<Self, ClientError> {
        let producer = idempotent_producer(&config).create().map_err(ClientError::Config)?;
        Ok(Client { producer, config })
    }

    /// The configuration the client was made with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Publishes `request` as JSON, keyed by its id, and waits for the delivery report.
    pub async fn publish(&self, topic: &str, request: &Request) -> Result<Published, ClientError> {
        let payload = serde_json::to_vec(request).map_err(|source| ClientError::Serialize {
            id: request.id.clone(),
            source,
        })?;
        let version = request.version.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: headers::SCHEMA_VERSION,
            value: Some(&version),
        });
        self.send(topic, Some(request.id.as_bytes()), &payload, Some(headers))
            .await
    }

    /// Publishes `payload` exactly as given, with an optional key and no headers, and waits for
    /// the delivery report. For messages that are not valid requests on purpose.
    pub async fn publish_bytes(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Published, ClientError> {
        self.send(topic, key, payload, None).await
    }

    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<Published, ClientError> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        let delivery =
            self.producer
                .send(record, self.config.delivery_timeout)
                .await
                .map_err(|(source, _message)| ClientError::Delivery {
                    topic: topic.to_string(),
                    source,
                })?;
        Ok(Published {
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }

    /// Starts listening on `reply_topic` from its current end; see the module documentation.
    pub async fn reply_listener(&self, reply_topic: &str, deadline: Instant) -> Result<ReplyListener, ClientError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("group.id", format!("ferry-reply-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Replies are small and awaited by a person or a test: favour latency.
            .set("fetch.wait.max.ms", "100")
            .create()
            .map_err(ClientError::Config)?;
        let topic = reply_topic.to_string();
        // Metadata and watermark queries block the calling thread inside librdkafka.
        let consumer = tokio::task::spawn_blocking(move || {
            assign_at_end(&consumer, &topic, deadline.into_std()).map(|()| consumer)
        })
        .await??;
        Ok(ReplyListener {
            consumer,
            topic: reply_topic.to_string(),
        })
    }

    /// Publishes `request` and waits until `timeout` for the reply keyed by its id on its
    /// `reply_to` topic. The timeout covers setting up, publishing and waiting.
    pub async fn request(&self, topic: &str, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let id = &request.id;
        let reply_topic = request
            .reply_to
            .as_deref()
            .ok_or_else(|| ClientError::MissingReplyTo { id: id.clone() })?;
        let listener = self.reply_listener(reply_topic, deadline).await?;
        let published = tokio::time::timeout_at(deadline, self.publish(topic, request))
            .await
            .map_err(|_elapsed| ClientError::PublishTimeout {
                id: id.clone(),
                topic: topic.to_string(),
                waited: started.elapsed(),
            })??;
        debug!(request_id = %id, topic, partition = published.partition, offset = published.offset, "request published");
        listener.wait_for(id, deadline).await.map_err(|e| match e {
            // Report the whole wait the caller asked for, not only the part after publishing.
            ClientError::Timeout { id, topic, .. } => ClientError::Timeout {
                id,
                topic,
                waited: started.elapsed(),
            },
            other => other,
        })
    }
}

/// A consumer reading a reply topic from the end it had when the listener was made.
pub struct ReplyListener {
    /// Assigned to every partition of the topic; never joins a group or commits.
    consumer: StreamConsumer,
    /// The reply topic, for errors and logs.
    topic: String,
}

impl ReplyListener {
    /// Waits until `deadline` for the first final reply (a response or an error) keyed `id`.
    /// Messages for other ids, and chunks of a streamed answer, are skipped (and consumed: a
    /// later call will not see them).
    pub async fn wait_for(&self, id: &str, deadline: Instant) -> Result<Reply, ClientError> {
        let started = Instant::now();
        let topic = &self.topic;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_elapsed) => {
                    return Err(ClientError::Timeout {
                        id: id.to_string(),
                        topic: topic.clone(),
                        waited: started.elapsed(),
                    })
                }
                // librdkafka reports transient trouble (a broker restarting) as errors and keeps
                // retrying by itself, so the wait goes on until the deadline.
                Ok(Err(error)) => {
                    warn!(%error, topic, "error while waiting for a reply; still waiting");
                    continue;
                }
                Ok(Ok(message)) => message,
            };
            if message.key() != Some(id.as_bytes()) {
                continue;
            }
            let (partition, offset) = (message.partition(), message.offset());
            debug!(request_id = id, topic, partition, offset, "reply received");
            let reply: Reply = serde_json::from_slice(message.payload().unwrap_or_default()).map_err(|source| {
                ClientError::InvalidReply {
                    id: id.to_string(),
                    topic: topic.clone(),
                    partition,
                    offset,
                    source,
                }
            })?;
            if reply.id() != id {
                return Err(ClientError::ReplyIdMismatch {
                    id: id.to_string(),
                    body_id: reply.id().to_string(),
                });
            }
            if !reply.is_final() {
                continue;
            }
            return Ok(reply);
        }
    }
}

/// Assigns every partition of `topic` at its current high watermark, retrying what a broker
/// cannot answer yet until `deadline`. Blocks the calling thread.
fn assign_at_end(consumer: &StreamConsumer, topic: &str, deadline: std::time::Instant) -> Result<(), ClientError> {
    let metadata_err = |source| ClientError::Metadata {
        topic: topic.to_string(),
        source,
    };
    let partitions = partitions_of(consumer, topic, deadline)?;
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let (_low, high) = watermarks(consumer, topic, partition, deadline)?;
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(high))
            .map_err(metadata_err)?;
    }
    consumer.assign(&assignment).map_err(metadata_err)?;
    debug!(
        topic,
        partitions = assignment.count(),
        "reply listener assigned at the end of the topic"
    );
    Ok(())
}

/// Sleeps before another try, or gives up with `error` when `deadline` is too close.
fn retry_before(deadline: std::time::Instant, topic: &str, error: KafkaError) -> Result<(), ClientError> {
    if deadline.saturating_duration_since(std::time::Instant::now()) <= RETRY_INTERVAL {
        return Err(ClientError::Metadata {
            topic: topic.to_string(),
            source: error,
        });
    }
    std::thread::sleep(RETRY_INTERVAL);
    Ok(())
}

/// The low and high watermarks of one partition, retrying until `deadline`. Blocks the calling
/// thread.
pub(crate) fn watermarks<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    partition: i32,
    deadline: std::time::Instant,
) -> Result<(i64, i64), ClientError> {
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        match consumer.fetch_watermarks(topic, partition, remaining) {
            Ok(marks) => return Ok(marks),
            Err(error) => retry_before(deadline, topic, error)?,
        }
    }
}

/// The partition ids of `topic`, once every partition has been reported, retrying what a
/// broker cannot answer yet until `deadline`. A topic that does not exist is an error at once:
/// consumers do not create topics. Blocks the calling thread.
pub(crate) fn partitions_of<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    deadline: std::time::Instant,
) -> Result<Vec<i32>, ClientError> {
    let remaining = || deadline.saturating_duration_since(std::time::Instant::now());
    let retry_or = |error: KafkaError| retry_before(deadline, topic, error);
    loop {
        let metadata = match consumer.fetch_metadata(Some(topic), remaining()) {
            Ok(metadata) => metadata,
            Err(error) => {
                retry_or(error)?;
                continue;
            }
        };
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(ClientError::UnknownTopic {
                topic: topic.to_string(),
            });
        };
        match found.error().map(RDKafkaErrorCode::from) {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                return Err(ClientError::UnknownTopic {
                    topic: topic.to_string(),
                })
            }
            Some(code) => retry_or(KafkaError::MetadataFetch(code))?,
            None if found.partitions().is_empty() => {
                retry_or(KafkaError::MetadataFetch(RDKafkaErrorCode::LeaderNotAvailable))?
            }
            None => return Ok(found.partitions().iter().map(|p| p.id()).collect()),
        }
    }
}
