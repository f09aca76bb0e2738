//! The engine: turns a validated request into a prompt and runs its generation.
//!
//! [`Engine::prepare`] does everything that can reject a request before compute is spent
//! (model name, chat template, prompt length); [`EngineHandle`] runs generations on a thread
//! of their own that owns the model, fed by a bounded channel, each job carrying its own reply
//! channel. The async Kafka loop never blocks on a forward pass.

pub mod sampler;
pub mod sequence;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_schemas::{ErrorCode, Request};
use tokio::sync::{mpsc, oneshot};

use crate::model::{Model, ModelError};
use crate::snapshot::writer::SnapshotSink;
pub use sampler::SamplingParams;
pub use sequence::{Completion, Finish, GenerationParams, Sequence};

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
        let text = self.prompt_text(req)?;
        let prompt = m
            .tokenizer
            .encode(&text)
            .map_err(|e| Rejection::Template(e.to_string()))?;
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

/// One generation for the engine thread.
#[derive(Debug)]
pub struct Job {
    pub prepared: Prepared,
    pub resume: Option<ResumeFrom>,
    pub snapshots: Option<SnapshotSink>,
    pub control: Arc<JobControl>,
}

impl Engine {
    /// Runs a job to its end, or until it is told to suspend, offering snapshots as it goes.
    pub fn run(&self, job: Job) -> Result<Outcome, ModelError> {
        let m = &self.model;
        let Job {
            prepared,
            resume,
            mut snapshots,
            control,
        } = job;
        let mut seq = match resume {
            Some(r) => Sequence::resume(m, prepared.prompt, prepared.params, r.tokens, r.cache)?,
            None => {
                let mut s = Sequence::new(m, prepared.prompt, prepared.params);
                s.prefill(m)?;
                s
            }
        };
        while seq.finish().is_none() {
            if control.suspend.load(Ordering::Acquire) {
                if let Some(sink) = &mut snapshots {
                    sink.offer(&seq)?;
                }
                return Ok(Outcome::Suspended {
                    tokens: seq.generated().len(),
                });
            }
            seq.step(m)?;
            if let Some(sink) = &mut snapshots {
                sink.maybe_offer(&seq)?;
            }
        }
        Ok(Outcome::Finished(seq.into_completion()?))
    }
}

struct Envelope {
    job: Job,
    reply: oneshot::Sender<Result<Outcome, ModelError>>,
}

/// The sending side of the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Envelope>,
}

/// The engine thread stopped (it panicked, or the handle outlived it).
#[derive(Debug, thiserror::Error)]
#[error("the engine thread has stopped")]
pub struct EngineStopped;

impl EngineHandle {
    /// Starts the engine thread. It runs jobs one at a time, in order, and ends when every
    /// handle is dropped.
    pub fn spawn(engine: Engine) -> std::io::Result<Self> {
        let (jobs, mut rx) = mpsc::channel::<Envelope>(1);
        std::thread::Builder::new().name("ferry-engine".into()).spawn(move || {
            while let Some(env) = rx.blocking_recv() {
                // A caller that stopped waiting is not an error for the engine.
                let _ = env.reply.send(engine.run(env.job));
            }
        })?;
        Ok(Self { jobs })
    }

    /// Runs a job on the engine thread and waits for it.
    pub async fn run(&self, job: Job) -> Result<Result<Outcome, ModelError>, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Envelope { job, reply })
            .await
            .map_err(|_| EngineStopped)?;
        rx.await.map_err(|_| EngineStopped)
    }
}
