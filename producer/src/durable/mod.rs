//! A durable request/reply client: a caller that can die at any moment and come back, under
//! the same identity, knowing which of its requests are still open and getting their answers,
//! including the ones that arrived while it was down, without sending finished work again.
//!
//! Everything it needs to remember lives in Kafka, so a restarted process (the same pod of a
//! StatefulSet, say) needs no disk of its own.
//!
//! # Protocol
//!
//! - **Identity.** A name stable across restarts (`[A-Za-z0-9._-]`, up to 200 characters), such
//!   as the orchestrator's pod name. One identity is one process at a time: two live processes
//!   with the same identity would both commit, and nothing fences the older one off.
//! - **Journal.** A compacted topic (default `ferry.callers`, created with
//!   `cleanup.policy=compact` if missing). Records are keyed `<identity>/<request id>` and all
//!   of an identity's records go to the partition [`journal::partition_for`] picks. A request
//!   is `sending` (journaled *before* it is published), then `sent` (once the broker has
//!   acknowledged it), then `answered` (with the final reply) or `expired` (its deadline passed);
//!   a tombstone removes it when the application [acknowledges](DurableClient::ack) it. See
//!   [`journal`] for the format.
//! - **Replies.** Every request names this caller's reply topic as `reply_to`. The caller reads
//!   every partition of that topic as the consumer group `ferry-caller.<identity>`, committing
//!   manually, and never commits past a reply it still needs: a final reply is needed until its
//!   `answered` record is acknowledged by the journal, and the first chunk of a streamed answer
//!   until its request is finished (`commits.rs`). Replies for ids it does not track (other
//!   callers', acknowledged ones) and for finished requests (duplicates from a redelivered
//!   request) are skipped. A new identity commits its starting position, the topic's end,
//!   before its first request (`replies.rs`).
//! - **Restart.** [`DurableClient::open`] reads the identity's journal partition from the
//!   beginning to its end and rebuilds what is open: `sending` requests are published again
//!   (whether the broker got them is unknown; the worker side tolerates duplicates and the
//!   caller keeps one answer per id), `sent` ones are awaited without being sent again, and
//!   `answered` or `expired` ones are handed over at once. Replies that arrived while it was
//!   down are read from the group's committed position. Deadlines are absolute, stored in the
//!   journal, and checked only once the reply topic has been read to the end it had at start,
//!   so an answer that arrived in time wins over a deadline that passed during the downtime.
//!
//! # Delivery contract
//!
//! Each request's outcome (a response, an error reply, or expiry) is handed to the application
//! **at least once until the application acknowledges it** with [`DurableClient::ack`]: a
//! process that dies after receiving an outcome and before acknowledging it gets the same
//! outcome again after the restart. An application that must act exactly once acknowledges
//! after it has made its own effect durable, or makes the effect idempotent by request id. A
//! request is published more than once only when a caller died between journaling it and the
//! broker's acknowledgement; workers may answer a request more than once (a redelivery); in
//! every case the caller hands over one outcome per request, the first final reply it reads.
//!
//! Streamed text is not journaled: after a restart, the stream of a request that is still open
//! starts again from its first chunk (the group never commits past it), and the resume-safe
//! `seq` rule ([`StreamText`]) drops what a worker sends twice.
//!
//! # Limits
//!
//! - Request ids must be unique within the reply topic: a reply is matched by its key alone.
//!   Prefixing ids with the identity is a simple way.
//! - The journal's partition count must never change (see [`journal`]).
//! - An answer stays in the journal until it is acknowledged; the journal holds one record per
//!   open request, so it grows with requests left unacknowledged, not with traffic.
//! - If the journal cannot be written (the broker is unreachable beyond the delivery timeout),
//!   the client stops: it commits nothing more, fails every waiter, and a new
//!   [`DurableClient::open`] picks up from what Kafka holds.
//!
//! # Layout
//!
//! - `journal.rs`: the record format, keys, the partition hash and the fold of a partition into
//!   what is open; the journal's writer and reader.
//! - `commits.rs`: how far the group may commit (pure).
//! - `progress.rs`: the chunk rule, outcomes, and the events a request's readers see (pure).
//! - `replies.rs`: the reply consumer: its starting positions and its commits.
//! - `requests.rs`: the tracked requests, the decisions that move them, and the background
//!   tasks (reply reader, committer, deadlines).
//! - `client.rs`: [`DurableClient`], the public face: open (the restart), submit, wait, ack.

mod client;
mod commits;
pub mod journal;
mod progress;
mod replies;
mod requests;

use std::time::Duration;

use ferry_schemas::ValidationError;
use futures::stream::FuturesUnordered;
use futures::Stream;
use rdkafka::error::KafkaError;
use tokio::sync::watch;

use crate::client::ClientError;
use crate::topics::TopicError;
pub use client::DurableClient;
pub use journal::{EntryState, DEFAULT_JOURNAL_TOPIC};
use progress::Progress;
pub use progress::{Event, Events, Outcome, StreamText};
pub use replies::group_id;

/// How a [`DurableClient`] is set up.
#[derive(Debug, Clone)]
pub struct DurableOptions {
    /// The caller's name, stable across restarts; see the module documentation.
    pub identity: String,
    /// The topic every request's `reply_to` names, and that the caller reads. It must exist.
    pub reply_topic: String,
    /// The journal topic; created (compacted) if missing.
    pub journal_topic: String,
    /// Partitions of the journal topic when this client creates it. Never change it later.
    pub journal_partitions: i32,
    /// How long a request without a `deadline` is awaited, from its submission.
    pub default_timeout: Duration,
    /// How often the reply consumer's position is committed.
    pub commit_interval: Duration,
    /// How long [`DurableClient::open`] may take (topic creation, journal read, offsets).
    pub open_timeout: Duration,
}

impl DurableOptions {
    /// Options with the defaults: journal `ferry.callers` (3 partitions when created), requests
    /// awaited for 120 s, commits every 200 ms, 30 s to open.
    pub fn new(identity: impl Into<String>, reply_topic: impl Into<String>) -> Self {
        DurableOptions {
            identity: identity.into(),
            reply_topic: reply_topic.into(),
            journal_topic: DEFAULT_JOURNAL_TOPIC.to_string(),
            journal_partitions: 3,
            default_timeout: Duration::from_secs(120),
            commit_interval: Duration::from_millis(200),
            open_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a durable client could not open, submit, wait or acknowledge.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// The identity is empty, too long, or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid caller identity {identity:?}: {reason}")]
    InvalidIdentity { identity: String, reason: &'static str },
    /// The journal topic could not be created.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The reply topic is missing, or its partitions could not be read. (Boxed, as in
    /// `Publish`, to keep every `Result` of this module small.)
    #[error(transparent)]
    Client(Box<ClientError>),
    /// librdkafka refused a configuration or an operation.
    #[error("could not {what}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    /// A journal entry could not be serialised (it holds a value JSON cannot express).
    #[error("could not serialise the journal entry of request {id}")]
    Serialize {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// The journal did not take a record; the client stops (see the module documentation).
    #[error("could not write the journal record of request {id}")]
    JournalWrite {
        id: String,
        #[source]
        source: KafkaError,
    },
    /// The journal partition could not be read to its end before the open deadline.
    #[error(
        "read {read} records of journal partition {topic}/{partition} (ending at offset {end}) before the deadline"
    )]
    JournalRead {
        topic: String,
        partition: i32,
        read: usize,
        end: i64,
    },
    /// A submitted request breaks a rule of the contract; nothing was journaled or published.
    #[error("request {id} is invalid")]
    Invalid {
        id: String,
        #[source]
        source: ValidationError,
    },
    /// A submitted request names another reply topic than the one this client reads.
    #[error("request {id} names reply topic {reply_to}, but this caller reads {expected}")]
    ReplyTopicMismatch {
        id: String,
        reply_to: String,
        expected: String,
    },
    /// A submitted id is already tracked (open, or answered and not yet acknowledged).
    #[error("request {id} is already tracked by this caller")]
    Duplicate { id: String },
    /// The request is journaled but could not be published; it stays `sending`, so a restarted
    /// caller publishes it again (or the application acknowledges it to give up).
    #[error("request {id} could not be published; it stays journaled as sending")]
    Publish {
        id: String,
        #[source]
        source: Box<ClientError>,
    },
    /// No request with this id is tracked.
    #[error("no request {id} is tracked by this caller")]
    Unknown { id: String },
    /// The request was acknowledged, or the client stopped, before it had an outcome.
    #[error("request {id} was acknowledged, or the client stopped, before it had an outcome")]
    Gone { id: String },
    /// The client stopped after a journal failure; open a new one.
    #[error("the durable client stopped: {reason}")]
    Stopped { reason: String },
    /// A blocking Kafka call panicked or was cancelled.
    #[error("a background Kafka task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl From<ClientError> for DurableError {
    fn from(error: ClientError) -> Self {
        DurableError::Client(Box::new(error))
    }
}

/// Wraps a librdkafka error with what was being done.
pub(crate) fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> DurableError {
    move |source| DurableError::Kafka { what, source }
}

/// A request the caller tracks, as [`DurableClient::pending`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    pub id: String,
    /// The request topic.
    pub topic: String,
    /// As the journal has it (a request whose final reply is being journaled shows `sent`).
    pub state: EntryState,
    /// Milliseconds since the Unix epoch.
    pub deadline_ms: i64,
    /// Whether it came from the journal when the client opened, rather than from a submission.
    pub recovered: bool,
}

/// One request's outcome and events. Cheap to clone; any number may exist for one request.
#[derive(Debug, Clone)]
pub struct Handle {
    id: String,
    progress: watch::Receiver<Progress>,
}

impl Handle {
    /// The request's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The outcome, if there is one yet.
    pub fn outcome_now(&self) -> Option<Outcome> {
        self.progress.borrow().outcome.clone()
    }

    /// Waits for the outcome: a final reply, or expiry at the request's deadline.
    pub async fn outcome(&self) -> Result<Outcome, DurableError> {
        let mut progress = self.progress.clone();
        let gone = || DurableError::Gone { id: self.id.clone() };
        let done = progress
            .wait_for(|p| p.outcome.is_some())
            .await
            .map_err(|_closed| gone())?;
        done.outcome.clone().ok_or_else(gone)
    }

    /// The request's events: streamed text as it arrives, then the outcome.
    pub fn events(&self) -> Events {
        Events::new(self.progress.clone())
    }
}

/// The outcomes of `handles` in the order they come, each with its request id.
pub fn completions(handles: Vec<Handle>) -> impl Stream<Item = (String, Result<Outcome, DurableError>)> + Unpin {
    handles
        .into_iter()
        .map(|handle| async move {
            let outcome = handle.outcome().await;
            (handle.id, outcome)
        })
        .collect::<FuturesUnordered<_>>()
}

/// Checks an identity against the rules in the module documentation.
pub fn validate_identity(identity: &str) -> Result<(), DurableError> {
    let invalid = |reason| DurableError::InvalidIdentity {
        identity: identity.to_string(),
        reason,
    };
    if identity.is_empty() || identity.len() > 200 {
        return Err(invalid("it must be 1 to 200 characters long"));
    }
    if !identity
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid("it may contain only ASCII letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    unix_ms(time::OffsetDateTime::now_utc())
}

pub(crate) fn unix_ms(at: time::OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_names_safe_in_keys_and_group_ids() {
        for ok in ["orchestrator-0", "a", "pod_1.ns", &"x".repeat(200)] {
            assert!(validate_identity(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "with space", "ünï", &"x".repeat(201)] {
            assert!(validate_identity(bad).is_err(), "{bad}");
        }
        assert_eq!(group_id("orchestrator-0"), "ferry-caller.orchestrator-0");
    }
}
