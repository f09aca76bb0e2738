//! The worker's configuration: one struct per concern, every flag also an environment variable,
//! validated once at start-up with messages that say what to change.

mod security;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::model::{Kernels, LoadOptions, ModelSource, WeightFormat};
use crate::snapshot::{ResumeMode, SnapshotPolicy};
pub use security::{librdkafka_features, KafkaSecurity, SaslMechanism, Secret, SecurityProtocol};

/// Ferry's worker: answers LLM requests from Kafka, committing each only once it is answered.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-worker", version, about)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub model: ModelConfig,
    #[command(flatten)]
    pub snapshot: SnapshotConfig,
    #[command(flatten)]
    pub shutdown: ShutdownConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    #[command(flatten)]
    pub health: HealthConfig,
}

/// Where requests come from and answers go.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "FERRY_BOOTSTRAP_SERVERS", default_value = "localhost:9092")]
    pub bootstrap_servers: String,
    /// Read the bootstrap servers from this file instead (as `ferry broker --bootstrap-file`
    /// writes it), waiting up to 60 s for it to appear.
    #[arg(long, env = "FERRY_BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,
    /// The topics requests are read from, each with an optional weight: `ferry.requests`, or
    /// priority lanes such as `ferry.high:4,ferry.normal:1`. When several lanes have work waiting,
    /// free slots go to them in proportion to their weights (smooth weighted round robin), so
    /// urgent requests are not stuck behind a backlog of normal ones.
    #[arg(long = "topic", env = "FERRY_REQUEST_TOPIC", default_value = "ferry.requests", value_delimiter = ',', value_parser = parse_lane)]
    pub topics: Vec<Lane>,
    /// The consumer group all workers of a fleet share.
    #[arg(long, env = "FERRY_GROUP_ID", default_value = "ferry-workers")]
    pub group_id: String,
    /// Where replies go for requests that name no `reply_to`.
    #[arg(long, env = "FERRY_REPLY_TOPIC", default_value = "ferry.replies")]
    pub reply_topic: String,
    /// Where unservable messages go; `<request topic>.dlq` when not given.
    #[arg(long, env = "FERRY_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Where this worker hands the requests it cannot serve for a reason of its own: the
    /// accelerator ran out of memory, or the worker gave up on itself (circuit breaker open,
    /// accelerator unrecoverable). The request is published there unchanged, with
    /// `ferry-handoff-*` headers saying from which worker and model and why, for workers of a
    /// smaller model (in a group of their own) to answer; its offset is committed once the copy is
    /// acknowledged. A request handed off once is never handed off again. Without it, such a
    /// request counts a failed attempt, is retried (alone, after running out of memory), and is
    /// dead-lettered after `--max-attempts`.
    #[arg(long, env = "FERRY_FALLBACK_TOPIC")]
    pub fallback_topic: Option<String>,
    /// How long the group waits for a silent worker before giving its partitions to others.
    #[arg(long, env = "FERRY_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,
    /// How long to wait for the broker to acknowledge a reply before the worker gives up and
    /// stops (the request is then redelivered, never lost).
    #[arg(long, env = "FERRY_PUBLISH_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,
    /// How answers reach the reply topics. `at-least-once` (the default): an answer is published,
    /// then its offset committed; a worker that dies in between leaves the request to be
    /// answered again (with the same answer), so a reader may see it twice. `exactly-once`
    /// (Apache Kafka, not the mock): each request's answer (or dead letter, or hand-off) and its
    /// offset are committed in one Kafka transaction, so readers with `isolation.level=
    /// read_committed` (librdkafka's default) see each answer once. The answers of a partition are
    /// then released in offset order. See the README's "Exactly-once delivery".
    #[arg(long, env = "FERRY_DELIVERY", value_enum, default_value = "at-least-once")]
    pub delivery: Delivery,
    /// With `--delivery exactly-once`: how long the broker lets a worker's transaction stay open
    /// before it aborts it (`transaction.timeout.ms`). A worker that dies inside one holds back
    /// the partitions it wrote (for read_committed readers) and the request's offset until then;
    /// one shorter than a broker restart makes the broker abort transactions in flight, which
    /// fences their workers (they exit, and their requests are redelivered).
    #[arg(long, env = "FERRY_TRANSACTION_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub transaction_timeout: Duration,
    /// Requests generated at once by this worker. When that many are running, the worker pauses
    /// its partitions (and keeps polling, so it stays in the group) until a slot frees.
    #[arg(long, env = "FERRY_MAX_IN_FLIGHT", default_value_t = 4)]
    pub max_in_flight: usize,
    /// Memory the KV caches of the requests in flight may take together: a request starts only
    /// when its worst case (prompt plus `max_tokens`, capped by the context) fits beside those
    /// already generating, and waits otherwise; one that could never fit is dead-lettered. A
    /// size (`512MiB`, `2GiB`, `1.5GB`, plain bytes), `off` or `0` for no limit, or `auto` (the
    /// default): on the CPU, the cgroup's memory limit less what the worker holds once the model
    /// is loaded and a reserve of a tenth of the limit (at least 128 MiB); unlimited where there
    /// is no cgroup limit, and on an accelerator, whose memory the cgroup does not bound.
    #[arg(long, env = "FERRY_KV_BUDGET", default_value = "auto", value_parser = parse_kv_budget)]
    pub kv_budget: KvBudgetSetting,
    /// Attempts a request gets. An attempt counts when its generation fails or its worker dies
    /// (attempts stopped on purpose by a drain or rebalance do not); once a request has used
    /// them all, it goes to the dead-letter topic with its history and its caller gets an
    /// `attempts_exhausted` error. Counted durably in the snapshot store (without one, only
    /// failures within one worker are counted).
    #[arg(long, env = "FERRY_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// How partitions are shared in the group. `cooperative-sticky` (the default) moves only the
    /// partitions that change hands in a rebalance, so the others keep generating.
    #[arg(
        long,
        env = "FERRY_ASSIGNMENT_STRATEGY",
        value_enum,
        default_value = "cooperative-sticky"
    )]
    pub assignment_strategy: AssignmentStrategy,
    /// The consumer group protocol. `classic` (the default): the group's members agree on the
    /// assignment among themselves, with `--assignment-strategy` and `--session-timeout`.
    /// `consumer` (KIP-848, Kafka 4.0 and later): the broker assigns (`--group-remote-assignor`)
    /// and owns the session timeout and heartbeat (`group.consumer.session.timeout.ms`, 45 s by
    /// default, and the group's `consumer.session.timeout.ms`), so `--session-timeout` and
    /// `--assignment-strategy` do not apply. See the README's "Choosing a group protocol".
    #[arg(long, env = "FERRY_GROUP_PROTOCOL", value_enum, default_value = "classic")]
    pub group_protocol: GroupProtocol,
    /// With `--group-protocol consumer`: the broker's assignor by name (`uniform` or `range` on
    /// Apache Kafka); the broker's default when unset.
    #[arg(long, env = "FERRY_GROUP_REMOTE_ASSIGNOR")]
    pub group_remote_assignor: Option<String>,
    /// Static group membership (`group.instance.id`, e.g. the pod name from a StatefulSet). A
    /// worker that restarts within the session timeout gets its partitions back without a
    /// rebalance; the price is that a worker that really died, or was evicted, keeps its
    /// partitions until the session timeout passes, so takeover is slower.
    #[arg(long, env = "FERRY_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
    /// Longest time between two polls of the consumer before librdkafka leaves the group. The
    /// worker polls all the time, also while it generates, so this only bounds a stuck worker.
    #[arg(long, env = "FERRY_MAX_POLL_INTERVAL", default_value = "300s", value_parser = humantime::parse_duration)]
    pub max_poll_interval: Duration,
    /// When partitions are revoked, the worker snapshots and stops their generations and
    /// commits what is finished, within this time, before it lets the rebalance go on.
    #[arg(long, env = "FERRY_REVOKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub revoke_timeout: Duration,
    /// Extra librdkafka properties, `key=value`, for TLS, SASL and tuning
    /// (`FERRY_KAFKA_PROPERTIES` takes a comma-separated list).
    #[arg(long = "kafka-property", env = "FERRY_KAFKA_PROPERTIES", value_delimiter = ',')]
    pub properties: Vec<String>,
    /// How often librdkafka reports its statistics, which give `/metrics` the consumer lag per
    /// partition (`statistics.interval.ms`); `0s` turns them off.
    #[arg(long, env = "FERRY_KAFKA_STATS_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kafka_stats_interval: Duration,
    /// Largest record, in bytes (key, value and headers), that the worker publishes: replies,
    /// stream chunks, dead letters and hand-offs alike. An answer that would be larger is
    /// refused with a `reply_too_large` error reply; a dead letter of a larger message keeps only
    /// the first bytes of the original (with its full size and sha256). The default stays below
    /// Kafka's default limits (broker `message.max.bytes` 1,048,588, librdkafka's 1,000,000);
    /// raise it only with both, and the topics' `max.message.bytes`, raised to match.
    #[arg(long, env = "FERRY_MAX_RECORD_BYTES", default_value_t = DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
    /// On a shared cluster: the reply topics requests may name, as topic-name prefixes
    /// (`tenant-a.`) or `re:` and a regular expression that must match the whole name
    /// (`re:tenant-[a-z]+\.replies`); comma-separated in `FERRY_REPLY_TOPIC_ALLOW`. Empty (the
    /// default): any topic but the forbidden ones. Internal topics (`__*`) and the fleet's own
    /// topics (request, dead-letter, fallback, `--journal-topic`) are refused either way, and
    /// `--reply-topic` is always allowed.
    #[arg(long = "reply-topic-allow", env = "FERRY_REPLY_TOPIC_ALLOW", value_delimiter = ',')]
    pub reply_topic_allow: Vec<String>,
    /// The durable callers' journal topic (`ferry request --identity`), which no request may
    /// name as its reply topic: a record there keyed by another caller's identity would erase
    /// that caller's journal entry by compaction.
    #[arg(long, env = "FERRY_JOURNAL_TOPIC", default_value = "ferry.callers")]
    pub journal_topic: String,
    #[command(flatten)]
    pub security: KafkaSecurity,
}

/// `--max-record-bytes` by default: below librdkafka's `message.max.bytes` (1,000,000) with room
/// for the record's framing.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 900_000;
/// What librdkafka's producer accepts by default (`message.max.bytes`).
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Room for a record's framing (batch and record headers) inside the producer's limit.
const RECORD_FRAMING_BYTES: usize = 1_024;

/// Properties the worker sets itself because its delivery guarantee depends on them.
const MANAGED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "partition.assignment.strategy",
    "group.instance.id",
    "max.poll.interval.ms",
    "group.protocol",
    "group.remote.assignor",
    "transactional.id",
    "transaction.timeout.ms",
    "isolation.level",
];

/// A request topic and its share of the worker's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    pub topic: String,
    pub weight: u32,
}

fn parse_lane(s: &str) -> Result<Lane, String> {
    let (topic, weight) = match s.rsplit_once(':') {
        Some((t, w)) => (
            t,
            w.parse()
                .map_err(|_| format!("{s:?}: the weight after ':' must be a whole number"))?,
        ),
        None => (s, 1),
    };
    Ok(Lane {
        topic: topic.trim().to_string(),
        weight,
    })
}

/// `--kv-budget`: how much memory the KV caches of the requests in flight may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvBudgetSetting {
    /// From the cgroup memory limit, where there is one (see `consumer::admission`).
    Auto,
    /// No limit.
    Off,
    /// This many bytes.
    Bytes(u64),
}

fn parse_kv_budget(s: &str) -> Result<KvBudgetSetting, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(KvBudgetSetting::Auto),
        "off" | "none" | "unlimited" => Ok(KvBudgetSetting::Off),
        _ => match parse_size(s)? {
            0 => Ok(KvBudgetSetting::Off),
            n => Ok(KvBudgetSetting::Bytes(n)),
        },
    }
}

/// A size in bytes: a number with an optional unit, binary (`KiB`, `MiB`, `GiB`, `TiB`, or
/// Kubernetes' `Ki`, `Mi`, `Gi`, `Ti`) or decimal (`kB`, `MB`, `GB`, `TB`, or `k`, `M`, `G`,
/// `T`), or `B`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let factor: u64 = match unit {
        "" | "B" | "b" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "TiB" | "Ti" => 1 << 40,
        // As in Kubernetes quantities, a bare `k`, `M`, `G` or `T` is decimal.
        "kB" | "KB" | "k" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "TB" | "T" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB)"
            ))
        }
    };
    let bad = || format!("{s:?} is not a size: use a number with a unit, such as 512MiB or 2GiB, or off");
    let n: f64 = number.parse().map_err(|_| bad())?;
    let bytes = n * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `group.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupProtocol {
    Classic,
    Consumer,
}

/// `--delivery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}

/// The largest `max.poll.interval.ms` librdkafka accepts (24 h).
pub const LIBRDKAFKA_MAX_POLL_INTERVAL_MS: u64 = 86_400_000;

impl GroupProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// `partition.assignment.strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AssignmentStrategy {
    CooperativeSticky,
    Range,
    Roundrobin,
}

impl AssignmentStrategy {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            AssignmentStrategy::CooperativeSticky => "cooperative-sticky",
            AssignmentStrategy::Range => "range",
            AssignmentStrategy::Roundrobin => "roundrobin",
        }
    }
}

impl KafkaConfig {
    /// The dead-letter topic for messages read from `topic`.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| ferry_schemas::dead_letter_topic(topic))
    }

    /// Where requests may have their answers published ([`crate::reply_topics`]).
    pub fn reply_policy(&self) -> Result<crate::reply_topics::ReplyTopicPolicy, ConfigError> {
        let allow = self
            .reply_topic_allow
            .iter()
            .filter(|a| !a.trim().is_empty())
            .map(|a| crate::reply_topics::Allow::parse(a).map_err(ConfigError))
            .collect::<Result<Vec<_>, _>>()?;
        let mut own: Vec<String> = Vec::new();
        for lane in &self.topics {
            own.push(lane.topic.clone());
            own.push(self.dead_letter_topic(&lane.topic));
        }
        if let Some(f) = &self.fallback_topic {
            own.push(f.clone());
            own.push(ferry_schemas::dead_letter_topic(f));
        }
        own.push(self.journal_topic.clone());
        Ok(crate::reply_topics::ReplyTopicPolicy::new(
            &self.reply_topic,
            own,
            allow,
        ))
    }

    /// The request topics, in the order given.
    pub fn topic_names(&self) -> Vec<&str> {
        self.topics.iter().map(|l| l.topic.as_str()).collect()
    }

    /// The extra properties as pairs.
    ///
    /// An error names an entry by its position and, once it has one, its key, never by its text:
    /// entries carry passwords (`sasl.password=...`), and an entry without `=` may be a piece of
    /// one (a password with a comma in it, split by `FERRY_KAFKA_PROPERTIES`' delimiter).
    pub fn property_pairs(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.properties
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (k, v) = p.split_once('=').ok_or_else(|| {
                    ConfigError(format!(
                        "--kafka-property entry {} of {} (FERRY_KAFKA_PROPERTIES is split at commas) is not of the \
                         form key=value; its text is not shown, as it may hold a secret",
                        i + 1,
                        self.properties.len()
                    ))
                })?;
                let k = k.trim();
                if k.is_empty() {
                    return Err(ConfigError(format!(
                        "--kafka-property entry {} of {} has no key before '='",
                        i + 1,
                        self.properties.len()
                    )));
                }
                if k == "statistics.interval.ms" {
                    return Err(ConfigError(
                        "--kafka-property statistics.interval.ms: use --kafka-stats-interval".into(),
                    ));
                }
                if MANAGED_PROPERTIES.contains(&k) {
                    return Err(ConfigError(format!(
                        "--kafka-property {k} is set by the worker itself (its delivery guarantee depends on it)"
                    )));
                }
                Ok((k.to_string(), v.trim().to_string()))
            })
            .collect()
    }
}

/// Which model to serve and how to load it.
#[derive(Debug, Clone, Args)]
pub struct ModelConfig {
    /// The GGUF model: a local path, or `hf://<owner>/<repo>/<file.gguf>[@<revision>]`.
    #[arg(long, env = "FERRY_MODEL")]
    pub model: ModelSource,
    /// The model file's expected sha256; the worker refuses to start on a mismatch.
    #[arg(long, env = "FERRY_MODEL_SHA256")]
    pub model_sha256: Option<String>,
    /// Where Hugging Face Hub downloads are cached (a volume shared by the pods of a node).
    #[arg(long, env = "FERRY_MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,
    /// The name requests use in their `model` field; the file's stem when not given.
    #[arg(long, env = "FERRY_MODEL_NAME")]
    pub model_name: Option<String>,
    /// How matrix weights are held in memory: `q8-0` re-quantises 4- and 5-bit weights to Q8_0
    /// at load, which candle runs about twice as fast on CPU; `native` keeps the file's format.
    #[arg(long, env = "FERRY_WEIGHTS", value_enum, default_value = "q8-0")]
    pub weights: WeightFormat,
    /// Caps the context window below the model's own, to bound KV-cache memory per request.
    #[arg(long, env = "FERRY_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Only fetch the model into `--model-cache-dir` (for a Hub reference), check it against
    /// `--model-sha256`, and exit: 0 when it is there and verified. For an init container, so
    /// that the worker starts only on a verified file. Several processes fetching into one cache
    /// at once (pods starting together on a node) take turns on a lock in the cache directory:
    /// one downloads, the others wait and then find the file.
    #[arg(long, env = "FERRY_FETCH_MODEL_ONLY")]
    pub fetch_model_only: bool,
    /// Which code runs the matrix products of Q8_0 weights on the CPU: `auto` (Ferry's kernels
    /// on the fastest instruction set the CPU has), a path of Ferry's kernels by name
    /// (`avx512vnni`, `avxvnni`, `avx2`, `portable`; the worker refuses to start if the CPU lacks
    /// it), or `candle` (candle's own). Snapshots name the kernels: one is resumed only on the
    /// kernels that wrote it, and otherwise replayed from its tokens.
    #[arg(long, env = "FERRY_KERNELS", default_value = "auto")]
    pub kernels: Kernels,
}

impl ModelConfig {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            source: self.model.clone(),
            cache_dir: self.model_cache_dir.clone(),
            sha256: self.model_sha256.clone(),
            weights: self.weights,
            name: self.model_name.clone(),
            max_context: self.max_context,
            kernels: self.kernels,
        }
    }
}

/// KV-cache snapshots.
#[derive(Debug, Clone, Args)]
pub struct SnapshotConfig {
    /// Where snapshots go: `file:///dir` (a shared volume), `s3://bucket/prefix`, `gs://…`,
    /// `az://…`, `memory://`, or `redis://host:port`. Without it, no snapshots are taken and an
    /// interrupted request starts over.
    #[arg(long, env = "FERRY_SNAPSHOT_STORE")]
    pub snapshot_store: Option<String>,
    /// Snapshot every this many generated tokens (0: not by count).
    #[arg(long, env = "FERRY_SNAPSHOT_EVERY_TOKENS", default_value_t = 16)]
    pub snapshot_every_tokens: usize,
    /// Also snapshot when this much time has passed since the last one (e.g. `500ms`).
    #[arg(long, env = "FERRY_SNAPSHOT_EVERY", value_parser = humantime::parse_duration)]
    pub snapshot_every: Option<Duration>,
    /// What a snapshot holds: `cache` (KV cache, no recompute on resume), `tokens` (token ids
    /// only, tiny, the cache recomputed on resume), or `auto` (by measured cost).
    #[arg(long = "resume", env = "FERRY_RESUME", value_enum, default_value = "cache")]
    pub resume: ResumeMode,
    /// Compact a snapshot once it has this many pieces.
    #[arg(long, env = "FERRY_SNAPSHOT_MAX_PIECES", default_value_t = 32)]
    pub snapshot_max_pieces: usize,
    /// Snapshots older than this are orphans (their request was answered elsewhere or
    /// abandoned) and are deleted.
    #[arg(long, env = "FERRY_SNAPSHOT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub snapshot_ttl: Duration,
    /// The deadline of one call to the snapshot store (a put also gets a second per 16 MiB it
    /// writes). A call past it is abandoned and the request goes on without the store (no
    /// snapshot, no ledger entry), and a store that timed out is left alone for a few seconds.
    /// At most `--drain-timeout`.
    #[arg(long, env = "FERRY_SNAPSHOT_STORE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub snapshot_store_timeout: Duration,
}

impl SnapshotConfig {
    pub fn policy(&self) -> SnapshotPolicy {
        SnapshotPolicy {
            every_tokens: self.snapshot_every_tokens,
            every: self.snapshot_every,
            mode: self.resume,
            max_pieces: self.snapshot_max_pieces,
        }
    }
}

/// Stopping.
#[derive(Debug, Clone, Args)]
pub struct ShutdownConfig {
    /// On SIGTERM, the worker stops fetching, snapshots its in-flight generation, waits for the
    /// snapshot to be durable, leaves the group and exits, all within this time.
    #[arg(long, env = "FERRY_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// The pod's `terminationGracePeriodSeconds` (SIGKILL follows SIGTERM after it). The drain
    /// timeout must end at least 5 s before it.
    #[arg(long, env = "FERRY_TERMINATION_GRACE_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub termination_grace_period: Duration,
}

/// Time kept between the end of the drain and the SIGKILL, for closing the consumer and exiting.
pub const DRAIN_MARGIN: Duration = Duration::from_secs(5);

/// This process.
#[derive(Debug, Clone, Args)]
pub struct RuntimeConfig {
    /// This worker's name in replies and logs; in Kubernetes, the pod name. Defaults to
    /// `$HOSTNAME`, or `worker-<pid>`.
    #[arg(long, env = "FERRY_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "FERRY_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// Compute threads. Pin it when the worker shares cores: candle's spinning thread pool
    /// slows down badly when it has more threads than free cores.
    #[arg(long, env = "FERRY_THREADS")]
    pub threads: Option<usize>,
}

/// The accelerator choice, parsed from `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    match s {
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceChoice::Cuda)
            .ok_or_else(|| format!("{s:?} is not a device: use cpu, cuda or cuda:N")),
    }
}

impl DeviceChoice {
    /// Opens the device. CUDA needs a build with the `cuda` feature.
    pub fn open(self) -> Result<candle_core::Device, ConfigError> {
        match self {
            DeviceChoice::Cpu => Ok(candle_core::Device::Cpu),
            DeviceChoice::Cuda(n) if cfg!(feature = "cuda") => {
                candle_core::Device::new_cuda(n).map_err(|e| ConfigError(format!("--device cuda:{n}: {e}")))
            }
            DeviceChoice::Cuda(_) => Err(ConfigError(
                "--device cuda needs a worker built with `--features cuda`".into(),
            )),
        }
    }
}

impl RuntimeConfig {
    pub fn worker_id(&self) -> String {
        self.worker_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("worker-{}", std::process::id()))
    }
}

/// Logs, metrics and probes.
#[derive(Debug, Clone, Args)]
pub struct TelemetryConfig {
    /// Where `/healthz`, `/readyz` and `/metrics` are served, `host:port`; `off` serves none.
    #[arg(long, env = "FERRY_HTTP_ADDR", default_value = "0.0.0.0:9090", value_parser = parse_http_addr)]
    pub http_addr: HttpAddr,
    /// `text` for people, `json` for log collectors (use it in Kubernetes).
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` syntax (`info`, `ferry_worker=debug,rdkafka=warn`).
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--http-addr`: an address, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpAddr(pub Option<SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|_| format!("{s:?} is not host:port (an IP address and a port) or `off`"))
}

/// When the worker gives up on itself: the accelerator health monitor and the circuit breaker.
/// Either drains the worker and exits it with status 3, so that it is restarted.
#[derive(Debug, Clone, Args)]
pub struct HealthConfig {
    /// How often the accelerator's health is checked (with `--device cuda`).
    #[arg(long, env = "FERRY_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// The circuit breaker opens after this many different requests failed in the engine in a
    /// row (the retries of one request count once; a successful generation resets the count);
    /// 0 turns it off.
    #[arg(long, env = "FERRY_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
}

/// A configuration that cannot work, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks every rule that clap's types do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.topics.is_empty() {
            return Err(ConfigError("--topic must name at least one topic".into()));
        }
        let mut names: Vec<(&str, String)> = vec![("--reply-topic", k.reply_topic.clone())];
        if let Some(fallback) = &k.fallback_topic {
            names.push(("--fallback-topic", fallback.clone()));
            let taken = k
                .topics
                .iter()
                .any(|l| l.topic == *fallback || k.dead_letter_topic(&l.topic) == *fallback)
                || k.reply_topic == *fallback;
            if taken {
                return Err(ConfigError(
                    "--fallback-topic must differ from every --topic, their dead-letter topics and --reply-topic"
                        .into(),
                ));
            }
        }
        for lane in &k.topics {
            names.push(("--topic", lane.topic.clone()));
            names.push(("--dead-letter-topic", k.dead_letter_topic(&lane.topic)));
            if lane.weight == 0 {
                return Err(ConfigError(format!(
                    "--topic {}: the weight must be at least 1",
                    lane.topic
                )));
            }
            if k.topics.iter().filter(|l| l.topic == lane.topic).count() > 1 {
                return Err(ConfigError(format!("--topic {} is given twice", lane.topic)));
            }
            if k.topics.iter().any(|l| l.topic == k.dead_letter_topic(&lane.topic)) {
                return Err(ConfigError("--dead-letter-topic must differ from every --topic".into()));
            }
        }
        for (flag, topic) in names {
            if topic.is_empty()
                || topic.len() > 249
                || !topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(ConfigError(format!("{flag} {topic:?} is not a valid Kafka topic name")));
            }
        }
        if k.max_in_flight == 0 || k.max_in_flight > 256 {
            return Err(ConfigError("--max-in-flight must be between 1 and 256".into()));
        }
        if k.max_attempts == 0 {
            return Err(ConfigError("--max-attempts must be at least 1".into()));
        }
        if k.group_protocol == GroupProtocol::Classic && k.max_poll_interval < k.session_timeout {
            return Err(ConfigError(
                "--max-poll-interval must be at least --session-timeout (librdkafka requires it)".into(),
            ));
        }
        if k.revoke_timeout >= k.max_poll_interval {
            return Err(ConfigError(
                "--revoke-timeout must be shorter than --max-poll-interval, which bounds a rebalance".into(),
            ));
        }
        if k.group_remote_assignor.is_some() && k.group_protocol == GroupProtocol::Classic {
            return Err(ConfigError(
                "--group-remote-assignor needs --group-protocol consumer (the classic protocol assigns with --assignment-strategy)".into(),
            ));
        }
        if k.group_instance_id.as_deref() == Some("") {
            return Err(ConfigError("--group-instance-id must not be empty".into()));
        }
        if k.group_id.is_empty() {
            return Err(ConfigError("--group-id must not be empty".into()));
        }
        if k.session_timeout < Duration::from_secs(1) || k.session_timeout > Duration::from_secs(3600) {
            return Err(ConfigError("--session-timeout must be between 1s and 1h".into()));
        }
        if k.publish_timeout < Duration::from_secs(1) {
            return Err(ConfigError("--publish-timeout must be at least 1s".into()));
        }
        if k.delivery == Delivery::ExactlyOnce
            && (k.transaction_timeout < Duration::from_secs(1) || k.transaction_timeout > Duration::from_secs(900))
        {
            return Err(ConfigError(
                "--transaction-timeout must be between 1s and 15m (the broker's transaction.max.timeout.ms by default)"
                    .into(),
            ));
        }
        let extra = k.property_pairs()?;
        let producer_max = extra
            .iter()
            .find(|(key, _)| key == "message.max.bytes")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES);
        if k.max_record_bytes < 4096 || k.max_record_bytes + RECORD_FRAMING_BYTES > producer_max {
            return Err(ConfigError(format!(
                "--max-record-bytes {} must be at least 4096 and at most {} (the producer's message.max.bytes {producer_max} \
                 less {RECORD_FRAMING_BYTES} for framing; raise it with --kafka-property message.max.bytes=N, and the \
                 broker's and topics' limits with it)",
                k.max_record_bytes,
                producer_max.saturating_sub(RECORD_FRAMING_BYTES)
            )));
        }
        let policy = k.reply_policy()?;
        if let Err(why) = policy.check(&k.reply_topic) {
            return Err(ConfigError(format!("--reply-topic: {why}")));
        }
        k.security.validate(&extra)?;
        k.security.check_supported(&librdkafka_features()?)?;
        if k.kafka_stats_interval != Duration::ZERO && k.kafka_stats_interval < Duration::from_millis(100) {
            return Err(ConfigError(
                "--kafka-stats-interval must be 0s (off) or at least 100ms".into(),
            ));
        }
        let h = &self.health;
        if h.health_interval < Duration::from_millis(100) || h.health_interval > Duration::from_secs(3600) {
            return Err(ConfigError("--health-interval must be between 100ms and 1h".into()));
        }
        if let Some(sha) = &self.model.model_sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError("--model-sha256 must be 64 hexadecimal digits".into()));
            }
        }
        if let Some(ctx) = self.model.max_context {
            if ctx < 16 {
                return Err(ConfigError("--max-context must be at least 16 tokens".into()));
            }
        }
        let sh = &self.shutdown;
        if sh.drain_timeout + DRAIN_MARGIN > sh.termination_grace_period {
            return Err(ConfigError(format!(
                "--drain-timeout {:?} must end at least {DRAIN_MARGIN:?} before --termination-grace-period {:?} \
                 (set terminationGracePeriodSeconds in the pod spec accordingly)",
                sh.drain_timeout, sh.termination_grace_period
            )));
        }
        if self.snapshot.snapshot_max_pieces < 2 {
            return Err(ConfigError("--snapshot-max-pieces must be at least 2".into()));
        }
        let store_timeout = self.snapshot.snapshot_store_timeout;
        if store_timeout < Duration::from_millis(10) || store_timeout > sh.drain_timeout {
            return Err(ConfigError(format!(
                "--snapshot-store-timeout {store_timeout:?} must be at least 10ms and at most \
                 --drain-timeout {:?}",
                sh.drain_timeout
            )));
        }
        if let Some(url) = &self.snapshot.snapshot_store {
            let known = [
                "file://",
                "s3://",
                "gs://",
                "az://",
                "memory://",
                "redis://",
                "rediss://",
            ];
            if !known.iter().any(|k| url.starts_with(k)) {
                return Err(ConfigError(format!(
                    "--snapshot-store {:?}: use one of {}",
                    crate::snapshot::store::redact(url),
                    known.join(", ")
                )));
            }
        }
        if self.runtime.threads == Some(0) {
            return Err(ConfigError("--threads must be at least 1".into()));
        }
        Ok(())
    }
}

/// Reads bootstrap servers from a file that another process writes (such as `ferry broker
/// --bootstrap-file`), waiting up to `wait` for it to appear with content.
pub async fn read_bootstrap_file(path: &std::path::Path, wait: Duration) -> Result<String, ConfigError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Ok(s) = tokio::fs::read_to_string(path).await {
            let s = s.trim();
            if !s.is_empty() {
                return Ok(s.to_string());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ConfigError(format!(
                "no bootstrap servers in {} after {wait:?}",
                path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["ferry-worker", "--model", "m.gguf"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).expect("parses")
    }

    #[test]
    fn the_record_budget_fits_the_producer() {
        assert_eq!(parse(&[]).kafka.max_record_bytes, 900_000);
        assert!(parse(&["--max-record-bytes", "999999"]).validate().is_err());
        assert!(parse(&["--max-record-bytes", "100"]).validate().is_err());
        let raised = parse(&[
            "--max-record-bytes",
            "4000000",
            "--kafka-property",
            "message.max.bytes=5000000",
        ]);
        assert_eq!(raised.validate(), Ok(()));
    }

    #[test]
    fn reply_topic_policy_from_flags() {
        let c = parse(&[
            "--reply-topic-allow",
            "tenant-a.,re:tenant-b\\.[a-z]+",
            "--fallback-topic",
            "small",
        ]);
        assert_eq!(c.validate(), Ok(()));
        let p = c.kafka.reply_policy().expect("policy");
        assert_eq!(p.check("tenant-a.x"), Ok(()));
        assert_eq!(p.check("tenant-b.replies"), Ok(()));
        assert!(p.check("tenant-c").is_err());
        for own in [
            "ferry.requests",
            "ferry.requests.dlq",
            "small",
            "small.dlq",
            "ferry.callers",
            "__consumer_offsets",
        ] {
            assert!(p.check(own).is_err(), "{own}");
        }
        assert!(parse(&["--reply-topic-allow", "re:("]).validate().is_err());
        assert!(parse(&["--reply-topic", "ferry.callers"]).validate().is_err());
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.kafka.dead_letter_topic("ferry.requests"), "ferry.requests.dlq");
        assert_eq!(c.kafka.topic_names(), ["ferry.requests"]);
        assert_eq!(c.kafka.assignment_strategy, AssignmentStrategy::CooperativeSticky);
        assert_eq!(c.model.weights, WeightFormat::Q8_0);
        assert_eq!(c.kafka.fallback_topic, None);
        assert!(!c.model.fetch_model_only);
        let f = parse(&["--fallback-topic", "ferry.requests.small"]);
        assert_eq!(f.validate(), Ok(()));
    }

    #[test]
    fn rejects_what_cannot_work() {
        for args in [
            &["--topic", "has space"][..],
            &["--dead-letter-topic", "ferry.requests"],
            &["--session-timeout", "10ms"],
            &["--kafka-property", "enable.auto.commit=true"],
            &["--kafka-property", "novalue"],
            &["--model-sha256", "abc"],
            &["--threads", "0"],
            &["--max-context", "4"],
            &["--drain-timeout", "28s"],
            &["--snapshot-store", "ftp://x"],
            &["--snapshot-store-timeout", "0s"],
            &["--snapshot-store-timeout", "21s"],
            &["--max-in-flight", "0"],
            &["--max-attempts", "0"],
            &["--topic", "a:0"],
            &["--topic", "a,a"],
            &["--max-poll-interval", "5s"],
            &["--revoke-timeout", "400s"],
            &["--kafka-property", "statistics.interval.ms=100"],
            &["--kafka-stats-interval", "1ms"],
            &["--health-interval", "0s"],
            &["--sasl-mechanism", "PLAIN"],
            &["--fallback-topic", "ferry.requests"],
            &["--fallback-topic", "ferry.requests.dlq"],
            &["--fallback-topic", "ferry.replies"],
            &["--fallback-topic", "no spaces"],
        ] {
            assert!(parse(args).validate().is_err(), "{args:?} should be rejected");
        }
    }

    #[test]
    fn parses_the_http_address() {
        assert_eq!(
            parse(&[]).telemetry.http_addr,
            HttpAddr(Some("0.0.0.0:9090".parse().expect("addr")))
        );
        assert_eq!(parse(&["--http-addr", "off"]).telemetry.http_addr, HttpAddr(None));
        assert_eq!(
            parse(&["--http-addr", "127.0.0.1:8080"]).telemetry.http_addr,
            HttpAddr(Some("127.0.0.1:8080".parse().expect("addr")))
        );
        assert!(parse_http_addr("localhost").is_err());
        assert_eq!(parse(&[]).health.breaker_failures, 5);
        assert_eq!(parse(&[]).kafka.kafka_stats_interval, Duration::from_secs(5));
        assert_eq!(parse(&["--kafka-stats-interval", "0s"]).validate(), Ok(()));
    }

    #[test]
    fn parses_priority_lanes() {
        let c = parse(&["--topic", "ferry.high:4,ferry.normal"]);
        assert_eq!(
            c.kafka.topics,
            [
                Lane {
                    topic: "ferry.high".into(),
                    weight: 4
                },
                Lane {
                    topic: "ferry.normal".into(),
                    weight: 1
                }
            ]
        );
        assert_eq!(c.validate(), Ok(()));
        assert!(parse_lane("x:heavy").is_err());
    }

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("cpu"), Ok(DeviceChoice::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceChoice::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceChoice::Cuda(3)));
        assert!(parse_device("tpu").is_err());
    }

    #[test]
    fn malformed_properties_are_named_by_position_never_by_text() {
        // A password with a comma, split by the delimiter: the second piece has no '='.
        let c = parse(&["--kafka-property", "sasl.password=hunter2,secretpart"]);
        let err = c.kafka.property_pairs().expect_err("the second piece is malformed");
        assert!(err.0.contains("entry 2 of 2"), "{err}");
        assert!(!err.0.contains("secretpart") && !err.0.contains("hunter2"), "{err}");
        let err = c.validate().expect_err("validation says the same");
        assert!(!err.to_string().contains("secretpart"), "{err}");
        let c = parse(&["--kafka-property", "=hunter2"]);
        let err = c.kafka.property_pairs().expect_err("no key");
        assert!(err.0.contains("entry 1 of 1") && !err.0.contains("hunter2"), "{err}");
        // A key is no secret: a managed one is named.
        let c = parse(&["--kafka-property", "group.id=mine"]);
        let err = c.kafka.property_pairs().expect_err("managed");
        assert!(err.0.contains("group.id") && !err.0.contains("mine"), "{err}");
    }

    #[test]
    fn sizes_and_kv_budgets_parse() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("3G"), Ok(3_000_000_000));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        for bad in ["", "MiB", "12XB", "-1GiB", "1e3", "1.2.3MiB", "5m"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse(&[]).kafka.kv_budget, KvBudgetSetting::Auto);
        assert_eq!(parse(&["--kv-budget", "off"]).kafka.kv_budget, KvBudgetSetting::Off);
        assert_eq!(parse(&["--kv-budget", "0"]).kafka.kv_budget, KvBudgetSetting::Off);
        assert_eq!(
            parse(&["--kv-budget", "2GiB"]).kafka.kv_budget,
            KvBudgetSetting::Bytes(2 << 30)
        );
        assert!(Config::try_parse_from(["ferry-worker", "--model", "m", "--kv-budget", "lots"]).is_err());
    }

    #[test]
    fn a_bad_store_url_is_reported_without_its_password() {
        let err = parse(&["--snapshot-store", "ftp://user:hunter2@host/x"])
            .validate()
            .expect_err("unknown scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("ftp://user:REDACTED@host/x"), "{err}");
    }

    #[test]
    fn extra_properties_pass_through() {
        let c = parse(&[
            "--kafka-property",
            "security.protocol=SASL_SSL",
            "--kafka-property",
            "sasl.mechanism=PLAIN",
        ]);
        assert_eq!(
            c.kafka.property_pairs(),
            Ok(vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.mechanism".into(), "PLAIN".into())
            ])
        );
    }
}
