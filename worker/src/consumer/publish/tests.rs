use super::gate::{record_level, record_size};
use super::*;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;

fn header<'a>(h: &'a OwnedHeaders, key: &str) -> Option<&'a str> {
    h.iter()
        .find(|x| x.key == key)
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[test]
fn replies_carry_the_workers_span_of_the_callers_trace() {
    let trace = Propagation::from_headers(
        Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        Some(b"congo=t61rcWkgMzE"),
        [0x11; 8],
    )
    .expect("valid")
    .expect("present");
    let h = reply_headers("response", Some(&trace));
    assert_eq!(header(&h, headers::KIND), Some("response"));
    assert_eq!(
        header(&h, headers::TRACEPARENT),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01")
    );
    assert_eq!(header(&h, headers::TRACESTATE), Some("congo=t61rcWkgMzE"));
    let none = reply_headers("chunk", None);
    assert_eq!(header(&none, headers::TRACEPARENT), None);
    assert_eq!(header(&none, headers::SCHEMA_VERSION), Some("1"));
}

#[test]
fn record_level_errors_are_told_apart_from_the_producers() {
    use RDKafkaErrorCode as C;
    assert_eq!(record_level(C::MessageSizeTooLarge), Some(RefusedKind::TooLarge));
    for c in [
        C::UnknownTopicOrPartition,
        C::UnknownTopic,
        C::InvalidTopic,
        C::TopicAuthorizationFailed,
        C::PolicyViolation,
        C::InvalidTimestamp,
    ] {
        assert_eq!(record_level(c), Some(RefusedKind::Topic), "{c:?}");
    }
    for c in [
        C::NotEnoughReplicas,
        C::NotEnoughReplicasAfterAppend,
        C::MessageTimedOut,
        C::RequestTimedOut,
        C::LeaderNotAvailable,
    ] {
        assert_eq!(record_level(c), Some(RefusedKind::Unavailable), "{c:?}");
    }
    for c in [C::Fatal, C::AllBrokersDown, C::ClusterAuthorizationFailed, C::QueueFull] {
        assert_eq!(record_level(c), None, "{c:?} stops the worker");
    }
    let refused = classify("t", KafkaError::MessageProduction(C::MessageSizeTooLarge));
    assert!(matches!(
        refused,
        PublishError::Refused(Refused {
            kind: RefusedKind::TooLarge,
            ..
        })
    ));
    let fatal = classify("t", KafkaError::MessageProduction(C::AllBrokersDown));
    assert!(matches!(fatal, PublishError::Worker(WorkerError::Publish { .. })));
    let sick = classify("t", KafkaError::MessageProduction(C::NotEnoughReplicas));
    assert!(matches!(
        sick,
        PublishError::Refused(Refused {
            kind: RefusedKind::Unavailable,
            source: Some(_),
            ..
        })
    ));
}

#[test]
fn record_size_counts_key_value_and_headers() {
    let h = OwnedHeaders::new().insert(Header {
        key: "ab",
        value: Some("cde"),
    });
    assert_eq!(record_size(Some(b"k"), Some(b"vv"), Some(&h)), 1 + 2 + 2 + 3);
    assert_eq!(record_size(None, None, None), 0);
}

#[test]
fn header_bounds_refuse_too_many_headers_and_long_own_values() {
    let fine = OwnedHeaders::new().insert(Header {
        key: "x-caller",
        value: Some(&"v".repeat(10_000)),
    });
    assert_eq!(
        gate::check_headers(&fine),
        Ok(()),
        "a caller's header is the record budget's business"
    );
    let long_own = OwnedHeaders::new().insert(Header {
        key: headers::TRACESTATE,
        value: Some(&"v".repeat(gate::MAX_OWN_HEADER_BYTES + 1)),
    });
    assert!(gate::check_headers(&long_own).is_err());
    let mut many = OwnedHeaders::new();
    for _ in 0..=gate::MAX_HEADERS {
        many = many.insert(Header {
            key: "h",
            value: Some("v"),
        });
    }
    assert!(gate::check_headers(&many).expect_err("too many").contains("headers"));
}
