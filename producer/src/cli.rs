//! The command line, as clap types.
//!
//! Every flag also reads an environment variable named `FERRY_...`, so the same settings work
//! from a shell, a Kubernetes manifest or a test. A value given on the command line wins over
//! the variable. Durations are humantime strings such as `500ms`, `30s` or `2m`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_schemas::{ChatMessage, Role};

use crate::bootstrap::{self, BootstrapError};
use crate::client::KafkaConfig;
use crate::telemetry::LogFormat;

/// Ferry's command-line tool: publish requests, await replies, host a local broker.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Which logs to write to stderr, as a tracing filter such as `info` or `ferry=debug`.
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "info")]
    pub log: String,

    /// How to write logs: `text` for people, `json` for log collectors.
    #[arg(long, global = true, env = "FERRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The subcommands.
// The enum exists once per process, so the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Host a local broker until SIGTERM or SIGINT: an in-memory Kafka-protocol broker
    /// (librdkafka's mock cluster), or with `--kafka` a real single-node Apache Kafka. Prints
    /// its bootstrap servers as the first line of stdout.
    Broker(BrokerArgs),
    /// Publish one request, wait for its reply and print it.
    Request(RequestArgs),
    /// Publish requests read as JSON lines from stdin, each keyed by its id.
    Publish(PublishArgs),
}

/// Flags of `ferry broker`.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Number of brokers in the mock cluster (1 with `--kafka`).
    #[arg(long, env = "FERRY_BROKERS", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=16))]
    pub brokers: i32,

    /// Partitions of each topic named by `--topic`. Topics created later by auto-creation get
    /// librdkafka's fixed mock default of 4 instead (see `ferry::broker::mock`); with `--kafka`
    /// they get this count too.
    #[arg(long, env = "FERRY_PARTITIONS", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub partitions: i32,

    /// A topic to create at start-up; repeat the flag for several (the variable takes a
    /// comma-separated list).
    #[arg(
        long = "topic",
        env = "FERRY_TOPICS",
        value_name = "NAME",
        value_delimiter = ',',
        default_values_t = ["ferry.requests".to_string(), "ferry.replies".to_string(), "ferry.requests.dlq".to_string()]
    )]
    pub topics: Vec<String>,

    /// Also write the bootstrap servers to this file, atomically (a temporary file renamed into
    /// place), so a process waiting for it never reads a partial line. Removed on shutdown.
    #[arg(long, env = "FERRY_BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,

    /// Run a real single-node Apache Kafka (the version pinned in `producer/kafka/pom.xml`)
    /// instead of the mock: its jars are fetched with Maven once into a cache and checked
    /// against `producer/kafka/jars.lock`; Java and Maven are installed with apt-get if missing.
    #[arg(long, env = "FERRY_BROKER_KAFKA")]
    pub kafka: bool,

    /// Where `--kafka` caches its jars. Defaults to `$XDG_CACHE_HOME/ferry-kafka` or
    /// `~/.cache/ferry-kafka`.
    #[arg(long, env = "FERRY_KAFKA_CACHE")]
    pub kafka_cache: Option<PathBuf>,

    /// How long `--kafka` waits for the JVM to answer metadata requests (not counting the
    /// one-time fetch of the jars).
    #[arg(long, env = "FERRY_KAFKA_START_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub kafka_start_timeout: Duration,

    /// Keep `--kafka`'s data, configuration, log (`kafka.log`) and JVM pid (`jvm.pid`) in this
    /// directory instead of a temporary one removed on exit. Starting again on the same
    /// directory brings the broker back on the same ports with its topics, records and
    /// committed offsets: a broker restart, not a new cluster.
    #[arg(long, env = "FERRY_KAFKA_DIR", requires = "kafka")]
    pub kafka_dir: Option<PathBuf>,

    /// Also stop when stdin reaches end of file: start the broker with a pipe as its stdin and it
    /// stops when that pipe is closed or its writer dies in any way, SIGKILL included, so a
    /// test harness or script that is killed leaves no broker behind.
    #[arg(long, env = "FERRY_BROKER_STOP_ON_STDIN_EOF")]
    pub stop_on_stdin_eof: bool,
}

/// Where the Kafka cluster is and how long to wait for it.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port pairs.
    #[arg(
        long,
        env = "FERRY_BOOTSTRAP_SERVERS",
        default_value = "localhost:9092",
        conflicts_with = "bootstrap_file"
    )]
    pub bootstrap_servers: String,

    /// Read the bootstrap servers from this file instead (as written by `ferry broker
    /// --bootstrap-file`), waiting up to `--bootstrap-wait` for it to appear.
    #[arg(long, env = "FERRY_BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,

    /// How long to wait for `--bootstrap-file` to appear.
    #[arg(long, env = "FERRY_BOOTSTRAP_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub bootstrap_wait: Duration,

    /// How long the producer keeps retrying a message before it reports it undeliverable.
    #[arg(long, env = "FERRY_DELIVERY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub delivery_timeout: Duration,
}

impl KafkaArgs {
    /// The client configuration, reading the bootstrap file first when one is named.
    pub async fn resolve(&self) -> Result<KafkaConfig, BootstrapError> {
        let bootstrap_servers = match &self.bootstrap_file {
            Some(path) => bootstrap::wait_for_file(path, self.bootstrap_wait).await?,
            None => self.bootstrap_servers.clone(),
        };
        Ok(KafkaConfig {
            bootstrap_servers,
            delivery_timeout: self.delivery_timeout,
        })
    }
}

/// Flags of `ferry request`.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("body").required(true).args(["prompt", "messages", "json", "fan_out", "resume"]))]
pub struct RequestArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// The topic the request is published to.
    #[arg(long, env = "FERRY_REQUEST_TOPIC", default_value = "ferry.requests")]
    pub topic: String,

    /// The topic the reply is awaited on; becomes the request's `reply_to`. Defaults to
    /// `ferry.replies`, or to the `reply_to` of a `--json` request that has one.
    #[arg(long, env = "FERRY_REPLY_TOPIC")]
    pub reply_topic: Option<String>,

    /// The request id, which keys both the request and its reply. Defaults to a random UUID
    /// (or the id of a `--json` request).
    #[arg(long, env = "FERRY_REQUEST_ID")]
    pub id: Option<String>,

    /// Raw prompt text, tokenised as is with no chat template.
    #[arg(long, env = "FERRY_PROMPT")]
    pub prompt: Option<String>,

    /// A chat turn as ROLE:CONTENT, with ROLE one of system, user, assistant. Repeat the flag
    /// for a conversation, in order.
    #[arg(long = "message", env = "FERRY_MESSAGE", value_name = "ROLE:CONTENT", value_parser = parse_chat_message)]
    pub messages: Vec<ChatMessage>,

    /// A whole request as JSON. Other flags given alongside override its fields.
    #[arg(long, env = "FERRY_REQUEST_JSON")]
    pub json: Option<String>,

    /// The model the request expects a worker to serve.
    #[arg(long, env = "FERRY_REQUEST_MODEL")]
    pub model: Option<String>,

    /// Most tokens to generate.
    #[arg(long, env = "FERRY_MAX_TOKENS")]
    pub max_tokens: Option<u32>,

    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, env = "FERRY_TEMPERATURE")]
    pub temperature: Option<f64>,

    /// Nucleus sampling threshold, above 0 and at most 1.
    #[arg(long, env = "FERRY_TOP_P")]
    pub top_p: Option<f64>,

    /// Keep only the k most likely tokens; 0 keeps all.
    #[arg(long, env = "FERRY_TOP_K")]
    pub top_k: Option<u32>,

    /// Seed of the random draws.
    #[arg(long, env = "FERRY_SEED")]
    pub seed: Option<u64>,

    /// Stop before the first occurrence of this string; repeat for several.
    #[arg(long = "stop", env = "FERRY_STOP", value_name = "TEXT")]
    pub stop: Vec<String>,

    /// How long to wait for the reply, publishing included.
    #[arg(long, env = "FERRY_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// What to print: `text` prints the generated text, `json` the whole reply. A fan-out or a
    /// resume always prints JSON lines.
    #[arg(long, env = "FERRY_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,

    /// Be a durable caller with this identity (stable across restarts, such as a pod name):
    /// requests are journaled in `--journal-topic` and replies read as the consumer group
    /// `ferry-caller.<identity>`, so a restarted caller with the same identity collects the
    /// answers of what it sent before, without sending it again (`ferry::durable`).
    #[arg(long, env = "FERRY_IDENTITY")]
    pub identity: Option<String>,

    /// The durable caller's journal, a compacted topic (created if missing).
    #[arg(long, env = "FERRY_JOURNAL_TOPIC", default_value = crate::durable::DEFAULT_JOURNAL_TOPIC)]
    pub journal_topic: String,

    /// Send every request of this file (one JSON request per line; blank lines are skipped) at
    /// once, and print each outcome as one JSON line as it comes: the reply, or
    /// `{"kind":"expired",...}`. Requests this identity already has open are awaited, not sent
    /// again. Exits 3 if any answer is an error reply, else 4 if any expired.
    #[arg(long, env = "FERRY_FAN_OUT", value_name = "FILE", requires = "identity")]
    pub fan_out: Option<PathBuf>,

    /// Send nothing: collect the outcomes of the requests this identity has open or answered
    /// and not yet acknowledged (after a crash), printed as with `--fan-out`.
    #[arg(long, env = "FERRY_RESUME", requires = "identity")]
    pub resume: bool,
}

/// How `ferry request` prints the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The generated text alone, followed by a newline.
    Text,
    /// The whole reply as one line of JSON.
    Json,
}

/// Flags of `ferry publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// The topic the requests are published to.
    #[arg(long, env = "FERRY_REQUEST_TOPIC", default_value = "ferry.requests")]
    pub topic: String,

    /// Publish every line exactly as read, valid or not, keyed by its `id` when one can be read.
    /// For tests that need deliberately bad messages.
    #[arg(long, env = "FERRY_PUBLISH_RAW")]
    pub raw: bool,
}

/// Parses `ROLE:CONTENT`; the content may itself contain colons.
pub fn parse_chat_message(s: &str) -> Result<ChatMessage, String> {
    let (role, content) = s
        .split_once(':')
        .ok_or_else(|| format!("expected ROLE:CONTENT, got {s:?}"))?;
    let role = match role.trim() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => return Err(format!("unknown role {other:?}; expected system, user or assistant")),
    };
    Ok(ChatMessage {
        role,
        content: content.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn chat_message_splits_at_the_first_colon() {
        assert_eq!(
            parse_chat_message("user:a: b"),
            Ok(ChatMessage {
                role: Role::User,
                content: "a: b".into()
            })
        );
        assert!(parse_chat_message("robot:hi").is_err());
        assert!(parse_chat_message("no colon").is_err());
    }

    #[test]
    fn request_needs_exactly_one_body() {
        assert!(Cli::try_parse_from(["ferry", "request"]).is_err());
        assert!(Cli::try_parse_from(["ferry", "request", "--prompt", "a", "--json", "{}"]).is_err());
        let cli = Cli::try_parse_from(["ferry", "request", "--message", "system:s", "--message", "user:u"]);
        match cli.map(|c| c.command) {
            Ok(Command::Request(args)) => assert_eq!(args.messages.len(), 2),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn fan_out_and_resume_are_bodies_that_need_an_identity() {
        assert!(Cli::try_parse_from(["ferry", "request", "--fan-out", "f.jsonl"]).is_err());
        assert!(Cli::try_parse_from(["ferry", "request", "--resume"]).is_err());
        assert!(Cli::try_parse_from(["ferry", "request", "--resume", "--identity", "a", "--prompt", "p"]).is_err());
        match Cli::try_parse_from(["ferry", "request", "--fan-out", "f.jsonl", "--identity", "a"]).map(|c| c.command) {
            Ok(Command::Request(args)) => {
                assert_eq!(args.identity.as_deref(), Some("a"));
                assert_eq!(args.journal_topic, "ferry.callers");
            }
            other => panic!("expected a request, got {other:?}"),
        }
        assert!(Cli::try_parse_from(["ferry", "request", "--resume", "--identity", "a"]).is_ok());
    }

    #[test]
    fn bootstrap_file_and_servers_conflict() {
        let parsed = Cli::try_parse_from([
            "ferry",
            "publish",
            "--bootstrap-servers",
            "h:1",
            "--bootstrap-file",
            "/tmp/x",
        ]);
        assert!(parsed.is_err());
    }

    #[test]
    fn broker_defaults_to_the_three_ferry_topics() {
        match Cli::try_parse_from(["ferry", "broker"]).map(|c| c.command) {
            Ok(Command::Broker(args)) => {
                assert_eq!(args.topics, ["ferry.requests", "ferry.replies", "ferry.requests.dlq"]);
                assert_eq!((args.brokers, args.partitions), (1, 3));
            }
            other => panic!("expected broker, got {other:?}"),
        }
    }
}
