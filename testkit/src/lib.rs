//! Ferry's test kit: what the tests, the benches and the load tester of every crate share.
//!
//! - [`cluster::Cluster`]: the Kafka-protocol broker a test runs against, with its topics, its
//!   worker processes and readers of what ends up on them. By [`broker::BrokerChoice::from_env`]:
//!   a real single-node Apache Kafka shared by the test binary (the default), the cluster
//!   `FERRY_TEST_BOOTSTRAP_SERVERS` names, or a mock `ferry broker` per test
//!   (`FERRY_TEST_BROKER=mock`).
//! - [`broker::BrokerProcess`]: one `ferry broker` process, for tests of the broker itself.
//! - [`worker::WorkerArgs`]: a `ferry-worker` command line, and [`worker::Pipeline`], the topics
//!   and group one test's workers share.
//! - [`process::ChildGuard`]: a child process with its log, killed when dropped.
//! - [`services`]: real Redis and a real S3-compatible server, installed when missing.
//! - [`http`]: a worker's probes and metrics, asked as a kubelet asks them.
//! - [`otlp::Collector`]: an OTLP/HTTP trace receiver, for a worker's exported spans.
//! - [`requests::chat`], [`model::model_path`], [`wait_for`], [`unique`].
//!
//! Nothing here imports the worker: the load tester uses this crate too, and it never imports the
//! worker. What needs the worker's types (loading the model in process, engine jobs) stays in
//! the worker's own `tests/support`.
//!
//! Helpers panic on failure, as a test's own code would, except where the load tester needs an
//! error to report ([`process::ChildGuard::try_spawn`]).

pub mod broker;
pub mod cluster;
pub mod http;
pub mod joined;
pub mod model;
pub mod otlp;
pub mod process;
pub mod read;
pub mod requests;
pub mod services;
mod shared_kafka;
pub mod worker;

use std::time::{Duration, Instant};

pub use broker::BrokerChoice;
pub use cluster::Cluster;
pub use process::{bin, ChildGuard};
pub use read::Record;
pub use worker::{Pipeline, Setup, WorkerArgs};

/// A generous bound for what takes milliseconds on the mock and seconds on a loaded real
/// cluster: a test that reaches it has found a bug, not a slow machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A unique name for a test's topic, group or request.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Polls `f` until it gives a value, failing the test after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `future` to completion on a runtime of its own, for tests that are not async.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}
