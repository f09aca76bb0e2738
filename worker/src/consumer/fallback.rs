//! Handing a request this worker cannot serve to a fallback topic (`--fallback-topic`).
//!
//! Some failures are the worker's, not the request's: the accelerator ran out of memory, or the
//! worker gave up on itself (its circuit breaker opened, or its accelerator reported an
//! unrecoverable error) and is draining to be restarted. With a fallback topic configured, such
//! a request is published there *unchanged* (same key, same value, so the same `reply_to`, and
//! every header it came with) plus the `ferry-handoff-*` headers below, which say which worker
//! and model handed it off and why. Workers consuming the fallback topic (typically a smaller
//! model, in a group of their own) answer it, and their reply's `model` names the model that
//! produced it. The original offset is committed only once the broker has acknowledged the copy,
//! so a request is never lost between the two topics.
//!
//! A message that carries [`HANDOFF_REASON`] on one of the worker's `--fallback-lane` topics was
//! handed off already and is never handed off again, whatever else the worker reading it is
//! configured with: a worker that cannot serve it lets it fail like any other request, and
//! after `--max-attempts` dead-letters it. A chain of fallback topics therefore has one hop, and
//! a pair of workers handing to each other cannot loop, as long as each declares the topic it
//! receives hand-offs on as a fallback lane. On any other lane the headers are a producer's own:
//! trusted there, they would let anyone who can write the request topic skip the model check
//! and stop a request from ever being handed off.
//!
//! The limit: the handoff is recorded in the request's ledger (with a snapshot store), so a
//! redelivery of the original, when its offset could not be committed at once, is settled
//! without serving it twice. Without a snapshot store there is no ledger, and such a redelivery
//! is served again here: the caller may then get two answers, from two models, and should keep
//! the first, as with any duplicate.

use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::Message;

use crate::ops::{FallbackReason, Trip};

pub use ferry_schemas::headers::{HANDOFF_ERROR, HANDOFF_MODEL, HANDOFF_REASON, HANDOFF_SOURCE, HANDOFF_WORKER};

/// The longest error text carried in [`HANDOFF_ERROR`]; Kafka headers are not for essays.
const MAX_ERROR_LEN: usize = 512;

/// The fallback reason of a trip.
pub fn reason_of_trip(trip: &Trip) -> FallbackReason {
    match trip {
        Trip::Breaker(_) => FallbackReason::CircuitBreakerOpen,
        Trip::Accelerator(_) => FallbackReason::AcceleratorUnhealthy,
    }
}

/// Whether `msg` was handed off by another worker already.
pub fn is_handed_off(msg: &OwnedMessage) -> bool {
    msg.headers().is_some_and(|h| h.iter().any(|x| x.key == HANDOFF_REASON))
}

/// Who handed a message off, as read from its headers, for the log of the worker that serves
/// it: `(worker, model, reason)`.
pub fn handed_off_by(msg: &OwnedMessage) -> Option<(String, String, String)> {
    let h = msg.headers()?;
    let get = |key: &str| {
        h.iter()
            .find(|x| x.key == key)
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    Some((get(HANDOFF_WORKER)?, get(HANDOFF_MODEL)?, get(HANDOFF_REASON)?))
}

/// What the handoff headers say.
#[derive(Debug, Clone)]
pub struct Handoff<'a> {
    pub reason: FallbackReason,
    pub worker: &'a str,
    pub model: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub error: &'a str,
}

/// The headers of the handed-off copy: the original's, in order, then the handoff's. Any
/// `ferry-handoff-*` header the original already had (only a message handed off already has
/// one, and those are never handed off again) is dropped rather than repeated.
pub fn headers(original: Option<&OwnedHeaders>, h: &Handoff<'_>) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(original) = original {
        for x in original.iter() {
            if !x.key.starts_with("ferry-handoff-") {
                out = out.insert(Header {
                    key: x.key,
                    value: x.value,
                });
            }
        }
    }
    let source = format!("{}/{}/{}", h.topic, h.partition, h.offset);
    let mut error = h.error;
    if error.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error = &error[..end];
    }
    for (key, value) in [
        (HANDOFF_REASON, h.reason.as_str()),
        (HANDOFF_WORKER, h.worker),
        (HANDOFF_MODEL, h.model),
        (HANDOFF_SOURCE, source.as_str()),
        (HANDOFF_ERROR, error),
    ] {
        out = out.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(h: &OwnedHeaders) -> Vec<(String, String)> {
        h.iter()
            .map(|x| {
                let v = x.value.map(|v| String::from_utf8_lossy(v).into_owned());
                (x.key.to_string(), v.unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn the_copy_keeps_the_original_headers_and_says_who_handed_it_off() {
        let original = OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            })
            .insert(Header {
                key: "x-empty",
                value: None::<&[u8]>,
            })
            .insert(Header {
                key: HANDOFF_REASON,
                value: Some("stale"),
            });
        let long = "é".repeat(400);
        let h = Handoff {
            reason: FallbackReason::OutOfMemory,
            worker: "worker-0",
            model: "big",
            topic: "ferry.requests",
            partition: 2,
            offset: 41,
            error: &long,
        };
        let got = pairs(&headers(Some(&original), &h));
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "traceparent",
                "x-empty",
                HANDOFF_REASON,
                HANDOFF_WORKER,
                HANDOFF_MODEL,
                HANDOFF_SOURCE,
                HANDOFF_ERROR
            ]
        );
        assert_eq!(got[0].1, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(got[2].1, "out_of_memory");
        assert_eq!(got[3].1, "worker-0");
        assert_eq!(got[4].1, "big");
        assert_eq!(got[5].1, "ferry.requests/2/41");
        assert!(got[6].1.len() <= MAX_ERROR_LEN && got[6].1.starts_with('é'));
        let none = pairs(&headers(None, &h));
        assert_eq!(none.len(), 5);
    }

    #[test]
    fn trips_name_their_reason() {
        assert_eq!(
            reason_of_trip(&Trip::Breaker("x".into())),
            FallbackReason::CircuitBreakerOpen
        );
        assert_eq!(
            reason_of_trip(&Trip::Accelerator("x".into())),
            FallbackReason::AcceleratorUnhealthy
        );
    }
}
