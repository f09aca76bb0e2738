//! A second Kafka node for a test's own broker: broker only, joined to the KRaft controller of a
//! `ferry broker --kafka --kafka-dir <dir>`, so that a topic can have replicas on two brokers and
//! lose one. `ferry broker` runs one node; what a test needs beyond it is here, not in the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::ChildGuard;

/// A broker-only Kafka node joined to another's controller; killed when dropped.
pub struct JoinedBroker {
    /// Its node id, which topics name in their replica assignments.
    pub id: i32,
    process: ChildGuard,
    /// Configuration, storage and log; removed after the process is gone (fields drop in order).
    _dir: tempfile::TempDir,
}

/// A `key=value` line of a properties file.
fn property(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {}", path.display()))
        .trim()
        .to_string()
}

/// The JVM's `-cp` argument, read from the running first node's command line.
fn classpath(kafka_dir: &Path) -> String {
    let pid = std::fs::read_to_string(kafka_dir.join("jvm.pid")).expect("the first node's jvm.pid");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).expect("its command line");
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "-cp").expect("a -cp argument");
    args[at + 1].clone()
}

impl JoinedBroker {
    /// Formats storage for node `id` of the first node's cluster, starts it, and returns once it
    /// is started (it registers with the controller a moment later: wait for it in metadata).
    pub fn join(kafka_dir: &Path, id: i32) -> Self {
        let controller = std::fs::read_to_string(kafka_dir.join("ports")).expect("the first node's ports");
        let controller = controller
            .split_whitespace()
            .nth(1)
            .expect("a controller port")
            .to_string();
        let cluster_id = property(&kafka_dir.join("data").join("meta.properties"), "cluster.id");
        let classpath = classpath(kafka_dir);
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::http::free_addr().port();
        let data: PathBuf = dir.path().join("data");
        let properties = dir.path().join("server.properties");
        let text = format!(
            "process.roles=broker
node.id={id}
controller.quorum.voters=1@127.0.0.1:{controller}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:{port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
broker.heartbeat.interval.ms=500
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
",
            data = data.display()
        );
        std::fs::write(&properties, text).expect("write its properties");
        let formatted = Command::new("java")
            .args(["-Xmx256m", "-cp", &classpath, "kafka.tools.StorageTool", "format", "-t"])
            .arg(&cluster_id)
            .arg("-c")
            .arg(&properties)
            .output()
            .expect("run the storage tool");
        assert!(
            formatted.status.success(),
            "formatting node {id}: {}{}",
            String::from_utf8_lossy(&formatted.stdout),
            String::from_utf8_lossy(&formatted.stderr)
        );
        let mut cmd = Command::new("java");
        cmd.args(["-Xms128m", "-Xmx512m", "-cp", &classpath, "kafka.Kafka"])
            .arg(&properties);
        let process = ChildGuard::spawn(&format!("kafka node {id}"), &mut cmd, dir.path().join("kafka.log"));
        Self { id, process, _dir: dir }
    }

    /// SIGKILLs the node: the fault of a broker that is gone.
    pub fn kill(&self) {
        self.process.signal("KILL");
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
