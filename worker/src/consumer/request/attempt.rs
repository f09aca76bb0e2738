//! Attempts: a stored answer published again, the deadline, the attempt budget (the ledger), the
//! admission and the slot (alone for a suspect), and what ends an attempt: an answer, a suspend, a
//! failure counted against the budget, or a hand-off to the fallback topic.

use super::*;

impl Inner {
    /// Serves a valid request whose reply topic may be written: a stored answer, or the
    /// attempts to generate one. A refused record comes back as [`PublishError::Refused`].
    ///
    /// The slot of a finished generation is left in `held`, for the caller to drop once the
    /// request is settled: a suspect waiting for it cannot crash the worker between this
    /// request's answer and its commit, which would spend an attempt of a request that did
    /// nothing wrong. Under exactly-once delivery a request that must wait for lower offsets
    /// to commit (which may need the slot) closes its attempt as not counted and lets it go.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn answer<'s>(
        &'s self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        request: &Request,
        prepared: Prepared,
        reply_topic: &ReplyTo,
        prefix: &str,
        control: Arc<JobControl>,
        started: Instant,
        queued: Duration,
        held: &mut Option<Slot<'s>>,
    ) -> Result<Served, PublishError> {
        // Owned, for the settled outcomes that keep it.
        let prefix = prefix.to_string();
        if let Some(served) = self.republish_done(trace, reply_topic, request, &prefix).await? {
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
        // With a store, a snapshot may hold text an earlier delivery streamed: the engine then
        // answers with that text, at no compute, rather than with none.
        if deadline.is_some_and(|d| d <= Instant::now()) && !self.snapshots.keeps() {
            info!("deadline passed before the start: answering without compute");
            let completion = past_deadline(&prepared);
            let body = self
                .publisher
                .reply(reply_topic, &reply::response(request, &completion, &cx(1)), trace)
                .await?;
            self.ops.metrics.answered(&answered(&completion, queued));
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
                // A reply topic that kept stopping workers gets no error reply either: writing
                // it is what failed.
                let code = match before.latest() {
                    Some(last) if last.reply_unwritable => ErrorCode::ReplyTopicUnwritable,
                    _ => ErrorCode::AttemptsExhausted,
                };
                let invalid = rejected(request, code, message);
                self.reject(msg, trace, &invalid, &before.attempts).await?;
                let reply = match code {
                    ErrorCode::ReplyTopicUnwritable => None,
                    _ => reply::error_reply(&invalid, &self.publisher.worker_id, used)
                        .map(|r| serde_json::to_vec(&r))
                        .transpose()?,
                };
                return Ok(Served::Answered {
                    prefix: Some(prefix),
                    reply,
                });
            }
            // The KV budget is held from before the slot until the generation ends (see
            // `admission`); it too comes before the attempt is recorded. A request with a
            // snapshot is admitted for its restore as well, sized from the manifest here, since
            // the restore (in `generate`) holds the cache and a piece of the snapshot at once.
            let restore = self.snapshots.restore_overhead(&prefix, &prepared).await;
            let mut kv = match self
                .kv_budget
                .admit(prepared.prompt.len(), prepared.params.max_tokens, restore, &control)
                .await
            {
                crate::consumer::admission::Admission::Admitted(permit) => permit,
                crate::consumer::admission::Admission::Suspended => return Ok(Served::Suspended),
                crate::consumer::admission::Admission::TooLarge { code, message } => {
                    let invalid = rejected(request, code, message);
                    self.reject(msg, trace, &invalid, &before.attempts).await?;
                    return Ok(Served::rejected());
                }
            };
            // The slot comes before the attempt is recorded: an attempt that waits behind a
            // suspect that crashes the worker must not be counted as died.
            #[cfg(feature = "fault-injection")]
            fault_injection::delay_slot(&request.id).await;
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
                    &mut kv,
                )
                .await?;
            #[cfg(feature = "fault-injection")]
            let generated = fault_injection::maybe_fail(&request.id, generated);
            // The generation is over: its memory goes to the next request before this one
            // publishes (which, under exactly-once delivery, may wait for lower offsets that
            // need it).
            drop(kv);
            match generated {
                Ok(Outcome::Finished(completion)) => {
                    let note = "answered; waiting for lower offsets to commit";
                    self.release_for_turn(&prefix, attempt, note, &mut local, held).await;
                    #[cfg(feature = "fault-injection")]
                    fault_injection::slow_publish().await;
                    let reply = reply::response(request, &completion, &cx(attempt));
                    let body = self.publisher.reply(reply_topic, &reply, trace).await?;
                    log_answered(&completion, attempt, started);
                    self.ops.health.generation_succeeded();
                    self.ops.metrics.answered(&answered(&completion, queued));
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
                Ok(Outcome::Suspended { .. }) => {
                    // A drain because the worker gave up on itself: what it holds cannot be
                    // served here, and the fallback may serve it sooner than the next owner
                    // of the partition. A drain on a signal or a revocation leaves it to be
                    // resumed from its snapshot.
                    if let Some(trip) = self.ops.health.tripped() {
                        if self.publisher.fallback_topic().is_some() {
                            let note = "suspended; handing off once lower offsets commit";
                            self.release_for_turn(&prefix, attempt, note, &mut local, held).await;
                        }
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
                Err(e) => {
                    let out_of_memory = matches!(e, ModelError::OutOfMemory(_));
                    // Under exactly-once a hand-off waits for lower offsets to commit, which may
                    // need the slot (a suspect waiting to run alone): the attempt is closed as
                    // not counted and the slot let go first, as for an answer.
                    if self.publisher.fallback_topic().is_some() {
                        let note = "failed; handing off once lower offsets commit";
                        self.release_for_turn(&prefix, attempt, note, &mut local, held).await;
                    }
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
                        reply_unwritable: false,
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

    /// Under exactly-once delivery, before a record that must wait for the lower offsets of its
    /// partition to commit: the attempt is closed as not counted and the slot let go, since
    /// those offsets may need it (a suspect waits to run alone), and holding it while waiting for
    /// them would stop the worker answering anything. Nothing to do when it is this request's
    /// turn already, or under at-least-once.
    async fn release_for_turn<'s>(
        &'s self,
        prefix: &str,
        attempt: u32,
        note: &str,
        local: &mut AttemptLog,
        held: &mut Option<Slot<'s>>,
    ) {
        if transaction::current().is_some_and(|s| s.must_wait()) {
            let note = note.to_string().into();
            self.end_attempt(prefix, attempt, EntryOutcome::Suspended, Some(note), local)
                .await;
            *held = None;
        }
    }

    /// Waits for the right to generate: shared, or alone for a suspect (`Some(why)`). `None`
    /// when the request is told to suspend while it waits.
    pub(super) async fn slot(&self, suspect: Option<&str>, control: &JobControl) -> Option<Slot<'_>> {
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

    /// The attempts recorded so far (see [`Snapshots::attempts_or`]).
    pub(super) async fn attempts(&self, prefix: &str, local: &AttemptLog) -> AttemptLog {
        self.snapshots.attempts_or(prefix, local).await
    }

    /// Records the start of an attempt (see [`Snapshots::begin_attempt_or`]); one the store
    /// recorded is open until it ends, so a drain can close it.
    pub(super) async fn begin_attempt(&self, prefix: &str, local: &mut AttemptLog) -> AttemptLog {
        let (log, durable) = self
            .snapshots
            .begin_attempt_or(prefix, &self.publisher.worker_id, local)
            .await;
        if durable {
            if let Some(latest) = log.latest() {
                self.open_attempts.open(prefix, latest.attempt);
            }
        }
        log
    }

    pub(super) async fn end_attempt(
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
            e.reply_unwritable = error.as_ref().is_some_and(|e| e.reply_unwritable);
        }
        self.open_attempts.close(prefix, attempt);
        self.snapshots.end_attempt(prefix, attempt, outcome, error).await;
    }

    /// Closes the attempts in flight as suspended, within `within`: the worker is stopping on
    /// purpose (drain deadline, a fatal error of its own, a trip), which says nothing about the
    /// requests, so their attempts must not count as deaths. What is not closed in time stays
    /// open and counts, as after a crash.
    pub async fn close_open_attempts(&self, within: Duration, why: &str) {
        let open = self.open_attempts.drain();
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

    /// Hands the request to the fallback topic (see [`fallback`]): publishes the copy, waits for
    /// the broker's acknowledgement, then records the attempt as handed off. `None`, and nothing
    /// done, when there is no fallback topic, when it does not exist, or when the message was
    /// handed off once already: the caller then handles the failure as it would without one.
    ///
    /// The ledger entry is written after the publish, never before: a crash in between leaves a
    /// request that may be answered twice, never one that is answered nowhere.
    pub(super) async fn hand_off(
        &self,
        msg: &OwnedMessage,
        prefix: &str,
        attempt: u32,
        reason: FallbackReason,
        error: &str,
        local: &mut AttemptLog,
    ) -> Result<Option<Served>, WorkerError> {
        let Some(topic) = self.publisher.fallback_topic() else {
            return Ok(None);
        };
        if self.is_handed_off(msg) {
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
            .hand_off(msg, fallback::headers(msg.headers(), &handoff))
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

    /// Publishes the stored answer of a request that was finished (here or by another worker)
    /// but whose offset was not committed.
    pub(super) async fn republish_done(
        &self,
        trace: Option<&Propagation>,
        reply_topic: &ReplyTo,
        request: &Request,
        prefix: &str,
    ) -> Result<Option<Served>, PublishError> {
        let Some(body) = self.snapshots.get_done(prefix).await else {
            return Ok(None);
        };
        let reply = match done_marker(&body, &request.id) {
            Ok(r) => r,
            Err(why) => {
                warn!(reason = %why, "ignoring a done marker that is not this request's final reply");
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
}

/// A done marker read back, when it is what only the worker writes there: a final reply (a
/// response or an error, never a chunk) to the request with this id. Anything else (a store
/// written by someone else, a stale format) is ignored and the request is served again.
pub(super) fn done_marker(body: &[u8], id: &str) -> Result<Reply, String> {
    let reply: Reply = serde_json::from_slice(body).map_err(|e| format!("not a reply: {e}"))?;
    if matches!(reply, Reply::Chunk(_)) {
        return Err("a stream chunk, not a final reply".into());
    }
    if reply.id() != id {
        return Err(format!("the final reply of another request ({:?})", reply.id()));
    }
    Ok(reply)
}

/// Whether the next attempt runs alone, and why: an earlier attempt died with its worker (it may
/// be what crashes workers, so it must take no bystander down with it), or the last one ran out
/// of accelerator memory (alone, it has the memory the others were using).
pub(super) fn suspect(log: &AttemptLog) -> Option<&'static str> {
    if log.attempts.iter().any(|e| e.outcome.is_none()) {
        return Some("an earlier attempt died with its worker");
    }
    let last = log.attempts.last()?;
    let oom = last.outcome == Some(EntryOutcome::Failed) && last.out_of_memory;
    oom.then_some("the last attempt ran out of accelerator memory")
}
