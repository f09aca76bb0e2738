//! `ferry broker` as a process: what it announces, the topics it makes, and its shutdown.
//! These tests are about the broker itself, so they spawn one even when
//! `FERRY_TEST_BOOTSTRAP_SERVERS` names an external cluster.

mod cluster;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cluster::{ferry_command, PATIENCE};
use ferry::topics::{cluster_kind, create_topic, ClusterKind, MOCK_AUTO_CREATE_PARTITIONS};
use ferry_testkit::broker::BrokerProcess;
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
    let broker = BrokerProcess::spawn(&[]);
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
    let mut broker = BrokerProcess::spawn(&[]);
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

/// How long `ferry broker --kafka` may take to write its bootstrap file. The first run on a
/// machine fetches the jars from Maven Central (and may install Java and Maven), so this is
/// generous; later starts take seconds.
const KAFKA_PATIENCE: Duration = Duration::from_secs(900);

/// The processes below `pid`: its children, their children, and so on (from /proc).
fn descendants(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(child) = entry?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // `pid (comm) state ppid ...`; the command name may hold spaces, so parse after `)`.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if let Some(ppid) = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)) {
            parents.push((child, ppid.parse::<u32>()?));
        }
    }
    let mut found = vec![pid];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(parents.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        index += 1;
    }
    found.remove(0);
    Ok(found)
}

/// The `java` processes below `pid`.
fn jvms_below(pid: u32) -> anyhow::Result<Vec<u32>> {
    Ok(descendants(pid)?
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "java"))
        .collect())
}

/// Whether `pid` still runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

async fn wait_until_gone(pids: &[u32], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() >= deadline {
            bail!("processes {pids:?} still running {within:?} later");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn kafka_broker_serves_real_kafka_and_stops_on_sigterm() -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::Message as _;

    let topic = format!("ferry-test-kafka-{}", uuid::Uuid::new_v4());
    let mut broker = BrokerProcess::spawn(&["--kafka", "--topic", &topic, "--partitions", "3"]);
    let started = Instant::now();
    let servers = ferry::bootstrap::wait_for_file(&broker.bootstrap_file(), KAFKA_PATIENCE).await?;
    eprintln!("ferry broker --kafka ready after {:.1?}", started.elapsed());
    assert_eq!(cluster_kind(&servers, PATIENCE).await?, ClusterKind::Kafka);
    assert_eq!(partition_count(&servers, &topic)?, 3);
    let jvms = jvms_below(broker.pid())?;
    assert_eq!(jvms.len(), 1, "expected one JVM below ferry broker, found {jvms:?}");

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &servers).create()?;
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("hello kafka").partition(1),
            PATIENCE,
        )
        .await
        .map_err(|(e, _)| e)?;
    let messages = cluster::read_messages(&servers, &topic, 1).await?;
    assert_eq!(messages[0].payload(), Some(&b"hello kafka"[..]));
    assert_eq!(messages[0].partition(), 1);

    let status = std::process::Command::new("kill")
        .args(["-TERM", &broker.pid().to_string()])
        .status()?;
    assert!(status.success(), "kill -TERM failed");
    let deadline = Instant::now() + ferry::broker::kafka::STOP_GRACE + PATIENCE;
    let exit = loop {
        if let Some(exit) = broker.child().try_wait()? {
            break exit;
        }
        if Instant::now() >= deadline {
            bail!("ferry broker --kafka still running long after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
    assert!(
        !broker.bootstrap_file().exists(),
        "the bootstrap file should be removed on shutdown"
    );
    wait_until_gone(&jvms, PATIENCE).await
}

#[tokio::test]
async fn kafka_jvm_does_not_outlive_a_killed_ferry_broker() -> anyhow::Result<()> {
    let mut broker = BrokerProcess::spawn(&["--kafka", "--topic", "t"]);
    ferry::bootstrap::wait_for_file(&broker.bootstrap_file(), KAFKA_PATIENCE).await?;
    let jvms = jvms_below(broker.pid())?;
    assert_eq!(jvms.len(), 1, "expected one JVM below ferry broker, found {jvms:?}");
    // The JVM's working directory (its storage) is named on its command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", jvms[0]))?;
    let properties = cmdline
        .split(|&b| b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .find(|arg| arg.ends_with("server.properties"))
        .map(std::path::PathBuf::from)
        .context("no server.properties on the JVM's command line")?;
    broker.child().kill()?;
    broker.child().wait()?;
    wait_until_gone(&jvms, ferry::broker::kafka::STOP_GRACE + PATIENCE).await?;
    let dir = properties.parent().context("server.properties has no directory")?;
    // The wrapper deletes the directory right after the JVM exits; allow it a moment.
    let deadline = Instant::now() + PATIENCE;
    while dir.exists() {
        if Instant::now() >= deadline {
            bail!("{} left behind after ferry broker was killed", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits for the broker process to exit, failing after `within`.
async fn exit_of(broker: &mut BrokerProcess, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(exit) = broker.child().try_wait()? {
            return Ok(exit);
        }
        if Instant::now() >= deadline {
            bail!("ferry broker still running {within:?} later");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A broker on a kept `--kafka-dir` is a broker that can crash and come back: when its JVM is
/// SIGKILLed, `ferry broker` exits with an error (it no longer serves), and a new `ferry broker`
/// on the same directory serves at the same address with the records written before the crash.
#[tokio::test]
async fn kafka_broker_on_a_kept_dir_survives_a_jvm_kill_with_its_data_and_address() -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::Message as _;

    let kept = tempfile::tempdir()?;
    let dir = kept.path().join("kafka");
    let dir_arg = dir.to_str().context("temporary path is not UTF-8")?;
    let topic = format!("ferry-test-kept-{}", uuid::Uuid::new_v4());
    let args = [
        "--kafka",
        "--kafka-dir",
        dir_arg,
        "--topic",
        &topic,
        "--partitions",
        "1",
    ];
    let mut broker = BrokerProcess::spawn(&args);
    let servers = ferry::bootstrap::wait_for_file(&broker.bootstrap_file(), KAFKA_PATIENCE).await?;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &servers).create()?;
    producer
        .send(FutureRecord::to(&topic).key("k").payload("before the crash"), PATIENCE)
        .await
        .map_err(|(e, _)| e)?;
    drop(producer);

    let jvm = std::fs::read_to_string(dir.join("jvm.pid"))?.trim().to_string();
    assert_eq!(jvms_below(broker.pid())?, [jvm.parse::<u32>()?]);
    let status = std::process::Command::new("kill").args(["-KILL", &jvm]).status()?;
    assert!(status.success(), "kill -KILL {jvm} failed");
    let exit = exit_of(&mut broker, PATIENCE).await?;
    assert!(
        !exit.success(),
        "ferry broker should fail when its Kafka dies, exited {exit}"
    );
    assert!(
        dir.join("data").join("meta.properties").exists(),
        "the kept data is gone"
    );

    let mut again = BrokerProcess::spawn(&args);
    let servers_again = ferry::bootstrap::wait_for_file(&again.bootstrap_file(), KAFKA_PATIENCE).await?;
    assert_eq!(servers_again, servers, "a restarted broker keeps its address");
    let messages = cluster::read_messages(&servers_again, &topic, 1).await?;
    assert_eq!(messages[0].payload(), Some(&b"before the crash"[..]));

    let status = std::process::Command::new("kill")
        .args(["-TERM", &again.pid().to_string()])
        .status()?;
    assert!(status.success(), "kill -TERM failed");
    let exit = exit_of(&mut again, ferry::broker::kafka::STOP_GRACE + PATIENCE).await?;
    assert_eq!(exit.code(), Some(0));
    assert!(
        dir.join("data").join("meta.properties").exists(),
        "a kept directory is kept"
    );
    Ok(())
}

/// `--stop-on-stdin-eof`: the broker stops cleanly once the pipe on its stdin is closed, as it
/// is when the process that started it dies.
#[tokio::test]
async fn stop_on_stdin_eof_stops_the_broker_when_its_pipe_closes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bootstrap");
    let mut child = ferry_command()
        .args(["broker", "--stop-on-stdin-eof", "--bootstrap-file"])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    ferry::bootstrap::wait_for_file(&file, PATIENCE).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait()?.is_none(),
        "the broker stopped while its stdin was open"
    );
    drop(child.stdin.take());
    let exit = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .context("ferry broker still running after its stdin closed")??;
    assert_eq!(exit.code(), Some(0));
    assert!(!file.exists(), "the bootstrap file should be removed on shutdown");
    Ok(())
}
