//! One request, from its message to a settled offset: parse, look for a stored answer, count
//! the attempt, generate (resuming from a snapshot when there is one), stream chunks, publish
//! the answer (or hand the request to the fallback topic when this worker cannot serve it),
//! then commit it or leave a done marker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_schemas::{headers, Chunk, ErrorCode, FinishReason, Reply, Request, SCHEMA_VERSION};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn, Instrument};

use super::fallback::{self, Handoff};
use super::inflight::InFlight;
use super::publish::{PublishError, Publisher, Refused, RefusedKind};
use super::transaction::{self, Scope, Settled, Transactions};
use super::{WorkerConsumer, WorkerError};
use crate::engine::{
    Checkpoint, Completion, Engine, EngineHandle, Finish, Job, JobControl, Outcome, Prepared, StreamChunk,
};
use crate::intake::{self, Invalid};
use crate::model::ModelError;
use crate::offsets::TopicPartition;
use crate::ops::metrics::Answered;
use crate::ops::trace::{new_span_id, Propagation};
use crate::ops::{FallbackReason, Ops, RequestOutcome};
use crate::reply::{self, WorkContext};
use crate::reply_topics::ReplyTopicPolicy;
use crate::snapshot::format::request_prefix;
use crate::snapshot::ledger::{AttemptEntry, AttemptError, AttemptLog, EntryOutcome};
use crate::snapshot::Snapshots;

/// Everything a request task uses, shared by all of them.
pub struct Inner {
    pub consumer: WorkerConsumer,
    pub publisher: Publisher,
    /// Which reply topics a request may name ([`crate::reply_topics`]).
    pub reply_policy: ReplyTopicPolicy,
    /// The attempts this worker has begun and not ended, by request prefix: a controlled exit
    /// closes them as suspended ([`Inner::close_open_attempts`]), so that only real deaths
    /// count against a request's budget.
    pub open_attempts: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    pub engine: Engine,
    pub engine_thread: EngineHandle,
    /// Where replies go for requests that name no `reply_to`.
    pub reply_topic: String,
    /// One dead-letter topic for every lane, when configured; else `<topic>.dlq` per lane.
    pub dead_letter_topic: Option<String>,
    /// Where requests this worker cannot serve for a reason of its own go (`--fallback-topic`).
    pub fallback_topic: Option<String>,
    /// The durable store's service, or [`Snapshots::none`] without one.
    pub snapshots: Snapshots,
    pub inflight: Arc<InFlight>,
    pub max_attempts: u32,
    /// Generations hold it shared; a suspect (a request an earlier attempt of which died with
    /// its worker) holds it alone, so if it crashes this worker too, it takes no bystander
    /// down with it, and only the suspect's attempt budget is spent.
    pub isolation: tokio::sync::RwLock<()>,
    /// Memory admission: a generation starts only when its worst-case KV cache fits.
    pub kv_budget: super::admission::KvBudget,
    /// Metrics, and the health state the circuit breaker reports to.
    pub ops: Arc<Ops>,
}

/// How serving a message ended.
enum Served {
    /// Answered, dead-lettered with an error reply, or handed to the fallback topic: its offset
    /// may be committed. `prefix` names its snapshot-store entries; `reply` is the final reply as
    /// published, kept as a done marker when the offset cannot be committed yet (a handoff has
    /// none: its ledger entry does that job).
    Answered {
        prefix: Option<String>,
        reply: Option<Vec<u8>>,
    },
    /// Suspended by a drain or a revocation, its state in a snapshot: left uncommitted.
    Suspended,
}

impl Served {
    fn rejected() -> Self {
        Served::Answered {
            prefix: None,
            reply: None,
        }
    }
}

/// The right to generate, held for one attempt.
#[allow(dead_code)] // Held for its drop.
enum Slot<'a> {
    Shared(tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// How one generation attempt ended.
enum Generated {
    Finished {
        completion: Completion,
        resumed_from: Option<u32>,
    },
    Suspended,
    Failed(ModelError),
}

impl Inner {
    /// Serves a message and settles its offset. Runs as its own task.
    pub async fn process(
        self: Arc<Self>,
        msg: OwnedMessage,
        epoch: u64,
        control: Arc<JobControl>,
    ) -> Result<(), WorkerError> {
        let tp: TopicPartition = (msg.topic().to_string(), msg.partition());
        let _in_flight = self.ops.metrics.request_started();
        let span = tracing::info_span!(
            "message",
            topic = %tp.0,
            partition = tp.1,
            offset = msg.offset(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        let trace = Propagation::from_headers(
            header(&msg, headers::TRACEPARENT),
            header(&msg, headers::TRACESTATE),
            new_span_id(),
        );
        if let Ok(Some(t)) = &trace {
            span.record("trace_id", t.own.trace_id_hex());
            span.record("span_id", t.own.span_id_hex());
            span.record("parent_span_id", t.parent.span_id_hex());
        }
        let scope = self.publisher.transactions.as_ref().map(|_| {
            Arc::new(Scope::new(
                tp.clone(),
                msg.offset(),
                epoch,
                control.clone(),
                self.inflight.clone(),
            ))
        });
        // The generation's slot, held until the request is settled (see `answer`).
        let mut held = None;
        let result = transaction::within(scope.clone(), async {
            let trace = trace.unwrap_or_else(|e| {
                debug!(error = %e, "ignoring an invalid traceparent header");
                None
            });
            let served = self.serve(&msg, trace.as_ref(), control, &mut held).await;
            match (served, &scope, &self.publisher.transactions) {
                (Ok(Served::Answered { prefix, .. }), Some(scope), Some(txns)) => {
                    self.settle_in_transaction(txns, scope, &tp, msg.offset(), epoch, prefix)
                        .await?;
                }
                (Ok(Served::Answered { prefix, reply }), _, _) => {
                    self.settle_answered(&tp, msg.offset(), epoch, prefix, reply).await;
                }
                (Ok(Served::Suspended), _, _) => self.ops.metrics.request_settled(RequestOutcome::Suspended),
                (Err(e), _, _) => return Err(e),
            }
            Ok(())
        })
        .instrument(span)
        .await;
        drop(held);
        // Whatever is still open in this request's transaction (it failed, or suspended after
        // publishing) is aborted: none of it becomes visible.
        let result = match (&scope, &self.publisher.transactions) {
            (Some(scope), Some(txns)) => match txns.abort(scope).await {
                Ok(()) => result,
                Err(e) => result.and(Err(e)),
            },
            _ => result,
        };
        self.inflight.settle(&tp, msg.offset());
        result
    }

    /// Exactly-once delivery: commits the request's records with its offset in its transaction
    /// ([`transaction`]), then deletes its store entries. A request told to suspend before its
    /// turn keeps a plain answer as a done marker for the partition's next owner.
    async fn settle_in_transaction(
        &self,
        txns: &Transactions,
        scope: &Scope,
        tp: &TopicPartition,
        offset: i64,
        epoch: u64,
        prefix: Option<String>,
    ) -> Result<(), WorkerError> {
        match txns.commit(scope, &self.consumer).await? {
            Settled::Committed => {
                let prefixes = match self.inflight.finish(tp, offset, epoch, prefix.as_deref()) {
                    Some((_, prefixes)) => prefixes,
                    // Revoked since the commit: its entries are still the committed request's.
                    None => prefix.into_iter().collect(),
                };
                self.delete_all(prefixes).await;
            }
            Settled::Suspended => {
                if let Some(answer) = scope.answer_only().await {
                    self.keep_done(prefix.as_deref(), Some(&answer)).await;
                }
                self.ops.metrics.request_settled(RequestOutcome::Suspended);
            }
        }
        Ok(())
    }

    /// The answer of this task's transaction, when it published nothing else (exactly-once).
    async fn answer_only(&self) -> Option<Vec<u8>> {
        match transaction::current() {
            Some(scope) => scope.answer_only().await,
            None => None,
        }
    }

    /// Commits past an answered offset when everything below it is finished; otherwise keeps
    /// its answer as a done marker, for a redelivery to publish again.
    async fn settle_answered(
        &self,
        tp: &TopicPartition,
        offset: i64,
        epoch: u64,
        prefix: Option<String>,
        reply: Option<Vec<u8>>,
    ) {
        match self.inflight.finish(tp, offset, epoch, prefix.as_deref()) {
            Some((position, prefixes)) => {
                if self.commit(tp, epoch, position) {
                    self.delete_all(prefixes).await;
                } else {
                    // The group refuses commits while it rebalances: keep the answer as a done
                    // marker, in case the partition moves, and retry the commit from the loop.
                    self.keep_done(prefix.as_deref(), reply.as_deref()).await;
                    self.inflight.defer(tp, epoch, position, prefixes);
                }
            }
            None => self.keep_done(prefix.as_deref(), reply.as_deref()).await,
        }
    }

    async fn keep_done(&self, prefix: Option<&str>, reply: Option<&[u8]>) {
        if let (Some(prefix), Some(reply)) = (prefix, reply) {
            match self.snapshots.put_done(prefix, reply).await {
                Ok(true) => info!("answered, not yet committable: done marker kept until the commit passes it"),
                Ok(false) => {}
                // The store logs its failures, at most once per interval.
                Err(e) => debug!(error = %e, "cannot keep a done marker; a redelivery would compute the answer again"),
            }
        }
    }

    /// Deletes the store entries of committed requests.
    pub async fn delete_all(&self, prefixes: Vec<String>) {
        for p in prefixes {
            self.snapshots.delete(&p).await;
        }
    }

    /// Retries the commits that failed, from the loop.
    pub async fn retry_deferred(&self) {
        for (tp, epoch, position, prefixes) in self.inflight.take_deferred() {
            if self.commit(&tp, epoch, position) {
                info!(topic = %tp.0, partition = tp.1, position, "deferred commit made");
                self.delete_all(prefixes).await;
            } else {
                self.inflight.defer(&tp, epoch, position, prefixes);
            }
        }
    }

    fn dead_letter_topic(&self, source: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| ferry_schemas::dead_letter_topic(source))
    }

    async fn reject(
        &self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        invalid: &Invalid,
        attempts: &[AttemptEntry],
    ) -> Result<(), PublishError> {
        let history = attempts.iter().map(AttemptEntry::to_schema).collect();
        let done = self
            .publisher
            .dead_letter(
                &self.dead_letter_topic(msg.topic()),
                &self.reply_topic,
                msg,
                invalid,
                history,
                &self.consumer,
                trace,
            )
            .await?;
        self.ops.metrics.dead_lettered(invalid.code, done.told);
        Ok(())
    }

    /// A record of this request's was refused (see [`super::publish`]): the request's failure.
    /// It is dead-lettered, its caller told where the reply topic is not the problem, and it is
    /// settled, so its partition goes on.
    async fn refused(
        &self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        request: &Request,
        prefix: &str,
        refused: Refused,
    ) -> Result<Served, WorkerError> {
        let code = match refused.kind {
            RefusedKind::TooLarge => ErrorCode::ReplyTooLarge,
            RefusedKind::Topic => ErrorCode::ReplyTopicUnwritable,
        };
        error!(error = %refused, code = code.as_str(), "the answer was refused: dead-lettering the request");
        let attempt = self.open_attempts.lock().ok().and_then(|mut m| m.remove(prefix));
        if let Some(attempt) = attempt {
            self.snapshots
                .end_attempt(prefix, attempt, EntryOutcome::Failed, Some(refused.to_string().into()))
                .await;
        }
        let invalid = rejected(request, code, refused.to_string());
        match rejected_as(self.reject(msg, trace, &invalid, &[]).await)? {
            Served::Suspended => Ok(Served::Suspended),
            Served::Answered { .. } => Ok(Served::Answered {
                prefix: Some(prefix.to_string()),
                reply: None,
            }),
        }
    }

    /// Closes the attempts in flight as suspended, within `within`: the worker is stopping on
    /// purpose (drain deadline, a fatal error of its own, a trip), which says nothing about the
    /// requests, so their attempts must not count as deaths. What is not closed in time stays
    /// open and counts, as after a crash.
    pub async fn close_open_attempts(&self, within: Duration, why: &str) {
        let open: Vec<(String, u32)> = match self.open_attempts.lock() {
            Ok(mut m) => m.drain().collect(),
            Err(_) => return,
        };
        let s = &self.snapshots;
        if open.is_empty() {
            return;
        }
        let note = format!("stopped on purpose: {why}");
        let all = futures::future::join_all(open.iter().map(|(prefix, attempt)| {
            s.end_attempt(prefix, *attempt, EntryOutcome::Suspended, Some(note.clone().into()))
        }));
        match tokio::time::timeout(within, all).await {
            Ok(_) => info!(attempts = open.len(), "closed the attempts in flight as suspended"),
            Err(_) => warn!(
                attempts = open.len(),
                "could not close the attempts in flight in time; they will count as died"
            ),
        }
    }

    async fn serve<'s>(
        &'s self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        control: Arc<JobControl>,
        held: &mut Option<Slot<'s>>,
    ) -> Result<Served, WorkerError> {
        let started = Instant::now();
        let queued = queued_for(msg);
        let mut request = match intake::parse(msg.payload()) {
            Ok(r) => r,
            Err(invalid) => return rejected_as(self.reject(msg, trace, &invalid, &[]).await),
        };
        let span = tracing::info_span!("request", request_id = %request.id);
        async {
            if let Some((worker, model, reason)) = fallback::handed_off_by(msg) {
                // The operator routed it here on purpose: it is answered by this worker's model
                // whatever model it asked for, and the reply's `model` says which one that is.
                info!(from_worker = %worker, from_model = %model, reason = %reason, "serving a request handed off by another worker");
                request.model = None;
            }
            let reply_topic = request.reply_to.clone().unwrap_or_else(|| self.reply_topic.clone());
            if let Err(why) = self.reply_policy.check(&reply_topic) {
                let invalid = rejected(&request, ErrorCode::ReplyTopicForbidden, why);
                return rejected_as(self.reject(msg, trace, &invalid, &[]).await);
            }
            let prepared = match self.engine.prepare(&request) {
                Ok(p) => p,
                Err(rejection) => {
                    let invalid = rejected(&request, rejection.code(), rejection.to_string());
                    return rejected_as(self.reject(msg, trace, &invalid, &[]).await);
                }
            };
            if !self.publisher.topic_exists(&reply_topic, &self.consumer) {
                let message = format!("the reply topic {reply_topic:?} does not exist");
                let invalid = rejected(&request, ErrorCode::InvalidRequest, message);
                return rejected_as(self.reject(msg, trace, &invalid, &[]).await);
            }
            let prefix = request_prefix(msg.topic(), &request.id, &reply_topic, msg.payload().unwrap_or_default());
            let answered = self
                .answer(msg, trace, &request, prepared, &reply_topic, &prefix, control, started, queued, held)
                .await;
            match answered {
                Ok(served) => Ok(served),
                Err(PublishError::Worker(e)) => Err(e),
                Err(PublishError::Refused(r)) => self.refused(msg, trace, &request, &prefix, r).await,
                Err(PublishError::Suspended) => {
                    // Exactly-once: told to suspend before its turn to commit. A computed answer
                    // is kept for the partition's next owner to publish.
                    if let Some(answer) = self.answer_only().await {
                        self.keep_done(Some(&prefix), Some(&answer)).await;
                    }
                    Ok(Served::Suspended)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Serves a valid request whose reply topic may be written: a stored answer, or the
    /// attempts to generate one. A refused record comes back as [`PublishError::Refused`].
    ///
    /// The slot of a finished generation is left in `held`, for the caller to drop once the
    /// request is settled: a suspect waiting for it cannot crash the worker between this
    /// request's answer and its commit, which would spend an attempt of a request that did
    /// nothing wrong. Under exactly-once delivery a request that must wait for lower offsets
    /// to commit (which may need the slot) closes its attempt as not counted and lets it go.
    #[allow(clippy::too_many_arguments)]
    async fn answer<'s>(
        &'s self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        request: &Request,
        prepared: Prepared,
        reply_topic: &str,
        prefix: &str,
        control: Arc<JobControl>,
        started: Instant,
        queued: Duration,
        held: &mut Option<Slot<'s>>,
    ) -> Result<Served, PublishError> {
        // Owned, for the settled outcomes that keep it.
        let prefix = prefix.to_string();
        if let Some(served) = self.republish_done(trace, reply_topic, &prefix).await? {
            return Ok(served);
        }
        let cx = |attempt| WorkContext {
            worker: &self.publisher.worker_id,
            model: &self.engine.model().name,
            attempt,
            queued,
            total: started.elapsed(),
        };
        let deadline = request.deadline.map(deadline_instant);
        if deadline.is_some_and(|d| d <= Instant::now()) {
            info!("deadline passed before the start: answering without compute");
            let completion = past_deadline(&prepared);
            let body = self
                .publisher
                .reply(reply_topic, &reply::response(request, &completion, &cx(1)), trace)
                .await?;
            self.ops.metrics.answered(&answered(&completion, queued, false));
            return Ok(Served::Answered {
                prefix: Some(prefix),
                reply: Some(body),
            });
        }
        let mut local = AttemptLog::default();
        let mut first_round = true;
        loop {
            // The previous round's slot, if any: a retry may have to run alone.
            *held = None;
            let before = self.attempts(&prefix, &local).await;
            if first_round && !before.attempts.is_empty() {
                // The ledger outlives workers: an entry before this delivery's first attempt
                // is an earlier delivery's (without a snapshot store there is no ledger).
                self.ops.metrics.redelivered();
                if before
                    .attempts
                    .iter()
                    .any(|e| e.outcome == Some(EntryOutcome::HandedOff))
                {
                    // The fallback topic has it and its workers answer it; serving it here
                    // as well could answer it twice, from two models.
                    info!("handed to the fallback topic by an earlier delivery: settling without serving");
                    self.ops.metrics.request_settled(RequestOutcome::HandedOff);
                    return Ok(Served::Answered {
                        prefix: Some(prefix),
                        reply: None,
                    });
                }
            }
            first_round = false;
            if before.budget_spent(self.max_attempts) {
                let used = before.counted();
                let message = format!(
                    "the request failed, or its worker died, {used} times (--max-attempts {})",
                    self.max_attempts
                );
                error!(attempts = used, "attempts exhausted: dead-lettering with the history");
                let invalid = rejected(request, ErrorCode::AttemptsExhausted, message);
                self.reject(msg, trace, &invalid, &before.attempts).await?;
                let reply = reply::error_reply(&invalid, &self.publisher.worker_id, used)
                    .map(|r| serde_json::to_vec(&r))
                    .transpose()?;
                return Ok(Served::Answered {
                    prefix: Some(prefix),
                    reply,
                });
            }
            // The KV budget is held from before the slot until the generation ends (see
            // `admission`); it too comes before the attempt is recorded.
            let _kv = match self
                .kv_budget
                .admit(prepared.prompt.len(), prepared.params.max_tokens, &control)
                .await
            {
                super::admission::Admission::Admitted(permit) => permit,
                super::admission::Admission::Suspended => return Ok(Served::Suspended),
                super::admission::Admission::TooLarge { code, message } => {
                    let invalid = rejected(request, code, message);
                    self.reject(msg, trace, &invalid, &before.attempts).await?;
                    return Ok(Served::rejected());
                }
            };
            // The slot comes before the attempt is recorded: an attempt that waits behind a
            // suspect that crashes the worker must not be counted as died.
            let Some(slot) = self.slot(suspect(&before), &control).await else {
                return Ok(Served::Suspended);
            };
            *held = Some(slot);
            let log = self.begin_attempt(&prefix, &mut local).await;
            let attempt = log.attempts.last().map_or(1, |a| a.attempt);
            #[cfg(feature = "fault-injection")]
            fault_injection::maybe_crash(&request.id);
            let generated = self
                .generate(
                    trace,
                    request,
                    prepared.clone(),
                    &prefix,
                    attempt,
                    control.clone(),
                    deadline,
                    reply_topic,
                )
                .await?;
            #[cfg(feature = "fault-injection")]
            let generated = fault_injection::maybe_fail(&request.id, generated);
            // The generation is over: its memory goes to the next request before this one
            // publishes (which, under exactly-once delivery, may wait for lower offsets that
            // need it).
            drop(_kv);
            match generated {
                Generated::Finished {
                    completion,
                    resumed_from,
                } => {
                    if transaction::current().is_some_and(|s| s.must_wait()) {
                        let note = "answered; waiting for lower offsets to commit".to_string();
                        self.end_attempt(&prefix, attempt, EntryOutcome::Suspended, Some(note.into()), &mut local)
                            .await;
                        *held = None;
                    }
                    #[cfg(feature = "fault-injection")]
                    fault_injection::slow_publish().await;
                    let mut reply = reply::response(request, &completion, &cx(attempt));
                    if let Reply::Response(r) = &mut reply {
                        r.resumed_from_token = resumed_from;
                    }
                    let body = self.publisher.reply(reply_topic, &reply, trace).await?;
                    log_answered(&completion, resumed_from, attempt, started);
                    self.ops.health.generation_succeeded();
                    self.ops
                        .metrics
                        .answered(&answered(&completion, queued, resumed_from.is_some()));
                    let decode_s = completion.decode.as_secs_f64();
                    if decode_s > 0.0 && !completion.tokens.is_empty() {
                        let speed = completion.tokens.len() as f64 / decode_s;
                        self.snapshots.stats.record_decode_speed(speed);
                    }
                    return Ok(Served::Answered {
                        prefix: Some(prefix),
                        reply: Some(body),
                    });
                }
                Generated::Suspended => {
                    // A drain because the worker gave up on itself: what it holds cannot be
                    // served here, and the fallback may serve it sooner than the next owner
                    // of the partition. A drain on a signal or a revocation leaves it to be
                    // resumed from its snapshot.
                    if let Some(trip) = self.ops.health.tripped() {
                        let reason = fallback::reason_of_trip(&trip);
                        let error = trip.to_string();
                        if let Some(served) = self.hand_off(msg, &prefix, attempt, reason, &error, &mut local).await? {
                            return Ok(served);
                        }
                    }
                    self.end_attempt(&prefix, attempt, EntryOutcome::Suspended, None, &mut local)
                        .await;
                    return Ok(Served::Suspended);
                }
                Generated::Failed(e) => {
                    let out_of_memory = matches!(e, ModelError::OutOfMemory(_));
                    let e = e.to_string();
                    error!(error = %e, attempt, "generation failed");
                    self.ops.metrics.generation_failed();
                    self.ops.health.generation_failed(&request.id, &e);
                    let reason = if out_of_memory {
                        Some(FallbackReason::OutOfMemory)
                    } else {
                        self.ops.health.tripped().as_ref().map(fallback::reason_of_trip)
                    };
                    if let Some(reason) = reason {
                        if let Some(served) = self.hand_off(msg, &prefix, attempt, reason, &e, &mut local).await? {
                            return Ok(served);
                        }
                    }
                    let error = AttemptError {
                        message: e,
                        out_of_memory,
                    };
                    self.end_attempt(&prefix, attempt, EntryOutcome::Failed, Some(error), &mut local)
                        .await;
                    // The next round counts it, and dead-letters the request once the
                    // budget is used up. An attempt that ran out of memory is retried
                    // alone (see `suspect`).
                }
            }
        }
    }

    /// Hands the request to the fallback topic (see [`fallback`]): publishes the copy, waits for
    /// the broker's acknowledgement, then records the attempt as handed off. `None`, and nothing
    /// done, when there is no fallback topic, when it does not exist, or when the message was
    /// handed off once already: the caller then handles the failure as it would without one.
    ///
    /// The ledger entry is written after the publish, never before: a crash in between leaves a
    /// request that may be answered twice, never one that is answered nowhere.
    async fn hand_off(
        &self,
        msg: &OwnedMessage,
        prefix: &str,
        attempt: u32,
        reason: FallbackReason,
        error: &str,
        local: &mut AttemptLog,
    ) -> Result<Option<Served>, WorkerError> {
        let Some(topic) = &self.fallback_topic else {
            return Ok(None);
        };
        if fallback::is_handed_off(msg) {
            warn!(
                reason = reason.as_str(),
                "handed off once already: not handing it off again"
            );
            return Ok(None);
        }
        if !self.publisher.topic_exists(topic, &self.consumer) {
            error!(fallback_topic = %topic, "the fallback topic does not exist: handling the failure here");
            return Ok(None);
        }
        let handoff = Handoff {
            reason,
            worker: &self.publisher.worker_id,
            model: &self.engine.model().name,
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
            error,
        };
        match self
            .publisher
            .hand_off(topic, msg, fallback::headers(msg.headers(), &handoff))
            .await
        {
            Ok(()) => {}
            Err(PublishError::Refused(r)) => {
                error!(fallback_topic = %topic, error = %r, "the fallback topic refused the request: handling the failure here");
                return Ok(None);
            }
            Err(PublishError::Worker(e)) => return Err(e),
            Err(PublishError::Suspended) => {
                // Exactly-once: the hand-off was not published; the next owner decides again.
                self.end_attempt(prefix, attempt, EntryOutcome::Suspended, None, local)
                    .await;
                return Ok(Some(Served::Suspended));
            }
        }
        warn!(fallback_topic = %topic, reason = reason.as_str(), attempt, "handed off to the fallback topic");
        self.ops.metrics.handed_off(reason);
        let note = format!("{error} (handed off to {topic})");
        self.end_attempt(prefix, attempt, EntryOutcome::HandedOff, Some(note.into()), local)
            .await;
        Ok(Some(Served::Answered {
            prefix: Some(prefix.to_string()),
            reply: None,
        }))
    }

    /// Waits for the right to generate: shared, or alone for a suspect (`Some(why)`). `None`
    /// when the request is told to suspend while it waits.
    async fn slot(&self, suspect: Option<&str>, control: &JobControl) -> Option<Slot<'_>> {
        if let Some(why) = suspect {
            info!("{why}: running this request alone");
        }
        let suspect = suspect.is_some();
        let acquire = async {
            if suspect {
                Slot::Alone(self.isolation.write().await)
            } else {
                Slot::Shared(self.isolation.read().await)
            }
        };
        let suspended = async {
            while !control.suspend.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            slot = acquire => Some(slot),
            () = suspended => None,
        }
    }

    /// Publishes the stored answer of a request that was finished (here or by another worker)
    /// but whose offset was not committed.
    async fn republish_done(
        &self,
        trace: Option<&Propagation>,
        reply_topic: &str,
        prefix: &str,
    ) -> Result<Option<Served>, PublishError> {
        let Some(body) = self.snapshots.get_done(prefix).await else {
            return Ok(None);
        };
        let reply: Reply = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "ignoring a done marker that is not a reply");
                return Ok(None);
            }
        };
        self.publisher
            .reply_bytes(reply_topic, reply.id(), reply.kind(), &body, trace)
            .await?;
        info!("already answered: published the stored answer again instead of recomputing it");
        self.ops.metrics.request_settled(RequestOutcome::Republished);
        self.ops.metrics.redelivered();
        Ok(Some(Served::Answered {
            prefix: Some(prefix.to_string()),
            reply: Some(body.to_vec()),
        }))
    }

    /// The attempts recorded so far (see [`Snapshots::attempts_or`]).
    async fn attempts(&self, prefix: &str, local: &AttemptLog) -> AttemptLog {
        self.snapshots.attempts_or(prefix, local).await
    }

    /// Records the start of an attempt (see [`Snapshots::begin_attempt_or`]); one the store
    /// recorded is open until it ends, so a drain can close it.
    async fn begin_attempt(&self, prefix: &str, local: &mut AttemptLog) -> AttemptLog {
        let (log, durable) = self
            .snapshots
            .begin_attempt_or(prefix, &self.publisher.worker_id, local)
            .await;
        if let (true, Some(latest), Ok(mut open)) = (durable, log.latest(), self.open_attempts.lock()) {
            open.insert(prefix.to_string(), latest.attempt);
        }
        log
    }

    async fn end_attempt(
        &self,
        prefix: &str,
        attempt: u32,
        outcome: EntryOutcome,
        error: Option<AttemptError>,
        local: &mut AttemptLog,
    ) {
        if let Some(e) = local.attempts.iter_mut().find(|e| e.attempt == attempt) {
            e.outcome = Some(outcome);
            e.error = error.as_ref().map(|e| e.message.clone());
            e.out_of_memory = error.as_ref().is_some_and(|e| e.out_of_memory);
        }
        if let Ok(mut open) = self.open_attempts.lock() {
            if open.get(prefix) == Some(&attempt) {
                open.remove(prefix);
            }
        }
        self.snapshots.end_attempt(prefix, attempt, outcome, error).await;
    }

    /// One generation attempt: resume from a snapshot when one verifies, snapshot as it goes,
    /// stream chunks when asked.
    #[allow(clippy::too_many_arguments)]
    async fn generate(
        &self,
        trace: Option<&Propagation>,
        request: &Request,
        prepared: Prepared,
        prefix: &str,
        attempt: u32,
        control: Arc<JobControl>,
        deadline: Option<Instant>,
        reply_topic: &str,
    ) -> Result<Generated, WorkerError> {
        let prompt_tokens = prepared.prompt.len();
        let found = self.snapshots.find(prefix, &prepared).await;
        let resumed_from = found.as_ref().map(|f| f.manifest.tokens.len() as u32);
        let writer = self.snapshots.writer(
            prefix,
            &prepared,
            &self.publisher.worker_id,
            found.as_ref().map(|f| &f.manifest),
        );
        let (writer, sink) = match writer {
            Some((w, s)) => (Some(w), Some(s)),
            None => (None, None),
        };
        let (chunks, mut chunk_rx) = if request.stream {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        info!(prompt_tokens, resumed_from_token = resumed_from, attempt, "generating");
        let job = Job {
            prepared,
            resume: found.map(|f| f.resume),
            snapshots: sink.map(|s| Box::new(s) as Box<dyn Checkpoint>),
            control,
            deadline,
            chunks,
        };
        let run = self.engine_thread.run(job);
        tokio::pin!(run);
        let outcome = loop {
            tokio::select! {
                r = &mut run => break r?,
                Some(c) = next_chunk(&mut chunk_rx) => self.publish_chunk(reply_topic, request, c, trace),
            }
        };
        // The engine has returned, so every chunk is in the channel: publish them before the
        // final reply, which then follows them on the reply partition.
        if let Some(rx) = &mut chunk_rx {
            while let Ok(c) = rx.try_recv() {
                self.publish_chunk(reply_topic, request, c, trace);
            }
        }
        Ok(match outcome {
            Ok(Outcome::Finished(completion)) => {
                if let Some(w) = writer {
                    w.stop().await;
                }
                Generated::Finished {
                    completion,
                    resumed_from,
                }
            }
            Ok(Outcome::Suspended { tokens }) => {
                if let Some(w) = writer {
                    w.flush_and_stop().await;
                }
                info!(tokens, "suspended; snapshot written");
                Generated::Suspended
            }
            Err(e) => {
                if let Some(w) = writer {
                    w.stop().await;
                }
                Generated::Failed(e)
            }
        })
    }

    fn publish_chunk(&self, topic: &str, request: &Request, c: StreamChunk, trace: Option<&Propagation>) {
        let chunk = Chunk {
            version: SCHEMA_VERSION,
            id: request.id.clone(),
            seq: c.seq,
            text: c.text,
        };
        self.publisher.chunk(topic, &chunk, trace);
    }
}

/// Whether the next attempt runs alone, and why: an earlier attempt died with its worker (it may
/// be what crashes workers, so it must take no bystander down with it), or the last one ran out
/// of accelerator memory (alone, it has the memory the others were using).
fn suspect(log: &AttemptLog) -> Option<&'static str> {
    if log.attempts.iter().any(|e| e.outcome.is_none()) {
        return Some("an earlier attempt died with its worker");
    }
    let last = log.attempts.last()?;
    let oom = last.outcome == Some(EntryOutcome::Failed) && last.out_of_memory;
    oom.then_some("the last attempt ran out of accelerator memory")
}

async fn next_chunk(rx: &mut Option<mpsc::UnboundedReceiver<StreamChunk>>) -> Option<StreamChunk> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn log_answered(completion: &Completion, resumed_from: Option<u32>, attempt: u32, started: Instant) {
    let decode_s = completion.decode.as_secs_f64();
    let tps = if decode_s > 0.0 {
        completion.tokens.len() as f64 / decode_s
    } else {
        0.0
    };
    info!(
        prompt_tokens = completion.prompt_tokens,
        completion_tokens = completion.tokens.len(),
        finish_reason = ?completion.finish.reason,
        resumed_from_token = resumed_from,
        attempt,
        decode_tokens_per_s = tps,
        total_ms = started.elapsed().as_millis() as u64,
        "answered"
    );
}

/// What `/metrics` learns from an answered generation.
fn answered(completion: &Completion, queued: Duration, resumed: bool) -> Answered {
    Answered {
        queued,
        finish: completion.finish.reason,
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.tokens.len(),
        prefill: completion.prefill,
        decode: completion.decode,
        resumed,
    }
}

/// The value of a message header, if the message has it.
fn header<'a>(msg: &'a OwnedMessage, key: &str) -> Option<&'a [u8]> {
    msg.headers()?.iter().find(|h| h.key == key)?.value
}

/// From the message's Kafka timestamp to now.
fn queued_for(msg: &OwnedMessage) -> Duration {
    msg.timestamp()
        .to_millis()
        .and_then(|ts| {
            let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
            u64::try_from(now as i64 - ts).ok()
        })
        .map(Duration::from_millis)
        .unwrap_or_default()
}

/// The monotonic instant of a wall-clock deadline (now, when it has passed).
fn deadline_instant(deadline: time::OffsetDateTime) -> Instant {
    let left = deadline - time::OffsetDateTime::now_utc();
    Instant::now() + Duration::try_from(left).unwrap_or(Duration::ZERO)
}

/// The answer to a request whose deadline passed before it started: no text, no compute.
fn past_deadline(prepared: &Prepared) -> Completion {
    Completion {
        text: String::new(),
        finish: Finish {
            reason: FinishReason::Deadline,
            stop_sequence: None,
        },
        prompt_tokens: prepared.prompt.len(),
        tokens: Vec::new(),
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
    }
}

/// How serving ended for a message that was dead-lettered (or, under exactly-once delivery,
/// told to suspend before its dead letter's turn came).
fn rejected_as(r: Result<(), PublishError>) -> Result<Served, WorkerError> {
    match r {
        Ok(()) => Ok(Served::rejected()),
        Err(PublishError::Suspended) => Ok(Served::Suspended),
        Err(PublishError::Worker(e)) => Err(e),
        // A dead letter's refusals are settled inside `Publisher::dead_letter`.
        Err(PublishError::Refused(r)) => Err(WorkerError::Transaction(format!("unexpected refusal: {r}"))),
    }
}

fn rejected(req: &Request, code: ErrorCode, message: String) -> Invalid {
    Invalid {
        code,
        message,
        id: Some(req.id.clone()),
        reply_to: req.reply_to.clone(),
        metadata: req.metadata.clone(),
    }
}

/// Faults for tests, compiled only with the `fault-injection` feature (never in a release
/// build): `FERRY_FAULT_CRASH_ON=<request id>` makes the worker abort, as a segfault or an OOM
/// kill would, right after it recorded the attempt on that request;
/// `FERRY_FAULT_FAIL_GENERATION=1` reports every finished generation as failed in the engine,
/// as a broken device would; `FERRY_FAULT_OOM_ON=<request id>` reports that request's
/// generations as failed with the CUDA driver's out-of-memory error, as candle words it.
#[cfg(feature = "fault-injection")]
mod fault_injection {
    use super::{Generated, ModelError};

    pub fn maybe_crash(request_id: &str) {
        if std::env::var("FERRY_FAULT_CRASH_ON").is_ok_and(|id| id == request_id) {
            tracing::error!(request_id, "fault injection: crashing on this request");
            std::process::abort();
        }
    }

    pub fn maybe_fail(request_id: &str, generated: Generated) -> Generated {
        match generated {
            Generated::Finished { .. } if std::env::var("FERRY_FAULT_OOM_ON").is_ok_and(|id| id == request_id) => {
                Generated::Failed(ModelError::OutOfMemory(
                    "fault injection: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
                ))
            }
            Generated::Finished { .. } if std::env::var_os("FERRY_FAULT_FAIL_GENERATION").is_some() => {
                Generated::Failed(ModelError::Backend("fault injection: the engine failed".into()))
            }
            other => other,
        }
    }

    /// `FERRY_FAULT_SLOW_PUBLISH_MS=<ms>`: a finished generation waits that long before its
    /// answer is published, widening the window between the two.
    pub async fn slow_publish() {
        if let Some(ms) = std::env::var("FERRY_FAULT_SLOW_PUBLISH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
}
