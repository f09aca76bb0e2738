//! Getting the model to the worker: ready means loaded *and verified*. A worker given the wrong
//! sha256 never turns ready and exits saying why; `--fetch-model-only` (the init container's
//! step) verifies the file and exits 0, or exits non-zero on a mismatch, without touching Kafka.
//!
//! Real processes: the worker binary, the real model file, and for the serving worker a
//! Kafka-protocol broker (or the cluster named by `FERRY_TEST_BOOTSTRAP_SERVERS`), so that the
//! only thing between it and ready is the model check.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::http::{free_addr, get};
use ferry_testkit::{bin, ChildGuard, Setup};

const WRONG: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn real_sha256() -> String {
    ferry_worker::model::file_sha256(&ferry_testkit::model::model_path()).expect("hash the test model")
}

#[test]
fn a_worker_with_the_wrong_sha256_never_turns_ready_and_says_why() {
    let s = Setup::new(1);
    let addr = free_addr();
    let args = s.pipeline.args().set("--http-addr", addr.to_string());
    let mut w = s.worker("worker-wrong-sha", args.set("--model-sha256", WRONG));
    // Ask /readyz until the process is gone: it must never say 200.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answers = Vec::new();
    let status = loop {
        if let Some((code, body)) = get(addr, "/readyz") {
            assert_ne!(code, 200, "ready with a model that does not verify: {body}");
            answers.push(body);
        }
        if let Some(status) = w.wait_exit(Duration::from_millis(20)) {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after 120 s:\n{}", w.log());
    };
    assert_eq!(status.code(), Some(1), "{}", w.log());
    let log = w.log();
    let actual = real_sha256();
    assert!(
        log.contains(&format!("has sha256 {actual}, expected {WRONG}")) && log.contains("refusing to serve it"),
        "the log says which hash it found and which it expected:\n{log}"
    );
    // When the endpoint answered before the exit, it said why it was not ready.
    assert!(answers.iter().all(|b| b.contains("loading the model")), "{answers:?}");
}

#[test]
fn fetch_mode_verifies_a_local_model_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, sha: &str| {
        let mut cmd = Command::new(bin("ferry-worker"));
        // No broker: fetching never touches Kafka.
        cmd.args(["--fetch-model-only", "--bootstrap-servers", "127.0.0.1:1", "--model"])
            .arg(ferry_testkit::model::model_path())
            .args(["--model-sha256", sha, "--http-addr", "off"]);
        let mut p = ChildGuard::spawn(name, &mut cmd, dir.path().join(format!("{name}.log")));
        let status = p.wait_exit(Duration::from_secs(60)).expect("fetch mode exits");
        (status, p.log())
    };
    let sha = real_sha256();
    let (status, log) = run("fetch-ok", &sha);
    assert!(status.success(), "{log}");
    assert!(log.contains("model fetched") && log.contains(&sha), "{log}");
    let (status, log) = run("fetch-wrong", WRONG);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("has sha256 {sha}, expected {WRONG}")), "{log}");
    // The environment variable the init container uses does the same as the flag.
    let mut cmd = Command::new(bin("ferry-worker"));
    cmd.env("FERRY_FETCH_MODEL_ONLY", "true")
        .env("FERRY_MODEL", ferry_testkit::model::model_path())
        .env("FERRY_MODEL_SHA256", &sha)
        .env("FERRY_HTTP_ADDR", "off");
    let mut p = ChildGuard::spawn("fetch-env", &mut cmd, dir.path().join("fetch-env.log"));
    let status = p.wait_exit(Duration::from_secs(60)).expect("fetch mode exits");
    assert!(status.success() && p.log().contains("model fetched"), "{}", p.log());
}

/// A stand-in for the Hugging Face Hub (none is reachable from the test machines): an HTTP
/// server that answers `GET /<repo>/resolve/<revision>/<file>` as the Hub does for hf-hub
/// (`x-repo-commit`, `etag`, ranges with `content-range`), streaming the file slowly so that a
/// download lasts longer than hf-hub's own lock waits (5 s). It counts the downloads it serves
/// (range requests other than hf-hub's `bytes=0-0` metadata probe).
struct SlowHub {
    addr: std::net::SocketAddr,
    downloads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl SlowHub {
    fn start(body: Vec<u8>, etag: String, chunk_delay: Duration) -> Self {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let downloads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = std::sync::Arc::new(body);
        let counter = downloads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (body, etag, counter) = (body.clone(), etag.clone(), counter.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut range = None;
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(r) = lower.strip_prefix("range: bytes=") {
                            range = Some(r.trim().to_string());
                        }
                        line.clear();
                    }
                    let size = body.len();
                    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                        Some((a, b)) => (
                            a.parse().unwrap_or(0),
                            b.parse::<usize>().map(|b| b + 1).unwrap_or(size),
                        ),
                        None => (0, size),
                    };
                    let end = end.min(size);
                    if end - start > 1 {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut out = stream;
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nx-repo-commit: {COMMIT}\r\netag: \"{etag}\"\r\n\
                         content-range: bytes {start}-{}/{size}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        end.saturating_sub(1),
                        end - start
                    );
                    if out.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    for piece in body[start..end].chunks(64 * 1024) {
                        if out.write_all(piece).and_then(|()| out.flush()).is_err() {
                            return;
                        }
                        if end - start > 1 {
                            std::thread::sleep(chunk_delay);
                        }
                    }
                });
            }
        });
        Self { addr, downloads }
    }
}

#[test]
fn fetches_into_one_cache_at_once_take_turns_and_download_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1 MiB of arbitrary bytes in 16 pieces, 450 ms apart: a download of about 7 s, longer
    // than hf-hub's own lock waits before giving up.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let body: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let file = dir.path().join("expected.gguf");
    std::fs::write(&file, &body).expect("write");
    let sha = ferry_worker::model::file_sha256(&file).expect("hash");
    let hub = SlowHub::start(body, sha.clone(), Duration::from_millis(450));
    let cache = dir.path().join("cache");
    let model = format!("hf://acme/tiny-GGUF/tiny.gguf@{COMMIT}");
    let start = |name: &str| {
        let mut cmd = Command::new(bin("ferry-worker"));
        cmd.env("HF_ENDPOINT", format!("http://{}", hub.addr))
            .env("HF_HOME", dir.path().join("hf-home"))
            .args([
                "--fetch-model-only",
                "--http-addr",
                "off",
                "--model",
                &model,
                "--model-sha256",
                &sha,
            ])
            .arg("--model-cache-dir")
            .arg(&cache);
        ChildGuard::spawn(name, &mut cmd, dir.path().join(format!("{name}.log")))
    };
    let mut first = start("fetch-first");
    // The second starts once the first holds the lock and is downloading.
    ferry_testkit::wait_for(Duration::from_secs(30), "the first download to start", || {
        (hub.downloads.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    });
    let mut second = start("fetch-second");
    for p in [&mut first, &mut second] {
        let status = p.wait_exit(Duration::from_secs(120)).expect("fetch mode exits");
        assert!(status.success(), "{} failed:\n{}", p.name, p.log());
        assert!(
            p.log().contains("model fetched") && p.log().contains(&sha),
            "{}",
            p.log()
        );
    }
    assert!(
        second
            .log()
            .contains("another process is fetching into the model cache: waiting for it"),
        "{}",
        second.log()
    );
    assert_eq!(
        hub.downloads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one download for the node; the second fetch found the file in the cache"
    );
}
