//! The journal: what a caller has asked for and what it has been told, as records in a compacted
//! Kafka topic, so that a caller that restarts knows where it stands.
//!
//! # Records
//!
//! One record per state change of a request, keyed `<identity>/<request id>`, with a JSON
//! [`Entry`] as the value, or no value (a tombstone) once the application has acknowledged the
//! outcome. On a compacted topic only the last record of each key survives, so each record is
//! self-contained: it repeats the request and its deadline.
//!
//! ```text
//!   sending ──publish acknowledged──▶ sent ──final reply read──▶ answered ──ack──▶ (tombstone)
//!      │                               │
//!      └──────────── deadline ─────────┴──────────────────────▶ expired ──ack──▶ (tombstone)
//! ```
//!
//! # Partition
//!
//! Every record of one identity goes to one partition, chosen explicitly as
//! [`partition_for`]`(identity)`: the 32-bit FNV-1a hash of the identity's UTF-8 bytes, modulo
//! the topic's partition count. The key alone could not do it: the default partitioner hashes
//! the whole key, request id included, which would scatter one caller over every partition, and
//! a restarting caller would have to read them all. One partition also gives order: a producer
//! with idempotence keeps a partition's records in the order they were sent, so the last record
//! of a key is the last state written. The price: the journal topic's partition count must never
//! change, or identities move to other partitions and lose their history.
//!
//! The pure part of this module (keys, the partition hash, the [`Recovered`] fold) does no I/O
//! and is tested here; [`JournalWriter`] and [`read_partition`] are the Kafka edges.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_schemas::{Reply, Request};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::replies::QuietEof;
use super::{kafka, DurableError};
use crate::client::{self, KafkaConfig};

/// The journal topic when none is named.
pub const DEFAULT_JOURNAL_TOPIC: &str = "ferry.callers";

/// The version written in every [`Entry`]; a reader skips entries of versions it does not know.
pub const ENTRY_VERSION: u32 = 1;

/// Where a request stands, as the journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// Journaled, and about to be published (or being published). Nobody knows whether the
    /// broker has it, so a restarted caller publishes it again.
    Sending,
    /// The broker acknowledged the request; its answer is awaited and never asked for again.
    Sent,
    /// The final reply (a response or an error) was read; it is in the entry.
    Answered,
    /// The deadline passed with no final reply; a reply that comes later is ignored.
    Expired,
}

impl EntryState {
    /// The state's name as it appears in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Sending => "sending",
            EntryState::Sent => "sent",
            EntryState::Answered => "answered",
            EntryState::Expired => "expired",
        }
    }

    /// Whether the request still waits for its answer.
    pub fn is_pending(self) -> bool {
        matches!(self, EntryState::Sending | EntryState::Sent)
    }
}

/// The value of a journal record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// [`ENTRY_VERSION`].
    pub version: u32,
    pub state: EntryState,
    /// The request topic it is (or was) published to, for publishing it again.
    pub topic: String,
    /// When the caller stops waiting, in milliseconds since the Unix epoch. Absolute, so that it
    /// means the same to a restarted caller.
    pub deadline_ms: i64,
    /// The request as published; its `reply_to` is the caller's reply topic.
    pub request: Request,
    /// The final reply, in state `answered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
}

/// The key of a request's journal records.
pub fn key(identity: &str, id: &str) -> String {
    format!("{identity}/{id}")
}

/// The request id in `key`, when the key belongs to `identity`.
pub fn id_from_key<'k>(identity: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(identity)?.strip_prefix('/')
}

/// The journal partition of `identity`: 32-bit FNV-1a of its UTF-8 bytes, modulo `partitions`.
/// Chosen because it is a few lines in any language (the Python example has it too); it is not
/// Kafka's murmur2, and it need not be, since the partition is always given explicitly.
pub fn partition_for(identity: &str, partitions: i32) -> i32 {
    let hash = identity.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    let partitions = u32::try_from(partitions.max(1)).unwrap_or(1);
    // The remainder is below `partitions`, which came from an i32.
    i32::try_from(hash % partitions).unwrap_or(0)
}

/// What an identity's journal says, folded from its records in partition order: the last record
/// of each key wins, a tombstone removes the key, and records of other identities (which share
/// the partition when their hashes collide) are skipped.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The request entries by id.
    pub entries: BTreeMap<String, Entry>,
    /// Records of other identities.
    pub foreign: usize,
    /// Records of this identity that could not be read (not JSON, an unknown version, or an
    /// entry whose request id does not match its key). The entry before such a record stands.
    pub unreadable: usize,
}

impl Recovered {
    /// Folds one record into the state.
    pub fn apply(&mut self, identity: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
        let id = key
            .and_then(|key| std::str::from_utf8(key).ok())
            .and_then(|key| id_from_key(identity, key));
        let Some(id) = id else {
            self.foreign += 1;
            return;
        };
        let Some(value) = value else {
            self.entries.remove(id);
            return;
        };
        match serde_json::from_slice::<Entry>(value) {
            Ok(entry) if entry.version == ENTRY_VERSION && entry.request.id == id => {
                self.entries.insert(id.to_string(), entry);
            }
            Ok(entry) => {
                warn!(
                    request_id = id,
                    version = entry.version,
                    body_id = %entry.request.id,
                    "skipping a journal entry that does not fit its key or version"
                );
                self.unreadable += 1;
            }
            Err(error) => {
                warn!(request_id = id, %error, "skipping an unreadable journal entry");
                self.unreadable += 1;
            }
        }
    }
}

/// Writes an identity's journal records to its partition.
pub struct JournalWriter {
    /// Idempotent, so retries neither duplicate nor reorder records within the partition.
    producer: FutureProducer,
    topic: String,
    partition: i32,
    identity: String,
}

impl JournalWriter {
    pub fn new(config: &KafkaConfig, topic: &str, partition: i32, identity: &str) -> Result<Self, DurableError> {
        let producer = client::idempotent_producer(config)
            .create()
            .map_err(kafka("create the journal producer"))?;
        Ok(JournalWriter {
            producer,
            topic: topic.to_string(),
            partition,
            identity: identity.to_string(),
        })
    }

    /// The journal partition of this identity.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Hands the record for `id` (a tombstone when `entry` is `None`) to the producer and
    /// returns its delivery report. It does not wait: the record takes its place in the
    /// partition's order now, so callers enqueue while holding the lock that orders state
    /// changes, and await the report after releasing it.
    pub fn enqueue(&self, id: &str, entry: Option<&Entry>) -> Result<DeliveryFuture, DurableError> {
        let key = key(&self.identity, id);
        let payload = entry
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|source| DurableError::Serialize {
                id: id.to_string(),
                source,
            })?;
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .partition(self.partition)
            .key(&key);
        if let Some(payload) = &payload {
            record = record.payload(payload);
        }
        self.producer
            .send_result(record)
            .map_err(|(source, _record)| DurableError::JournalWrite {
                id: id.to_string(),
                source,
            })
    }

    /// Waits for the producer to deliver what is queued, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        rdkafka::producer::Producer::flush(&self.producer, timeout)
    }
}

/// Waits for the delivery report of a record [`JournalWriter::enqueue`] queued.
pub async fn confirm(id: &str, delivery: DeliveryFuture) -> Result<(), DurableError> {
    match delivery.await {
        Ok(Ok(_delivery)) => Ok(()),
        Ok(Err((source, _message))) => Err(DurableError::JournalWrite {
            id: id.to_string(),
            source,
        }),
        // The producer was dropped with the record still queued.
        Err(_canceled) => Err(DurableError::JournalWrite {
            id: id.to_string(),
            source: KafkaError::Canceled,
        }),
    }
}

/// Reads `partition` of the journal from its beginning up to the end it has when the read
/// starts, and folds `identity`'s records. Blocks the calling thread.
pub fn read_partition(
    config: &KafkaConfig,
    topic: &str,
    partition: i32,
    identity: &str,
    deadline: std::time::Instant,
) -> Result<Recovered, DurableError> {
    let consumer: BaseConsumer<QuietEof> = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        // Assigned, never subscribed, and never committing: the group is only a name.
        .set("group.id", format!("ferry-journal-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create_with_context(QuietEof)
        .map_err(kafka("create the journal reader"))?;
    let mut recovered = Recovered::default();
    let (low, high) = client::watermarks(&consumer, topic, partition, deadline)?;
    if high <= low {
        return Ok(recovered);
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Beginning)
        .and_then(|()| consumer.assign(&assignment))
        .map_err(kafka("assign the journal partition"))?;
    let mut records = 0usize;
    loop {
        if std::time::Instant::now() >= deadline {
            return Err(DurableError::JournalRead {
                topic: topic.to_string(),
                partition,
                read: records,
                end: high,
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                records += 1;
                recovered.apply(identity, message.key(), message.payload());
                if message.offset() + 1 >= high {
                    break;
                }
            }
            // Reached the end as it is now; anything written since belongs to another instance
            // of this identity, which must not run at the same time (see the module docs).
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(error)) => warn!(%error, topic, partition, "error while reading the journal; retrying"),
            None => {}
        }
    }
    debug!(
        topic,
        partition,
        records,
        entries = recovered.entries.len(),
        foreign = recovered.foreign,
        "journal read"
    );
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> Request {
        serde_json::from_value(serde_json::json!({"id": id, "prompt": "p", "reply_to": "r"}))
            .unwrap_or_else(|e| panic!("test request: {e}"))
    }

    fn entry(id: &str, state: EntryState) -> Vec<u8> {
        let entry = Entry {
            version: ENTRY_VERSION,
            state,
            topic: "t".into(),
            deadline_ms: 1,
            request: request(id),
            reply: None,
        };
        serde_json::to_vec(&entry).unwrap_or_default()
    }

    fn fold(records: &[(&str, Option<Vec<u8>>)]) -> Recovered {
        let mut recovered = Recovered::default();
        for (key, value) in records {
            recovered.apply("me", Some(key.as_bytes()), value.as_deref());
        }
        recovered
    }

    fn states(recovered: &Recovered) -> Vec<(&str, EntryState)> {
        recovered.entries.iter().map(|(id, e)| (id.as_str(), e.state)).collect()
    }

    #[test]
    fn the_last_record_of_a_key_wins_and_a_tombstone_removes_it() {
        let recovered = fold(&[
            ("me/a", Some(entry("a", EntryState::Sending))),
            ("me/b", Some(entry("b", EntryState::Sending))),
            ("me/a", Some(entry("a", EntryState::Sent))),
            ("me/c", Some(entry("c", EntryState::Sending))),
            ("me/b", Some(entry("b", EntryState::Sent))),
            ("me/b", Some(entry("b", EntryState::Answered))),
            ("me/c", Some(entry("c", EntryState::Sent))),
            ("me/c", Some(entry("c", EntryState::Expired))),
            ("me/c", None),
            ("me/d", Some(entry("d", EntryState::Sending))),
        ]);
        assert_eq!(
            states(&recovered),
            [
                ("a", EntryState::Sent),
                ("b", EntryState::Answered),
                ("d", EntryState::Sending)
            ]
        );
    }

    #[test]
    fn other_identities_are_skipped_even_when_one_is_a_prefix() {
        let recovered = fold(&[
            ("meme/a", Some(entry("a", EntryState::Sent))),
            ("m/e/a", Some(entry("e/a", EntryState::Sent))),
            ("you/x", Some(entry("x", EntryState::Sent))),
            ("me/a", Some(entry("a", EntryState::Sent))),
            ("you/a", None),
        ]);
        assert_eq!(states(&recovered), [("a", EntryState::Sent)]);
        assert_eq!(recovered.foreign, 4);
    }

    #[test]
    fn an_unreadable_record_leaves_the_entry_before_it() {
        let recovered = fold(&[
            ("me/a", Some(entry("a", EntryState::Sent))),
            ("me/a", Some(b"not json".to_vec())),
            // The body names another request than the key.
            ("me/a", Some(entry("b", EntryState::Answered))),
        ]);
        assert_eq!(states(&recovered), [("a", EntryState::Sent)]);
        assert_eq!(recovered.unreadable, 2);
    }

    #[test]
    fn request_ids_may_contain_the_separator() {
        assert_eq!(id_from_key("me", &key("me", "a/b")), Some("a/b"));
        assert_eq!(id_from_key("me", "me"), None);
        assert_eq!(id_from_key("me", "mex/a"), None);
    }

    #[test]
    fn the_partition_hash_is_fnv1a_and_stays_in_range() {
        // Reference values of 32-bit FNV-1a; the Python example computes the same.
        let fnv = |s: &str| {
            s.bytes()
                .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
        };
        assert_eq!(fnv(""), 0x811c_9dc5);
        assert_eq!(fnv("a"), 0xe40c_292c);
        assert_eq!(fnv("foobar"), 0xbf9c_f968);
        for identity in ["", "a", "orchestrator-0", "orchestrator-1", "ünïcode"] {
            for partitions in [1, 3, 4, 50] {
                let p = partition_for(identity, partitions);
                assert!((0..partitions).contains(&p), "{identity} {partitions} -> {p}");
                assert_eq!(i64::from(p), i64::from(fnv(identity) % partitions as u32));
            }
        }
        assert_eq!(
            partition_for("anything", 0),
            0,
            "a topic without partitions is not a panic"
        );
    }

    #[test]
    fn entries_are_self_contained_json() -> Result<(), serde_json::Error> {
        let json = serde_json::json!({
            "version": 1, "state": "sent", "topic": "ferry.requests", "deadline_ms": 1700000000000_i64,
            "request": {"version": 1, "id": "a", "prompt": "p", "reply_to": "r"}
        });
        let entry: Entry = serde_json::from_value(json.clone())?;
        assert_eq!((entry.state, entry.request.id.as_str()), (EntryState::Sent, "a"));
        assert_eq!(serde_json::to_value(&entry)?, json);
        Ok(())
    }
}
