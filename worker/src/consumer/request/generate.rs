//! One generation on the engine thread: resumed from a snapshot when one verifies, snapshotted as
//! it goes, its chunks streamed when the request asks.

use super::*;
use crate::consumer::admission::KvPermit;

/// How long, under exactly-once delivery, the final reply waits for the stream's last chunk to be
/// acknowledged, so that it follows the chunks in the log.
const CHUNKS_BEFORE_ANSWER: Duration = Duration::from_secs(10);

impl Inner {
    /// One generation attempt: resume from a snapshot when one verifies, snapshot as it goes,
    /// stream chunks when asked. `kv` is the attempt's KV reservation, whose restore allowance
    /// bounds the restore and is given back once it is done.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn generate(
        &self,
        trace: Option<&Propagation>,
        request: &Request,
        prepared: Prepared,
        prefix: &str,
        attempt: u32,
        control: Arc<JobControl>,
        deadline: Option<Instant>,
        reply_topic: &ReplyTo,
        kv: &mut KvPermit,
    ) -> Result<Result<Outcome, ModelError>, WorkerError> {
        let prompt_tokens = prepared.prompt.len();
        let found = self
            .snapshots
            .find_within(prefix, &prepared, kv.restore_allowance())
            .await;
        // The restore is over: what it held beside the cache is free again.
        kv.restored();
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
        // The delivery of the last chunk queued: under exactly-once the final reply goes on
        // another producer (the transactional one), so it is published only once the chunks
        // before it are in the log.
        let mut last_chunk = None;
        let outcome = loop {
            tokio::select! {
                r = &mut run => break r?,
                Some(c) = next_chunk(&mut chunk_rx) => {
                    last_chunk = self.publish_chunk(reply_topic, request, c, trace).or(last_chunk);
                }
            }
        };
        // The engine has returned, so every chunk is in the channel: publish them before the
        // final reply, which then follows them on the reply partition.
        if let Some(rx) = &mut chunk_rx {
            while let Ok(c) = rx.try_recv() {
                last_chunk = self.publish_chunk(reply_topic, request, c, trace).or(last_chunk);
            }
        }
        if let (Some(delivery), Some(_)) = (last_chunk, &self.publisher.transactions) {
            // Chunks are a preview: one that is not delivered in time does not hold the answer.
            if tokio::time::timeout(CHUNKS_BEFORE_ANSWER, delivery).await.is_err() {
                warn!("the stream's last chunk is not acknowledged yet; publishing the final reply");
            }
        }
        if let Some(w) = writer {
            match &outcome {
                Ok(Outcome::Suspended { tokens }) => {
                    w.flush_and_stop().await;
                    info!(tokens, "suspended; snapshot written");
                }
                Ok(Outcome::Finished(_)) | Err(_) => w.stop().await,
            }
        }
        Ok(outcome)
    }

    pub(super) fn publish_chunk(
        &self,
        topic: &ReplyTo,
        request: &Request,
        c: StreamChunk,
        trace: Option<&Propagation>,
    ) -> Option<rdkafka::producer::DeliveryFuture> {
        let chunk = Chunk {
            version: SCHEMA_VERSION,
            id: request.id.clone(),
            seq: c.seq,
            text: c.text,
        };
        self.publisher.chunk(topic, &chunk, trace)
    }
}

pub(super) async fn next_chunk(rx: &mut Option<mpsc::UnboundedReceiver<StreamChunk>>) -> Option<StreamChunk> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) fn log_answered(completion: &Completion, attempt: u32, started: Instant) {
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
        resumed_from_token = completion.resumed_from,
        attempt,
        decode_tokens_per_s = tps,
        total_ms = started.elapsed().as_millis() as u64,
        "answered"
    );
}

/// What `/metrics` learns from an answered generation.
pub(super) fn answered(completion: &Completion, queued: Duration) -> Answered {
    Answered {
        queued,
        finish: completion.finish.reason,
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.tokens.len(),
        prefill: completion.prefill,
        decode: completion.decode,
        resumed: completion.resumed_from.is_some(),
    }
}

/// The answer to a request whose deadline passed before it started: no text, no compute.
pub(super) fn past_deadline(prepared: &Prepared) -> Completion {
    Completion {
        text: String::new(),
        finish: Finish {
            reason: FinishReason::Deadline,
            stop_sequence: None,
        },
        prompt_tokens: prepared.prompt.len(),
        tokens: Vec::new(),
        prefill: Duration::ZERO,
        resumed_from: None,
        decode: Duration::ZERO,
    }
}
