//! One real Apache Kafka per test binary, shared by its tests: `ferry broker --kafka` started by
//! the first test that asks and stopped when the test binary exits, however it exits.
//!
//! The broker runs with `--stop-on-stdin-eof` and a pipe from this process as its stdin. The
//! pipe's write end lives in a static that is never dropped: the kernel closes it when this
//! process exits (a test binary is not unwound at exit, and may be killed), and the broker then
//! stops Kafka cleanly and removes its data. Rust opens the pipe close-on-exec, so the worker
//! processes that tests spawn later do not hold it open.

use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the first start may take: on a fresh machine it fetches Kafka's jars first.
pub const FIRST_START: Duration = Duration::from_secs(600);

/// The broker process and the pipe it watches.
type Shared = (String, Mutex<(Child, ChildStdin)>);

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

/// The bootstrap servers of this process's shared Kafka, starting it with the `ferry` binary at
/// `ferry` on first use; the error says why it could not start (its log included).
pub fn bootstrap_servers(ferry: &Path) -> Result<String, String> {
    match SHARED.get_or_init(|| start(ferry)) {
        Ok((servers, _)) => Ok(servers.clone()),
        Err(e) => Err(e.clone()),
    }
}

/// Waits for a starting `ferry broker` (`child`, logging to `log`) to write its bootstrap
/// servers to `file`; the error, with the log, if it exits first or takes over [`FIRST_START`].
pub fn wait_for_bootstrap(file: &Path, child: &mut Child, log: &Path) -> Result<String, String> {
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + FIRST_START;
    loop {
        if let Some(s) = std::fs::read_to_string(file).ok().filter(|s| !s.trim().is_empty()) {
            return Ok(s.trim().to_string());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "ferry broker exited with {status} before it was ready:\n{}",
                read_log()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "ferry broker was not ready within {FIRST_START:?}:\n{}",
                read_log()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(ferry: &Path) -> Result<Shared, String> {
    // Named after this process, and kept after it: the broker's log stays there to read.
    let dir = std::env::temp_dir().join(format!("ferry-test-kafka-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let file = dir.join("bootstrap");
    let _ = std::fs::remove_file(&file);
    let log_path = dir.join("broker.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    // Only the flags below count, not the developer's FERRY_* settings.
    let mut child = crate::process::command(ferry)
        .args(["broker", "--kafka", "--stop-on-stdin-eof", "--partitions", "1"])
        .args(["--kafka-start-timeout", "300s", "--bootstrap-file"])
        .arg(&file)
        .env("FERRY_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot run {} broker --kafka: {e}", ferry.display()))?;
    let stdin = child.stdin.take().ok_or("no pipe to the broker's stdin")?;
    let servers = match wait_for_bootstrap(&file, &mut child, &log_path) {
        Ok(servers) => servers,
        Err(e) => {
            let _ = child.kill();
            return Err(e);
        }
    };
    eprintln!("tests: Kafka at {servers} (log: {})", log_path.display());
    Ok((servers, Mutex::new((child, stdin))))
}
