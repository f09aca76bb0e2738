//! The requests a caller tracks: their phases, the decisions that move them (a reply read, a
//! deadline passed, a publish acknowledged), each taken under one lock with its journal record
//! queued in the same breath, and the background tasks that feed them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ferry_schemas::{Reply, Request};
use futures::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::error::KafkaError;
use rdkafka::producer::DeliveryFuture;
use rdkafka::Message as _;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, warn};

use super::commits::CommitTracker;
use super::journal::{self, Entry, EntryState, JournalWriter, ENTRY_VERSION};
use super::progress::{Outcome, Progress};
use super::replies::{self, ReplyConsumer};
use super::{now_ms, DurableError, DurableOptions, Handle};
use crate::client::Client;

/// How long one offset commit may take before it is retried at the next interval.
pub(super) const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest the reply reader waits without polling the consumer itself.
const REPOLL_INTERVAL: Duration = Duration::from_secs(1);

/// How long the deadline task sleeps when nothing is due sooner; it is also woken by every
/// submission.
const IDLE_WAKE: Duration = Duration::from_secs(60);

/// State shared by the client and its tasks.
pub(super) struct Shared {
    pub(super) options: DurableOptions,
    /// Publishes requests.
    pub(super) client: Client,
    pub(super) journal: JournalWriter,
    pub(super) state: Mutex<State>,
    /// True once every reply partition has been read to its end once since opening.
    pub(super) caught_up: watch::Sender<bool>,
    /// Wakes the deadline task when requests are added.
    pub(super) deadlines: Notify,
}

/// Every decision that writes to the journal is taken, and its record queued, under this lock,
/// so the journal's order is the order of the decisions.
pub(super) struct State {
    pub(super) requests: HashMap<String, Tracked>,
    pub(super) commits: CommitTracker,
    /// Why the client stopped; once set, nothing is committed or journaled again.
    pub(super) stopped: Option<String>,
}

/// A request between its submission (or recovery) and its acknowledgement.
pub(super) struct Tracked {
    pub(super) topic: String,
    pub(super) request: Arc<Request>,
    pub(super) deadline_ms: i64,
    pub(super) phase: Phase,
    /// The first chunk read for it, held uncommitted until it is finished.
    pub(super) first_chunk: Option<(i32, i64)>,
    pub(super) recovered: bool,
    pub(super) progress: watch::Sender<Progress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Journaled `sending`; being published.
    Sending,
    /// Published and journaled `sent` (or its `sent` record is queued).
    Sent,
    /// Its `answered` or `expired` record is queued; the outcome is not handed out before the
    /// journal has it.
    Finishing,
    /// The outcome is in the journal and in `progress`.
    Finished,
}

impl Tracked {
    pub(super) fn entry(&self, state: EntryState, reply: Option<Reply>) -> Entry {
        Entry {
            version: ENTRY_VERSION,
            state,
            topic: self.topic.clone(),
            deadline_ms: self.deadline_ms,
            request: (*self.request).clone(),
            reply,
        }
    }

    pub(super) fn journal_state(&self) -> EntryState {
        match self.phase {
            Phase::Sending => EntryState::Sending,
            Phase::Sent | Phase::Finishing => EntryState::Sent,
            Phase::Finished => match self.progress.borrow().outcome {
                Some(Outcome::Expired { .. }) => EntryState::Expired,
                _ => EntryState::Answered,
            },
        }
    }
}

/// An outcome whose journal record is queued; confirming it finishes the request.
pub(super) struct Finishing {
    pub(super) id: String,
    /// Reply offsets to release once the record is in the journal.
    pub(super) holds: Vec<(i32, i64)>,
    pub(super) outcome: Outcome,
    pub(super) delivery: Result<DeliveryFuture, DurableError>,
}

/// The tracked form of a request read from the journal.
pub(super) fn recovered_request(entry: Entry) -> Tracked {
    let id = entry.request.id.clone();
    let outcome = match (entry.state, entry.reply) {
        (EntryState::Answered, Some(reply)) => Some(Outcome::Reply(reply)),
        (EntryState::Expired, _) => Some(Outcome::Expired {
            id,
            deadline_ms: entry.deadline_ms,
        }),
        _ => None,
    };
    let phase = match (entry.state, &outcome) {
        (_, Some(_)) => Phase::Finished,
        (EntryState::Sending, None) => Phase::Sending,
        // `answered` without its reply cannot be written by this client; await the reply again.
        (_, None) => Phase::Sent,
    };
    let mut progress = Progress::default();
    if let Some(Outcome::Reply(Reply::Response(response))) = &outcome {
        progress.stream.finish(&response.text);
    }
    progress.outcome = outcome;
    Tracked {
        topic: entry.topic,
        request: Arc::new(entry.request),
        deadline_ms: entry.deadline_ms,
        phase,
        first_chunk: None,
        recovered: true,
        progress: watch::Sender::new(progress),
    }
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn stopped_error(&self) -> DurableError {
        self.stopped_error_in(&self.lock())
    }

    pub(super) fn stopped_error_in(&self, state: &State) -> DurableError {
        DurableError::Stopped {
            reason: state.stopped.clone().unwrap_or_else(|| "unknown".into()),
        }
    }

    /// Stops the client after a journal failure: nothing is committed or journaled again, and
    /// every waiter is told (their senders are dropped).
    pub(super) fn stop(&self, state: &mut State, error: &DurableError) {
        if state.stopped.is_none() {
            error!(identity = %self.options.identity, error = %error, "the journal failed; the durable caller stops");
            state.stopped = Some(error.to_string());
        }
        state.requests.clear();
    }

    pub(super) fn handle(&self, id: &str) -> Option<Handle> {
        let state = self.lock();
        state.requests.get(id).map(|t| Handle {
            id: id.to_string(),
            progress: t.progress.subscribe(),
        })
    }

    /// Tracks new requests and queues their `sending` records, all under one lock.
    pub(super) fn journal_new(
        &self,
        topic: &str,
        prepared: Vec<(Request, i64)>,
    ) -> Result<Vec<(String, DeliveryFuture)>, DurableError> {
        let mut state = self.lock();
        if state.stopped.is_some() {
            return Err(self.stopped_error_in(&state));
        }
        if let Some((request, _)) = prepared.iter().find(|(r, _)| state.requests.contains_key(&r.id)) {
            return Err(DurableError::Duplicate { id: request.id.clone() });
        }
        let mut deliveries = Vec::with_capacity(prepared.len());
        for (request, deadline_ms) in prepared {
            let tracked = Tracked {
                topic: topic.to_string(),
                request: Arc::new(request),
                deadline_ms,
                phase: Phase::Sending,
                first_chunk: None,
                recovered: false,
                progress: watch::Sender::new(Progress::default()),
            };
            let id = tracked.request.id.clone();
            match self
                .journal
                .enqueue(&id, Some(&tracked.entry(EntryState::Sending, None)))
            {
                Ok(delivery) => deliveries.push((id.clone(), delivery)),
                Err(error) => {
                    self.stop(&mut state, &error);
                    return Err(error);
                }
            }
            state.requests.insert(id, tracked);
        }
        Ok(deliveries)
    }

    /// Publishes a request journaled as `sending`, then journals it as `sent`.
    pub(super) async fn publish(&self, id: &str) -> Result<(), DurableError> {
        let (topic, request) = {
            let state = self.lock();
            match state.requests.get(id) {
                Some(t) if t.phase == Phase::Sending => (t.topic.clone(), Arc::clone(&t.request)),
                // Expired or acknowledged meanwhile: nothing to send.
                _ => return Ok(()),
            }
        };
        let published = self
            .client
            .publish(&topic, &request)
            .await
            .map_err(|source| DurableError::Publish {
                id: id.to_string(),
                source: Box::new(source),
            })?;
        debug!(
            request_id = id,
            topic,
            partition = published.partition,
            offset = published.offset,
            "request published"
        );
        let delivery = {
            let mut state = self.lock();
            let Some(tracked) = state.requests.get_mut(id) else {
                return Ok(());
            };
            // A fast answer may already be journaled; `sent` would then overwrite it.
            if tracked.phase != Phase::Sending {
                return Ok(());
            }
            tracked.phase = Phase::Sent;
            let entry = tracked.entry(EntryState::Sent, None);
            self.journal.enqueue(id, Some(&entry))
        };
        let result = match delivery {
            Ok(delivery) => journal::confirm(id, delivery).await,
            Err(error) => Err(error),
        };
        if let Err(error) = &result {
            self.stop(&mut self.lock(), error);
        }
        result
    }

    /// Routes one reply message; returns the journal write that will finish its request, when
    /// it is a final reply for an open one.
    pub(super) fn on_message(
        &self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Option<Finishing> {
        let mut guard = self.lock();
        let State {
            requests,
            commits,
            stopped,
        } = &mut *guard;
        if stopped.is_some() {
            return None;
        }
        let Some(id) = key.and_then(|key| std::str::from_utf8(key).ok()) else {
            commits.read(partition, offset, false);
            return None;
        };
        let Some(tracked) = requests.get_mut(id) else {
            // Another caller's reply, or one for a request already acknowledged.
            commits.read(partition, offset, false);
            return None;
        };
        if !matches!(tracked.phase, Phase::Sending | Phase::Sent) {
            // A duplicate answer (a redelivered request), or a late one after expiry.
            commits.read(partition, offset, false);
            return None;
        }
        let reply = match serde_json::from_slice::<Reply>(payload.unwrap_or_default()) {
            Ok(reply) if reply.id() == id => reply,
            Ok(reply) => {
                warn!(
                    request_id = id,
                    body_id = reply.id(),
                    partition,
                    offset,
                    "skipping a reply whose body names another request than its key"
                );
                commits.read(partition, offset, false);
                return None;
            }
            Err(error) => {
                warn!(request_id = id, partition, offset, %error, "skipping a message that is not a reply");
                commits.read(partition, offset, false);
                return None;
            }
        };
        match reply {
            Reply::Chunk(chunk) => {
                let first = tracked.first_chunk.is_none();
                if first {
                    tracked.first_chunk = Some((partition, offset));
                }
                tracked
                    .progress
                    .send_if_modified(|progress| progress.stream.push(chunk.seq, &chunk.text));
                commits.read(partition, offset, first);
                None
            }
            reply => {
                tracked.phase = Phase::Finishing;
                let entry = tracked.entry(EntryState::Answered, Some(reply.clone()));
                let delivery = self.journal.enqueue(id, Some(&entry));
                commits.read(partition, offset, true);
                let mut holds = vec![(partition, offset)];
                holds.extend(tracked.first_chunk);
                Some(Finishing {
                    id: id.to_string(),
                    holds,
                    outcome: Outcome::Reply(reply),
                    delivery,
                })
            }
        }
    }

    /// Marks every open request past its deadline as finishing and queues its `expired`
    /// record. Returns those, and the nearest deadline still ahead.
    pub(super) fn expire_due(&self, now_ms: i64) -> (Vec<Finishing>, Option<i64>) {
        let mut state = self.lock();
        if state.stopped.is_some() {
            return (Vec::new(), None);
        }
        let mut due = Vec::new();
        let mut next: Option<i64> = None;
        for (id, tracked) in state.requests.iter_mut() {
            if !matches!(tracked.phase, Phase::Sending | Phase::Sent) {
                continue;
            }
            if tracked.deadline_ms > now_ms {
                next = Some(next.map_or(tracked.deadline_ms, |n| n.min(tracked.deadline_ms)));
                continue;
            }
            tracked.phase = Phase::Finishing;
            let entry = tracked.entry(EntryState::Expired, None);
            due.push(Finishing {
                id: id.clone(),
                holds: tracked.first_chunk.into_iter().collect(),
                outcome: Outcome::Expired {
                    id: id.clone(),
                    deadline_ms: tracked.deadline_ms,
                },
                delivery: self.journal.enqueue(id, Some(&entry)),
            });
        }
        (due, next)
    }

    /// Waits for an outcome's journal record, then releases its reply offsets and hands the
    /// outcome out. A journal failure stops the client instead.
    pub(super) async fn finish(&self, finishing: Finishing) {
        let Finishing {
            id,
            holds,
            outcome,
            delivery,
        } = finishing;
        let result = match delivery {
            Ok(delivery) => journal::confirm(&id, delivery).await,
            Err(error) => Err(error),
        };
        let mut state = self.lock();
        if let Err(error) = result {
            self.stop(&mut state, &error);
            return;
        }
        for (partition, offset) in holds {
            state.commits.release(partition, offset);
        }
        let Some(tracked) = state.requests.get_mut(&id) else {
            return;
        };
        if tracked.phase != Phase::Finishing {
            return;
        }
        tracked.phase = Phase::Finished;
        debug!(request_id = %id, outcome = ?outcome_kind(&outcome), "request finished");
        tracked.progress.send_modify(|progress| {
            if let Outcome::Reply(Reply::Response(response)) = &outcome {
                if !progress.stream.finish(&response.text) {
                    warn!(request_id = %id, "the streamed chunks are not a prefix of the final text; the final text stands");
                }
            }
            progress.outcome = Some(outcome);
        });
    }
}

pub(super) fn outcome_kind(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Reply(reply) => reply.kind(),
        Outcome::Expired { .. } => "expired",
    }
}

mod tasks;
pub(super) use tasks::{commit_positions, expire_deadlines, read_replies};

#[cfg(test)]
mod tests;
