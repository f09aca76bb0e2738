//! `ferry request --identity`: the command line as a durable caller ([`crate::durable`]).
//!
//! Three shapes:
//!
//! - one request from the usual flags: the same output and exit codes as without `--identity`,
//!   but journaled, so that if the process dies, `--resume` with the same identity collects the
//!   answer;
//! - `--fan-out FILE`: every request of a JSON-lines file, journaled and published at once;
//! - `--resume`: nothing new, only the outcomes of what the identity has open.
//!
//! A fan-out or a resume prints each outcome as one JSON line as it comes, and acknowledges it
//! only once the line is written and flushed: a process that dies in between prints it again
//! after its restart (the delivery contract of [`crate::durable`]), never zero times.
//!
//! On start, each request recovered from the journal is reported on stderr, one line each, as
//! `ferry: recovered <id> <state>` (`sending`, `sent`, `answered` or `expired`), for people and
//! for scripts.

use std::path::Path;

use ferry_schemas::{Reply, Request};
use futures::StreamExt as _;
use tracing::{debug, info};

use crate::cli::RequestArgs;
use crate::durable::{self, DurableClient, DurableOptions, Outcome};
use crate::request::{build_request, print_line, render, reply_result, RequestError, DEFAULT_REPLY_TOPIC};

/// Runs `ferry request --identity`.
pub async fn run(args: &RequestArgs, identity: &str) -> Result<(), RequestError> {
    let batch = args.fan_out.is_some() || args.resume;
    // One request is built first: its reply topic (from `--json`, say) is the caller's.
    let single = if batch {
        None
    } else {
        Some(build_request(args, uuid::Uuid::new_v4().to_string())?)
    };
    let reply_topic = single
        .as_ref()
        .and_then(|request| request.reply_to.clone())
        .or_else(|| args.reply_topic.clone())
        .unwrap_or_else(|| DEFAULT_REPLY_TOPIC.to_string());
    let mut options = DurableOptions::new(identity, reply_topic);
    options.journal_topic = args.journal_topic.clone();
    options.default_timeout = args.timeout;
    let client = DurableClient::open(args.kafka.resolve().await?, options).await?;
    let recovered = client.recovered().to_vec();
    for request in &recovered {
        eprintln!("ferry: recovered {} {}", request.id, request.state.as_str());
    }
    let result = match single {
        Some(request) => one(&client, args, request).await,
        None => many(&client, args, recovered.iter().map(|r| r.id.clone()).collect()).await,
    };
    // Whatever happened, commit what was read, so the next run reads less again.
    let closed = client.close().await;
    result?;
    closed?;
    Ok(())
}

/// One request: printed and exiting as `ferry request` without an identity does.
async fn one(client: &DurableClient, args: &RequestArgs, request: Request) -> Result<(), RequestError> {
    let id = request.id.clone();
    let handle = match client.handle(&id) {
        // A request of this id is open from an earlier run: await it rather than send it again.
        Some(handle) => handle,
        None => client.submit_with_timeout(&args.topic, request, args.timeout).await?,
    };
    let outcome = handle.outcome().await?;
    if let Outcome::Reply(reply) = &outcome {
        if let Some(text) = render(reply, args.output) {
            print_line(&text)?;
        }
    }
    client.ack(&id).await?;
    match outcome {
        Outcome::Reply(reply) => reply_result(reply),
        Outcome::Expired { id, .. } => Err(RequestError::Expired { id }),
    }
}

/// A fan-out (the requests of `--fan-out`, if any) plus everything recovered.
async fn many(client: &DurableClient, args: &RequestArgs, recovered: Vec<String>) -> Result<(), RequestError> {
    let requests = match &args.fan_out {
        Some(path) => read_fan_out(path)?,
        None => Vec::new(),
    };
    let (again, new): (Vec<Request>, Vec<Request>) = requests
        .into_iter()
        .partition(|request| recovered.contains(&request.id));
    for request in &again {
        eprintln!(
            "ferry: {} is already open; awaiting it without sending it again",
            request.id
        );
    }
    let sent = new.len();
    let mut handles = if new.is_empty() {
        Vec::new()
    } else {
        client
            .submit_all_with_timeout(&args.topic, new, Some(args.timeout))
            .await?
    };
    info!(
        sent,
        recovered = recovered.len(),
        "fan-out published; awaiting outcomes"
    );
    handles.extend(recovered.iter().filter_map(|id| client.handle(id)));
    let total = handles.len();
    let (mut errors, mut expired) = (0, 0);
    let mut outcomes = durable::completions(handles);
    while let Some((id, outcome)) = outcomes.next().await {
        let outcome = outcome?;
        match &outcome {
            Outcome::Reply(Reply::Error(_)) => errors += 1,
            Outcome::Expired { .. } => expired += 1,
            Outcome::Reply(_) => {}
        }
        print_line(&outcome.to_json().to_string())?;
        client.ack(&id).await?;
        debug!(request_id = %id, "outcome printed and acknowledged");
    }
    if errors + expired > 0 {
        return Err(RequestError::Incomplete { total, errors, expired });
    }
    Ok(())
}

/// The requests of a JSON-lines file; blank lines are skipped.
fn read_fan_out(path: &Path) -> Result<Vec<Request>, RequestError> {
    let text = std::fs::read_to_string(path).map_err(|source| RequestError::FanOutFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_fan_out(&text).map_err(|(line, source)| RequestError::FanOutLine {
        path: path.to_path_buf(),
        line,
        source,
    })
}

/// Parses JSON lines into requests; the error names the 1-based line.
fn parse_fan_out(text: &str) -> Result<Vec<Request>, (usize, serde_json::Error)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| serde_json::from_str(line).map_err(|e| (i + 1, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_lines_skip_blanks_and_name_the_bad_line() {
        let ok = "{\"id\":\"a\",\"prompt\":\"x\"}\n\n  \n{\"id\":\"b\",\"prompt\":\"y\"}\n";
        let ids: Vec<String> = parse_fan_out(ok)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let bad = "{\"id\":\"a\",\"prompt\":\"x\"}\n{\"prompt\":\"no id\"}\n";
        assert!(matches!(parse_fan_out(bad), Err((2, _))));
    }
}
