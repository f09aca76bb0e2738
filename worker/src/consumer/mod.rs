//! The Kafka side of the worker: many requests in flight, offsets committed only for finished
//! work, in order.
//!
//! # Data flow
//!
//! The loop polls the consumer all the time (also while it generates, so it never exceeds
//! `max.poll.interval.ms` and every rebalance is answered at once). A message goes to its
//! [lane](lanes) (one per request topic, served by weight); while fewer than `--max-in-flight`
//! requests run, the loop starts the next one as a task ([`request`]), which generates on the
//! engine thread (interleaved with the others), publishes the answer and waits for the broker's
//! acknowledgement. A lane that holds `--max-in-flight` waiting messages has its partitions
//! paused until it drains.
//!
//! A started request generates only once its worst-case KV cache fits in the worker's
//! `--kv-budget` beside those generating ([`admission`]); until then it waits, holding its slot,
//! so a burst of long requests queues instead of exhausting the pod's memory.
//!
//! # Offsets
//!
//! Requests finish out of order, but a partition commits one position: the [`OffsetTracker`]
//! moves it only past offsets that are all finished. A request finished above a running one
//! leaves a *done marker* with its answer in the snapshot store; if the partition is redelivered
//! before the commit passes it, the stored answer is published again instead of recomputed. If
//! the worker dies anywhere before a commit, the group redelivers the uncommitted messages to
//! a surviving worker: a request may be answered twice (with the same answer), never zero times.
//! Several tasks commit (request tasks, the deferred-commit retry, the revocation callback);
//! [`commits`] makes a partition's commits one at a time and never lets its position move back.
//!
//! Under `--delivery exactly-once` ([`transaction`]) none of that commits: each request's
//! records and its offset go in one Kafka transaction, committed once every lower offset of its
//! partition has been, so a reader with `read_committed` sees each answer once.
//!
//! # Rebalances and shutdown
//!
//! Partitions are assigned `cooperative-sticky` by default, so a rebalance moves only those that
//! change hands. On revoke ([`inflight`]), the requests of the revoked partitions are snapshotted
//! and stopped, and what is finished is committed, within `--revoke-timeout`, before the
//! rebalance goes on; the new owner resumes them from the snapshots. On SIGTERM the worker
//! drains the same way for all of its partitions within `--drain-timeout`, then leaves the group
//! so the survivors take over at once. A second signal, or the deadline, ends it sooner; what is
//! not committed is redelivered either way.
//!
//! # Failures
//!
//! Attempts are counted durably in the snapshot store. A request whose generation fails, or
//! whose worker dies, `--max-attempts` times goes to the dead-letter topic with its history and
//! its caller gets an `attempts_exhausted` error; input that can never work goes there at once.
//! A request an earlier attempt of which died with its worker is a suspect: it runs alone, so
//! that if it is what crashes workers, it spends only its own budget, not its neighbours'.
//!
//! A failure that is the worker's rather than the request's (the accelerator out of memory, the
//! circuit breaker open, the accelerator unrecoverable) hands the request to `--fallback-topic`
//! when one is configured ([`fallback`]), once: a handed-off request is never handed off again.
//! Without one, an out-of-memory attempt counts as failed and the retry runs alone.

pub mod admission;
mod commits;
mod fallback;
mod inflight;
mod lanes;
mod publish;
mod request;
mod run;
mod transaction;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::{Delivery, GroupProtocol, KafkaConfig, Lane, LIBRDKAFKA_MAX_POLL_INTERVAL_MS};
use crate::engine::{Engine, EngineHandle, JobControl};
use crate::offsets::TopicPartition;
use crate::ops::Ops;
use crate::snapshot::Snapshots;
use inflight::{InFlight, WorkerContext};
use lanes::Lanes;
use publish::Publisher;

pub use crate::offsets::OffsetTracker;

/// Failures that stop the worker. Its uncommitted messages are then redelivered to others.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The Kafka clients could not be created or subscribed.
    #[error("kafka setup: {0}")]
    Setup(#[source] KafkaError),
    /// The broker did not acknowledge a reply or dead-letter record in time.
    #[error("publishing to {topic} failed: {source}")]
    Publish { topic: String, source: KafkaError },
    /// Reading from the consumer failed in a way librdkafka does not recover from.
    #[error("consuming: {0}")]
    Consume(#[source] KafkaError),
    /// The engine thread died.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineStopped),
    /// Serialising a reply failed (a bug).
    #[error("serialising a reply: {0}")]
    Serialize(#[from] serde_json::Error),
    /// A request task panicked (a bug).
    #[error("a request task panicked: {0}")]
    Task(String),
    /// A topic the worker must be able to write (dead-letter, fallback) is missing or unusable.
    #[error("{0}")]
    Topics(String),
    /// The KV budget cannot hold even one request (`--kv-budget`, or the memory limit).
    #[error(transparent)]
    Budget(#[from] admission::BudgetError),
    /// Exactly-once delivery cannot go on: the transactional producer was fenced by a newer
    /// worker of the same name, the broker does not support transactions, or no transaction
    /// could be committed within `--publish-timeout`.
    #[error("exactly-once delivery: {0}")]
    Transaction(String),
}

impl WorkerError {
    /// Whether the worker stops for a reason of its own, not because of a request in flight:
    /// the attempts in flight are then closed as suspended, so they do not count against their
    /// requests' budgets (see [`request::Inner::close_open_attempts`]). A panicking task or a
    /// dead engine thread may have been killed by a request, so those attempts stay open and
    /// count, as a crash's would.
    fn is_controlled(&self) -> bool {
        !matches!(self, WorkerError::Task(_) | WorkerError::Engine(_))
    }
}

/// How long a controlled exit may spend closing the attempts in flight in the snapshot store.
const CLOSE_ATTEMPTS_WITHIN: Duration = Duration::from_secs(2);

/// Signals the worker counts: the first starts a drain, the second ends the process at once.
pub type Signals = tokio::sync::watch::Receiver<u32>;

type WorkerConsumer = StreamConsumer<WorkerContext>;

/// How often the loop polls the consumer when nothing arrives, which keeps the worker inside
/// `max.poll.interval.ms` and answers rebalances while every slot is busy and the partitions are
/// paused.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// What the worker needs besides Kafka settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub worker_id: String,
    /// The durable store's service, or [`Snapshots::none`] without `--snapshot-store`.
    pub snapshots: Snapshots,
    pub drain_timeout: Duration,
    /// Where metrics and health go.
    pub ops: Arc<Ops>,
}

/// The worker's Kafka side.
pub struct Worker {
    inner: Arc<request::Inner>,
    lanes: Vec<Lane>,
    max_in_flight: usize,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.inner.publisher.worker_id)
            .finish_non_exhaustive()
    }
}

/// librdkafka settings shared by the consumer and the producer.
/// The classic protocol's heartbeat interval for a session timeout: a tenth of it, between
/// 100 ms and librdkafka's default of 3 s.
fn classic_heartbeat_ms(session_timeout: Duration) -> u128 {
    (session_timeout.as_millis() / 10).clamp(100, 3_000)
}

fn base_config(bootstrap: &str, cfg: &KafkaConfig, defaults: &[(&str, &str)]) -> Result<ClientConfig, WorkerError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in cfg.security.properties() {
        c.set(k, v);
    }
    for (k, v) in cfg
        .property_pairs()
        .map_err(|e| WorkerError::Setup(KafkaError::ClientCreation(e.0)))?
    {
        c.set(k, v);
    }
    Ok(c)
}

/// The producer of `--delivery exactly-once` ([`transaction`]), its transactions initialised
/// (which fences and aborts what a previous worker of the same name left open). Refused on
/// librdkafka's mock cluster, which does not store transactional offsets.
fn transactional_producer(
    bootstrap: &str,
    cfg: &KafkaConfig,
    worker_id: &str,
    consumer: &WorkerConsumer,
) -> Result<transaction::Transactions, WorkerError> {
    let cluster = inflight::blocking(|| consumer.client().fetch_cluster_id(Duration::from_secs(30)));
    if cluster.as_deref().is_some_and(|id| id.starts_with("mockCluster")) {
        return Err(WorkerError::Transaction(
            "librdkafka's mock cluster does not store transactional offsets: use a real Kafka broker \
             (`ferry broker --kafka`) or --delivery at-least-once"
                .into(),
        ));
    }
    // librdkafka requires a transactional producer's message timeout within the transaction's.
    let message_timeout = cfg.publish_timeout.min(cfg.transaction_timeout);
    let producer: FutureProducer = base_config(bootstrap, cfg, &[])?
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("transactional.id", format!("ferry-{}-{worker_id}", cfg.group_id))
        .set(
            "transaction.timeout.ms",
            cfg.transaction_timeout.as_millis().to_string(),
        )
        .set("message.timeout.ms", message_timeout.as_millis().to_string())
        .set("client.id", worker_id)
        .create()
        .map_err(WorkerError::Setup)?;
    inflight::blocking(|| producer.init_transactions(Duration::from_secs(60)))
        .map_err(|e| WorkerError::Transaction(format!("cannot initialise transactions: {e}")))?;
    info!(
        transaction_timeout = ?cfg.transaction_timeout,
        "exactly-once delivery: answers and offsets committed in one transaction"
    );
    Ok(transaction::Transactions::new(
        producer,
        message_timeout,
        cfg.publish_timeout,
    ))
}

impl Worker {
    pub fn new(bootstrap: &str, cfg: &KafkaConfig, engine: Engine, opts: WorkerOptions) -> Result<Self, WorkerError> {
        let inflight = Arc::new(InFlight::new(cfg.revoke_timeout));
        // A worker just handed an evicted worker's partition should see its message at once,
        // not after librdkafka's default 500 ms fetch wait. And under the classic protocol a
        // member learns that a rebalance began (a worker left) only from its next heartbeat's
        // answer: librdkafka's default 3 s interval made a survivor take over an evicted worker's
        // partition 1.5 s later on average, so it heartbeats every tenth of the session timeout
        // (1 s by default). Both overridable with --kafka-property.
        let heartbeat = classic_heartbeat_ms(cfg.session_timeout).to_string();
        let mut defaults = vec![("fetch.wait.max.ms", "100")];
        if cfg.group_protocol == GroupProtocol::Classic {
            defaults.push(("heartbeat.interval.ms", heartbeat.as_str()));
        }
        let mut consumer_config = base_config(bootstrap, cfg, &defaults)?;
        consumer_config
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A request published in a transaction (a hand-off from an exactly-once worker) is
            // served only once that transaction is committed.
            .set("isolation.level", "read_committed")
            .set("group.protocol", cfg.group_protocol.as_librdkafka());
        match cfg.group_protocol {
            GroupProtocol::Classic => {
                consumer_config
                    .set("session.timeout.ms", cfg.session_timeout.as_millis().to_string())
                    .set("max.poll.interval.ms", cfg.max_poll_interval.as_millis().to_string())
                    .set("partition.assignment.strategy", cfg.assignment_strategy.as_librdkafka());
            }
            GroupProtocol::Consumer => {
                // The broker owns the session timeout, the heartbeat and the assignment; librdkafka
                // refuses the client-side settings. And librdkafka 2.12 fails fatally when a
                // consumer of this protocol exceeds `max.poll.interval.ms` (fixed in 2.15), which
                // would turn a long stall into a dead worker that drops its in-flight work. So its
                // limit is set out of reach, and `--max-poll-interval` is enforced by the worker's
                // own liveness check instead: /healthz fails once the poll loop has stood still
                // that long, and the liveness probe restarts the pod.
                consumer_config.set("max.poll.interval.ms", LIBRDKAFKA_MAX_POLL_INTERVAL_MS.to_string());
                if let Some(assignor) = &cfg.group_remote_assignor {
                    consumer_config.set("group.remote.assignor", assignor);
                }
            }
        }
        consumer_config
            .set(
                "statistics.interval.ms",
                cfg.kafka_stats_interval.as_millis().to_string(),
            )
            .set("client.id", &opts.worker_id);
        if let Some(id) = &cfg.group_instance_id {
            consumer_config.set("group.instance.id", id);
        }
        let consumer: WorkerConsumer = consumer_config
            .create_with_context(WorkerContext {
                inflight: inflight.clone(),
                ops: opts.ops.clone(),
            })
            .map_err(WorkerError::Setup)?;
        let producer = base_config(bootstrap, cfg, &[])?
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", cfg.publish_timeout.as_millis().to_string())
            .set("client.id", &opts.worker_id)
            .create()
            .map_err(WorkerError::Setup)?;
        consumer.subscribe(&cfg.topic_names()).map_err(WorkerError::Setup)?;
        let engine_thread = EngineHandle::spawn(engine.clone(), cfg.max_in_flight)
            .map_err(|e| WorkerError::Setup(KafkaError::ClientCreation(format!("engine thread: {e}"))))?;
        if !opts.snapshots.keeps() && cfg.max_attempts > 0 {
            info!("no snapshot store: attempts are counted within this worker only, not across crashes");
        }
        if let Some(topic) = &cfg.fallback_topic {
            info!(fallback_topic = %topic, "requests this worker cannot serve (out of memory, a trip) go to the fallback topic");
        }
        let transactions = match cfg.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce => Some(transactional_producer(bootstrap, cfg, &opts.worker_id, &consumer)?),
        };
        let reply_policy = cfg
            .reply_policy()
            .map_err(|e| WorkerError::Setup(KafkaError::ClientCreation(e.0)))?;
        let publisher = Publisher::new(
            producer,
            transactions,
            opts.worker_id,
            cfg.publish_timeout,
            cfg.max_record_bytes,
            publish::Topics {
                policy: reply_policy,
                reply_topic: cfg.reply_topic.clone(),
                dead_letter_topic: cfg.dead_letter_topic.clone(),
                fallback_topic: cfg.fallback_topic.clone(),
            },
        );
        let mut must_write: Vec<(String, &str)> = Vec::new();
        for lane in &cfg.topics {
            let dlq = cfg.dead_letter_topic(&lane.topic);
            if !must_write.iter().any(|(t, _)| *t == dlq) {
                must_write.push((dlq, "dead-letter topic (--dead-letter-topic)"));
            }
        }
        if let Some(topic) = &cfg.fallback_topic {
            must_write.push((topic.clone(), "fallback topic (--fallback-topic)"));
        }
        publisher.check_topics(&must_write, &consumer)?;
        let kv_budget = admission::KvBudget::from_config(cfg.kv_budget, engine.model(), opts.ops.clone())?;
        let inner = Arc::new(request::Inner {
            consumer,
            publisher,
            open_attempts: request::OpenAttempts::new(opts.ops.clone()),
            engine,
            engine_thread,
            fallback_lanes: cfg.fallback_lanes.iter().cloned().collect(),
            snapshots: opts.snapshots,
            inflight,
            max_attempts: cfg.max_attempts,
            isolation: tokio::sync::RwLock::new(()),
            kv_budget,
            ops: opts.ops,
        });
        Ok(Self {
            inner,
            lanes: cfg.topics.clone(),
            max_in_flight: cfg.max_in_flight,
            drain_timeout: opts.drain_timeout,
        })
    }

    /// Registers a message with the offset tracker (in receive order) and starts its task.
    fn start(&self, tasks: &mut JoinSet<Result<(), WorkerError>>, msg: OwnedMessage) {
        let tp: TopicPartition = (msg.topic().to_string(), msg.partition());
        let control = Arc::new(JobControl::default());
        let epoch = self.inner.inflight.start(&tp, msg.offset(), control.clone());
        let inner = self.inner.clone();
        tasks.spawn(async move { inner.process(msg, epoch, control).await });
    }

    /// Pauses the partitions of full lanes and resumes those of lanes with room again.
    fn update_pauses(&self, lanes: &Lanes<OwnedMessage>) {
        for topic in lanes.topics() {
            let full = lanes.is_full(topic);
            let changed = {
                let mut s = self.inner.inflight.lock();
                if full {
                    s.paused_topics.insert(topic.to_string())
                } else {
                    s.paused_topics.remove(topic)
                }
            };
            if !changed {
                continue;
            }
            let Ok(assignment) = self.inner.consumer.assignment() else {
                continue;
            };
            let mut tpl = TopicPartitionList::new();
            for e in assignment.elements_for_topic(topic) {
                tpl.add_partition(topic, e.partition());
            }
            if tpl.count() == 0 {
                continue;
            }
            let result = if full {
                self.inner.consumer.pause(&tpl)
            } else {
                self.inner.consumer.resume(&tpl)
            };
            match result {
                Ok(()) => info!(
                    topic,
                    paused = full,
                    "lane {}",
                    if full { "full: paused" } else { "has room: resumed" }
                ),
                Err(e) => warn!(topic, error = %e, "cannot pause or resume a lane"),
            }
        }
    }
}

fn drop_revoked(inner: &request::Inner, lanes: &mut Lanes<OwnedMessage>) {
    let revoked = inner.inflight.take_revoked();
    if !revoked.is_empty() {
        lanes.retain(|m| !revoked.iter().any(|(t, p)| t == m.topic() && *p == m.partition()));
    }
}

fn task_result(joined: Result<Result<(), WorkerError>, tokio::task::JoinError>) -> Result<(), WorkerError> {
    joined.map_err(|e| WorkerError::Task(e.to_string()))?
}

impl request::Inner {
    /// Commits `position` for a partition, for work that started in `epoch`; `true` once it is
    /// committed, by this call or by an equal or higher commit before it. Commits of a
    /// partition are made one at a time and never move its position back ([`commits`]). A
    /// failed commit is not fatal: the caller keeps done markers and defers the commit to a
    /// retry; if the partition moves first, the new owner publishes the stored answers again.
    fn commit(&self, tp: &TopicPartition, epoch: u64, position: i64) -> bool {
        self.inflight.commits.commit(tp, epoch, position, || {
            let mut tpl = TopicPartitionList::new();
            if let Err(e) = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(position)) {
                warn!(error = %e, "cannot build the commit");
                return false;
            }
            match self.consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => true,
                Err(e) => {
                    // Commits fail while the group rebalances; the loop retries them at every poll.
                    debug!(topic = %tp.0, partition = tp.1, position, error = %e, "commit failed; will retry");
                    false
                }
            }
        })
    }
}

/// Faults for the tests, compiled only into builds with the `fault-injection` feature:
/// `FERRY_FAULT_STALL_POLL_FILE=<path>` stops the consumer loop (blocking its thread, as a stuck
/// worker would) for as long as that file exists, while librdkafka's own threads run on.
#[cfg(feature = "fault-injection")]
mod fault_injection {
    /// Runs on every turn of the consumer loop, so the variable is read once.
    pub fn maybe_stall_poll() {
        static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
        let Some(path) = FILE.get_or_init(|| std::env::var_os("FERRY_FAULT_STALL_POLL_FILE").map(Into::into)) else {
            return;
        };
        if path.exists() {
            tracing::warn!(file = %path.display(), "fault injection: the consumer loop stalls while this file exists");
            while path.exists() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_heartbeat_is_a_tenth_of_the_session_within_bounds() {
        assert_eq!(classic_heartbeat_ms(Duration::from_secs(10)), 1_000);
        assert_eq!(classic_heartbeat_ms(Duration::from_secs(6)), 600);
        assert_eq!(classic_heartbeat_ms(Duration::from_millis(500)), 100);
        assert_eq!(classic_heartbeat_ms(Duration::from_secs(300)), 3_000);
    }
}
