//! Where requests come from and answers go: the Kafka settings, the delivery guarantee, the
//! lanes of several request topics, the record size limit and the KV budget.

use super::*;

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
    /// The request topics (among `--topic`) that are a fallback topic: the lanes where requests
    /// handed off by other workers arrive. Only there are the `ferry-handoff-*` headers read: a
    /// request that carries them is answered by this worker's model whatever model it names,
    /// and is never handed off again. On any other lane those headers are a producer's own and
    /// mean nothing, so a producer cannot use them to dodge the model check or a hand-off. The
    /// fallback fleet sets it to the topic it consumes.
    #[arg(long = "fallback-lane", env = "FERRY_FALLBACK_LANES", value_delimiter = ',')]
    pub fallback_lanes: Vec<String>,
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
    /// is loaded and a reserve of a tenth of the limit (at least 128 MiB), unlimited where there
    /// is no cgroup limit; on a GPU, whose memory the cgroup does not bound, the device's free
    /// memory once the model is loaded less a reserve of a tenth of the device (at least
    /// 512 MiB). A request resuming from a snapshot also needs room for its restore (the
    /// snapshot's largest piece) until its cache is restored.
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
pub(super) const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Room for a record's framing (batch and record headers) inside the producer's limit.
pub(super) const RECORD_FRAMING_BYTES: usize = 1_024;

/// Properties the worker sets itself because its delivery guarantee depends on them.
pub(super) const MANAGED_PROPERTIES: &[&str] = &[
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

pub(super) fn parse_lane(s: &str) -> Result<Lane, String> {
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
    /// From the cgroup memory limit, where there is one, or the GPU's free memory (see
    /// `consumer::admission`).
    Auto,
    /// No limit.
    Off,
    /// This many bytes.
    Bytes(u64),
}

pub(super) fn parse_kv_budget(s: &str) -> Result<KvBudgetSetting, String> {
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
