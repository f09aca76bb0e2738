//! Real services for integration tests: Redis and an S3-compatible server, each a child process
//! of the test on a free port, killed when the test drops it.
//!
//! Nothing needs to be set up beforehand. A missing `redis-server` is installed with
//! `apt-get install redis-server`, a missing moto (the S3 server) with
//! `pip install 'moto[server]'`, once per machine: an exclusive lock on a file in the temporary
//! directory keeps parallel tests, and parallel test binaries, from installing at the same time.
//! Where installing is impossible (no root, no network) the test fails and says what to install.
//!
//! Servers are ready when `start` returns: it polls them until they answer, under a deadline.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::wait_for;

/// How long a server may take to start answering. moto imports a large Python package, which
/// takes seconds on a loaded CI machine.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How many fresh ports to try when a server cannot listen: another process may take a free
/// port between our probe and the server's bind.
const PORT_ATTEMPTS: usize = 3;

/// A Redis server of the test's own, with nothing saved to disk.
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>/`.
    pub url: String,
    pub port: u16,
    process: ServiceProcess,
}

impl RedisServer {
    pub fn start() -> Self {
        let binary = redis_server_binary();
        let process = ServiceProcess::start(
            "redis-server",
            |port, dir| {
                let mut cmd = Command::new(&binary);
                cmd.args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir);
                cmd
            },
            redis_answers_ping,
        );
        Self {
            url: format!("redis://127.0.0.1:{}/", process.port),
            port: process.port,
            process,
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// An S3-compatible server (moto) of the test's own, holding one empty bucket.
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    pub bucket: String,
    process: ServiceProcess,
}

impl S3Server {
    /// The fake credentials and region; moto accepts any.
    pub const ACCESS_KEY_ID: &'static str = "ferry-test";
    pub const SECRET_ACCESS_KEY: &'static str = "ferry-test-secret";
    pub const REGION: &'static str = "us-east-1";

    pub fn start() -> Self {
        let python = moto_python();
        let process = ServiceProcess::start(
            "moto",
            |port, _| {
                let mut cmd = Command::new(&python);
                cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]);
                cmd
            },
            |port| TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        let endpoint = format!("http://127.0.0.1:{}", process.port);
        let bucket = "ferry-test".to_string();
        // moto accepts unsigned requests, so a plain PUT creates the bucket.
        let create = format!("{endpoint}/{bucket}");
        wait_for(START_DEADLINE, "moto to create the bucket", || {
            ureq::put(&create).call().ok()
        });
        Self {
            endpoint,
            bucket,
            process,
        }
    }

    /// The store URL for keys under `root` in the bucket.
    pub fn url(&self, root: &str) -> String {
        format!("s3://{}/{root}", self.bucket)
    }

    /// The settings a store needs to reach this server, as `object_store` configuration keys,
    /// for the worker's `snapshot::store::open_with_options`. Passing them explicitly keeps
    /// parallel tests from racing on the process environment.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_allow_http", "true".into()),
            ("aws_access_key_id", Self::ACCESS_KEY_ID.into()),
            ("aws_secret_access_key", Self::SECRET_ACCESS_KEY.into()),
            ("aws_region", Self::REGION.into()),
        ]
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// A server process on a port of its own, killed and reaped when dropped. A failing test prints
/// the server's log.
struct ServiceProcess {
    name: &'static str,
    port: u16,
    child: Child,
    /// Holds the log and anything else the server writes; removed after the server is gone.
    dir: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts `command(port, dir)` on a free port and waits until `ready(port)`.
    fn start(name: &'static str, command: impl Fn(u16, &Path) -> Command, ready: impl Fn(u16) -> bool) -> Self {
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let log = dir.path().join(format!("{name}.log"));
            let out = File::create(&log).expect("log file");
            let child = command(port, dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::from(out.try_clone().expect("dup log")))
                .stderr(Stdio::from(out))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
            let mut process = Self { name, port, child, dir };
            let deadline = Instant::now() + START_DEADLINE;
            loop {
                if ready(port) {
                    return process;
                }
                if let Ok(Some(status)) = process.child.try_wait() {
                    // Most likely the port was taken meanwhile: try another one.
                    last_log = format!("{name} exited with {status}:\n{}", process.log());
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} did not answer within {START_DEADLINE:?}:\n{}",
                    process.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("{name} failed to start {PORT_ATTEMPTS} times; the last time:\n{last_log}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.name))).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of {} (port {}) -----\n{}", self.name, self.port, self.log());
        }
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn redis_answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// The `redis-server` binary, installed with apt if it is missing.
fn redis_server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    let find = || find_program("redis-server");
    BINARY
        .get_or_init(|| find().unwrap_or_else(|| with_install_lock("redis-server", find, install_redis_server)))
        .clone()
}

fn install_redis_server() -> PathBuf {
    let apt = |args: &[&str]| run(Command::new("apt-get").args(args));
    let install = || apt(&["install", "-y", "--no-install-recommends", "redis-server"]);
    // A fresh machine's package lists may be empty or stale: update once and retry.
    if let Err(e) = install().or_else(|_| apt(&["update"])).and_then(|()| install()) {
        panic!(
            "redis-server is missing and installing it failed; install it \
             (Debian: `apt-get install redis-server`) and run the tests again.\n{e}"
        );
    }
    find_program("redis-server").expect("apt-get installed redis-server, but it is not on the PATH")
}

/// A Python interpreter that can run `moto.server`: the system's `python3` (after a
/// `pip install 'moto[server]'` if needed), or, where that `pip` refuses to install (an
/// "externally managed" system Python), a virtual environment of the tests' own.
fn moto_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    let find = || {
        [system_python(), moto_venv().join("bin/python3")]
            .into_iter()
            .find(|p| has_moto(p))
    };
    PYTHON
        .get_or_init(|| find().unwrap_or_else(|| with_install_lock("moto", find, install_moto)))
        .clone()
}

fn install_moto() -> PathBuf {
    let pip = |python: &Path| run(Command::new(python).args(["-m", "pip", "install", "--quiet", "moto[server]"]));
    let system = system_python();
    let system_error = match pip(&system) {
        Ok(()) if has_moto(&system) => return system,
        Ok(()) => "pip succeeded, but `import moto.server` still fails".to_string(),
        Err(e) => e,
    };
    let venv = moto_venv();
    let venv_python = venv.join("bin/python3");
    match run(Command::new(&system).arg("-m").arg("venv").arg(&venv)).and_then(|()| pip(&venv_python)) {
        Ok(()) if has_moto(&venv_python) => venv_python,
        outcome => panic!(
            "moto (the S3 server the tests run) is missing and installing it failed; run \
             `python3 -m pip install 'moto[server]'` and the tests again.\n\
             system pip: {system_error}\nvirtual environment: {outcome:?}"
        ),
    }
}

fn system_python() -> PathBuf {
    PathBuf::from("python3")
}

fn moto_venv() -> PathBuf {
    std::env::temp_dir().join("ferry-test-moto-venv")
}

fn has_moto(python: &Path) -> bool {
    run(Command::new(python).args(["-c", "import moto.server"])).is_ok()
}

/// Installs something under an exclusive lock on a file named after `what`, so that only one
/// test process on the machine installs at a time: under the lock, `find` looks again (another
/// process may have installed it while this one waited) and only then `install` runs.
// File::lock is Rust 1.89, past the workspace's declared 1.85; its dependencies already need
// 1.89 (uuid), so this costs nothing.
#[allow(clippy::incompatible_msrv)]
fn with_install_lock(what: &str, find: impl FnOnce() -> Option<PathBuf>, install: impl FnOnce() -> PathBuf) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-test-install-{what}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    // The lock is released when `file` is closed, at the end of this function.
    find().unwrap_or_else(install)
}

/// The path of `program` on the `PATH`, or in the sbin directories a non-root `PATH` lacks.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/bin", "/usr/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Runs a command to completion; on failure, says what ran and what it printed.
fn run(cmd: &mut Command) -> Result<(), String> {
    let described = format!("{cmd:?}");
    match cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
    {
        Ok(Output { status, .. }) if status.success() => Ok(()),
        Ok(Output { status, stdout, stderr }) => Err(format!(
            "{described} exited with {status}\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        )),
        Err(e) => Err(format!("cannot run {described}: {e}")),
    }
}
