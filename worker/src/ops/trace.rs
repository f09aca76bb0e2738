//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>) across Kafka.
//!
//! A request may carry a `traceparent` header: `00-<trace id: 32 hex>-<parent id: 16 hex>-<flags:
//! 2 hex>`. The worker's handling of that request is a span of the same trace: it keeps the
//! trace id and the flags, draws a new span id of its own, logs both ids with every line about
//! the request, and writes `00-<trace id>-<its span id>-<flags>` on every message it publishes
//! for the request (chunks, the reply, an error reply, the dead-letter record), so a trace viewer
//! shows the worker between the caller and the reply's consumer. `tracestate` travels unchanged
//! beside a valid `traceparent`, as the specification asks.
//!
//! With `--otlp-endpoint` the worker's span is exported ([`super::otel`]) and its span id is the
//! exported span's; without, the worker draws one of its own. A request without a valid
//! `traceparent` gets none on its reply, exported or not: the caller did not ask to be traced.
//! Pure functions, no I/O.

use std::fmt;

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The span this context names (the caller's span in a request's header, the worker's own
    /// in a reply's): 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled), kept as received.
    pub flags: u8,
}

/// Why a `traceparent` header was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Not `version-traceid-parentid-flags` in lowercase hex of the right lengths.
    #[error("not of the form 00-<32 hex>-<16 hex>-<2 hex>")]
    Malformed,
    /// Version `ff`, which the specification forbids.
    #[error("version ff is invalid")]
    InvalidVersion,
    /// An all-zero trace or parent id, which the specification forbids.
    #[error("all-zero trace or parent id")]
    ZeroId,
}

impl TraceContext {
    /// Parses a `traceparent` value. Version `00` must be exactly four fields; a later version
    /// may append fields after the flags, which are ignored (the specification's forward
    /// compatibility rule).
    pub fn parse(header: &str) -> Result<Self, TraceParentError> {
        let header = header.trim();
        let b = header.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(TraceParentError::Malformed);
        }
        let version = hex::<1>(&b[0..2]).ok_or(TraceParentError::Malformed)?[0];
        if version == 0xff {
            return Err(TraceParentError::InvalidVersion);
        }
        if (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return Err(TraceParentError::Malformed);
        }
        let trace_id = hex::<16>(&b[3..35]).ok_or(TraceParentError::Malformed)?;
        let span_id = hex::<8>(&b[36..52]).ok_or(TraceParentError::Malformed)?;
        let flags = hex::<1>(&b[53..55]).ok_or(TraceParentError::Malformed)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(TraceParentError::ZeroId);
        }
        Ok(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The context of a child span with id `span_id` (nonzero; see [`new_span_id`]): same
    /// trace, same flags.
    pub fn child(&self, span_id: [u8; 8]) -> Self {
        Self { span_id, ..*self }
    }

    /// The `traceparent` value, version 00.
    pub fn to_header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            self.flags
        )
    }

    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        to_hex(&self.span_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_header())
    }
}

/// A random span id, never all zero.
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// The trace of a request, as the worker carries it from the request's headers to everything
/// it publishes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Propagation {
    /// The caller's context, as received.
    pub parent: TraceContext,
    /// The worker's span: same trace, its own span id.
    pub own: TraceContext,
    /// `tracestate`, passed on unchanged when it keeps within the W3C limits
    /// ([`bounded_tracestate`]), else dropped.
    pub tracestate: Option<String>,
}

/// Most bytes of a `tracestate` the worker passes on (W3C Trace Context: 512).
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// Most list members of a `tracestate` (W3C Trace Context: 32).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The `tracestate` to pass on: the received value, trimmed, when it is UTF-8, not empty and
/// within [`MAX_TRACESTATE_BYTES`] and [`MAX_TRACESTATE_MEMBERS`]. Anything else is dropped
/// whole, as the specification allows: it is copied onto every record published for the
/// request (each stream chunk too), so an unbounded one would multiply a caller's bytes.
pub fn bounded_tracestate(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    if s.is_empty() || s.len() > MAX_TRACESTATE_BYTES {
        return None;
    }
    let members = s.split(',').filter(|m| !m.trim().is_empty()).count();
    if members > MAX_TRACESTATE_MEMBERS || s.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    Some(s.to_string())
}

impl Propagation {
    /// From the request's `traceparent` and `tracestate` header values. `Ok(None)` without a
    /// `traceparent`; an error when it is there but invalid (the caller logs it and goes on
    /// without a trace).
    pub fn from_headers(
        traceparent: Option<&[u8]>,
        tracestate: Option<&[u8]>,
        span_id: [u8; 8],
    ) -> Result<Option<Self>, TraceParentError> {
        let Some(raw) = traceparent else {
            return Ok(None);
        };
        let text = std::str::from_utf8(raw).map_err(|_| TraceParentError::Malformed)?;
        let parent = TraceContext::parse(text)?;
        Ok(Some(Self {
            parent,
            own: parent.child(span_id),
            tracestate: tracestate.and_then(bounded_tracestate),
        }))
    }

    /// The `traceparent` to write on what the worker publishes for this request.
    pub fn outgoing(&self) -> String {
        self.own.to_header()
    }
}

fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        // The specification allows lowercase only.
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_the_specification_example() {
        let tc = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tc.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tc.flags, 1);
        assert_eq!(tc.to_header(), EXAMPLE);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_and_takes_a_new_span_id() {
        let parent = TraceContext::parse(EXAMPLE).expect("valid");
        let child = parent.child([0xab; 8]);
        assert_eq!(
            child.to_header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-abababababababab-01"
        );
        let unsampled = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").expect("valid");
        assert!(unsampled.child(new_span_id()).to_header().ends_with("-00"));
        assert_ne!(new_span_id(), [0; 8]);
    }

    #[test]
    fn rejects_what_the_specification_forbids() {
        for (bad, why) in [
            ("", TraceParentError::Malformed),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                TraceParentError::Malformed,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceParentError::Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-x00f067aa0ba902b7-01",
                TraceParentError::Malformed,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                TraceParentError::Malformed,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::InvalidVersion,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceParentError::ZeroId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceParentError::ZeroId,
            ),
        ] {
            assert_eq!(TraceContext::parse(bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn later_versions_keep_the_four_known_fields() {
        let tc = TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next")
            .expect("forward compatible");
        assert_eq!(tc.to_header(), EXAMPLE, "written back as version 00");
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x").is_err());
    }

    #[test]
    fn propagation_from_headers() {
        let span = [7u8; 8];
        assert_eq!(Propagation::from_headers(None, Some(b"a=b"), span), Ok(None));
        assert_eq!(
            Propagation::from_headers(Some(b"\xff"), None, span),
            Err(TraceParentError::Malformed)
        );
        let p = Propagation::from_headers(Some(EXAMPLE.as_bytes()), Some(b" vendor=x "), span)
            .expect("valid")
            .expect("present");
        assert_eq!(p.parent.to_header(), EXAMPLE);
        assert_eq!(p.outgoing(), "00-4bf92f3577b34da6a3ce929d0e0e4736-0707070707070707-01");
        assert_eq!(p.tracestate.as_deref(), Some("vendor=x"));
    }

    #[test]
    fn tracestate_beyond_the_w3c_limits_is_dropped() {
        assert_eq!(bounded_tracestate(b" a=1,b=2 ").as_deref(), Some("a=1,b=2"));
        assert_eq!(bounded_tracestate(b""), None);
        assert_eq!(bounded_tracestate(b"\xff\xfe"), None);
        let at_limit = "x".repeat(MAX_TRACESTATE_BYTES - 2) + "=1";
        assert_eq!(bounded_tracestate(at_limit.as_bytes()), Some(at_limit.clone()));
        assert_eq!(bounded_tracestate(format!("{at_limit}2").as_bytes()), None);
        let members = |n: usize| (0..n).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        assert!(bounded_tracestate(members(32).as_bytes()).is_some());
        assert_eq!(bounded_tracestate(members(33).as_bytes()), None);
        assert_eq!(bounded_tracestate(b"a=1\nb=2"), None);
        let huge = vec![b'a'; 200_000];
        let p = Propagation::from_headers(Some(EXAMPLE.as_bytes()), Some(&huge), [7; 8])
            .expect("valid")
            .expect("present");
        assert_eq!(p.tracestate, None, "a 200 KB tracestate is not copied onto every chunk");
    }
}
