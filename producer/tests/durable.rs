//! The durable client ([`ferry::durable`]) against a real broker process: fan-outs as futures
//! and streams, restarts that find answers which arrived while the caller was down, requests
//! journaled but never published, duplicates and deadlines. Replies come from a small responder
//! that keeps the worker's reply contract, including streaming with resent chunks, so each case
//! is deterministic; `worker/tests/durable_caller.rs` runs the same client against real workers
//! and kills it. Runs against `FERRY_TEST_BOOTSTRAP_SERVERS` when set.

mod cluster;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use cluster::{ferry_command, key_of, message_count, read_messages, response, Responder, TestCluster, PATIENCE};
use ferry::client::KafkaConfig;
use ferry::durable::journal::{self, Entry, EntryState};
use ferry::durable::{DurableClient, DurableError, DurableOptions, Event, Outcome};
use ferry_schemas::{Reply, Request};
use futures::StreamExt as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// The stand-in worker's answers: `echo: <prompt>`. A streamed request gets its text in chunks
/// first, with a chunk sent twice and an older one after a newer one, as a resumed generation
/// sends them. A prompt starting with `twice` is answered twice, the second time with other
/// text.
fn echo(request: &Request) -> Vec<serde_json::Value> {
    let prompt = request.prompt.clone().unwrap_or_default();
    let text = format!("echo: {prompt}");
    let mut replies = Vec::new();
    if request.stream {
        for (seq, piece) in [(0, "echo"), (1, ": "), (1, ": "), (3, &prompt[..]), (2, ": ")] {
            replies
                .push(serde_json::json!({"kind": "chunk", "version": 1, "id": request.id, "seq": seq, "text": piece}));
        }
    }
    replies.push(response(&request.id, &text));
    if prompt.starts_with("twice") {
        replies.push(response(&request.id, "a second, different answer"));
    }
    replies
}

struct Setup {
    cluster: TestCluster,
    requests: String,
    replies: String,
    journal: String,
}

impl Setup {
    async fn start() -> anyhow::Result<Self> {
        let cluster = TestCluster::start().await?;
        let requests = cluster.topic("requests").await?;
        let replies = cluster.topic("replies").await?;
        // Made here so that a real cluster deletes it with the test's other topics; the
        // client's own creation of a missing (compacted) journal runs in
        // worker/tests/durable_caller.rs.
        let journal = cluster.topic("callers").await?;
        Ok(Setup {
            cluster,
            requests,
            replies,
            journal,
        })
    }

    fn options(&self, identity: &str) -> DurableOptions {
        let mut options = DurableOptions::new(identity, &self.replies);
        options.journal_topic = self.journal.clone();
        options.commit_interval = Duration::from_millis(50);
        options
    }

    async fn open(&self, identity: &str) -> Result<DurableClient, DurableError> {
        DurableClient::open(self.config(), self.options(identity)).await
    }

    fn config(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: self.cluster.bootstrap_servers().to_string(),
            delivery_timeout: PATIENCE,
        }
    }

    fn responder(&self) -> anyhow::Result<Responder> {
        Responder::start(self.cluster.bootstrap_servers(), &self.requests, echo)
    }

    /// How many times each id was published to the request topic: every message it holds.
    async fn published(&self) -> anyhow::Result<BTreeMap<String, usize>> {
        let total = usize::try_from(message_count(self.cluster.bootstrap_servers(), &self.requests)?)?;
        let mut counts = BTreeMap::new();
        for message in read_messages(self.cluster.bootstrap_servers(), &self.requests, total).await? {
            *counts.entry(key_of(&message).unwrap_or_default()).or_default() += 1;
        }
        Ok(counts)
    }
}

fn request(id: &str, prompt: &str, stream: bool) -> anyhow::Result<Request> {
    Ok(serde_json::from_value(
        serde_json::json!({"id": id, "prompt": prompt, "stream": stream}),
    )?)
}

fn identity() -> String {
    format!("caller-{}", uuid::Uuid::new_v4().simple())
}

fn response_text(outcome: &Outcome) -> Option<&str> {
    match outcome {
        Outcome::Reply(Reply::Response(r)) => Some(&r.text),
        _ => None,
    }
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(PATIENCE, future)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

#[tokio::test]
async fn a_fan_out_is_answered_as_futures_and_streams_assemble_resent_chunks() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let _responder = setup.responder()?;
    let client = setup.open(&identity()).await?;
    let requests = vec![
        request("f-1", "one", false)?,
        request("f-2", "two", true)?,
        request("f-3", "twice over", false)?,
    ];
    let handles = client.submit_all(&setup.requests, requests).await?;
    let mut events = handles[1].events();
    let mut outcomes = BTreeMap::new();
    let mut completions = ferry::durable::completions(handles);
    while let Some((id, outcome)) = within("the fan-out", completions.next()).await? {
        outcomes.insert(id, outcome?);
    }
    let texts: BTreeMap<&str, Option<&str>> = outcomes.iter().map(|(id, o)| (id.as_str(), response_text(o))).collect();
    assert_eq!(
        texts,
        BTreeMap::from([
            ("f-1", Some("echo: one")),
            ("f-2", Some("echo: two")),
            // The first final reply wins; the duplicate is skipped.
            ("f-3", Some("echo: twice over")),
        ])
    );
    // The stream's deltas drop the resent chunks and add up to the answer.
    let mut streamed = String::new();
    let mut done = None;
    while let Some(event) = within("the stream", events.next()).await? {
        match event {
            Event::Text(delta) => streamed.push_str(&delta),
            Event::Done(outcome) => done = Some(outcome),
        }
    }
    assert_eq!(streamed, "echo: two");
    assert_eq!(done.as_ref().and_then(response_text), Some("echo: two"));
    let pending: Vec<EntryState> = client.pending().iter().map(|p| p.state).collect();
    assert_eq!(pending, [EntryState::Answered; 3], "answers stay until acknowledged");
    for id in ["f-1", "f-2", "f-3"] {
        client.ack(id).await?;
    }
    assert!(matches!(client.ack("f-1").await, Err(DurableError::Unknown { .. })));
    assert_eq!(
        setup.published().await?,
        BTreeMap::from(["f-1", "f-2", "f-3"].map(|id| (id.to_string(), 1)))
    );
    Ok(())
}

#[tokio::test]
async fn a_restarted_caller_collects_answers_that_arrived_while_it_was_down() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let identity = identity();
    let client = setup.open(&identity).await?;
    let ids = ["d-1", "d-2", "d-3"];
    let requests = ids
        .iter()
        .map(|id| request(id, id, *id == "d-2"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    client.submit_all(&setup.requests, requests).await?;
    // Dropped without closing, as a crash would leave it.
    drop(client);

    // The answers arrive while no caller runs.
    let _responder = setup.responder()?;
    let replies = read_messages(setup.cluster.bootstrap_servers(), &setup.replies, 3 + 5).await?;
    assert_eq!(replies.len(), 8);

    let client = setup.open(&identity).await?;
    // As the journal had them: the reader may already be finishing them.
    let pending: Vec<(String, EntryState, bool)> = client
        .recovered()
        .iter()
        .map(|p| (p.id.clone(), p.state, p.recovered))
        .collect();
    assert_eq!(
        pending,
        ids.map(|id| (id.to_string(), EntryState::Sent, true)),
        "recovered as sent: published, not to be sent again"
    );
    for id in ids {
        let outcome = within("a recovered answer", client.wait(id)).await??;
        assert_eq!(response_text(&outcome), Some(format!("echo: {id}").as_str()));
        client.ack(id).await?;
    }
    client.close().await?;
    assert_eq!(
        setup.published().await?,
        BTreeMap::from(ids.map(|id| (id.to_string(), 1))),
        "nothing was published again"
    );
    // Everything acknowledged: the next caller has nothing to do.
    let client = setup.open(&identity).await?;
    assert!(client.pending().is_empty(), "{:?}", client.pending());
    Ok(())
}

#[tokio::test]
async fn an_outcome_not_acknowledged_is_handed_over_again_after_a_restart() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let _responder = setup.responder()?;
    let identity = identity();
    let client = setup.open(&identity).await?;
    let handle = client.submit(&setup.requests, request("u-1", "kept", true)?).await?;
    within("the answer", handle.outcome()).await??;
    drop(client);

    let client = setup.open(&identity).await?;
    let pending = client.recovered();
    assert_eq!(
        pending.iter().map(|p| (p.id.as_str(), p.state)).collect::<Vec<_>>(),
        [("u-1", EntryState::Answered)]
    );
    // Handed over at once, with the whole text as the stream.
    let mut events = client.events("u-1").context("a recovered handle")?;
    assert_eq!(events.next().await, Some(Event::Text("echo: kept".into())));
    assert!(matches!(events.next().await, Some(Event::Done(_))));
    client.ack("u-1").await?;
    Ok(())
}

#[tokio::test]
async fn a_request_journaled_but_never_published_is_published_on_restart() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let identity = identity();
    // A caller that died between journaling `sending` and publishing: it opened (committing
    // its group's starting position), journaled the request, and died.
    drop(setup.open(&identity).await?);
    let partitions =
        ferry::topics::create_topic(setup.cluster.bootstrap_servers(), &setup.journal, 3, PATIENCE).await?;
    let partition = journal::partition_for(&identity, i32::try_from(partitions)?);
    let mut lost = request("s-1", "lost", false)?;
    lost.reply_to = Some(setup.replies.clone());
    let entry = Entry {
        version: journal::ENTRY_VERSION,
        state: EntryState::Sending,
        topic: setup.requests.clone(),
        deadline_ms: (time::OffsetDateTime::now_utc().unix_timestamp() + 60) * 1000,
        request: lost,
        reply: None,
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", setup.cluster.bootstrap_servers())
        .create()?;
    let payload = serde_json::to_vec(&entry)?;
    producer
        .send(
            FutureRecord::to(&setup.journal)
                .partition(partition)
                .key(&journal::key(&identity, "s-1"))
                .payload(&payload),
            PATIENCE,
        )
        .await
        .map_err(|(e, _)| e)?;

    let _responder = setup.responder()?;
    let client = setup.open(&identity).await?;
    let outcome = within("the republished request's answer", client.wait("s-1")).await??;
    assert_eq!(response_text(&outcome), Some("echo: lost"));
    assert_eq!(setup.published().await?, BTreeMap::from([("s-1".to_string(), 1)]));
    Ok(())
}

#[tokio::test]
async fn a_request_expires_at_its_deadline_and_a_late_answer_is_ignored() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let identity = identity();
    let client = setup.open(&identity).await?;
    let started = std::time::Instant::now();
    let handle = client
        .submit_with_timeout(
            &setup.requests,
            request("x-1", "late", false)?,
            Duration::from_millis(1500),
        )
        .await?;
    let outcome = within("expiry", handle.outcome()).await??;
    assert!(
        matches!(outcome, Outcome::Expired { ref id, .. } if id == "x-1"),
        "{outcome:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500), "expired early");
    // The answer comes after all; the outcome stands.
    let _responder = setup.responder()?;
    read_messages(setup.cluster.bootstrap_servers(), &setup.replies, 1).await?;
    client.close().await?;
    let client = setup.open(&identity).await?;
    let pending: Vec<(String, EntryState)> = client.pending().into_iter().map(|p| (p.id, p.state)).collect();
    assert_eq!(pending, [("x-1".to_string(), EntryState::Expired)]);
    assert!(matches!(client.wait("x-1").await?, Outcome::Expired { .. }));
    Ok(())
}

#[tokio::test]
async fn submissions_are_checked_before_anything_is_journaled() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let client = setup.open(&identity()).await?;
    let mut other = request("c-1", "p", false)?;
    other.reply_to = Some("someone-elses-replies".into());
    assert!(matches!(
        client.submit(&setup.requests, other).await,
        Err(DurableError::ReplyTopicMismatch { .. })
    ));
    let twice = vec![request("c-2", "p", false)?, request("c-2", "p", false)?];
    assert!(matches!(
        client.submit_all(&setup.requests, twice).await,
        Err(DurableError::Duplicate { .. })
    ));
    let invalid = vec![request("c-3", "p", false)?, request("c-4", "", false)?];
    assert!(matches!(
        client.submit_all(&setup.requests, invalid).await,
        Err(DurableError::Invalid { .. })
    ));
    assert!(client.pending().is_empty(), "half-submitted: {:?}", client.pending());
    // Giving up on an open request: its waiters are told, and it is gone.
    let open = client.submit(&setup.requests, request("c-5", "p", false)?).await?;
    client.forget("c-5").await?;
    assert!(matches!(open.outcome().await, Err(DurableError::Gone { .. })));
    assert!(client.pending().is_empty(), "{:?}", client.pending());
    assert!(matches!(
        DurableClient::open(setup.config(), setup.options("bad/identity")).await,
        Err(DurableError::InvalidIdentity { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn request_command_with_an_identity_answers_and_leaves_nothing_open() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let _responder = setup.responder()?;
    let identity = identity();
    let output = ferry_command()
        .arg("request")
        .args(["--bootstrap-servers", setup.cluster.bootstrap_servers()])
        .args(["--topic", &setup.requests, "--reply-topic", &setup.replies])
        .args(["--journal-topic", &setup.journal, "--identity", &identity])
        .args(["--prompt", "durable", "--timeout", "30s"])
        .output();
    let output = within("ferry request --identity", output).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr: {stderr}");
    assert_eq!(String::from_utf8(output.stdout)?, "echo: durable\n");
    let client = setup.open(&identity).await?;
    assert!(
        client.pending().is_empty(),
        "acknowledged, so not open: {:?}",
        client.pending()
    );
    Ok(())
}
