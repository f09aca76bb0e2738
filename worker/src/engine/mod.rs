//! The engine: turns a validated request into a prompt and runs its generation.
//!
//! [`Engine::prepare`] does everything that can reject a request before compute is spent
//! (model name, chat template, prompt length); [`EngineHandle`] runs generations on a thread
//! of their own that owns the model, fed by a bounded channel, each job carrying its own reply
//! channel. The async Kafka loop never blocks on a forward pass.

pub mod sampler;
pub mod sequence;

use std::sync::Arc;

use ferry_schemas::{ErrorCode, Request};
use tokio::sync::{mpsc, oneshot};

use crate::model::{Model, ModelError};
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
                    return Err(Rejection::Template("this model has no chat template; send `prompt` instead".into()));
                };
                template
                    .render(messages, m.tokenizer.bos_token(), m.tokenizer.eos_token())
                    .map_err(|e| Rejection::Template(e.to_string()))
            }
            (None, Some(prompt)) => Ok(prompt.clone()),
            (None, None) => Err(Rejection::Template("the request has neither messages nor prompt".into())),
        }
    }

    /// Checks `req` against this model and tokenises its prompt.
    pub fn prepare(&self, req: &Request) -> Result<Prepared, Rejection> {
        let m = &self.model;
        if let Some(requested) = &req.model {
            if requested != &m.name {
                return Err(Rejection::UnknownModel { requested: requested.clone(), served: m.name.clone() });
            }
        }
        let text = self.prompt_text(req)?;
        let prompt = m.tokenizer.encode(&text).map_err(|e| Rejection::Template(e.to_string()))?;
        if prompt.is_empty() || prompt.len() >= m.context_length {
            return Err(Rejection::PromptTooLong { tokens: prompt.len(), context_length: m.context_length });
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

struct Job {
    prepared: Prepared,
    reply: oneshot::Sender<Result<Completion, ModelError>>,
}

/// The sending side of the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
}

/// The engine thread stopped (it panicked, or the handle outlived it).
#[derive(Debug, thiserror::Error)]
#[error("the engine thread has stopped")]
pub struct EngineStopped;

impl EngineHandle {
    /// Starts the engine thread. It runs jobs one at a time, in order, and ends when every
    /// handle is dropped.
    pub fn spawn(engine: Engine) -> std::io::Result<Self> {
        let (jobs, mut rx) = mpsc::channel::<Job>(1);
        std::thread::Builder::new().name("ferry-engine".into()).spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                // A caller that stopped waiting is not an error for the engine.
                let _ = job.reply.send(engine.generate(job.prepared));
            }
        })?;
        Ok(Self { jobs })
    }

    /// Runs a generation on the engine thread and waits for it.
    pub async fn generate(&self, prepared: Prepared) -> Result<Result<Completion, ModelError>, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job { prepared, reply }).await.map_err(|_| EngineStopped)?;
        rx.await.map_err(|_| EngineStopped)
    }
}
