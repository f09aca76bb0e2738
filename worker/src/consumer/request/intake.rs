//! The first phase: the message parsed and validated, the reply topic checked, the prompt prepared;
//! or the request refused, with a dead letter and, where the caller can be told, an error reply.

use super::*;

impl Inner {
    pub(super) async fn serve<'s>(
        &'s self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        control: Arc<JobControl>,
        held: &mut Option<Slot<'s>>,
    ) -> Result<Served, WorkerError> {
        let started = Instant::now();
        let queued = queued_for(msg);
        let mut request = match parse(msg.payload()) {
            Ok(r) => r,
            Err(invalid) => return rejected_as(self.reject(msg, trace, &invalid, &[]).await),
        };
        let span = tracing::info_span!("request", request_id = %request.id);
        async {
            // Hand-off headers count only on a fallback lane: anywhere else a producer wrote them.
            let handed_off = self.fallback_lanes.contains(msg.topic()).then(|| fallback::handed_off_by(msg));
            if let Some((worker, model, reason)) = handed_off.flatten() {
                // The operator routed it here on purpose: it is answered by this worker's model
                // whatever model it asked for, and the reply's `model` says which one that is.
                info!(from_worker = %worker, from_model = %model, reason = %reason, "serving a request handed off by another worker");
                request.model = None;
            }
            let reply_topic = match self.publisher.reply_to(request.reply_to.as_deref()) {
                Ok(to) => to,
                Err(why) => {
                    let invalid = rejected(&request, ErrorCode::ReplyTopicForbidden, why);
                    return rejected_as(self.reject(msg, trace, &invalid, &[]).await);
                }
            };
            let prepared = match self.engine.prepare(&request) {
                Ok(p) => p,
                Err(rejection) => {
                    let invalid = rejected(&request, rejection.code(), rejection.to_string());
                    return rejected_as(self.reject(msg, trace, &invalid, &[]).await);
                }
            };
            if !self.publisher.topic_exists(reply_topic.as_str(), &self.consumer) {
                let message = format!("the reply topic {reply_topic:?} does not exist");
                let invalid = rejected(&request, ErrorCode::InvalidRequest, message);
                return rejected_as(self.reject(msg, trace, &invalid, &[]).await);
            }
            let prefix = request_prefix(
                msg.topic(),
                &request.id,
                reply_topic.as_str(),
                msg.payload().unwrap_or_default(),
            );
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

    pub(super) async fn reject(
        &self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        invalid: &Invalid,
        attempts: &[AttemptEntry],
    ) -> Result<(), PublishError> {
        let history = attempts.iter().map(AttemptEntry::to_schema).collect();
        let done = self
            .publisher
            .dead_letter(msg, invalid, history, &self.consumer, trace)
            .await?;
        self.ops.metrics.dead_lettered(invalid.code, done.told);
        Ok(())
    }

    /// A record of this request's was refused (see [`crate::consumer::publish`]): the request's failure.
    /// It is dead-lettered, its caller told where the reply topic is not the problem, and it is
    /// settled, so its partition goes on.
    pub(super) async fn refused(
        &self,
        msg: &OwnedMessage,
        trace: Option<&Propagation>,
        request: &Request,
        prefix: &str,
        refused: Refused,
    ) -> Result<Served, WorkerError> {
        let code = match refused.kind {
            RefusedKind::TooLarge => ErrorCode::ReplyTooLarge,
            RefusedKind::Topic | RefusedKind::Unavailable => ErrorCode::ReplyTopicUnwritable,
        };
        error!(error = %refused, code = code.as_str(), "the answer was refused: dead-lettering the request");
        let invalid = rejected(request, code, refused.to_string());
        // The dead letter decides whose failure it was (see `publish`): if it cannot be written
        // either, the worker stops here and the attempt stays open, for a controlled exit to
        // close as suspended.
        let served = rejected_as(self.reject(msg, trace, &invalid, &[]).await)?;
        // Under exactly-once the dead letter is written only with the commit, and a reply topic
        // that could not take the answer in time has poisoned the transaction: Kafka cannot end
        // it until that partition heals, so the worker will stop. That attempt counts, so that
        // the attempt budget ends the loop with a dead letter; any other is settled with the
        // request (`Inner::settle_attempt`).
        let poisoned = refused.kind == RefusedKind::Unavailable && transaction::current().is_some();
        if transaction::current().is_none() || poisoned {
            if let Some(attempt) = self.open_attempts.take(prefix) {
                let error = AttemptError {
                    message: refused.to_string(),
                    out_of_memory: false,
                    reply_unwritable: poisoned,
                };
                self.snapshots
                    .end_attempt(prefix, attempt, EntryOutcome::Failed, Some(error))
                    .await;
            }
        }
        match served {
            Served::Suspended => Ok(Served::Suspended),
            Served::Answered { .. } => Ok(Served::Answered {
                prefix: Some(prefix.to_string()),
                reply: None,
            }),
        }
    }
}

/// How serving ended for a message that was dead-lettered (or, under exactly-once delivery,
/// told to suspend before its dead letter's turn came).
pub(super) fn rejected_as(r: Result<(), PublishError>) -> Result<Served, WorkerError> {
    match r {
        Ok(()) => Ok(Served::rejected()),
        Err(PublishError::Suspended) => Ok(Served::Suspended),
        Err(PublishError::Worker(e)) => Err(e),
        // A dead letter's refusals are settled inside `Publisher::dead_letter`.
        Err(PublishError::Refused(r)) => Err(WorkerError::Transaction(format!("unexpected refusal: {r}"))),
    }
}

pub(super) fn rejected(req: &Request, code: ErrorCode, message: String) -> Invalid {
    Invalid {
        code,
        message,
        id: Some(req.id.clone()),
        reply_to: req.reply_to.clone(),
        metadata: req.metadata.clone(),
    }
}
