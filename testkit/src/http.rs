//! A worker's HTTP endpoints (`/healthz`, `/readyz`, `/metrics`), asked the way a kubelet or
//! Prometheus asks them: plain HTTP/1.1 over TCP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::wait_for;

/// A port nothing listens on now (the worker binds it a moment later).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// `GET path`: the status and the body, or `None` when nothing answers.
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Waits until `path` answers `status`; returns the body.
pub fn wait_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> String {
    wait_for(timeout, &format!("{path} to answer {status}"), || {
        get(addr, path).filter(|(s, _)| *s == status).map(|(_, b)| b)
    })
}
