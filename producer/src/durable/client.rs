//! [`DurableClient`]: opening a caller (the restart procedure), submitting, waiting,
//! acknowledging and closing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_schemas::Request;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::commits::CommitTracker;
use super::journal::{self, EntryState, JournalWriter};
use super::requests::{
    commit_positions, expire_deadlines, read_replies, recovered_request, Shared, State, Tracked, COMMIT_TIMEOUT,
};
use super::{
    group_id, kafka, millis, now_ms, replies, unix_ms, validate_identity, DurableError, DurableOptions, Events, Handle,
    Outcome, PendingRequest,
};
use crate::client::{Client, KafkaConfig};
use crate::topics;

/// The durable caller; see the module documentation. Dropping it stops its background tasks
/// without a final commit (the restart reads a little more again); [`DurableClient::close`]
/// commits first.
pub struct DurableClient {
    shared: Arc<Shared>,
    /// Shared with the reader and commit tasks; kept here for the final commit.
    consumer: Arc<replies::ReplyConsumer>,
    /// The reply reader, the committer and the deadline watcher; aborted on drop.
    tasks: JoinSet<()>,
    /// What the journal held at opening, as it held it (the live states move on at once).
    recovered: Vec<PendingRequest>,
}

impl DurableClient {
    /// Opens the caller: creates the journal topic if needed, reads this identity's journal,
    /// positions the reply consumer at the group's committed offsets, starts reading, and
    /// publishes again the requests journaled as `sending`.
    pub async fn open(config: KafkaConfig, options: DurableOptions) -> Result<Self, DurableError> {
        validate_identity(&options.identity)?;
        let deadline = Instant::now() + options.open_timeout;
        let partitions = topics::create_topic_with_config(
            &config.bootstrap_servers,
            &options.journal_topic,
            options.journal_partitions,
            &[("cleanup.policy", "compact")],
            options.open_timeout,
        )
        .await?;
        let partition = journal::partition_for(&options.identity, i32::try_from(partitions).unwrap_or(i32::MAX));
        let recovered = {
            let (config, topic, identity) = (config.clone(), options.journal_topic.clone(), options.identity.clone());
            tokio::task::spawn_blocking(move || {
                journal::read_partition(&config, &topic, partition, &identity, deadline.into_std())
            })
            .await??
        };
        let journal_has_pending = recovered.entries.values().any(|e| e.state.is_pending());
        let consumer = replies::consumer(&config, &group_id(&options.identity))?;
        let (consumer, starts) = {
            let topic = options.reply_topic.clone();
            tokio::task::spawn_blocking(move || {
                replies::assign_from_committed(&consumer, &topic, journal_has_pending, deadline.into_std())
                    .map(|starts| (consumer, starts))
            })
            .await??
        };
        let consumer = Arc::new(consumer);
        let mut commits = CommitTracker::default();
        for &(partition, offset) in &starts {
            commits.start(partition, offset);
        }
        let mut requests = HashMap::new();
        let mut resend = Vec::new();
        for (id, entry) in recovered.entries {
            if entry.request.reply_to.as_deref() != Some(options.reply_topic.as_str()) {
                warn!(
                    request_id = %id,
                    reply_to = ?entry.request.reply_to,
                    reply_topic = %options.reply_topic,
                    "a recovered request names another reply topic; its answer will not be read here"
                );
            }
            if entry.state == EntryState::Sending {
                resend.push(id.clone());
            }
            requests.insert(id, recovered_request(entry));
        }
        let recovered = pending_of(&requests);
        let journal = JournalWriter::new(&config, &options.journal_topic, partition, &options.identity)?;
        info!(
            identity = %options.identity,
            journal_topic = %options.journal_topic,
            journal_partition = partition,
            reply_topic = %options.reply_topic,
            recovered = requests.len(),
            republishing = resend.len(),
            "durable caller open"
        );
        let shared = Arc::new(Shared {
            client: Client::new(config)?,
            journal,
            state: Mutex::new(State {
                requests,
                commits,
                stopped: None,
            }),
            caught_up: watch::Sender::new(false),
            deadlines: Notify::new(),
            options,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(read_replies(Arc::clone(&shared), Arc::clone(&consumer), starts.len()));
        tasks.spawn(commit_positions(
            Arc::clone(&shared),
            Arc::clone(&consumer),
            starts.into_iter().collect(),
        ));
        tasks.spawn(expire_deadlines(Arc::clone(&shared)));
        let client = DurableClient {
            shared,
            consumer,
            tasks,
            recovered,
        };
        let published = futures::future::join_all(resend.iter().map(|id| client.shared.publish(id))).await;
        published.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(client)
    }

    /// The caller's identity.
    pub fn identity(&self) -> &str {
        &self.shared.options.identity
    }

    /// Every request tracked and not yet acknowledged, by id, in its state now: right after
    /// [`DurableClient::open`], what the journal held, though replies read since may already
    /// have moved some on (see [`DurableClient::recovered`] for the journal as it was).
    pub fn pending(&self) -> Vec<PendingRequest> {
        pending_of(&self.shared.lock().requests)
    }

    /// What this identity's journal held when the client opened, in the states it held them:
    /// the requests a predecessor left open, and its outcomes not yet acknowledged.
    pub fn recovered(&self) -> &[PendingRequest] {
        &self.recovered
    }

    /// Journals and publishes one request to `topic`, awaited until its `deadline` or, without
    /// one, for the default timeout. Its `reply_to` becomes this caller's reply topic when
    /// unset. Returns once the broker has the request.
    pub async fn submit(&self, topic: &str, request: Request) -> Result<Handle, DurableError> {
        self.submit_all_with_timeout(topic, vec![request], None)
            .await?
            .pop()
            .ok_or_else(|| DurableError::Stopped {
                reason: "the request vanished while it was submitted".into(),
            })
    }

    /// [`DurableClient::submit`] with its own timeout (used when the request has no `deadline`).
    pub async fn submit_with_timeout(
        &self,
        topic: &str,
        request: Request,
        timeout: Duration,
    ) -> Result<Handle, DurableError> {
        let id = request.id.clone();
        self.submit_all_with_timeout(topic, vec![request], Some(timeout))
            .await?
            .pop()
            .ok_or_else(|| DurableError::Gone { id })
    }

    /// A fan-out: journals every request as `sending` first (nothing is published if one is
    /// invalid or a duplicate), then publishes them all at once. The handles are in the order of
    /// `requests`.
    pub async fn submit_all(&self, topic: &str, requests: Vec<Request>) -> Result<Vec<Handle>, DurableError> {
        self.submit_all_with_timeout(topic, requests, None).await
    }

    /// [`DurableClient::submit_all`] with a timeout for requests without a `deadline`.
    pub async fn submit_all_with_timeout(
        &self,
        topic: &str,
        requests: Vec<Request>,
        timeout: Option<Duration>,
    ) -> Result<Vec<Handle>, DurableError> {
        let options = &self.shared.options;
        let timeout_ms = millis(timeout.unwrap_or(options.default_timeout));
        let now = now_ms();
        let mut prepared = Vec::with_capacity(requests.len());
        let mut ids = HashSet::new();
        for mut request in requests {
            match request.reply_to.as_deref() {
                None => request.reply_to = Some(options.reply_topic.clone()),
                Some(reply_to) if reply_to == options.reply_topic => {}
                Some(reply_to) => {
                    return Err(DurableError::ReplyTopicMismatch {
                        id: request.id.clone(),
                        reply_to: reply_to.to_string(),
                        expected: options.reply_topic.clone(),
                    })
                }
            }
            request.validate().map_err(|source| DurableError::Invalid {
                id: request.id.clone(),
                source,
            })?;
            if !ids.insert(request.id.clone()) {
                return Err(DurableError::Duplicate { id: request.id });
            }
            let deadline_ms = request.deadline.map_or(now.saturating_add(timeout_ms), unix_ms);
            prepared.push((request, deadline_ms));
        }
        let deliveries = self.shared.journal_new(topic, prepared)?;
        self.shared.deadlines.notify_one();
        let ids: Vec<String> = deliveries.iter().map(|(id, _)| id.clone()).collect();
        let confirmed = futures::future::join_all(
            deliveries
                .into_iter()
                .map(|(id, delivery)| async move { journal::confirm(&id, delivery).await }),
        )
        .await;
        if let Some(error) = confirmed.into_iter().find_map(Result::err) {
            self.shared.stop(&mut self.shared.lock(), &error);
            return Err(error);
        }
        let handles: Vec<Handle> = ids.iter().filter_map(|id| self.shared.handle(id)).collect();
        let published = futures::future::join_all(ids.iter().map(|id| self.shared.publish(id))).await;
        published.into_iter().collect::<Result<Vec<()>, _>>()?;
        if handles.len() != ids.len() {
            return Err(self.shared.stopped_error());
        }
        Ok(handles)
    }

    /// The handle of a tracked request (a recovered one, for example).
    pub fn handle(&self, id: &str) -> Option<Handle> {
        self.shared.handle(id)
    }

    /// Waits for the outcome of a tracked request.
    pub async fn wait(&self, id: &str) -> Result<Outcome, DurableError> {
        let handle = self
            .handle(id)
            .ok_or_else(|| DurableError::Unknown { id: id.to_string() })?;
        handle.outcome().await
    }

    /// The events of a tracked request; see [`Events`].
    pub fn events(&self, id: &str) -> Option<Events> {
        self.handle(id).map(|handle| handle.events())
    }

    /// Acknowledges a request's outcome, or gives up on a request still open: writes its
    /// tombstone and forgets it. Later replies for it are skipped, and a restart does not
    /// report it again. Returns once the journal has the tombstone.
    pub async fn ack(&self, id: &str) -> Result<(), DurableError> {
        let delivery = {
            let mut state = self.shared.lock();
            if state.stopped.is_some() {
                return Err(self.shared.stopped_error_in(&state));
            }
            let Some(tracked) = state.requests.remove(id) else {
                return Err(DurableError::Unknown { id: id.to_string() });
            };
            if let Some((partition, offset)) = tracked.first_chunk {
                state.commits.release(partition, offset);
            }
            self.shared.journal.enqueue(id, None)
        };
        let result = match delivery {
            Ok(delivery) => journal::confirm(id, delivery).await,
            Err(error) => Err(error),
        };
        if let Err(error) = &result {
            self.shared.stop(&mut self.shared.lock(), error);
        }
        result
    }

    /// [`DurableClient::ack`] under the name that fits giving up on a request still open: its
    /// answer, if one comes, is ignored, and a restart does not report it.
    pub async fn forget(&self, id: &str) -> Result<(), DurableError> {
        self.ack(id).await
    }

    /// Stops reading, commits the final positions and flushes the journal. Requests still open
    /// stay in the journal for the next [`DurableClient::open`].
    pub async fn close(mut self) -> Result<(), DurableError> {
        self.tasks.shutdown().await;
        let positions = {
            let state = self.shared.lock();
            if state.stopped.is_some() {
                return Err(self.shared.stopped_error_in(&state));
            }
            state.commits.positions()
        };
        replies::commit(
            &self.consumer,
            &self.shared.options.reply_topic,
            &positions,
            Some(COMMIT_TIMEOUT),
        )
        .await?;
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.journal.flush(COMMIT_TIMEOUT))
            .await?
            .map_err(kafka("flush the journal"))?;
        debug!(identity = %self.shared.options.identity, ?positions, "durable caller closed");
        Ok(())
    }
}

/// The tracked requests as [`PendingRequest`]s, by id.
fn pending_of(requests: &HashMap<String, Tracked>) -> Vec<PendingRequest> {
    let mut pending: Vec<PendingRequest> = requests
        .iter()
        .map(|(id, t)| PendingRequest {
            id: id.clone(),
            topic: t.topic.clone(),
            state: t.journal_state(),
            deadline_ms: t.deadline_ms,
            recovered: t.recovered,
        })
        .collect();
    pending.sort_by(|a, b| a.id.cmp(&b.id));
    pending
}
