//! The zero-install broker: librdkafka's mock cluster, hosted in this process.
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

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::BrokerError;

/// A running mock cluster with its topics created. Dropping it stops the cluster.
pub struct Broker {
    /// The cluster; it serves on librdkafka's own threads for as long as this value lives.
    cluster: MockCluster<'static, DefaultProducerContext>,
    /// Where clients connect, as `host:port[,host:port...]`.
    bootstrap_servers: String,
}

impl Broker {
    /// Starts a cluster of `brokers` brokers and creates `topics` (valid, distinct names) with
    /// `partitions` partitions each.
    pub fn start(brokers: i32, partitions: i32, topics: &[String]) -> Result<Self, BrokerError> {
        let cluster = MockCluster::new(brokers).map_err(BrokerError::Start)?;
        // The mock's own default for auto-created topics; a factor above the broker count
        // would leave partitions without enough replicas.
        let replication = brokers.min(3);
        for topic in topics {
            cluster
                .create_topic(topic, partitions, replication)
                .map_err(|source| BrokerError::CreateTopic {
                    topic: topic.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_creates_the_named_topics() -> anyhow::Result<()> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let broker = Broker::start(1, 2, &["a".to_string(), "b".to_string()])?;
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
}
