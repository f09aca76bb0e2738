//! The caller's reply consumer: where it starts, and how its position is committed.
//!
//! The consumer belongs to the group `ferry-caller.<identity>` but never joins it: it assigns
//! itself every partition of the reply topic at the group's committed offsets and commits
//! explicitly (Kafka's "standalone" commits, which a broker accepts for a group with no
//! members). Joining would buy nothing, since one identity is one process, and would cost a
//! restart the session timeout: a caller that was killed is still a member until then, and the
//! group would wait for it before assigning anything to its successor.
//!
//! Where the group has no committed offset for a partition (a new identity), reading starts at
//! the partition's end, and that position is committed at once, before any request is sent: if
//! the caller then dies, its successor starts from that committed position and finds every
//! reply sent since. The exception is a journal that already holds pending requests with no
//! committed offset to go with them (the group's offsets expired, or were deleted); then
//! reading starts at the beginning, since the replies may be anywhere.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::{kafka, DurableError};
use crate::client::{self, KafkaConfig};

/// The reply consumer's context: librdkafka also reports each end of partition as a client
/// error, which the default context logs at error level; here it is the expected signal that
/// the caller has caught up ([`KafkaError::PartitionEOF`] from `recv`), so it is not logged.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            warn!(%error, reason, "librdkafka reported an error");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// The reply consumer.
pub type ReplyConsumer = StreamConsumer<QuietEof>;

/// The consumer group of an identity.
pub fn group_id(identity: &str) -> String {
    format!("ferry-caller.{identity}")
}

/// Creates the reply consumer (not yet assigned).
pub fn consumer(config: &KafkaConfig, group_id: &str) -> Result<ReplyConsumer, DurableError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A committed offset that retention has since deleted: read what is left.
        .set("auto.offset.reset", "earliest")
        // End-of-partition events tell the caller when it has read everything that arrived
        // while it was down, before it starts expiring deadlines.
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100")
        .create_with_context(QuietEof)
        .map_err(kafka("create the reply consumer"))
}

/// Assigns every partition of `topic` at the group's committed offset (see the module docs for
/// partitions without one, whose start is committed here) and returns the starting offsets.
/// Blocks the calling thread.
pub fn assign_from_committed(
    consumer: &ReplyConsumer,
    topic: &str,
    journal_has_pending: bool,
    deadline: std::time::Instant,
) -> Result<Vec<(i32, i64)>, DurableError> {
    let partitions = client::partitions_of(consumer, topic, deadline)?;
    let mut asked = TopicPartitionList::new();
    for &partition in &partitions {
        asked.add_partition(topic, partition);
    }
    let remaining = deadline.saturating_duration_since(std::time::Instant::now());
    let committed = consumer
        .committed_offsets(asked, remaining)
        .map_err(kafka("read the caller group's committed offsets"))?;
    let mut starts = Vec::with_capacity(partitions.len());
    let mut to_commit = TopicPartitionList::new();
    for &partition in &partitions {
        let offset = committed
            .find_partition(topic, partition)
            .and_then(|p| match p.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            });
        let start = match offset {
            Some(offset) => offset,
            None => {
                let (low, high) = client::watermarks(consumer, topic, partition, deadline)?;
                let start = if journal_has_pending { low } else { high };
                to_commit
                    .add_partition_offset(topic, partition, Offset::Offset(start))
                    .map_err(kafka("list the offsets to commit"))?;
                start
            }
        };
        starts.push((partition, start));
    }
    if to_commit.count() > 0 {
        consumer
            .commit(&to_commit, CommitMode::Sync)
            .map_err(kafka("commit the caller group's starting offsets"))?;
        info!(
            topic,
            partitions = to_commit.count(),
            from_beginning = journal_has_pending,
            "caller group had no committed offsets; committed its starting positions"
        );
    }
    let mut assignment = TopicPartitionList::new();
    for &(partition, start) in &starts {
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(kafka("list the reply partitions"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(kafka("assign the reply partitions"))?;
    debug!(topic, ?starts, "reply consumer assigned at the group's positions");
    Ok(starts)
}

/// Commits `positions` of `topic` for the consumer's group. `wait` waits for the broker's
/// answer, up to `timeout`; otherwise the commit is only queued (the periodic commits: a lost
/// one is superseded by the next, and the final commit on close waits).
pub async fn commit(
    consumer: &Arc<ReplyConsumer>,
    topic: &str,
    positions: &[(i32, i64)],
    wait: Option<Duration>,
) -> Result<(), DurableError> {
    let mut list = TopicPartitionList::new();
    for &(partition, offset) in positions {
        list.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(kafka("list the offsets to commit"))?;
    }
    let Some(timeout) = wait else {
        return consumer
            .commit(&list, CommitMode::Async)
            .map_err(kafka("commit the caller group's offsets"));
    };
    let consumer = Arc::clone(consumer);
    // A synchronous commit blocks inside librdkafka until the coordinator answers; the
    // librdkafka call itself has no timeout, so the wait is bounded here.
    let commit = tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync));
    match tokio::time::timeout(timeout, commit).await {
        Ok(joined) => joined?.map_err(kafka("commit the caller group's offsets")),
        Err(_elapsed) => Err(kafka("commit the caller group's offsets")(KafkaError::Canceled)),
    }
}
