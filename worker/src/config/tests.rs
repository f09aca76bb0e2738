use super::*;

fn parse(args: &[&str]) -> Config {
    let mut all = vec!["ferry-worker", "--model", "m.gguf"];
    all.extend_from_slice(args);
    Config::try_parse_from(all).expect("parses")
}

#[test]
fn the_record_budget_fits_the_producer() {
    assert_eq!(parse(&[]).kafka.max_record_bytes, 900_000);
    assert!(parse(&["--max-record-bytes", "999999"]).validate().is_err());
    assert!(parse(&["--max-record-bytes", "100"]).validate().is_err());
    let raised = parse(&[
        "--max-record-bytes",
        "4000000",
        "--kafka-property",
        "message.max.bytes=5000000",
    ]);
    assert_eq!(raised.validate(), Ok(()));
}

#[test]
fn reply_topic_policy_from_flags() {
    let c = parse(&[
        "--reply-topic-allow",
        "tenant-a.,re:tenant-b\\.[a-z]+",
        "--fallback-topic",
        "small",
    ]);
    assert_eq!(c.validate(), Ok(()));
    let p = c.kafka.reply_policy().expect("policy");
    assert_eq!(p.check("tenant-a.x"), Ok(()));
    assert_eq!(p.check("tenant-b.replies"), Ok(()));
    assert!(p.check("tenant-c").is_err());
    for own in [
        "ferry.requests",
        "ferry.requests.dlq",
        "small",
        "small.dlq",
        "ferry.callers",
        "__consumer_offsets",
    ] {
        assert!(p.check(own).is_err(), "{own}");
    }
    assert!(parse(&["--reply-topic-allow", "re:("]).validate().is_err());
    assert!(parse(&["--reply-topic", "ferry.callers"]).validate().is_err());
}

#[test]
fn a_fallback_lane_is_one_of_the_request_topics() {
    let ok = parse(&["--topic", "a,ferry.fallback", "--fallback-lane", "ferry.fallback"]);
    assert_eq!(ok.validate(), Ok(()));
    assert_eq!(ok.kafka.fallback_lanes, ["ferry.fallback"]);
    let err = parse(&["--topic", "a", "--fallback-lane", "ferry.fallback"]).validate();
    assert!(err.expect_err("not a lane").0.contains("--fallback-lane"));
}

#[test]
fn defaults_are_valid() {
    let c = parse(&[]);
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.kafka.dead_letter_topic("ferry.requests"), "ferry.requests.dlq");
    assert_eq!(c.kafka.topic_names(), ["ferry.requests"]);
    assert_eq!(c.kafka.assignment_strategy, AssignmentStrategy::CooperativeSticky);
    assert_eq!(c.model.weights, WeightFormat::Q8_0);
    assert_eq!(c.kafka.fallback_topic, None);
    assert!(!c.model.fetch_model_only);
    let f = parse(&["--fallback-topic", "ferry.requests.small"]);
    assert_eq!(f.validate(), Ok(()));
}

#[test]
fn rejects_what_cannot_work() {
    for args in [
        &["--topic", "has space"][..],
        &["--dead-letter-topic", "ferry.requests"],
        &["--session-timeout", "10ms"],
        &["--kafka-property", "enable.auto.commit=true"],
        &["--kafka-property", "novalue"],
        &["--model-sha256", "abc"],
        &["--threads", "0"],
        &["--max-context", "4"],
        &["--drain-timeout", "28s"],
        &["--snapshot-store", "ftp://x"],
        &["--snapshot-store-timeout", "0s"],
        &["--snapshot-store-timeout", "21s"],
        &["--max-in-flight", "0"],
        &["--max-attempts", "0"],
        &["--topic", "a:0"],
        &["--topic", "a,a"],
        &["--max-poll-interval", "5s"],
        &["--revoke-timeout", "400s"],
        &["--kafka-property", "statistics.interval.ms=100"],
        &["--kafka-stats-interval", "1ms"],
        &["--health-interval", "0s"],
        &["--sasl-mechanism", "PLAIN"],
        &["--fallback-topic", "ferry.requests"],
        &["--fallback-topic", "ferry.requests.dlq"],
        &["--fallback-topic", "ferry.replies"],
        &["--fallback-topic", "no spaces"],
    ] {
        assert!(parse(args).validate().is_err(), "{args:?} should be rejected");
    }
}

#[test]
fn parses_the_http_address() {
    assert_eq!(
        parse(&[]).telemetry.http_addr,
        HttpAddr(Some("0.0.0.0:9090".parse().expect("addr")))
    );
    assert_eq!(parse(&["--http-addr", "off"]).telemetry.http_addr, HttpAddr(None));
    assert_eq!(
        parse(&["--http-addr", "127.0.0.1:8080"]).telemetry.http_addr,
        HttpAddr(Some("127.0.0.1:8080".parse().expect("addr")))
    );
    assert!(parse_http_addr("localhost").is_err());
    assert_eq!(
        parse(&[]).telemetry.probe_addr,
        HttpAddr(Some("0.0.0.0:9091".parse().expect("addr")))
    );
    assert_eq!(parse(&["--probe-addr", "off"]).telemetry.probe_addr, HttpAddr(None));
    assert_eq!(
        parse(&["--probe-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]).validate(),
        Ok(())
    );
    assert_eq!(
        parse(&["--probe-addr", "127.0.0.1:9090", "--http-addr", "127.0.0.2:9090"]).validate(),
        Ok(())
    );
    assert!(parse(&["--probe-addr", "127.0.0.1:9090"]).validate().is_err());
    assert!(
        parse(&["--probe-addr", "0.0.0.0:8080", "--http-addr", "127.0.0.1:8080"])
            .validate()
            .is_err()
    );
    assert_eq!(parse(&[]).health.breaker_failures, 5);
    assert_eq!(parse(&[]).kafka.kafka_stats_interval, Duration::from_secs(5));
    assert_eq!(parse(&["--kafka-stats-interval", "0s"]).validate(), Ok(()));
}

#[test]
fn parses_priority_lanes() {
    let c = parse(&["--topic", "ferry.high:4,ferry.normal"]);
    assert_eq!(
        c.kafka.topics,
        [
            Lane {
                topic: "ferry.high".into(),
                weight: 4
            },
            Lane {
                topic: "ferry.normal".into(),
                weight: 1
            }
        ]
    );
    assert_eq!(c.validate(), Ok(()));
    assert!(parse_lane("x:heavy").is_err());
}

#[test]
fn parses_devices() {
    assert_eq!(parse_device("cpu"), Ok(DeviceChoice::Cpu));
    assert_eq!(parse_device("cuda"), Ok(DeviceChoice::Cuda(0)));
    assert_eq!(parse_device("cuda:3"), Ok(DeviceChoice::Cuda(3)));
    assert!(parse_device("tpu").is_err());
}

#[test]
fn malformed_properties_are_named_by_position_never_by_text() {
    // A password with a comma, split by the delimiter: the second piece has no '='.
    let c = parse(&["--kafka-property", "sasl.password=hunter2,secretpart"]);
    let err = c.kafka.property_pairs().expect_err("the second piece is malformed");
    assert!(err.0.contains("entry 2 of 2"), "{err}");
    assert!(!err.0.contains("secretpart") && !err.0.contains("hunter2"), "{err}");
    let err = c.validate().expect_err("validation says the same");
    assert!(!err.to_string().contains("secretpart"), "{err}");
    let c = parse(&["--kafka-property", "=hunter2"]);
    let err = c.kafka.property_pairs().expect_err("no key");
    assert!(err.0.contains("entry 1 of 1") && !err.0.contains("hunter2"), "{err}");
    // A key is no secret: a managed one is named.
    let c = parse(&["--kafka-property", "group.id=mine"]);
    let err = c.kafka.property_pairs().expect_err("managed");
    assert!(err.0.contains("group.id") && !err.0.contains("mine"), "{err}");
}

#[test]
fn sizes_and_kv_budgets_parse() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("2Gi"), Ok(2 << 30));
    assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
    assert_eq!(parse_size("100MB"), Ok(100_000_000));
    assert_eq!(parse_size("3G"), Ok(3_000_000_000));
    assert_eq!(parse_size(" 4096 "), Ok(4096));
    assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
    for bad in ["", "MiB", "12XB", "-1GiB", "1e3", "1.2.3MiB", "5m"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse(&[]).kafka.kv_budget, KvBudgetSetting::Auto);
    assert_eq!(parse(&["--kv-budget", "off"]).kafka.kv_budget, KvBudgetSetting::Off);
    assert_eq!(parse(&["--kv-budget", "0"]).kafka.kv_budget, KvBudgetSetting::Off);
    assert_eq!(
        parse(&["--kv-budget", "2GiB"]).kafka.kv_budget,
        KvBudgetSetting::Bytes(2 << 30)
    );
    assert!(Config::try_parse_from(["ferry-worker", "--model", "m", "--kv-budget", "lots"]).is_err());
}

#[test]
fn a_bad_store_url_is_reported_without_its_password() {
    let err = parse(&["--snapshot-store", "ftp://user:hunter2@host/x"])
        .validate()
        .expect_err("unknown scheme");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(err.to_string().contains("ftp://user:REDACTED@host/x"), "{err}");
}

#[test]
fn extra_properties_pass_through() {
    let c = parse(&[
        "--kafka-property",
        "security.protocol=SASL_SSL",
        "--kafka-property",
        "sasl.mechanism=PLAIN",
    ]);
    assert_eq!(
        c.kafka.property_pairs(),
        Ok(vec![
            ("security.protocol".into(), "SASL_SSL".into()),
            ("sasl.mechanism".into(), "PLAIN".into())
        ])
    );
}
