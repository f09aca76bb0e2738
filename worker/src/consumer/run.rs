//! The worker's loop, as a state machine: [`State`] by [`State`], from consuming to leaving the
//! group or giving up.

use super::*;

/// Where the worker's loop stands ([`Worker::run`]), in the manner of a source's consumer state
/// in vector's Kafka source: each state is a method that returns the next.
#[derive(Debug)]
enum State {
    /// Fetching messages and serving them.
    Consuming,
    /// Told to stop (a signal, or a trip, which bumps the same counter): fetching has stopped,
    /// generations are suspended and requests settle.
    Draining,
    /// Giving up on what is in flight, which stays uncommitted for the partitions' next owners:
    /// with `error`, the worker's own failure, which it exits with; without, a drain cut short
    /// (a second signal, the deadline), after which it leaves the group. With `close_attempts`,
    /// the open attempts are first recorded as stopped on purpose (`why`), so they do not count
    /// against the requests' budgets.
    Abandoned {
        why: String,
        close_attempts: bool,
        error: Option<WorkerError>,
    },
    /// Done: the worker leaves the group.
    Left,
}

impl State {
    /// A request task failed with a worker error: the open attempts are closed only when the
    /// worker stops on purpose ([`WorkerError::is_controlled`]).
    fn failed(e: WorkerError) -> Self {
        State::Abandoned {
            why: e.to_string(),
            close_attempts: e.is_controlled(),
            error: Some(e),
        }
    }
}

impl Worker {
    /// Serves requests until the first signal, then drains (see the module doc): [`State`] by
    /// [`State`], from consuming to leaving the group or giving up.
    pub async fn run(&self, mut signals: Signals) -> Result<(), WorkerError> {
        let mut tasks: JoinSet<Result<(), WorkerError>> = JoinSet::new();
        let mut state = State::Consuming;
        loop {
            state = match state {
                State::Consuming => self.consume(&mut tasks, &mut signals).await,
                State::Draining => self.drain(&mut tasks, &mut signals).await,
                State::Abandoned {
                    why,
                    close_attempts,
                    error,
                } => {
                    self.inner.inflight.abandon();
                    if close_attempts {
                        self.inner.close_open_attempts(CLOSE_ATTEMPTS_WITHIN, &why).await;
                    }
                    match error {
                        Some(e) => return Err(e),
                        None => State::Left,
                    }
                }
                State::Left => {
                    // Leave the group now, so the partitions move to the survivors without
                    // waiting for the session timeout (with static membership librdkafka does
                    // not leave; see `--group-instance-id`).
                    self.inner.consumer.unsubscribe();
                    info!("left the consumer group");
                    return Ok(());
                }
            }
        }
    }

    /// [`State::Consuming`]: fetches messages into their lanes and starts their tasks while
    /// there is room, until a signal ([`State::Draining`]) or a failure of the worker's own
    /// ([`State::Abandoned`]).
    async fn consume(&self, tasks: &mut JoinSet<Result<(), WorkerError>>, signals: &mut Signals) -> State {
        let inner = &self.inner;
        info!(worker = %inner.publisher.worker_id, max_in_flight = self.max_in_flight, "consuming");
        let mut lanes: Lanes<OwnedMessage> = Lanes::new(
            self.lanes.iter().map(|l| (l.topic.as_str(), l.weight)),
            self.max_in_flight,
        );
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(feature = "fault-injection")]
            fault_injection::maybe_stall_poll();
            inner.ops.health.beat();
            drop_revoked(inner, &mut lanes);
            while tasks.len() < self.max_in_flight {
                let Some(msg) = lanes.pop() else { break };
                self.start(tasks, msg);
            }
            self.update_pauses(&lanes);
            tokio::select! {
                _ = signals.changed() => {
                    inner.ops.health.set_draining();
                    return State::Draining;
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = task_result(joined) {
                        return State::failed(e);
                    }
                }
                m = inner.consumer.recv() => {
                    // A revocation handled during this poll drops the waiting messages of its
                    // partitions before anything fetched after it is queued.
                    drop_revoked(inner, &mut lanes);
                    match m {
                        Ok(m) => {
                            let m = m.detach();
                            let topic = m.topic().to_string();
                            lanes.push(&topic, m);
                        }
                        Err(e) => {
                            // librdkafka reports transient broker trouble here and recovers.
                            warn!(error = %e, "consumer error");
                            if matches!(e, KafkaError::MessageConsumption(RDKafkaErrorCode::Fatal)) {
                                let e = WorkerError::Consume(e);
                                return State::Abandoned {
                                    why: e.to_string(),
                                    close_attempts: true,
                                    error: Some(e),
                                };
                            }
                        }
                    }
                }
                _ = poll.tick() => {
                    inner.ops.metrics.set_commit_lag(inner.inflight.commit_lag());
                    if inner.inflight.has_deferred() {
                        let inner = inner.clone();
                        tokio::spawn(async move { inner.retry_deferred().await });
                    }
                }
            }
        }
    }

    /// [`State::Draining`]: stops fetching, suspends every generation in flight (each
    /// snapshots at its current token), and waits for all requests to settle, within the drain
    /// timeout. Then [`State::Left`]; or [`State::Abandoned`] on a second signal, at the
    /// deadline, or when a request task fails.
    async fn drain(&self, tasks: &mut JoinSet<Result<(), WorkerError>>, signals: &mut Signals) -> State {
        let inner = &self.inner;
        let suspended = inner.inflight.suspend(None);
        info!(in_flight = suspended, "draining: suspending the generations in flight");
        let drained = tokio::time::timeout(self.drain_timeout, async {
            loop {
                tokio::select! {
                    joined = tasks.join_next() => match joined {
                        None => return Ok::<bool, WorkerError>(true),
                        Some(j) => task_result(j)?,
                    },
                    _ = signals.changed() => return Ok(false),
                }
            }
        })
        .await;
        let cut_short = |why: &str| State::Abandoned {
            why: why.to_string(),
            close_attempts: true,
            error: None,
        };
        match drained {
            Ok(Ok(true)) => State::Left,
            Ok(Ok(false)) => {
                warn!("second signal: exiting now; what is in flight stays uncommitted");
                cut_short("a second signal")
            }
            Ok(Err(e)) => State::failed(e),
            Err(_) => {
                warn!("drain deadline passed: exiting; what is in flight stays uncommitted");
                cut_short("the drain deadline passed")
            }
        }
    }
}
