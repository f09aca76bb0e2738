//! A sick snapshot store never stops answers: a worker process whose Redis store hangs, answers
//! seconds late, refuses connections, or disappears mid-generation and comes back still answers
//! every request correctly (greedy decoding: byte for byte the in-process reference), keeps
//! running, and, with the store hanging, drains on SIGTERM and exits by itself.
//!
//! The faults are TCP servers of the test's own: a listener that accepts and never answers, and
//! a proxy in front of a real `redis-server` that delays every response or is cut and restored.
//! Nothing here asserts how long anything took; a bound is only how long the test waits before
//! it gives up.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ferry_schemas::{Reply, Request};
use ferry_testkit::services::RedisServer;
use ferry_testkit::{unique, wait_for, ChildGuard, Cluster, Pipeline};
use ferry_worker::engine::Engine;
use ferry_worker::snapshot::format::request_prefix;
use rdkafka::consumer::Consumer;

/// How long the test waits for an answer before it fails: generous, for a loaded 2-core machine
/// with every store call timing out on the way.
const ANSWER_WAIT: Duration = Duration::from_secs(240);

/// The short requests every case sends, and their answers without any fault.
fn short_requests() -> &'static [(Request, String)] {
    static REFERENCES: OnceLock<Vec<(Request, String)>> = OnceLock::new();
    REFERENCES.get_or_init(|| {
        [
            "The capital of France is",
            "Write a haiku about rivers.",
            "List three colours:",
        ]
        .iter()
        .enumerate()
        .map(|(i, prompt)| reference(&format!("short-{i}"), prompt, 24))
        .collect()
    })
}

/// A greedy request and its uninterrupted answer, computed in this process.
fn reference(id: &str, prompt: &str, max_tokens: u32) -> (Request, String) {
    let request: Request = serde_json::from_value(serde_json::json!({
        "id": id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0
    }))
    .expect("request");
    let engine = Engine::new(support::shared());
    let text = engine
        .generate(engine.prepare(&request).expect("prepares"))
        .expect("reference")
        .text;
    (request, text)
}

/// A broker with the test's topics, and the worker arguments that use them.
struct Setup {
    cluster: Cluster,
    pipeline: Pipeline,
}

impl Setup {
    fn start() -> Self {
        let pipeline = Pipeline::new();
        let cluster = Cluster::start(&pipeline.topics());
        Self { cluster, pipeline }
    }

    /// A worker whose snapshot store is `store`, snapshotting every 4 tokens, with no HTTP
    /// endpoints unless `extra` names an `--http-addr`.
    fn worker(&self, name: &str, store: &str, extra: &[&str]) -> ChildGuard {
        let args = self.pipeline.args().set("--snapshot-store", store);
        let args = args.set("--snapshot-every-tokens", "4").set("--http-addr", "off");
        self.cluster.start_worker(name, args.extra(extra), &[])
    }

    fn publish(&self, requests: &[&Request]) {
        let producer = self.cluster.producer();
        rt().block_on(async {
            for r in requests {
                let payload = serde_json::to_vec(r).expect("json");
                self.cluster
                    .publish(&producer, &self.pipeline.requests, &r.id, &payload)
                    .await;
            }
        });
    }

    /// Waits until the reply topic holds at least `n` replies, and returns every response's text
    /// by request id. Error replies fail the test.
    fn answers(&self, n: usize, worker: &mut ChildGuard) -> BTreeMap<String, Vec<String>> {
        let reader = self.cluster.reader(&unique("watermarks"));
        let deadline = Instant::now() + ANSWER_WAIT;
        loop {
            let (_, high) = reader
                .fetch_watermarks(&self.pipeline.replies, 0, Duration::from_secs(10))
                .expect("watermarks");
            if high as usize >= n {
                break;
            }
            assert!(
                worker.wait_exit(Duration::ZERO).is_none(),
                "the worker exited while the store was sick:\n{}",
                worker.log()
            );
            assert!(Instant::now() < deadline, "{high} of {n} replies after {ANSWER_WAIT:?}");
            thread::sleep(Duration::from_millis(500));
        }
        let mut texts: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (_, value, _) in self.cluster.read_all(&self.pipeline.replies) {
            match serde_json::from_slice::<Reply>(&value).expect("a reply") {
                Reply::Response(r) => texts.entry(r.id).or_default().push(r.text),
                other => panic!("not a response: {other:?}"),
            }
        }
        texts
    }

    /// Checks that every one of `expected` was answered, and only with its reference answer.
    fn assert_answered(&self, expected: &[&(Request, String)], worker: &mut ChildGuard) {
        let texts = self.answers(expected.len(), worker);
        for (request, reference) in expected {
            let got = texts
                .get(&request.id)
                .unwrap_or_else(|| panic!("{} was not answered: {texts:?}", request.id));
            assert!(
                got.iter().all(|t| t == reference),
                "{}: answered {got:?}, the reference is {reference:?}",
                request.id
            );
        }
        assert!(
            worker.wait_exit(Duration::ZERO).is_none(),
            "the worker exited:\n{}",
            worker.log()
        );
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Whether the worker's log says that it started generating request `id`.
fn generating(worker: &ChildGuard, id: &str) -> bool {
    let span = format!("request_id={id}");
    worker
        .log()
        .lines()
        .any(|l| l.contains(&span) && l.contains("generating"))
}

/// A TCP server that accepts connections, reads whatever comes and never answers: a store that
/// hangs. It lives as long as the test process.
fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// A port nobody listens on.
fn refused_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// What a [`Proxy`] does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards both ways at once.
    Pass,
    /// Forwards requests at once and every response this much later.
    Delay(Duration),
    /// Drops every connection and refuses new ones: the store is gone.
    Down,
}

/// A TCP proxy in front of `upstream` on a port of its own, whose [`Mode`] the test changes.
struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

struct ProxyState {
    mode: Mode,
    /// Both ends of every connection, to cut them when the mode turns to `Down`.
    connections: Vec<TcpStream>,
}

impl Proxy {
    fn start(upstream: SocketAddr, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(ProxyState {
            mode,
            connections: Vec::new(),
        }));
        let shared = state.clone();
        thread::spawn(move || accept_loop(Some(listener), addr, upstream, shared));
        Self { addr, state }
    }

    fn set(&self, mode: Mode) {
        let mut state = self.state.lock().expect("proxy state");
        state.mode = mode;
        if mode == Mode::Down {
            for c in state.connections.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }
}

/// Accepts connections while the proxy is up; closes the listener (so connecting is refused)
/// while it is down, and listens on the same port again when it comes back.
fn accept_loop(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
) {
    loop {
        let mode = state.lock().expect("proxy state").mode;
        if mode == Mode::Down {
            listener = None;
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => match TcpListener::bind(addr) {
                Ok(l) => {
                    l.set_nonblocking(true).expect("nonblocking");
                    listener.insert(l)
                }
                Err(_) => {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        match l.accept() {
            Ok((client, _)) => {
                client.set_nonblocking(false).expect("blocking");
                if let Ok(server) = TcpStream::connect(upstream) {
                    serve(client, server, &state);
                }
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve(client: TcpStream, server: TcpStream, state: &Arc<Mutex<ProxyState>>) {
    {
        let mut s = state.lock().expect("proxy state");
        for c in [&client, &server] {
            s.connections.push(c.try_clone().expect("clone"));
        }
    }
    let (client_in, server_out) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
    thread::spawn(move || copy(client_in, server_out));
    // Responses: read as they come, stamped, and written once their delay has passed.
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let shared = state.clone();
    let mut server_in = server;
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n @ 1..) = server_in.read(&mut buf) {
            let delay = match shared.lock().expect("proxy state").mode {
                Mode::Delay(d) => d,
                _ => Duration::ZERO,
            };
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let mut client_out = client;
    thread::spawn(move || {
        for (due, bytes) in rx {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if client_out.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = client_out.shutdown(Shutdown::Both);
    });
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// Whether `key` exists in the Redis server on `port`, asked directly (not through a proxy).
fn redis_has(port: u16, key: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let command = format!("*2\r\n$6\r\nEXISTS\r\n${}\r\n{key}\r\n", key.len());
    let mut reply = [0u8; 4];
    stream.write_all(command.as_bytes()).is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b":1\r\n"
}

/// Snapshot writes that failed so far, as the worker's `/metrics` counts them (all kinds).
fn failed_puts(addr: SocketAddr) -> Option<f64> {
    let (_, metrics) = ferry_testkit::http::get(addr, "/metrics")?;
    Some(
        metrics
            .lines()
            .filter(|l| l.starts_with("ferry_snapshot_store_errors_total{op=\"put\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// A store that accepts connections and never answers: every request is answered anyway, and a
/// SIGTERM while a generation's snapshots are failing drains and exits by itself, with status 0,
/// well inside a drain deadline it is given no reason to reach (every store call has its own
/// deadline, and flushing the last snapshot gives up after a few).
#[test]
fn a_store_that_never_answers_neither_stops_answers_nor_the_drain() {
    let s = Setup::start();
    let store = format!("redis://{}/", black_hole());
    let http = ferry_testkit::http::free_addr().to_string();
    let mut w = s.worker(
        "worker-hung-store",
        &store,
        &[
            "--drain-timeout",
            "90s",
            "--termination-grace-period",
            "100s",
            "--http-addr",
            &http,
        ],
    );
    let http: SocketAddr = http.parse().expect("address");
    let expected: Vec<_> = short_requests().iter().collect();
    s.publish(&expected.iter().map(|(r, _)| r).collect::<Vec<_>>());
    s.assert_answered(&expected, &mut w);
    let before = wait_for(Duration::from_secs(30), "/metrics", || failed_puts(http));

    let long: Request = serde_json::from_value(serde_json::json!({
        "id": "long", "prompt": "Once upon a time", "max_tokens": 4000
    }))
    .expect("request");
    s.publish(&[&long]);
    wait_for(Duration::from_secs(120), "the long request's snapshots to fail", || {
        (generating(&w, "long") && failed_puts(http).is_some_and(|n| n > before)).then_some(())
    });
    w.signal("TERM");
    let status = w
        .wait_exit(Duration::from_secs(240))
        .expect("the drain ends by itself while the store hangs");
    assert!(status.success(), "exit status {status}:\n{}", w.log());
    let log = w.log();
    assert!(
        !log.contains("drain deadline passed"),
        "the drain waited for the store until its deadline:\n{log}"
    );
    assert!(log.contains("left the consumer group"), "{log}");
    assert_eq!(
        s.cluster
            .committed(&s.cluster.reader(&s.pipeline.group), &s.pipeline.requests),
        Some(3),
        "the answered requests are committed, the suspended one is not"
    );
}

/// A store that answers every call seconds late, past the store timeout: every call is abandoned
/// and every request answered without it.
#[test]
fn a_store_that_answers_seconds_late_does_not_stop_answers() {
    let s = Setup::start();
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        SocketAddr::from(([127, 0, 0, 1], redis.port)),
        Mode::Delay(Duration::from_millis(2500)),
    );
    let mut w = s.worker("worker-slow-store", &proxy.url(), &["--snapshot-store-timeout", "2s"]);
    let expected: Vec<_> = short_requests().iter().collect();
    s.publish(&expected.iter().map(|(r, _)| r).collect::<Vec<_>>());
    s.assert_answered(&expected, &mut w);
    assert!(
        w.log().contains("did not answer within"),
        "no store call timed out:\n{}",
        w.log()
    );
}

/// Nothing listens where the store should be. The worker starts anyway (no backend connects at
/// start-up: a store that is down only costs snapshots) and answers every request.
#[test]
fn a_store_that_refuses_connections_does_not_stop_answers() {
    let s = Setup::start();
    let mut w = s.worker(
        "worker-refused-store",
        &format!("redis://127.0.0.1:{}/", refused_port()),
        &[],
    );
    let expected: Vec<_> = short_requests().iter().collect();
    s.publish(&expected.iter().map(|(r, _)| r).collect::<Vec<_>>());
    s.assert_answered(&expected, &mut w);
}

/// The store disappears in the middle of a generation (connections dropped, new ones refused)
/// and comes back: the generation is answered correctly, so is a request that arrives while the
/// store is gone, and once it is back the worker snapshots to it again.
#[test]
fn a_store_that_disappears_mid_generation_and_comes_back() {
    let s = Setup::start();
    let redis = RedisServer::start();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)), Mode::Pass);
    let mut w = s.worker("worker-cut-store", &proxy.url(), &[]);
    let cut = reference("cut", "Tell me a story about a lighthouse keeper.", 96);
    let during = &short_requests()[0];

    s.publish(&[&cut.0]);
    // A request's keys live under a prefix bound to the request topic, id, reply topic and the
    // bytes `Setup::publish` sends.
    let manifest = |r: &Request| {
        let payload = serde_json::to_vec(r).expect("json");
        format!(
            "{}manifest",
            request_prefix(&s.pipeline.requests, &r.id, &s.pipeline.replies, &payload)
        )
    };
    wait_for(Duration::from_secs(120), "the first snapshot of the generation", || {
        redis_has(redis.port, &manifest(&cut.0)).then_some(())
    });
    proxy.set(Mode::Down);
    s.publish(&[&during.0]);
    wait_for(
        Duration::from_secs(120),
        "the worker to notice the store is gone",
        || w.log().contains("going on without it").then_some(()),
    );
    s.assert_answered(&[&cut, during], &mut w);

    proxy.set(Mode::Pass);
    let after: Request = serde_json::from_value(serde_json::json!({
        "id": "after", "prompt": "Once upon a time", "max_tokens": 4000
    }))
    .expect("request");
    s.publish(&[&after]);
    wait_for(
        Duration::from_secs(120),
        "a snapshot in the store that came back",
        || redis_has(redis.port, &manifest(&after)).then_some(()),
    );
    assert!(w.wait_exit(Duration::ZERO).is_none(), "the worker exited:\n{}", w.log());
}
