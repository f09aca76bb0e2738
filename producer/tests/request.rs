//! Request and wait: `ferry request` and [`Client::request`] against a tiny responder that
//! stands in for a worker. Runs against `FERRY_TEST_BOOTSTRAP_SERVERS` when set, otherwise
//! against a `ferry broker` spawned per test.

mod cluster;

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use cluster::{ferry_command, response, write_bootstrap_file, Responder, TestCluster, PATIENCE};
use ferry::client::{Client, ClientError, KafkaConfig};
use ferry_schemas::{Reply, Request};

/// The stand-in worker's answer: an error reply to a prompt of `fail`, `echo: <prompt>` to
/// anything else. Built as JSON rather than as structs so that the test states the wire format
/// itself.
fn reply_to(request: &Request) -> serde_json::Value {
    let prompt = request.prompt.clone().unwrap_or_default();
    if prompt == "fail" {
        return serde_json::json!({
            "kind": "error", "version": 1, "id": request.id, "worker": "responder", "attempt": 1,
            "error": {"code": "engine_error", "message": "asked to fail"}
        });
    }
    response(&request.id, &format!("echo: {prompt}"))
}

/// A cluster with a request topic, a reply topic and a responder on them.
struct Setup {
    cluster: TestCluster,
    requests: String,
    replies: String,
    _responder: Option<Responder>,
}

async fn setup(with_responder: bool) -> anyhow::Result<Setup> {
    let cluster = TestCluster::start().await?;
    let requests = cluster.topic("requests").await?;
    let replies = cluster.topic("replies").await?;
    let responder = if with_responder {
        Some(Responder::start(cluster.bootstrap_servers(), &requests, |r| {
            vec![reply_to(r)]
        })?)
    } else {
        None
    };
    Ok(Setup {
        cluster,
        requests,
        replies,
        _responder: responder,
    })
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `ferry request` with the setup's topics and `args`.
async fn ferry_request(setup: &Setup, args: &[&str]) -> anyhow::Result<Run> {
    let started = std::time::Instant::now();
    let output = ferry_command()
        .arg("request")
        .args(["--bootstrap-servers", setup.cluster.bootstrap_servers()])
        .args(["--topic", &setup.requests, "--reply-topic", &setup.replies])
        .args(args)
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(PATIENCE * 2, output)
        .await
        .context("ferry request hung")??;
    Ok(Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout)?,
        stderr: String::from_utf8(output.stderr)?,
        took: started.elapsed(),
    })
}

#[tokio::test]
async fn request_command_prints_the_answer_text() -> anyhow::Result<()> {
    let setup = setup(true).await?;
    let run = ferry_request(&setup, &["--prompt", "hello there", "--timeout", "30s"]).await?;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.stdout, "echo: hello there\n");
    Ok(())
}

#[tokio::test]
async fn request_command_prints_the_whole_reply_as_json() -> anyhow::Result<()> {
    let setup = setup(true).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let run = ferry_request(
        &setup,
        &["--prompt", "p", "--id", &id, "--output", "json", "--max-tokens", "3"],
    )
    .await?;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    match serde_json::from_str::<Reply>(run.stdout.trim())? {
        Reply::Response(r) => {
            assert_eq!((r.id.as_str(), r.text.as_str()), (id.as_str(), "echo: p"))
        }
        other => panic!("expected a response, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn request_command_reads_the_bootstrap_file() -> anyhow::Result<()> {
    let setup = setup(true).await?;
    let dir = tempfile::tempdir()?;
    let file = write_bootstrap_file(dir.path(), setup.cluster.bootstrap_servers())?;
    let output = ferry_command()
        .arg("request")
        .arg("--bootstrap-file")
        .arg(&file)
        .args([
            "--topic",
            &setup.requests,
            "--reply-topic",
            &setup.replies,
            "--message",
            "user:hi",
        ])
        .output();
    let output = tokio::time::timeout(PATIENCE * 2, output)
        .await
        .context("ferry request hung")??;
    // A chat request has no prompt, so the responder echoes an empty one.
    assert_eq!(String::from_utf8(output.stdout)?, "echo: \n");
    assert!(output.status.success());
    Ok(())
}

#[tokio::test]
async fn error_reply_exits_3_with_the_reason() -> anyhow::Result<()> {
    let setup = setup(true).await?;
    let run = ferry_request(&setup, &["--prompt", "fail"]).await?;
    assert_eq!(run.code, Some(3), "stderr: {}", run.stderr);
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    assert!(
        run.stderr.contains("engine_error: asked to fail"),
        "stderr: {}",
        run.stderr
    );
    Ok(())
}

#[tokio::test]
async fn request_without_a_worker_times_out_with_exit_4() -> anyhow::Result<()> {
    let setup = setup(false).await?;
    let run = ferry_request(&setup, &["--prompt", "anyone?", "--timeout", "1500ms"]).await?;
    assert_eq!(run.code, Some(4), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("no reply to request"), "stderr: {}", run.stderr);
    assert!(
        run.took >= Duration::from_millis(1500),
        "gave up early, after {:?}",
        run.took
    );
    Ok(())
}

#[tokio::test]
async fn library_request_returns_the_reply() -> anyhow::Result<()> {
    let setup = setup(true).await?;
    let client = Client::new(KafkaConfig {
        bootstrap_servers: setup.cluster.bootstrap_servers().to_string(),
        delivery_timeout: PATIENCE,
    })?;
    let id = uuid::Uuid::new_v4().to_string();
    let request: Request =
        serde_json::from_value(serde_json::json!({ "id": id, "prompt": "lib", "reply_to": setup.replies }))?;
    match client.request(&setup.requests, &request, PATIENCE).await? {
        Reply::Response(r) => {
            assert_eq!((r.id.as_str(), r.text.as_str()), (id.as_str(), "echo: lib"))
        }
        other => panic!("expected a response, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn library_request_names_a_missing_reply_topic() -> anyhow::Result<()> {
    let setup = setup(false).await?;
    let client = Client::new(KafkaConfig {
        bootstrap_servers: setup.cluster.bootstrap_servers().to_string(),
        delivery_timeout: PATIENCE,
    })?;
    let missing = format!("ferry-test-missing-{}", uuid::Uuid::new_v4());
    let request: Request =
        serde_json::from_value(serde_json::json!({ "id": "x", "prompt": "p", "reply_to": missing }))?;
    let result = client.request(&setup.requests, &request, PATIENCE).await;
    assert!(
        matches!(result, Err(ClientError::UnknownTopic { ref topic }) if *topic == missing),
        "{result:?}"
    );
    Ok(())
}
