//! `/healthz`, `/readyz` and `/metrics` over HTTP/1.1.
//!
//! A minimal responder on tokio's listener rather than an HTTP framework: it reads one request
//! head (bounded in size and time), answers `GET` or `HEAD` for the three paths, and closes the
//! connection. Probes and Prometheus need nothing more. It runs on the worker's own runtime, so
//! an answer from `/healthz` also says the runtime is alive.
//!
//! At most [`MAX_CONNECTIONS`] connections are served at once; the next ones wait, not yet
//! accepted, in the listen backlog until one closes. Each connection has [`READ_TIMEOUT`] to send
//! its head and [`WRITE_TIMEOUT`] to take the answer, so a client that sends or reads slowly
//! (or not at all) holds its place for seconds, not for ever. Limit: a flood of such clients
//! still delays the probes by those seconds; it cannot exhaust the worker's memory or file
//! descriptors.
//!
//! - `/healthz`: 200 while the process works; 503 once the consumer loop, having started, has
//!   stood still for longer than `--max-poll-interval` outside a drain.
//! - `/readyz`: 200 once the model is loaded and the group has assigned this worker its
//!   partitions (an empty assignment counts), and not while it drains or after a trip; 503 with
//!   the reason in one line otherwise.
//! - `/metrics`: the Prometheus text format.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::Ops;

/// A request head larger than this is refused.
const MAX_HEAD: usize = 8 * 1024;
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

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        }
    }

    /// The bytes on the wire; `head_only` for a `HEAD` request.
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
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
            content_type: super::exposition::CONTENT_TYPE,
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

async fn handle(mut stream: TcpStream, ops: &Ops) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let (response, head_only) = match head {
        Some(head) => {
            let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(method), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
                    (respond(ops, method, target), method == "HEAD")
                }
                _ => (Response::text(400, "bad request line"), false),
            }
        }
        None => (Response::text(431, "request head too large"), false),
    };
    let write = async {
        stream.write_all(&response.encode(head_only)).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(written) => written,
        Err(_) => Ok(()),
    }
}

/// Reads up to the end of the request head. `None` when it exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") || n == 0 {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

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
        assert_eq!(m.content_type, super::super::exposition::CONTENT_TYPE);
        assert!(m.body.contains("ferry_ready 1\n"));
        assert_eq!(respond(&ops, "POST", "/readyz").status, 405);
        assert_eq!(respond(&ops, "GET", "/").status, 404);
        let head = String::from_utf8(respond(&ops, "HEAD", "/healthz").encode(true)).expect("utf-8");
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(head.contains("Content-Length: 3\r\n"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn answers_a_plain_http_client() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, ops()));
        let get = move |path: &str| {
            let mut s = std::net::TcpStream::connect(addr).expect("connects");
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("writes");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("reads");
            out
        };
        let (ok, not_ready) = tokio::task::spawn_blocking(move || (get("/healthz"), get("/readyz")))
            .await
            .expect("client");
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
