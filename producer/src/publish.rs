//! `ferry publish`: requests read as JSON lines from stdin, each published keyed by its id.
//!
//! By default every line must parse as a [`Request`] and pass [`Request::validate`]; the input
//! is read and checked whole before anything is published, so a bad line means nothing is
//! published, and the error names every bad line by number (counting from 1). Blank lines are
//! skipped. The line is published exactly as read, not re-serialised.
//!
//! With `--raw` every line is published as is, blank ones included (as an empty message), keyed
//! by its `id` when the line is a JSON object with a string `id`, and unkeyed otherwise, so a
//! test can send the worker deliberately bad messages.
//!
//! For each published message one line goes to stdout, in input order:
//! `ID<TAB>PARTITION<TAB>OFFSET`, with `-` for a message without a key and control characters
//! in the id escaped so that each message stays on one line.

use std::fmt;
use std::io::{self, Read, Write};

use ferry_schemas::Request;
use futures::StreamExt;
use tracing::info;

use crate::bootstrap::BootstrapError;
use crate::cli::PublishArgs;
use crate::client::{Client, ClientError};

/// Messages awaiting their delivery report at once. The producer batches them; the bound keeps
/// memory flat for long inputs.
const MAX_IN_FLIGHT: usize = 512;

/// How many bad lines the error lists before it only counts the rest.
const MAX_LISTED_ERRORS: usize = 10;

/// One message ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Line number in the input, counting from 1.
    pub line: usize,
    /// The request id, when there is one.
    pub key: Option<String>,
    /// The line without its line ending.
    pub payload: Vec<u8>,
}

/// A line that is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// Line number in the input, counting from 1.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// Why `ferry publish` stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The bootstrap file did not appear.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// stdin could not be read.
    #[error("could not read stdin")]
    Stdin(#[source] io::Error),
    /// Some lines are not valid requests; nothing was published.
    #[error("{}", describe_invalid(.0))]
    InvalidLines(Vec<LineError>),
    /// The producer could not be created.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A message could not be delivered; the lines before it were published (and printed).
    #[error("line {line} could not be published")]
    Delivery {
        line: usize,
        #[source]
        source: ClientError,
    },
    /// A result line could not be written to stdout.
    #[error("could not write to stdout")]
    Stdout(#[source] io::Error),
}

fn describe_invalid(errors: &[LineError]) -> String {
    let listed: Vec<String> = errors
        .iter()
        .take(MAX_LISTED_ERRORS)
        .map(LineError::to_string)
        .collect();
    let more = errors.len().saturating_sub(MAX_LISTED_ERRORS);
    let tail = if more > 0 {
        format!("; and {more} more")
    } else {
        String::new()
    };
    format!(
        "{} invalid line(s), nothing was published (use --raw to publish them anyway): {}{tail}",
        errors.len(),
        listed.join("; ")
    )
}

/// Splits input into lines without their `\n` or `\r\n` endings. A final line without a newline
/// counts; the empty piece after a final newline does not.
pub fn split_lines(input: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|last| last.is_empty()) {
        lines.pop();
    }
    lines
        .into_iter()
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .collect()
}

/// Checks one line; `Ok(None)` for a blank line in validating mode.
pub fn parse_line(line: usize, bytes: &[u8], raw: bool) -> Result<Option<Outgoing>, LineError> {
    if raw {
        let key = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|value| value.get("id")?.as_str().map(str::to_string));
        return Ok(Some(Outgoing {
            line,
            key,
            payload: bytes.to_vec(),
        }));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let error = |reason: String| LineError { line, reason };
    let text = std::str::from_utf8(bytes).map_err(|e| error(format!("not UTF-8 ({e})")))?;
    let request: Request = serde_json::from_str(text).map_err(|e| error(format!("not a request: {e}")))?;
    request.validate().map_err(|e| error(format!("invalid request: {e}")))?;
    Ok(Some(Outgoing {
        line,
        key: Some(request.id),
        payload: bytes.to_vec(),
    }))
}

/// Checks every line; all of them or the list of errors.
pub fn parse_input(input: &[u8], raw: bool) -> Result<Vec<Outgoing>, Vec<LineError>> {
    let mut outgoing = Vec::new();
    let mut errors = Vec::new();
    for (index, bytes) in split_lines(input).into_iter().enumerate() {
        match parse_line(index + 1, bytes, raw) {
            Ok(Some(message)) => outgoing.push(message),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(outgoing)
    } else {
        Err(errors)
    }
}

/// The stdout line for one published message. Control characters in the id are escaped (the
/// rest, Unicode included, is left as it is) so that each message stays on one line.
pub fn result_line(key: Option<&str>, partition: i32, offset: i64) -> String {
    let mut id = String::new();
    match key {
        None => id.push('-'),
        Some(key) => {
            for c in key.chars() {
                if c.is_control() {
                    id.extend(c.escape_default());
                } else {
                    id.push(c);
                }
            }
        }
    }
    format!("{id}\t{partition}\t{offset}")
}

/// Runs `ferry publish`.
pub async fn run(args: &PublishArgs) -> Result<(), PublishError> {
    // The input is checked whole before anything is published, so it is read whole. A plain
    // blocking read on a blocking thread: the workspace's Tokio has no `io-std` feature.
    let input = tokio::task::spawn_blocking(|| {
        let mut input = Vec::new();
        io::stdin().lock().read_to_end(&mut input).map(|_| input)
    })
    .await
    .map_err(io::Error::other)
    .and_then(|read| read)
    .map_err(PublishError::Stdin)?;
    let outgoing = parse_input(&input, args.raw).map_err(PublishError::InvalidLines)?;
    let client = Client::new(args.kafka.resolve().await?)?;
    let topic = args.topic.as_str();
    let client = &client;
    // `buffered` keeps input order in the output while many deliveries are in flight.
    let mut deliveries = futures::stream::iter(outgoing)
        .map(|message| async move {
            let key = message.key.as_deref().map(str::as_bytes);
            let result = client.publish_bytes(topic, key, &message.payload).await;
            (message, result)
        })
        .buffered(MAX_IN_FLIGHT);
    let mut count = 0_usize;
    // Not locked for the whole loop: the lock guard cannot be held across the awaits. Stdout is
    // line-buffered, so each result line goes out as soon as its delivery is confirmed.
    let mut stdout = io::stdout();
    while let Some((message, result)) = deliveries.next().await {
        let published = result.map_err(|source| PublishError::Delivery {
            line: message.line,
            source,
        })?;
        writeln!(
            stdout,
            "{}",
            result_line(message.key.as_deref(), published.partition, published.offset)
        )
        .map_err(PublishError::Stdout)?;
        count += 1;
    }
    stdout.flush().map_err(PublishError::Stdout)?;
    info!(topic, count, raw = args.raw, "published");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_lose_their_endings_and_the_final_empty_piece() {
        assert_eq!(split_lines(b"a\r\nb\n\nc"), [&b"a"[..], b"b", b"", b"c"]);
        assert_eq!(split_lines(b"a\n"), [&b"a"[..]]);
        assert!(split_lines(b"").is_empty());
    }

    #[test]
    fn every_bad_line_is_named_and_blank_lines_are_skipped() {
        let input = b"{\"id\":\"a\",\"prompt\":\"p\"}\n\nnot json\n{\"id\":\"b\",\"prompt\":\"p\",\"top_k\":5000}\n{\"id\":\"c\"}\n";
        let errors = parse_input(input, false).err().unwrap_or_default();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5]);
        assert!(errors[1].reason.contains("top_k"), "{}", errors[1]);
        let message = PublishError::InvalidLines(errors).to_string();
        assert!(message.starts_with("3 invalid line(s)"), "{message}");
        assert!(message.contains("line 3: not a request"), "{message}");
    }

    #[test]
    fn valid_lines_are_published_as_read_keyed_by_id() {
        let line = br#"{"id":"a b","prompt":"p" }"#;
        let parsed = parse_input(line, false);
        assert_eq!(
            parsed,
            Ok(vec![Outgoing {
                line: 1,
                key: Some("a b".into()),
                payload: line.to_vec()
            }])
        );
    }

    #[test]
    fn raw_lines_are_keyed_when_an_id_can_be_read() {
        let parsed = parse_input(b"{\"id\":\"x\",\"bogus\":1}\n\xff\n\n[1]\n", true).unwrap_or_default();
        let keys: Vec<Option<&str>> = parsed.iter().map(|m| m.key.as_deref()).collect();
        assert_eq!(keys, [Some("x"), None, None, None]);
        assert_eq!(parsed[1].payload, b"\xff");
        assert!(parsed[2].payload.is_empty());
    }

    #[test]
    fn result_lines_stay_on_one_line() {
        assert_eq!(result_line(Some("id-1"), 2, 40), "id-1\t2\t40");
        assert_eq!(result_line(Some("a\tb\nc"), 0, 1), "a\\tb\\nc\t0\t1");
        assert_eq!(result_line(None, 0, 1), "-\t0\t1");
    }
}
