//! The engine thread: [`EngineHandle::spawn`] starts it, [`EngineHandle::run`] sends it a job and
//! waits for the outcome; [`serve`] admits jobs up to the limit and runs batched rounds.

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::{Active, Engine, Job, Outcome, Progress};
use crate::model::ModelError;

/// Where a job's outcome goes: back to the [`EngineHandle::run`] that sent it.
type Reply = oneshot::Sender<Result<Outcome, ModelError>>;

/// A job on its way to the engine thread.
struct Envelope {
    job: Job,
    reply: Reply,
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
    /// Starts the engine thread. It runs up to `max_in_flight` jobs at once (at least one),
    /// decoded together as one batch, and ends when every handle is dropped and its jobs are
    /// done. As many jobs again can wait in the channel, so that a caller with work ready does
    /// not wait for a slot to hand it over.
    pub fn spawn(engine: Engine, max_in_flight: usize) -> std::io::Result<Self> {
        let max_in_flight = max_in_flight.max(1);
        let (jobs, rx) = mpsc::channel::<Envelope>(max_in_flight);
        std::thread::Builder::new()
            .name("ferry-engine".into())
            .spawn(move || serve(&engine, rx, max_in_flight))?;
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

/// The engine thread's loop: admit, then one batched round over the active jobs, round after
/// round.
fn serve(engine: &Engine, mut rx: mpsc::Receiver<Envelope>, max_in_flight: usize) {
    let mut active: Vec<(Active, Reply)> = Vec::new();
    let mut open = true;
    loop {
        if active.is_empty() {
            // Idle: wait for work, or end once no handle is left to send any.
            match rx.blocking_recv() {
                Some(env) => admit(engine, env, &mut active),
                None => return,
            }
        }
        while open && active.len() < max_in_flight {
            match rx.try_recv() {
                Ok(env) => admit(engine, env, &mut active),
                Err(TryRecvError::Empty) => break,
                // Finish what is active; the blocking receive above then ends the thread.
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // Nobody can receive the answer of a caller that stopped waiting: free its slot.
        active.retain(|(_, reply)| !reply.is_closed());
        let progress = {
            let mut jobs: Vec<&mut Active> = active.iter_mut().map(|(job, _)| job).collect();
            engine.round(&mut jobs)
        };
        // Answer the jobs that ended, from the back so the indices stay valid.
        for (i, p) in progress.into_iter().enumerate().rev() {
            match p {
                Progress::Running => {}
                Progress::Ended => {
                    let (job, reply) = active.remove(i);
                    let _ = reply.send(job.into_outcome());
                }
                // The job fails alone: its sequence is dropped and the others go on.
                Progress::Failed(e) => {
                    let (_, reply) = active.remove(i);
                    let _ = reply.send(Err(e));
                }
            }
        }
    }
}

/// Starts `env`'s job and makes it active, or answers it at once if it failed to start or
/// already ended (its deadline had passed).
fn admit(engine: &Engine, env: Envelope, active: &mut Vec<(Active, Reply)>) {
    match engine.admit(env.job) {
        Ok(job) if job.seq.finish().is_some() => {
            let _ = env.reply.send(job.into_outcome());
        }
        Ok(job) => active.push((job, env.reply)),
        Err(e) => {
            let _ = env.reply.send(Err(e));
        }
    }
}
