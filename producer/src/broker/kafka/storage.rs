//! A broker's directory and what goes in it: the work directory, the formatted storage template,
//! `server.properties`, the log4j2 configuration, free ports and the cluster id.

use super::*;

/// The directory of one broker: configuration, `data/`, `kafka.log`, `jvm.pid` and `ports`.
/// A temporary one (`.1` false) is removed on drop; a kept one (`--kafka-dir`) never is.
pub(super) struct WorkDir(pub(super) PathBuf, pub(super) bool);

impl WorkDir {
    pub(super) fn create() -> Result<Self, KafkaBrokerError> {
        let path = std::env::temp_dir().join(format!("ferry-kafka-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(WorkDir(path, false))
    }

    /// A directory kept across starts, made if it does not exist yet.
    pub(super) fn keep(path: &Path) -> Result<Self, KafkaBrokerError> {
        std::fs::create_dir_all(path).map_err(io_err("create", path))?;
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(WorkDir(path, true))
    }

    /// The broker and controller ports: in a kept directory, the ones of its first start
    /// (recorded in `ports`), so that clients and the stored metadata still find the broker after
    /// a restart; otherwise two free ones.
    pub(super) fn ports(&self) -> Result<(u16, u16), KafkaBrokerError> {
        let file = self.0.join("ports");
        if self.1 {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut it = text.split_whitespace().map(str::parse::<u16>);
                if let (Some(Ok(port)), Some(Ok(controller))) = (it.next(), it.next()) {
                    return Ok((port, controller));
                }
            }
        }
        let (port, controller) = free_ports()?;
        self.write(&file, &format!("{port} {controller}\n"))?;
        Ok((port, controller))
    }

    pub(super) fn write(&self, path: &Path, text: &str) -> Result<(), KafkaBrokerError> {
        std::fs::write(path, text).map_err(io_err("write", path))
    }

    pub(super) fn jvm_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.0.join("jvm.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The last lines of the JVM's output, for an error message.
    pub(super) fn log_tail(&self) -> String {
        let log = std::fs::read(self.0.join("kafka.log")).unwrap_or_default();
        jars::tail(&log, &[])
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The error of a file operation `action` on `path`, for `map_err`.
pub(super) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KafkaBrokerError {
    let path = path.to_path_buf();
    move |source| KafkaBrokerError::Io { action, path, source }
}

/// Formatted, empty KRaft storage for a single node, made once per jar directory (next to it,
/// as `storage/`) and copied into each new broker: formatting costs a JVM start, copying a few
/// file writes. Every copy has the same cluster and directory ids, which is harmless for
/// brokers that never form one cluster. The controller is named by the static
/// `controller.quorum.voters`, not by `format --standalone`, because a standalone format writes
/// the controller's port into the storage and a copy could then only run on that port.
pub(super) async fn storage_template(
    jars: &Path,
    classpath: &str,
    log4j_option: &str,
) -> Result<PathBuf, KafkaBrokerError> {
    let template = jars.with_file_name("storage");
    if template.join("meta.properties").exists() {
        return Ok(template);
    }
    // Formatted privately, then renamed into place: the rename is the commit, so a format that
    // was interrupted is never copied, and two brokers formatting at once both succeed.
    let partial = jars.with_file_name(format!("storage.partial.{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&partial).map_err(io_err("create", &partial))?;
    let properties = partial.join("format.properties");
    std::fs::write(&properties, server_properties(&partial.join("data"), 9092, 9093, 1))
        .map_err(io_err("write", &properties))?;
    let output = Command::new("java")
        .args(TOOL_JVM_OPTIONS)
        .arg(log4j_option)
        .args(["-cp", classpath, "kafka.tools.StorageTool", "format", "-t"])
        .arg(cluster_id())
        .arg("-c")
        .arg(&properties)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| KafkaBrokerError::Spawn {
            program: "java",
            source,
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(KafkaBrokerError::Format {
            status: output.status.to_string(),
            output: jars::tail(&output.stdout, &output.stderr),
        });
    }
    let renamed = std::fs::rename(partial.join("data"), &template);
    let _ = std::fs::remove_dir_all(&partial);
    if let Err(source) = renamed {
        // Another broker may have committed its template first; that one serves as well.
        if !template.join("meta.properties").exists() {
            return Err(io_err("move the formatted storage to", &template)(source));
        }
    }
    info!(template = %template.display(), "Kafka storage formatted (once)");
    Ok(template)
}

/// Copies the directory tree `from` to `to` (files and directories only, as formatted storage
/// holds), made writable: the formatter leaves its checkpoint read-only.
pub(super) fn copy_tree(from: &Path, to: &Path) -> Result<(), KafkaBrokerError> {
    std::fs::create_dir_all(to).map_err(io_err("create", to))?;
    for entry in std::fs::read_dir(from).map_err(io_err("read", from))? {
        let entry = entry.map_err(io_err("read", from))?;
        let target = to.join(entry.file_name());
        if entry.file_type().map_err(io_err("read", &entry.path()))?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(io_err("copy", &entry.path()))?;
            let mut permissions = std::fs::metadata(&target)
                .map_err(io_err("read", &target))?
                .permissions();
            #[allow(clippy::permissions_set_readonly_false)] // Only the owner's write bit matters.
            permissions.set_readonly(false);
            std::fs::set_permissions(&target, permissions).map_err(io_err("write", &target))?;
        }
    }
    Ok(())
}

/// Two distinct free loopback ports, for the broker and the controller listener.
pub(super) fn free_ports() -> Result<(u16, u16), KafkaBrokerError> {
    // Both are held until both are known, so the kernel cannot hand out the same port twice.
    let first = TcpListener::bind("127.0.0.1:0").map_err(KafkaBrokerError::Port)?;
    let second = TcpListener::bind("127.0.0.1:0").map_err(KafkaBrokerError::Port)?;
    let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).map_err(KafkaBrokerError::Port);
    Ok((port(&first)?, port(&second)?))
}

/// A new cluster id in Kafka's form: 16 random bytes as unpadded URL-safe base64 (22
/// characters), never starting with `-` (Kafka's `Uuid.randomUuid` rule, so the id cannot be
/// mistaken for a command-line option). Made here rather than by `StorageTool random-uuid`,
/// which would cost a JVM start.
pub(super) fn cluster_id() -> String {
    loop {
        let id = base64_url(uuid::Uuid::new_v4().as_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

pub(super) fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// `server.properties` of a single node that is both broker and KRaft controller.
pub(super) fn server_properties(data: &Path, port: u16, controller_port: u16, partitions: i32) -> String {
    format!(
        "# Written by ferry broker --kafka: a single-node development broker on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
num.partitions={partitions}
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
",
        data = data.display()
    )
}

/// Warnings and errors only, plus the line that says the server started.
pub(super) const LOG4J2: &str = "status = warn
shutdownHook = disable
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.console.ref = console
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
";
