use super::*;
use std::io::{Read, Write};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ops() -> Arc<Ops> {
    let (tx, _rx) = tokio::sync::watch::channel(0);
    Ops::new(Arc::new(tx), 5, Duration::from_secs(60))
}

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// `GET path` on `addr`, as a kubelet asks: the whole answer, once the server closes.
async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// A listener for `endpoint` on a free loopback port, served on this runtime.
async fn start(ops: &Arc<Ops>, endpoint: Endpoint) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = bind(loopback(), endpoint).await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    (addr, tokio::spawn(serve(listener, ops.clone(), endpoint)))
}

#[test]
fn routes() {
    let ops = ops();
    assert_eq!(respond(&ops, Routes::All, "GET", "/healthz").status, 200);
    let r = respond(&ops, Routes::All, "GET", "/readyz");
    assert_eq!((r.status, r.body.as_str()), (503, "loading the model\n"));
    ops.health.set_model_loaded();
    ops.health.set_consuming();
    assert_eq!(respond(&ops, Routes::All, "GET", "/readyz?verbose").status, 200);
    let m = respond(&ops, Routes::All, "GET", "/metrics");
    assert_eq!(m.content_type, super::super::metrics::CONTENT_TYPE);
    assert!(m.body.contains("ferry_ready 1\n"));
    assert_eq!(respond(&ops, Routes::All, "POST", "/readyz").status, 405);
    assert_eq!(respond(&ops, Routes::All, "GET", "/").status, 404);
    assert_eq!(respond(&ops, Routes::All, "HEAD", "/healthz").status, 200);
    // The probes' port answers the probes, the same way, and nothing else.
    assert_eq!(respond(&ops, Routes::Probes, "GET", "/healthz").status, 200);
    assert_eq!(respond(&ops, Routes::Probes, "GET", "/readyz?verbose").status, 200);
    assert_eq!(respond(&ops, Routes::Probes, "HEAD", "/readyz").status, 200);
    assert_eq!(respond(&ops, Routes::Probes, "GET", "/metrics").status, 404);
    assert_eq!(respond(&ops, Routes::Probes, "GET", "/").status, 404);
    assert_eq!(respond(&ops, Routes::Probes, "POST", "/healthz").status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn answers_a_plain_http_client() {
    let listener = bind(loopback(), Endpoint::MAIN).await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(listener, ops(), Endpoint::MAIN));
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
    let two = Endpoint {
        max_connections: 2,
        ..Endpoint::MAIN
    };
    let listener = bind(loopback(), two).await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(listener, ops(), two));
    // Two clients that connect and send nothing hold both places (for up to the head timeout).
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
    tokio::time::timeout(two.write_timeout, probe.read_to_string(&mut out))
        .await
        .expect("answered once a place freed")
        .expect("reads");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    server.abort();
}

/// The issue this listener exists for: idle clients that hold every place of the main port (and
/// more waiting behind them) delayed the kubelet's probes by seconds, past their timeout, and a
/// healthy pod was restarted. The probes' port has places of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_the_main_port_is_flooded() {
    let ops = ops();
    ops.health.set_model_loaded();
    ops.health.set_consuming();
    let (main, main_server) = start(&ops, Endpoint::MAIN).await;
    let (probes, probe_server) = start(&ops, Endpoint::PROBES).await;
    let mut flood = Vec::new();
    for _ in 0..Endpoint::MAIN.max_connections + 16 {
        flood.push(TcpStream::connect(main).await.expect("connects"));
    }
    // The flood holds: the main port's own /healthz waits behind it.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), get(main, "/healthz"))
            .await
            .is_err(),
        "the main port answered while idle clients held every place"
    );
    // The kubelet's timeouts are 3 s and 5 s (k8s/base/deployment.yaml); the issue asks for 1 s.
    for path in ["/healthz", "/readyz"] {
        let answer = tokio::time::timeout(Duration::from_secs(1), get(probes, path))
            .await
            .unwrap_or_else(|_| panic!("{path} on the probes' port did not answer within 1 s"))
            .expect("reads");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {answer}");
    }
    drop(flood);
    main_server.abort();
    probe_server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_probe_port_answers_only_the_probes() {
    let ops = ops();
    let (probes, server) = start(&ops, Endpoint::PROBES).await;
    let metrics = get(probes, "/metrics").await.expect("asks");
    assert!(metrics.starts_with("HTTP/1.1 404 "), "{metrics}");
    assert!(!metrics.contains("ferry_"), "{metrics}");
    let healthz = get(probes, "/healthz").await.expect("asks");
    assert!(healthz.starts_with("HTTP/1.1 200 OK\r\n"), "{healthz}");
    let readyz = get(probes, "/readyz").await.expect("asks");
    assert!(readyz.ends_with("loading the model\n"), "{readyz}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_idle_client_of_the_probe_port_gives_up_its_place_within_the_head_timeout() {
    let one = Endpoint {
        max_connections: 1,
        ..Endpoint::PROBES
    };
    let (probes, server) = start(&ops(), one).await;
    let _idle = TcpStream::connect(probes).await.expect("connects");
    // Waits behind the idle client until the server lets that one go after the head timeout.
    let answer = tokio::time::timeout(one.head_timeout + Duration::from_secs(2), get(probes, "/healthz"))
        .await
        .expect("answered once the idle client's head timeout passed")
        .expect("reads");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    server.abort();
}
