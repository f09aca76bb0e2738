//! Child processes of a test: the workspace's binaries, started without the developer's settings,
//! each logging to a file, killed and reaped when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) when dropped, its output in a log file. On a failing
/// test (a panic) the log is printed.
pub struct ChildGuard {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` as `name`, its stdout and stderr to `log`; panics if it cannot start.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        Self::try_spawn(name, cmd, log).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`ChildGuard::spawn`], with the reason as an error rather than a panic.
    pub fn try_spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Self, String> {
        let out = File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log.display()))?;
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, for tests of a process's own life cycle.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`); panics if `kill` fails.
    pub fn signal(&self, name: &str) {
        if let Err(e) = self.try_signal(name) {
            panic!("{e}");
        }
    }

    /// Sends a signal by name through the `kill` command (the workspace forbids `unsafe`, and so
    /// `libc::kill`).
    pub fn try_signal(&self, name: &str) -> Result<(), String> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run `kill`: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{name} {} ({}) failed", self.pid(), self.name))
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit, returning its status, or `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the process's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
    }
}

/// A command for `program` that does not inherit the developer's `FERRY_*` settings, so that
/// only what a test sets counts.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FERRY_") {
            command.env_remove(name);
        }
    }
    command
}

/// A binary of the workspace (`ferry`, `ferry-worker`, `ferry-loadtest`), built beside the
/// running test or bench executable (`target/<profile>/deps/..`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
