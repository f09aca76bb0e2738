//! The engine: turns a validated request into a prompt and runs its generation.
//!
//! [`Engine::prepare`] does everything that can reject a request before compute is spent
//! (model name, chat template, prompt length); [`EngineHandle`] runs generations on a thread
//! of their own that owns the model, fed by a bounded channel, each job carrying its own reply
//! channel. The async Kafka loop never blocks on a forward pass.
//!
//! The engine thread keeps up to `max_in_flight` jobs active and decodes them as one batch
//! (continuous batching). Each round it admits waiting jobs (no compute yet), then, in admission
//! order, checks every active job's deadline and suspend flag and emits a token for each job
//! whose logits are ready (feeding its snapshot sink and stream), and finally runs *one* forward
//! pass for the whole batch ([`LlamaWeights::forward_batch`](crate::model::LlamaWeights)): every
//! decoding job's last token, plus the next [`PREFILL_CHUNK`] tokens of the prompt of at most
//! one prefilling job. Jobs join and leave between rounds.
//!
//! Chunked prefill bounds the stall: while a long prompt is prefilled, the jobs decoding beside
//! it still get a token every round, each round costing at most one chunk's compute more. A
//! resume rebuilds its cache the same way: from a snapshot cache it feeds just its last token;
//! from tokens alone it prefills the prompt in chunks, then replays the generated tokens one a
//! round, exactly as they were first computed (see the invariant in [`sequence`]). Its answer
//! therefore does not depend on which jobs shared its batch, nor on being resumed.
//!
//! Limit: an error inside a batched forward pass (a tensor operation failing, not a bad input:
//! inputs are checked before any compute) fails every job of that batch, since their caches may
//! be partly written.

pub mod sampler;
pub mod sequence;
pub mod stream;
mod thread;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_schemas::{ErrorCode, FinishReason, Request};
use tokio::sync::mpsc;

use crate::model::{Model, ModelError};
pub use sampler::SamplingParams;
pub use sequence::{Completion, Finish, GenerationParams, Sequence, PREFILL_CHUNK};
pub use stream::{Release, StreamChunk};
pub use thread::{EngineHandle, EngineStopped};

/// Why a request is refused before generation. Refused requests are dead-lettered and their
/// caller gets an error reply; they are never retried, since the same input fails the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The request names a model this worker does not serve.
    #[error("model {requested:?} is not served here; this worker serves {served:?}")]
    UnknownModel { requested: String, served: String },
    /// The chat could not be rendered with the model's template.
    #[error("{0}")]
    Template(String),
    /// The prompt leaves no room to generate in the context window.
    #[error("the prompt is {tokens} tokens; the context window is {context_length}, so at most {} fit", context_length - 1)]
    PromptTooLong { tokens: usize, context_length: usize },
}

impl Rejection {
    pub fn code(&self) -> ErrorCode {
        match self {
            Rejection::UnknownModel { .. } => ErrorCode::UnknownModel,
            Rejection::Template(_) => ErrorCode::TemplateError,
            Rejection::PromptTooLong { .. } => ErrorCode::PromptTooLong,
        }
    }
}

/// A request turned into token ids and generation parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
}

impl Prepared {
    /// A prompt decoded greedily for at most `max_tokens`, with no stop strings: the job of the
    /// benches and the GPU check, whose answers must be reproducible.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Prepared {
        Prepared {
            prompt,
            params: GenerationParams {
                sampling: SamplingParams::GREEDY,
                max_tokens,
                stop: Vec::new(),
            },
        }
    }
}

/// The model plus the request-to-prompt logic.
#[derive(Debug, Clone)]
pub struct Engine {
    model: Arc<Model>,
}

impl Engine {
    pub fn new(model: Arc<Model>) -> Self {
        Self { model }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The text the model sees for `req`: the chat rendered with the model's template, or the
    /// raw prompt.
    pub fn prompt_text(&self, req: &Request) -> Result<String, Rejection> {
        let m = &self.model;
        match (&req.messages, &req.prompt) {
            (Some(messages), _) => {
                let Some(template) = &m.template else {
                    return Err(Rejection::Template(
                        "this model has no chat template; send `prompt` instead".into(),
                    ));
                };
                template
                    .render(messages, m.tokenizer.bos_token(), m.tokenizer.eos_token())
                    .map_err(|e| Rejection::Template(e.to_string()))
            }
            (None, Some(prompt)) => Ok(prompt.clone()),
            (None, None) => Err(Rejection::Template(
                "the request has neither messages nor prompt".into(),
            )),
        }
    }

    /// The prompt's token ids. A chat whose contents hold the text of a control token (say
    /// `<|im_start|>system`) has those contents tokenised as plain text, so a caller cannot open
    /// a turn of another role; any other prompt is tokenised whole, exactly as rendered. A raw
    /// `prompt` is the caller's own text, control tokens included.
    pub fn prompt_tokens(&self, req: &Request) -> Result<Vec<u32>, Rejection> {
        let m = &self.model;
        let tok = &m.tokenizer;
        let err = |e: crate::model::ModelError| Rejection::Template(e.to_string());
        let injected = req
            .messages
            .as_ref()
            .is_some_and(|ms| ms.iter().any(|x| tok.contains_control(&x.content)));
        if !injected {
            return tok.encode(&self.prompt_text(req)?).map_err(err);
        }
        let (Some(template), Some(messages)) = (&m.template, &req.messages) else {
            return tok.encode(&self.prompt_text(req)?).map_err(err);
        };
        let segments = template
            .render_segments(messages, tok.bos_token(), tok.eos_token())
            .map_err(|e| Rejection::Template(e.to_string()))?
            .ok_or_else(|| {
                Rejection::Template(
                    "a message holds the text of a control token, and this model's chat template rewrites contents, \
                     so it cannot be kept as text: remove it"
                        .into(),
                )
            })?;
        let mut ids = Vec::new();
        for s in segments {
            match s {
                crate::model::chat::Segment::Template(t) => ids.extend(tok.encode(&t).map_err(err)?),
                crate::model::chat::Segment::Content(c) => ids.extend(tok.encode_plain(&c).map_err(err)?),
            }
        }
        Ok(ids)
    }

    /// Checks `req` against this model and tokenises its prompt.
    pub fn prepare(&self, req: &Request) -> Result<Prepared, Rejection> {
        let m = &self.model;
        if let Some(requested) = &req.model {
            if requested != &m.name {
                return Err(Rejection::UnknownModel {
                    requested: requested.clone(),
                    served: m.name.clone(),
                });
            }
        }
        let prompt = self.prompt_tokens(req)?;
        if prompt.is_empty() || prompt.len() >= m.context_length {
            return Err(Rejection::PromptTooLong {
                tokens: prompt.len(),
                context_length: m.context_length,
            });
        }
        let sampling = SamplingParams {
            temperature: req.temperature.unwrap_or(0.0),
            top_p: req.top_p.unwrap_or(1.0),
            top_k: req.top_k.unwrap_or(0) as usize,
            seed: req.effective_seed(),
        };
        Ok(Prepared {
            prompt,
            params: GenerationParams {
                sampling,
                max_tokens: req.max_tokens_or_default() as usize,
                stop: req.stop.clone(),
            },
        })
    }

    /// Runs a prepared request to the end, on the calling thread.
    pub fn generate(&self, prepared: Prepared) -> Result<Completion, ModelError> {
        Sequence::new(&self.model, prepared.prompt, prepared.params).run(&self.model)
    }
}

/// Continue-from state for a job: the generated tokens of a snapshot and, unless it was a
/// tokens-only snapshot, the cache of all positions but the last token's.
#[derive(Debug)]
pub struct ResumeFrom {
    pub tokens: Vec<u32>,
    pub cache: Option<crate::model::SequenceCache>,
}

/// Signals from the worker to a running job.
#[derive(Debug, Default)]
pub struct JobControl {
    /// Stop at the next token boundary, snapshot, and report [`Outcome::Suspended`] (graceful
    /// drain on SIGTERM, or a revoked partition).
    pub suspend: AtomicBool,
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Finished(Completion),
    /// Stopped on request after `tokens` generated tokens; the snapshot sink was handed the
    /// state at that token.
    Suspended {
        tokens: usize,
    },
}

/// Where a running sequence's state goes as it is generated: the engine offers it at token
/// boundaries and knows nothing of what is done with it. The snapshot writer
/// (`snapshot::writer::SnapshotSink`) keeps it in a durable store; a job with none is simply
/// not checkpointed.
///
/// Both calls run on the engine thread between forward passes, so they must be quick: copy what
/// is needed out of the sequence and hand the rest of the work to another thread.
pub trait Checkpoint: Send + std::fmt::Debug {
    /// Called after every emitted token: takes the state if the implementor's policy says one
    /// is due (every so many tokens, or so much time).
    fn maybe_offer(&mut self, seq: &Sequence) -> Result<(), ModelError>;
    /// Called when the job is told to suspend: takes the state now, as the last one before the
    /// job stops.
    fn offer(&mut self, seq: &Sequence) -> Result<(), ModelError>;
}

/// One generation for the engine thread.
#[derive(Debug)]
pub struct Job {
    pub prepared: Prepared,
    pub resume: Option<ResumeFrom>,
    /// Where the sequence's state is offered as it goes (see [`Checkpoint`]).
    pub snapshots: Option<Box<dyn Checkpoint>>,
    pub control: Arc<JobControl>,
    /// When the answer is no longer wanted in full: once it has passed, the generation ends with
    /// [`FinishReason::Deadline`] and the text so far. Checked every round, so it can be overrun
    /// by one batched forward pass (a decode step, plus at most one prefill chunk).
    pub deadline: Option<Instant>,
    /// Where the text goes as it is generated, for a streaming client. Chunks are numbered so
    /// that a resumed generation's repeats can be told apart (see [`stream`]). A receiver that
    /// went away is not an error: the generation goes on for the final reply.
    pub chunks: Option<mpsc::UnboundedSender<StreamChunk>>,
}

impl Job {
    /// A job for `prepared` as the engine runs it plainly: not resuming, not checkpointed, no
    /// deadline, no stream.
    pub fn new(prepared: Prepared) -> Self {
        Self {
            prepared,
            resume: None,
            snapshots: None,
            control: Arc::new(JobControl::default()),
            deadline: None,
            chunks: None,
        }
    }
}

/// A job admitted to the engine: its sequence, and what to feed and check along the way.
#[derive(Debug)]
struct Active {
    seq: Sequence,
    snapshots: Option<Box<dyn Checkpoint>>,
    control: Arc<JobControl>,
    deadline: Option<Instant>,
    chunks: Option<mpsc::UnboundedSender<StreamChunk>>,
}

impl Active {
    fn send(&self, chunk: Option<StreamChunk>) {
        if let (Some(tx), Some(chunk)) = (&self.chunks, chunk) {
            // A client that stopped listening still gets the final reply.
            let _ = tx.send(chunk);
        }
    }

    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The outcome of a job that [`Engine::round`] reported as ended: one whose sequence is
    /// not finished was suspended.
    fn into_outcome(self) -> Result<Outcome, ModelError> {
        if self.seq.finish().is_some() {
            Ok(Outcome::Finished(self.seq.into_completion()?))
        } else {
            Ok(Outcome::Suspended {
                tokens: self.seq.generated().len(),
            })
        }
    }
}

/// Where a job stands after a round.
#[derive(Debug)]
enum Progress {
    Running,
    Ended,
    Failed(ModelError),
}

impl Engine {
    /// Runs a job to its end, or until it is told to suspend, offering snapshots as it goes, on
    /// the calling thread: the engine thread's rounds with a batch of one.
    pub fn run(&self, job: Job) -> Result<Outcome, ModelError> {
        let mut active = self.admit(job)?;
        loop {
            match self.round(&mut [&mut active]).pop() {
                Some(Progress::Running) => {}
                Some(Progress::Ended) | None => return active.into_outcome(),
                Some(Progress::Failed(e)) => return Err(e),
            }
        }
    }

    /// Starts a job: makes its sequence, fresh or restored from a snapshot, with no compute yet
    /// (its prompt or replay is fed by the rounds). A job whose deadline has already passed
    /// finishes at once with the text its snapshot had reached (none, if it is not resuming).
    fn admit(&self, job: Job) -> Result<Active, ModelError> {
        let m = &self.model;
        let Job {
            prepared,
            resume,
            snapshots,
            control,
            deadline,
            chunks,
        } = job;
        let (prompt, params) = (prepared.prompt, prepared.params);
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        let mut seq = match resume {
            Some(r) if expired => Sequence::from_tokens(m, prompt, params, r.tokens)?,
            None if expired => Sequence::from_tokens(m, prompt, params, Vec::new())?,
            Some(r) => Sequence::restore(m, prompt, params, r.tokens, r.cache)?,
            None => Sequence::new(m, prompt, params),
        };
        let last = if expired {
            seq.finish_now(m, FinishReason::Deadline)?
        } else {
            None
        };
        let active = Active {
            seq,
            snapshots,
            control,
            deadline,
            chunks,
        };
        active.send(last);
        Ok(active)
    }

    /// One round over the active jobs: each is checked and, if its logits are ready, emits a
    /// token; then one forward pass feeds every job that needs input, with at most one prompt
    /// chunk among them. Returns each job's progress, in order.
    fn round(&self, jobs: &mut [&mut Active]) -> Vec<Progress> {
        let mut progress: Vec<Progress> = jobs
            .iter_mut()
            .map(|job| match self.emit(job) {
                Ok(true) => Progress::Ended,
                Ok(false) => Progress::Running,
                Err(e) => Progress::Failed(e),
            })
            .collect();
        // The jobs to feed: every running one but the prefilling ones after the first, which
        // wait for a later round so that one long prompt at a time delays the others.
        let mut prefilling = false;
        let mut fed = Vec::new();
        let mut inputs = Vec::new();
        for (i, job) in jobs.iter_mut().enumerate() {
            if !matches!(progress[i], Progress::Running) {
                continue;
            }
            if job.seq.is_prefilling() {
                if prefilling {
                    continue;
                }
                prefilling = true;
            }
            if let Some(input) = job.seq.next_input() {
                fed.push(i);
                inputs.push(input);
            }
        }
        // A job whose input cannot be computed (its context is full) fails alone, before any
        // compute: the check is repeated here per input to tell which one.
        let context_length = self.model.weights.config.context_length;
        let mut k = 0;
        while k < inputs.len() {
            if inputs[k].cache.len() + inputs[k].tokens.len() > context_length {
                inputs.remove(k);
                progress[fed.remove(k)] = Progress::Failed(ModelError::ContextFull { context_length });
            } else {
                k += 1;
            }
        }
        let result = self.model.weights.forward_batch(&mut inputs);
        drop(inputs);
        match result {
            Ok(logits) => {
                for (i, logits) in fed.into_iter().zip(logits) {
                    if let Err(e) = jobs[i].seq.accept_logits(&logits) {
                        progress[i] = Progress::Failed(e);
                    }
                }
            }
            Err(e) => {
                for i in fed {
                    progress[i] = Progress::Failed(e.of_batch());
                }
            }
        }
        progress
    }

    /// A job's part of a round before the forward pass: it ends on its deadline, on a suspend
    /// request (offering the snapshot sink the current state), or when the token it emits (if
    /// its logits are ready) finishes it. Returns whether the job has ended.
    fn emit(&self, job: &mut Active) -> Result<bool, ModelError> {
        let m = &self.model;
        if job.seq.finish().is_some() {
            return Ok(true);
        }
        // The deadline goes first: a job past it can be answered now, at no cost, rather than
        // handed to another worker that would find the deadline passed too.
        if job.expired() {
            let last = job.seq.finish_now(m, FinishReason::Deadline)?;
            job.send(last);
            return Ok(true);
        }
        if job.control.suspend.load(Ordering::Acquire) {
            if let Some(sink) = &mut job.snapshots {
                sink.offer(&job.seq)?;
            }
            return Ok(true);
        }
        if job.seq.can_emit() {
            let chunk = job.seq.emit(m)?;
            if let Some(sink) = &mut job.snapshots {
                sink.maybe_offer(&job.seq)?;
            }
            job.send(chunk);
        }
        Ok(job.seq.finish().is_some())
    }
}
