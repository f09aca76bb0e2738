//! `ferry request`: build a request from flags, publish it, wait for its reply and print it.
//!
//! Building the request ([`build_request`]) and rendering the reply ([`render`]) do no I/O and
//! are tested here; [`run`] wires them to Kafka and stdout.

use std::io::{self, Write};
use std::path::PathBuf;

use ferry_schemas::{ErrorCode, Reply, Request, ValidationError};
use tracing::debug;

use crate::bootstrap::BootstrapError;
use crate::cli::{Output, RequestArgs};
use crate::client::{Client, ClientError};
use crate::durable::DurableError;

/// The reply topic when neither `--reply-topic` nor a `--json` request names one.
pub const DEFAULT_REPLY_TOPIC: &str = "ferry.replies";

/// Why `ferry request` did not print an answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The bootstrap file did not appear.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// `--json` is not a request (malformed JSON, a missing id, an unknown field).
    #[error("--json is not a valid request")]
    Json(#[source] serde_json::Error),
    /// The request breaks a rule of the contract; nothing was published.
    #[error("the request is invalid, so it was not published")]
    Invalid(#[from] ValidationError),
    /// Kafka trouble, or no reply before the timeout.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The worker answered with an error reply.
    #[error("request {id} failed: {code}: {message}", code = .code.as_str())]
    ErrorReply {
        id: String,
        code: ErrorCode,
        message: String,
    },
    /// The reply could not be written to stdout.
    #[error("could not write the reply to stdout")]
    Stdout(#[source] io::Error),
    /// The durable caller failed (`--identity`).
    #[error(transparent)]
    Durable(#[from] DurableError),
    /// The `--fan-out` file could not be read.
    #[error("could not read the fan-out file {path}")]
    FanOutFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A line of the `--fan-out` file is not a request.
    #[error("line {line} of {path} is not a valid request")]
    FanOutLine {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    /// The request's deadline passed before its answer came (durable caller).
    #[error("request {id} expired before its answer came")]
    Expired { id: String },
    /// Some outcomes of a fan-out or a resume were not answers.
    #[error("{errors} error replies and {expired} expired requests among {total} outcomes")]
    Incomplete {
        total: usize,
        errors: usize,
        expired: usize,
    },
}

impl RequestError {
    /// 3 for an error reply, 4 when no reply came in time, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RequestError::ErrorReply { .. } => 3,
            RequestError::Incomplete { errors, .. } if *errors > 0 => 3,
            RequestError::Client(ClientError::Timeout { .. } | ClientError::PublishTimeout { .. }) => 4,
            RequestError::Expired { .. } | RequestError::Incomplete { .. } => 4,
            _ => 1,
        }
    }
}

/// The request the flags describe, validated. `default_id` is used when neither `--id` nor a
/// `--json` request gives one.
pub fn build_request(args: &RequestArgs, default_id: String) -> Result<Request, RequestError> {
    let mut request: Request = match &args.json {
        Some(json) => serde_json::from_str(json).map_err(RequestError::Json)?,
        // Built through serde rather than a struct literal so that fields the contract gains
        // later take their serde defaults here too.
        None => serde_json::from_value(serde_json::json!({ "id": default_id })).map_err(RequestError::Json)?,
    };
    if let Some(id) = &args.id {
        request.id = id.clone();
    }
    if let Some(prompt) = &args.prompt {
        request.prompt = Some(prompt.clone());
    }
    if !args.messages.is_empty() {
        request.messages = Some(args.messages.clone());
    }
    if args.model.is_some() {
        request.model = args.model.clone();
    }
    if args.max_tokens.is_some() {
        request.max_tokens = args.max_tokens;
    }
    if args.temperature.is_some() {
        request.temperature = args.temperature;
    }
    if args.top_p.is_some() {
        request.top_p = args.top_p;
    }
    if args.top_k.is_some() {
        request.top_k = args.top_k;
    }
    if args.seed.is_some() {
        request.seed = args.seed;
    }
    if !args.stop.is_empty() {
        request.stop = args.stop.clone();
    }
    request.reply_to = args
        .reply_topic
        .clone()
        .or(request.reply_to)
        .or_else(|| Some(DEFAULT_REPLY_TOPIC.to_string()));
    request.validate()?;
    Ok(request)
}

/// What to print on stdout for `reply`: the text, or the whole reply as JSON. An error reply in
/// text mode prints nothing; its message goes to stderr with the exit code.
pub fn render(reply: &Reply, output: Output) -> Option<String> {
    match (output, reply) {
        // Serialising a value that came from JSON cannot fail; if it ever did, the error path
        // below still reports the reply's outcome.
        (Output::Json, reply) => serde_json::to_string(reply).ok(),
        (Output::Text, Reply::Response(response)) => Some(response.text.clone()),
        // A chunk is not an answer; `wait_for` never returns one, and text mode would print
        // only a piece of the text.
        (Output::Text, Reply::Error(_) | Reply::Chunk(_)) => None,
    }
}

/// Prints `text` and a newline on stdout, flushed, so that a reader sees whole lines even if
/// the process dies right after.
pub(crate) fn print_line(text: &str) -> Result<(), RequestError> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(RequestError::Stdout)
}

/// Runs `ferry request` without `--identity`: a one-shot publish-and-wait (the durable caller is
/// `caller::run`).
pub async fn run(args: &RequestArgs) -> Result<(), RequestError> {
    let request = build_request(args, uuid::Uuid::new_v4().to_string())?;
    let client = Client::new(args.kafka.resolve().await?)?;
    debug!(request_id = %request.id, topic = %args.topic, reply_to = ?request.reply_to, "sending request");
    let reply = client.request(&args.topic, &request, args.timeout).await?;
    if let Some(text) = render(&reply, args.output) {
        print_line(&text)?;
    }
    reply_result(reply)
}

/// Success for a response, [`RequestError::ErrorReply`] for an error reply.
pub(crate) fn reply_result(reply: Reply) -> Result<(), RequestError> {
    match reply {
        // Only final replies get here, so a chunk cannot.
        Reply::Response(_) | Reply::Chunk(_) => Ok(()),
        Reply::Error(e) => Err(RequestError::ErrorReply {
            id: e.id,
            code: e.error.code,
            message: e.error.message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use ferry_schemas::{ChatMessage, Role};

    fn args(flags: &[&str]) -> RequestArgs {
        let argv = ["ferry", "request"].iter().chain(flags);
        match Cli::try_parse_from(argv).map(|cli| cli.command) {
            Ok(Command::Request(args)) => args,
            other => panic!("{flags:?} should parse as a request: {other:?}"),
        }
    }

    #[test]
    fn prompt_flags_build_a_request_with_the_default_reply_topic() -> Result<(), RequestError> {
        let r = build_request(
            &args(&["--prompt", "hi", "--max-tokens", "5", "--stop", "a", "--stop", "b"]),
            "id-1".into(),
        )?;
        assert_eq!(r.id, "id-1");
        assert_eq!(r.prompt.as_deref(), Some("hi"));
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.stop, ["a", "b"]);
        assert_eq!(r.reply_to.as_deref(), Some(DEFAULT_REPLY_TOPIC));
        Ok(())
    }

    #[test]
    fn messages_keep_their_order() -> Result<(), RequestError> {
        let r = build_request(
            &args(&["--message", "system:be brief", "--message", "user:hi: there"]),
            "x".into(),
        )?;
        assert_eq!(
            r.messages,
            Some(vec![
                ChatMessage {
                    role: Role::System,
                    content: "be brief".into()
                },
                ChatMessage {
                    role: Role::User,
                    content: "hi: there".into()
                },
            ])
        );
        Ok(())
    }

    #[test]
    fn json_keeps_its_reply_to_unless_a_flag_overrides_it() -> Result<(), RequestError> {
        let json = r#"{"id":"j","prompt":"p","reply_to":"mine","temperature":0.5}"#;
        let r = build_request(&args(&["--json", json, "--seed", "7"]), "unused".into())?;
        assert_eq!(
            (r.id.as_str(), r.reply_to.as_deref(), r.temperature, r.seed),
            ("j", Some("mine"), Some(0.5), Some(7))
        );
        let r = build_request(
            &args(&["--json", json, "--reply-topic", "theirs", "--id", "k"]),
            "unused".into(),
        )?;
        assert_eq!((r.id.as_str(), r.reply_to.as_deref()), ("k", Some("theirs")));
        Ok(())
    }

    #[test]
    fn invalid_requests_are_refused() {
        let r = build_request(&args(&["--prompt", "hi", "--temperature", "3"]), "x".into());
        assert!(
            matches!(r, Err(RequestError::Invalid(ref e)) if e.field == "temperature"),
            "{r:?}"
        );
        let r = build_request(&args(&["--json", r#"{"prompt":"no id"}"#]), "x".into());
        assert!(matches!(r, Err(RequestError::Json(_))), "{r:?}");
    }

    #[test]
    fn text_output_prints_the_answer_and_json_the_whole_reply() -> Result<(), serde_json::Error> {
        let reply: Reply = serde_json::from_value(serde_json::json!({
            "kind": "response", "version": 1, "id": "r", "model": "m", "text": "hello",
            "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "timings": {"queued_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "total_ms": 0.0},
            "worker": "w", "attempt": 1, "resumed_from_token": null
        }))?;
        assert_eq!(render(&reply, Output::Text).as_deref(), Some("hello"));
        let json = render(&reply, Output::Json).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Reply>(&json)?, reply);
        Ok(())
    }

    #[test]
    fn error_reply_exits_3_and_prints_nothing_as_text() -> Result<(), serde_json::Error> {
        let reply: Reply = serde_json::from_value(serde_json::json!({
            "kind": "error", "version": 1, "id": "r", "worker": "w", "attempt": 1,
            "error": {"code": "prompt_too_long", "message": "too long"}
        }))?;
        assert_eq!(render(&reply, Output::Text), None);
        let err = RequestError::ErrorReply {
            id: "r".into(),
            code: ErrorCode::PromptTooLong,
            message: "too long".into(),
        };
        assert_eq!(err.exit_code(), 3);
        assert_eq!(err.to_string(), "request r failed: prompt_too_long: too long");
        Ok(())
    }
}
