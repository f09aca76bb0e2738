//! `ferry broker` as a process: what it announces, the topics it makes, and its shutdown.
//! These tests are about the broker itself, so they spawn one even when
//! `FERRY_TEST_BOOTSTRAP_SERVERS` names an external cluster.

mod cluster;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cluster::{ferry_command, BrokerProcess, PATIENCE};
use ferry::topics::{cluster_kind, create_topic, ClusterKind, MOCK_AUTO_CREATE_PARTITIONS};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio::time::Instant;

fn partition_count(bootstrap_servers: &str, topic: &str) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), PATIENCE)?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .context("topic missing from metadata")?;
    if let Some(error) = found.error() {
        bail!("topic {topic}: {error:?}");
    }
    Ok(found.partitions().len())
}

#[tokio::test]
async fn first_stdout_line_is_the_bootstrap_servers_and_topics_exist() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bootstrap");
    let child = ferry_command()
        .arg("broker")
        .arg("--bootstrap-file")
        .arg(&file)
        .args([
            "--partitions",
            "5",
            "--topic",
            "alpha",
            "--topic",
            "beta",
            "--brokers",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let servers = ferry::bootstrap::wait_for_file(&file, PATIENCE).await?;
    assert_eq!(servers.split(',').count(), 2, "{servers}");
    assert_eq!(partition_count(&servers, "alpha")?, 5);
    assert_eq!(partition_count(&servers, "beta")?, 5);
    assert_eq!(cluster_kind(&servers, PATIENCE).await?, ClusterKind::Mock);
    // The child is killed on drop (kill_on_drop), so its stdout ends and can be read whole.
    let mut child = child;
    child.start_kill()?;
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output()).await??;
    assert_eq!(String::from_utf8(output.stdout)?.lines().next(), Some(servers.as_str()));
    Ok(())
}

#[tokio::test]
async fn topics_made_later_are_auto_created_with_the_mock_default() -> anyhow::Result<()> {
    let broker = BrokerProcess::spawn(&[])?;
    let servers = ferry::bootstrap::wait_for_file(&broker.bootstrap_file(), PATIENCE).await?;
    let topic = format!("ferry-test-later-{}", uuid::Uuid::new_v4());
    // The partition count asked for is ignored by the mock: see ferry::topics.
    let partitions = create_topic(&servers, &topic, 2, PATIENCE).await?;
    assert_eq!(partitions, MOCK_AUTO_CREATE_PARTITIONS as usize);
    assert_eq!(partition_count(&servers, &topic)?, partitions);
    // Creating it again is not an error.
    assert_eq!(create_topic(&servers, &topic, 2, PATIENCE).await?, partitions);
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_the_broker_with_exit_0_and_removes_the_file() -> anyhow::Result<()> {
    let mut broker = BrokerProcess::spawn(&[])?;
    let file = broker.bootstrap_file();
    ferry::bootstrap::wait_for_file(&file, PATIENCE).await?;

    let status = std::process::Command::new("kill")
        .args(["-TERM", &broker.pid().to_string()])
        .status()?;
    assert!(status.success(), "kill -TERM failed");

    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = broker.child().try_wait()? {
            break exit;
        }
        if Instant::now() >= deadline {
            bail!("ferry broker still running 10 s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(exit.code(), Some(0));
    assert!(!file.exists(), "the bootstrap file should be removed on shutdown");
    Ok(())
}
