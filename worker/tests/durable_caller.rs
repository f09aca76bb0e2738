//! The durable caller against a real worker and the real model: `ferry request --identity
//! --fan-out` (and the Python example, which speaks the same protocol) is SIGKILLed mid-fan-out,
//! the remaining answers arrive while no caller runs, and a new caller with the same identity
//! reports what is open, collects exactly what is left, and sends nothing again.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_schemas::Reply;
use ferry_testkit::{bin, unique, wait_for, Cluster};

/// Requests in the fan-out. With two generated at a time, the caller is killed after two
/// answers while at least four have not even started.
const REQUESTS: usize = 8;

/// Model load plus generation on a loaded CI machine.
const GENERATION_PATIENCE: Duration = Duration::from_secs(300);

/// The Python client the example is tested with; the Makefile installs the same.
const CONFLUENT_KAFKA: &str = "confluent-kafka==2.12.1";

#[derive(Debug, Clone, Copy)]
enum Lang {
    /// `ferry request --identity`.
    Rust,
    /// `examples/python/durable_fanout.py`.
    Python,
}

/// The topics and names of one scenario.
struct Setup {
    cluster: Cluster,
    requests: String,
    replies: String,
    journal: String,
    identity: String,
    ids: Vec<String>,
    fan_out: PathBuf,
}

impl Setup {
    fn start() -> Self {
        let (requests, replies, journal) = (unique("req"), unique("rep"), unique("callers"));
        let dlq = format!("{requests}.dlq");
        // The journal is left to the caller to create, as in production.
        let cluster = Cluster::start_with_partitions(&[&requests, &replies, &dlq], 3);
        let identity = unique("orchestrator");
        let ids: Vec<String> = (0..REQUESTS).map(|i| format!("{identity}-r{i}")).collect();
        let prompts = [
            "Name a colour.",
            "Count to five.",
            "Say hello in French.",
            "Name a fruit.",
            "What is two plus two?",
            "Name a river.",
            "Write a short greeting.",
            "Name an animal.",
        ];
        let fan_out = cluster.dir.path().join("fan-out.jsonl");
        let lines: Vec<String> = ids
            .iter()
            .zip(prompts.iter().cycle())
            .map(|(id, prompt)| {
                serde_json::json!({
                    "id": id,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 24,
                    "stream": true
                })
                .to_string()
            })
            .collect();
        std::fs::write(&fan_out, lines.join("\n") + "\n").expect("fan-out file");
        Setup {
            cluster,
            requests,
            replies,
            journal,
            identity,
            ids,
            fan_out,
        }
    }

    fn caller(&self, name: &str, lang: Lang, args: &[&str]) -> Caller {
        let mut cmd = match lang {
            Lang::Rust => {
                let mut cmd = Command::new(bin("ferry"));
                cmd.arg("request");
                cmd
            }
            Lang::Python => {
                let mut cmd = Command::new(python_with_confluent_kafka());
                cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/durable_fanout.py"));
                cmd
            }
        };
        cmd.args(["--bootstrap-servers", &self.cluster.bootstrap])
            .args(["--topic", &self.requests, "--reply-topic", &self.replies])
            .args(["--journal-topic", &self.journal, "--identity", &self.identity])
            .args(["--timeout", "600s"])
            .args(args);
        Caller::spawn(name, cmd, self.cluster.dir.path())
    }

    /// The final replies in the reply topic by id, in partition order (one id's replies share a
    /// partition, since they share the key).
    fn final_replies(&self) -> BTreeMap<String, Vec<Reply>> {
        let mut finals: BTreeMap<String, Vec<Reply>> = BTreeMap::new();
        for (_, key, value, _) in self.cluster.read_all_partitions(&self.replies) {
            let reply: Reply = serde_json::from_slice(&value).expect("a reply");
            if reply.is_final() {
                finals.entry(key).or_default().push(reply);
            }
        }
        finals
    }
}

/// A caller process: its stdout lines as they come, its stderr in a file. Killed on drop.
struct Caller {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Caller {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Self {
        let stderr = dir.join(format!("{name}.stderr"));
        let file = File::create(&stderr).expect("stderr file");
        // Only the flags given count, not the developer's FERRY_* settings.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FERRY_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .env("FERRY_LOG", "info,ferry=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Caller {
            name: name.to_string(),
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn next_line(&self, timeout: Duration) -> String {
        self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "{} printed no line within {timeout:?} ({e}); stderr:\n{}",
                self.name,
                self.stderr()
            )
        })
    }

    /// SIGKILL, then every line it printed before dying (the pipe ends with the process).
    fn kill(&mut self) -> Vec<String> {
        self.child.kill().expect("SIGKILL the caller");
        self.child.wait().expect("reap the caller");
        self.lines.iter().collect()
    }

    /// Waits for the process to exit; its status and every line it printed.
    fn finish(&mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not finish within {timeout:?}; it printed {:?}; stderr:\n{}",
                self.name,
                self.lines.try_iter().collect::<Vec<_>>(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, self.lines.iter().collect())
    }

    /// What it reported as recovered from the journal: id to state.
    fn recovered(&self) -> BTreeMap<String, String> {
        self.stderr()
            .lines()
            .filter_map(|line| line.split_once(": recovered "))
            .filter_map(|(_, rest)| rest.trim().split_once(' '))
            .map(|(id, state)| (id.to_string(), state.to_string()))
            .collect()
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- stderr of {} -----\n{}", self.name, self.stderr());
        }
    }
}

/// The printed outcomes, as (id, reply); every line must be a reply.
fn outcomes(lines: &[String]) -> Vec<(String, Reply)> {
    lines
        .iter()
        .map(|line| {
            let reply: Reply = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a reply ({e}): {line}"));
            (reply.id().to_string(), reply)
        })
        .collect()
}

fn distinct_ids(outcomes: &[(String, Reply)], who: &str) -> BTreeSet<String> {
    let ids: BTreeSet<String> = outcomes.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), outcomes.len(), "{who} printed an answer twice: {outcomes:?}");
    ids
}

/// The scenario: `first` sends the fan-out and is killed after two answers; the rest are
/// answered while no caller runs; `second` resumes; a Rust caller checks that nothing is left.
fn kill_mid_fan_out_then_resume(first: Lang, second: Lang) {
    let setup = Setup::start();
    let _worker = setup.cluster.worker(
        "worker-durable",
        &[
            "--topic",
            &setup.requests,
            "--reply-topic",
            &setup.replies,
            "--group-id",
            &unique("group"),
            "--max-in-flight",
            "2",
        ],
    );
    let fan_out = setup.fan_out.to_string_lossy().into_owned();
    let all: BTreeSet<String> = setup.ids.iter().cloned().collect();

    // The first caller sends everything and dies by SIGKILL after its second answer.
    let mut caller = setup.caller("caller-1", first, &["--fan-out", &fan_out]);
    let mut lines = vec![
        caller.next_line(GENERATION_PATIENCE),
        caller.next_line(GENERATION_PATIENCE),
    ];
    lines.extend(caller.kill());
    let printed_first = outcomes(&lines);
    let first_ids = distinct_ids(&printed_first, "the first caller");
    assert!(
        first_ids.len() < REQUESTS,
        "the caller was to die with requests open, but it printed all {REQUESTS}"
    );

    // Every request is answered while no caller runs.
    let finals = wait_for(GENERATION_PATIENCE, "a final reply to every request", || {
        let finals = setup.final_replies();
        all.iter().all(|id| finals.contains_key(id)).then_some(finals)
    });

    // A new caller with the same identity reports what is open and collects it.
    let mut caller = setup.caller("caller-2", second, &["--resume"]);
    let (status, lines) = caller.finish(Duration::from_secs(120));
    assert!(
        status.success(),
        "the resuming caller failed: {status}\n{}",
        caller.stderr()
    );
    let recovered = caller.recovered();
    let printed_second = outcomes(&lines);
    let second_ids = distinct_ids(&printed_second, "the resuming caller");

    // It reports everything the first did not print, and what that one printed but had not
    // acknowledged when it died, which can only be `answered`. The rest are `sent` (published
    // and acknowledged long before the kill, so nothing is `sending`) or `answered` (journaled
    // in the instant before the kill). At least one answer came while no caller ran.
    for id in all.difference(&first_ids) {
        assert!(
            recovered.contains_key(id),
            "{id} was never printed and not reported open: {recovered:?}"
        );
    }
    for (id, state) in &recovered {
        assert!(all.contains(id), "reported a request it never sent: {id}");
        let allowed: &[&str] = if first_ids.contains(id) {
            &["answered"]
        } else {
            &["sent", "answered"]
        };
        assert!(allowed.contains(&state.as_str()), "{id} was reported {state}");
    }
    assert!(
        recovered.values().any(|state| state == "sent"),
        "no request was open at the kill, so nothing arrived while the caller was down: {recovered:?}"
    );

    // It prints exactly what it reported, each once; every answer reaches the application, and
    // one reaches it twice only when it was not acknowledged before the kill.
    let reported: BTreeSet<String> = recovered.keys().cloned().collect();
    assert_eq!(second_ids, reported);
    assert_eq!(first_ids.union(&second_ids).cloned().collect::<BTreeSet<_>>(), all);
    for id in first_ids.intersection(&second_ids) {
        assert_eq!(
            recovered[id], "answered",
            "{id} was printed twice though it had been acknowledged"
        );
    }

    // Each printed answer is a response, the first final reply of its id in the reply topic.
    for (id, reply) in printed_first.iter().chain(&printed_second) {
        let Reply::Response(response) = reply else {
            panic!("{id} was answered with {reply:?}")
        };
        assert!(!response.text.is_empty(), "{id} has an empty answer");
        assert_eq!(
            Some(reply),
            finals[id].first(),
            "{id} printed another reply than its first"
        );
    }

    // Nothing was published twice: every request is in the request topic exactly once.
    let mut published: BTreeMap<String, usize> = BTreeMap::new();
    for (_, key, _, _) in setup.cluster.read_all_partitions(&setup.requests) {
        *published.entry(key).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = all.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(published, expected, "requests published more than once, or missing");

    // Everything was acknowledged: a third caller (always the Rust one, so the Python example's
    // tombstones and commits are read by the other implementation) finds nothing.
    let mut caller = setup.caller("caller-3", Lang::Rust, &["--resume"]);
    let (status, lines) = caller.finish(Duration::from_secs(60));
    assert!(
        status.success(),
        "the last caller failed: {status}\n{}",
        caller.stderr()
    );
    assert_eq!(caller.recovered(), BTreeMap::new(), "requests left in the journal");
    assert!(lines.is_empty(), "the last caller printed {lines:?}");
}

#[test]
fn a_caller_killed_mid_fan_out_collects_every_answer_once_after_a_restart() {
    kill_mid_fan_out_then_resume(Lang::Rust, Lang::Rust);
}

#[test]
fn the_python_example_survives_the_same_kill() {
    kill_mid_fan_out_then_resume(Lang::Python, Lang::Python);
}

#[test]
fn a_python_caller_takes_over_from_a_killed_rust_caller() {
    kill_mid_fan_out_then_resume(Lang::Rust, Lang::Python);
}

/// A `python3` that can import `confluent_kafka`, installing it with pip once if it is missing
/// (under a lock, since test binaries run in parallel). Fails, saying what to install, where
/// installing is impossible.
fn python_with_confluent_kafka() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let python = PathBuf::from("python3");
            let importable = || {
                Command::new(&python)
                    .args(["-c", "import confluent_kafka"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if importable() {
                return python;
            }
            let lock_path = std::env::temp_dir().join("ferry-test-install-confluent-kafka.lock");
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .expect("install lock file");
            // File::lock is Rust 1.89, which the workspace requires.
            lock.lock().expect("install lock");
            if !importable() {
                let output = Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet", CONFLUENT_KAFKA])
                    .output()
                    .expect("run pip");
                assert!(
                    output.status.success() && importable(),
                    "the Python example needs {CONFLUENT_KAFKA}, and installing it failed; run \
                     `python3 -m pip install {CONFLUENT_KAFKA}` and the tests again.\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            python
        })
        .clone()
}
