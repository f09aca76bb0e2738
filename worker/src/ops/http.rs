//! `/healthz`, `/readyz` and `/metrics` over HTTP/1.1, served by hyper, on two listeners: the
//! main one (`--http-addr`, [`Endpoint::MAIN`]) answers all three, the probes' own
//! (`--probe-addr`, [`Endpoint::PROBES`]) only `/healthz` and `/readyz`.
//!
//! Each connection gets one answer and is closed (no keep-alive): probes and Prometheus need
//! nothing more. Both listeners run on the worker's own runtime, so an answer from `/healthz`
//! also says the runtime is alive.
//!
//! Each listener serves at most [`Endpoint::max_connections`] connections at once; the next
//! ones wait, not yet accepted, in the listen backlog until one closes. Each connection has
//! [`Endpoint::head_timeout`] to send its head and [`Endpoint::write_timeout`] more to take the
//! answer, so a client that sends or reads slowly (or not at all) holds its place for seconds,
//! not for ever. A head larger than [`MAX_HEAD`] is answered 431, a malformed one 400 (hyper's
//! answers). Limit: a flood of slow clients on one listener still delays that listener's
//! answers by those seconds; it cannot exhaust the worker's memory or file descriptors. That is
//! why the probes have a listener of their own: its places are not the ones a flood of the main
//! port holds, and in Kubernetes a NetworkPolicy admits no pod to it (k8s/base/networkpolicy.yaml).
//!
//! - `/healthz`: 200 while the process works; 503 once the consumer loop, having started, has
//!   stood still for longer than `--max-poll-interval` outside a drain.
//! - `/readyz`: 200 once the model is loaded and the group has assigned this worker its
//!   partitions (an empty assignment counts), and not while it drains or after a trip; 503 with
//!   the reason in one line otherwise.
//! - `/metrics`: the Prometheus text format (main listener only).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::Ops;

/// A request head larger than this is refused (hyper's smallest read buffer).
pub const MAX_HEAD: usize = 8 * 1024;

/// The paths a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// `/healthz`, `/readyz` and `/metrics`.
    All,
    /// `/healthz` and `/readyz`; anything else is 404.
    Probes,
}

impl Routes {
    /// The paths, for log lines.
    pub fn paths(self) -> &'static str {
        match self {
            Routes::All => "/healthz, /readyz and /metrics",
            Routes::Probes => "/healthz and /readyz",
        }
    }
}

/// One listener's terms: what it answers, how many clients at once, and how patiently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub routes: Routes,
    /// Connections served at once; the rest wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client has to send its request head.
    pub head_timeout: Duration,
    /// How long a client has, after that, to take the answer.
    pub write_timeout: Duration,
}

impl Endpoint {
    /// `--http-addr`: Prometheus and whoever else asks. A scrape sends its head at once; 2 s
    /// leaves room for a slow network while bounding what an idle client holds.
    pub const MAIN: Self = Self {
        routes: Routes::All,
        max_connections: 64,
        head_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(5),
    };
    /// `--probe-addr`: the kubelet, which sends its head at once and reads an answer of a few
    /// bytes, three probes per period at most. The timeouts stay well under the probes' own
    /// (3 s and 5 s in k8s/base/deployment.yaml), so a stuck client frees its place before a
    /// probe that waits behind it would time out.
    pub const PROBES: Self = Self {
        routes: Routes::Probes,
        max_connections: 16,
        head_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
    };
}

/// An answer, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }

    /// As hyper sends it. Under `HEAD` hyper sends the head alone, with the body's length.
    fn into_http(self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() =
            hyper::StatusCode::from_u16(self.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(self.content_type));
        headers.insert(CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
        response
    }
}

/// The answer to `method path` on a listener that answers `routes`: pure, so the routes are
/// tested without a socket.
pub fn respond(ops: &Ops, routes: Routes, method: &str, target: &str) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "only GET and HEAD");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match (path, routes) {
        ("/healthz", _) => match ops.health.liveness() {
            Ok(()) => Response::text(200, "ok"),
            Err(why) => Response::text(503, why),
        },
        ("/readyz", _) => match ops.health.readiness() {
            Ok(()) => Response::text(200, "ready"),
            Err(why) => Response::text(503, why),
        },
        ("/metrics", Routes::All) => Response {
            status: 200,
            content_type: super::metrics::CONTENT_TYPE,
            body: ops.render_metrics(),
        },
        (_, Routes::All) => Response::text(404, "not found: try /healthz, /readyz or /metrics"),
        (_, Routes::Probes) => Response::text(
            404,
            "not found: this is the probes' port, try /healthz or /readyz (/metrics is on --http-addr)",
        ),
    }
}

/// Binds `addr` for `endpoint`, and logs where it serves; failing to bind is a start-up error
/// (the port is taken, say).
pub async fn bind(addr: std::net::SocketAddr, endpoint: Endpoint) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "serving {}", endpoint.routes.paths());
    Ok(listener)
}

/// Answers connections on `endpoint`'s terms until the task is dropped.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>, endpoint: Endpoint) {
    let permits = Arc::new(tokio::sync::Semaphore::new(endpoint.max_connections.max(1)));
    loop {
        // A permit before the accept: the connections over the limit wait in the kernel's
        // backlog, costing the process nothing, and are served in the order they came.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return; // The semaphore is never closed.
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let ops = ops.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = handle(stream, &ops, endpoint).await {
                        debug!(error = %e, "http connection");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors, typically: wait rather than spin.
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: one request, its answer, then the connection is closed.
async fn handle(stream: TcpStream, ops: &Arc<Ops>, endpoint: Endpoint) -> Result<(), hyper::Error> {
    let ops = ops.clone();
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let ops = ops.clone();
        async move {
            let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
            let answer = respond(&ops, endpoint.routes, request.method().as_str(), target);
            Ok::<_, Infallible>(answer.into_http())
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(endpoint.head_timeout)
        .max_buf_size(MAX_HEAD)
        .title_case_headers(true)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // The head's deadline is hyper's; this one bounds the whole exchange, the answer's writing
    // included.
    match tokio::time::timeout(endpoint.head_timeout + endpoint.write_timeout, connection).await {
        Ok(served) => served,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
