//! `/healthz`, `/readyz` and `/metrics` over HTTP/1.1, served by hyper.
//!
//! Each connection gets one answer and is closed (no keep-alive): probes and Prometheus need
//! nothing more. The server runs on the worker's own runtime, so an answer from `/healthz` also
//! says the runtime is alive.
//!
//! At most [`MAX_CONNECTIONS`] connections are served at once; the next ones wait, not yet
//! accepted, in the listen backlog until one closes. Each connection has [`READ_TIMEOUT`] to send
//! its head and [`WRITE_TIMEOUT`] more to take the answer, so a client that sends or reads slowly
//! (or not at all) holds its place for seconds, not for ever. A head larger than [`MAX_HEAD`] is
//! answered 431, a malformed one 400 (hyper's answers). Limit: a flood of slow clients still
//! delays the probes by those seconds; it cannot exhaust the worker's memory or file
//! descriptors.
//!
//! - `/healthz`: 200 while the process works; 503 once the consumer loop, having started, has
//!   stood still for longer than `--max-poll-interval` outside a drain.
//! - `/readyz`: 200 once the model is loaded and the group has assigned this worker its
//!   partitions (an empty assignment counts), and not while it drains or after a trip; 503 with
//!   the reason in one line otherwise.
//! - `/metrics`: the Prometheus text format.

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
/// A client has this long to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A client has this long to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

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

/// The answer to `method path`: pure, so the routes are tested without a socket.
pub fn respond(ops: &Ops, method: &str, target: &str) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "only GET and HEAD");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match path {
        "/healthz" => match ops.health.liveness() {
            Ok(()) => Response::text(200, "ok"),
            Err(why) => Response::text(503, why),
        },
        "/readyz" => match ops.health.readiness() {
            Ok(()) => Response::text(200, "ready"),
            Err(why) => Response::text(503, why),
        },
        "/metrics" => Response {
            status: 200,
            content_type: super::metrics::CONTENT_TYPE,
            body: ops.render_metrics(),
        },
        _ => Response::text(404, "not found: try /healthz, /readyz or /metrics"),
    }
}

/// Binds `addr`; failing to bind is a start-up error (the port is taken, say).
pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    Ok(listener)
}

/// Answers connections, [`MAX_CONNECTIONS`] at a time, until the task is dropped.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>) {
    serve_with_limit(listener, ops, MAX_CONNECTIONS).await;
}

/// [`serve`], with at most `limit` connections at a time.
pub async fn serve_with_limit(listener: TcpListener, ops: Arc<Ops>, limit: usize) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
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
                    if let Err(e) = handle(stream, &ops).await {
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
async fn handle(stream: TcpStream, ops: &Arc<Ops>) -> Result<(), hyper::Error> {
    let ops = ops.clone();
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let ops = ops.clone();
        async move {
            let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
            Ok::<_, Infallible>(respond(&ops, request.method().as_str(), target).into_http())
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .title_case_headers(true)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // The head's deadline is hyper's; this one bounds the whole exchange, the answer's writing
    // included.
    match tokio::time::timeout(READ_TIMEOUT + WRITE_TIMEOUT, connection).await {
        Ok(served) => served,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ops() -> Arc<Ops> {
        let (tx, _rx) = tokio::sync::watch::channel(0);
        Ops::new(Arc::new(tx), 5, Duration::from_secs(60))
    }

    #[test]
    fn routes() {
        let ops = ops();
        assert_eq!(respond(&ops, "GET", "/healthz").status, 200);
        let r = respond(&ops, "GET", "/readyz");
        assert_eq!((r.status, r.body.as_str()), (503, "loading the model\n"));
        ops.health.set_model_loaded();
        ops.health.set_consuming();
        assert_eq!(respond(&ops, "GET", "/readyz?verbose").status, 200);
        let m = respond(&ops, "GET", "/metrics");
        assert_eq!(m.content_type, super::super::metrics::CONTENT_TYPE);
        assert!(m.body.contains("ferry_ready 1\n"));
        assert_eq!(respond(&ops, "POST", "/readyz").status, 405);
        assert_eq!(respond(&ops, "GET", "/").status, 404);
        assert_eq!(respond(&ops, "HEAD", "/healthz").status, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn answers_a_plain_http_client() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, ops()));
        let ask = move |method: &str, path: &str| {
            let mut s = std::net::TcpStream::connect(addr).expect("connects");
            write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("writes");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("reads");
            out
        };
        // A request the server may answer, and close, before it has taken all of it.
        let refused = move |text: String| {
            let mut s = std::net::TcpStream::connect(addr).expect("connects");
            let _ = s.write_all(text.as_bytes());
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        let (ok, not_ready, head, big, bad) = tokio::task::spawn_blocking(move || {
            let filler = "x".repeat(MAX_HEAD + 1);
            (
                ask("GET", "/healthz"),
                ask("GET", "/readyz"),
                ask("HEAD", "/healthz"),
                refused(format!(
                    "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n"
                )),
                refused("NOT A REQUEST LINE HTTP/1.1\r\nHost: x\r\n\r\n".to_string()),
            )
        })
        .await
        .expect("client");
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(head.contains("Content-Length: 3\r\n"), "{head}");
        // Refused: 431, unless the connection was reset first (the server closes with the rest
        // of the head unread, which can reset it before the client reads the answer).
        assert!(big.is_empty() || big.starts_with("HTTP/1.1 431 "), "{big}");
        assert!(bad.is_empty() || bad.starts_with("HTTP/1.1 400 "), "{bad}");
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nok\n"),
            "{ok}"
        );
        assert!(not_ready.starts_with("HTTP/1.1 503 "), "{not_ready}");
        assert!(not_ready.ends_with("loading the model\n"), "{not_ready}");
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_limit_wait_until_one_closes() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve_with_limit(listener, ops(), 2));
        // Two clients that connect and send nothing hold both places (for up to READ_TIMEOUT).
        let idle = TcpStream::connect(addr).await.expect("connects");
        let _idle_too = TcpStream::connect(addr).await.expect("connects");
        let mut probe = TcpStream::connect(addr).await.expect("connects");
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("writes");
        let mut first = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), probe.read(&mut first))
                .await
                .is_err(),
            "a third connection was served while two held the places"
        );
        drop(idle);
        let mut out = String::new();
        tokio::time::timeout(READ_TIMEOUT, probe.read_to_string(&mut out))
            .await
            .expect("answered once a place freed")
            .expect("reads");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        server.abort();
    }
}
