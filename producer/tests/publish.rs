//! Publishing requests: through the library and through `ferry publish`, read back with a
//! plain rdkafka consumer. Runs against `FERRY_TEST_BOOTSTRAP_SERVERS` when set, otherwise
//! against a `ferry broker` spawned per test.

mod cluster;

use std::io::{Seek, SeekFrom, Write};
use std::process::Stdio;

use anyhow::Context as _;
use cluster::{ferry_command, key_of, message_count, read_messages, TestCluster, PATIENCE};
use ferry::client::{Client, KafkaConfig};
use ferry_schemas::Request;
use rdkafka::message::Headers;
use rdkafka::Message;

fn request(id: &str, prompt: &str) -> anyhow::Result<Request> {
    Ok(serde_json::from_value(
        serde_json::json!({ "id": id, "prompt": prompt }),
    )?)
}

/// Runs `ferry publish` with `stdin` as its input; returns (exit code, stdout, stderr).
async fn ferry_publish(args: &[&str], stdin: &[u8]) -> anyhow::Result<(Option<i32>, String, String)> {
    // stdin from a file: the whole input is there at once, with an end the reader sees.
    let mut input = tempfile::tempfile()?;
    input.write_all(stdin)?;
    input.seek(SeekFrom::Start(0))?;
    let child = ferry_command()
        .arg("publish")
        .args(args)
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .context("ferry publish hung")??;
    Ok((
        output.status.code(),
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

#[tokio::test]
async fn library_publish_is_consumed_back_keyed_by_id() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let topic = cluster.topic("lib-publish").await?;
    let client = Client::new(KafkaConfig {
        bootstrap_servers: cluster.bootstrap_servers().to_string(),
        delivery_timeout: PATIENCE,
    })?;
    let sent = request(&uuid::Uuid::new_v4().to_string(), "hello")?;

    let published = client.publish(&topic, &sent).await?;

    let messages = read_messages(cluster.bootstrap_servers(), &topic, 1).await?;
    let message = &messages[0];
    assert_eq!(key_of(message).as_deref(), Some(sent.id.as_str()));
    assert_eq!(
        (message.partition(), message.offset()),
        (published.partition, published.offset)
    );
    let received: Request = serde_json::from_slice(message.payload().unwrap_or_default())?;
    assert_eq!(received, sent);
    let version = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == ferry_schemas::headers::SCHEMA_VERSION))
        .and_then(|h| h.value.map(<[u8]>::to_vec));
    assert_eq!(version.as_deref(), Some(&b"1"[..]));
    Ok(())
}

#[tokio::test]
async fn publish_command_keys_each_line_by_its_id() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let topic = cluster.topic("cli-publish").await?;
    let ids = [uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string()];
    let lines = [
        format!(r#"{{"id":"{}","prompt":"one"}}"#, ids[0]),
        format!(
            r#"{{"id":"{}","messages":[{{"role":"user","content":"two"}}]}}"#,
            ids[1]
        ),
    ];
    let input = format!("{}\n\n{}\n", lines[0], lines[1]);

    let (code, stdout, stderr) = ferry_publish(
        &["--bootstrap-servers", cluster.bootstrap_servers(), "--topic", &topic],
        input.as_bytes(),
    )
    .await?;

    assert_eq!(code, Some(0), "stderr: {stderr}");
    let printed: Vec<Vec<&str>> = stdout.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(printed.len(), 2, "stdout: {stdout}");
    let mut messages = read_messages(cluster.bootstrap_servers(), &topic, 2).await?;
    messages.sort_by_key(|m| ids.iter().position(|id| Some(id.as_str()) == key_of(m).as_deref()));
    for ((id, line), (message, fields)) in ids.iter().zip(&lines).zip(messages.iter().zip(&printed)) {
        assert_eq!(key_of(message).as_deref(), Some(id.as_str()));
        assert_eq!(message.payload(), Some(line.as_bytes()), "published exactly as read");
        assert_eq!(
            fields[..],
            [
                id.as_str(),
                &message.partition().to_string(),
                &message.offset().to_string()
            ]
        );
    }
    Ok(())
}

#[tokio::test]
async fn publish_command_refuses_invalid_lines_and_publishes_nothing() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let topic = cluster.topic("cli-invalid").await?;
    let input = "{\"id\":\"ok\",\"prompt\":\"p\"}\n{\"id\":\"bad\",\"prompt\":\"p\",\"temperature\":9}\nnot json\n";

    let (code, stdout, stderr) = ferry_publish(
        &["--bootstrap-servers", cluster.bootstrap_servers(), "--topic", &topic],
        input.as_bytes(),
    )
    .await?;

    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    assert!(
        stderr.contains("line 2: invalid request: temperature"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("line 3: not a request"), "stderr: {stderr}");
    assert_eq!(message_count(cluster.bootstrap_servers(), &topic)?, 0);
    Ok(())
}

#[tokio::test]
async fn raw_publish_sends_bad_lines_keyed_when_possible() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let topic = cluster.topic("cli-raw").await?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut input = format!("{{\"id\":\"{id}\",\"unknown_field\":1}}\n").into_bytes();
    input.extend_from_slice(b"\xff\xfe not utf-8\n");

    let (code, stdout, stderr) = ferry_publish(
        &[
            "--bootstrap-servers",
            cluster.bootstrap_servers(),
            "--topic",
            &topic,
            "--raw",
        ],
        &input,
    )
    .await?;

    assert_eq!(code, Some(0), "stderr: {stderr}");
    let first_fields: Vec<&str> = stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap_or_default())
        .collect();
    assert_eq!(first_fields, [id.as_str(), "-"]);
    let messages = read_messages(cluster.bootstrap_servers(), &topic, 2).await?;
    let mut seen: Vec<(Option<String>, Vec<u8>)> = messages
        .iter()
        .map(|m| (key_of(m), m.payload().unwrap_or_default().to_vec()))
        .collect();
    seen.sort();
    assert_eq!(seen[0], (None, b"\xff\xfe not utf-8".to_vec()));
    assert_eq!(seen[1].0.as_deref(), Some(id.as_str()));
    Ok(())
}
