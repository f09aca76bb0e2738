//! The worker's configuration: one struct per concern, every flag also an environment variable,
//! validated once at start-up with messages that say what to change.

mod kafka;
mod security;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::model::{Kernels, LoadOptions, ModelSource, WeightFormat};
use crate::snapshot::{ResumeMode, SnapshotPolicy};
pub use kafka::*;
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

pub fn parse_device(s: &str) -> Result<DeviceChoice, String> {
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
    /// Where the probes alone, `/healthz` and `/readyz`, are also served, `host:port`, with
    /// connections and timeouts of their own: clients that flood `--http-addr` cannot delay
    /// them. The Kubernetes probes ask here. `off` serves none.
    #[arg(long, env = "FERRY_PROBE_ADDR", default_value = "0.0.0.0:9091", value_parser = parse_http_addr)]
    pub probe_addr: HttpAddr,
    /// `text` for people, `json` for log collectors (use it in Kubernetes).
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` syntax (`info`, `ferry_worker=debug,rdkafka=warn`). It also
    /// picks the spans exported with `--otlp-endpoint`.
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    pub log: String,
    /// Where OpenTelemetry traces go: a collector's OTLP/HTTP base URL (`http://collector:4318`;
    /// spans are posted to `/v1/traces` below it, as protobuf). Unset, no spans are exported.
    #[arg(long, env = "FERRY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<url::Url>,
    /// The `service.name` of the exported spans (`service.instance.id` is the worker id).
    #[arg(long, env = "FERRY_OTLP_SERVICE_NAME", default_value = "ferry-worker")]
    pub otlp_service_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--http-addr` or `--probe-addr`: an address, or none.
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
        for lane in &k.fallback_lanes {
            if !k.topics.iter().any(|l| l.topic == *lane) {
                return Err(ConfigError(format!(
                    "--fallback-lane {lane}: not one of --topic (a fallback lane is a request topic this worker consumes)"
                )));
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
        if let (HttpAddr(Some(http)), HttpAddr(Some(probe))) = (self.telemetry.http_addr, self.telemetry.probe_addr) {
            if http.port() != 0 && http.port() == probe.port() && overlap(http.ip(), probe.ip()) {
                return Err(ConfigError(format!(
                    "--probe-addr {probe} and --http-addr {http} are the same port: give the probes one of their own"
                )));
            }
        }
        Ok(())
    }
}

/// Whether two listeners on these addresses (and one port) would collide: the same address, or
/// either one every address.
fn overlap(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
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
mod tests;
