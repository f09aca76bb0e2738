use super::*;
use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    s: KafkaSecurity,
}

fn parse(args: &[&str]) -> KafkaSecurity {
    let mut all = vec!["x"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).expect("parses").s
}

const SCRAM: &[&str] = &[
    "--security-protocol",
    "sasl_ssl",
    "--sasl-mechanism",
    "SCRAM-SHA-512",
    "--sasl-username",
    "ferry",
    "--sasl-password",
    "hunter2",
];

const OIDC: &[&str] = &[
    "--security-protocol",
    "SASL_SSL",
    "--sasl-mechanism",
    "oauthbearer",
    "--sasl-oauthbearer-token-endpoint-url",
    "https://idp.example.com/oauth2/token",
    "--sasl-oauthbearer-client-id",
    "ferry",
    "--sasl-oauthbearer-client-secret",
    "s3cret",
    "--sasl-oauthbearer-scope",
    "kafka",
];

#[test]
fn maps_flags_to_librdkafka_properties() {
    assert!(parse(&[]).properties().is_empty(), "nothing set: librdkafka's defaults");
    let s = parse(&[SCRAM, &["--ssl-ca-location", "/etc/ferry/kafka/ca.crt"]].concat());
    assert_eq!(s.validate(&[]), Ok(()));
    assert_eq!(
        s.properties(),
        [
            ("security.protocol", "sasl_ssl".to_string()),
            ("sasl.mechanism", "SCRAM-SHA-512".to_string()),
            ("sasl.username", "ferry".to_string()),
            ("sasl.password", "hunter2".to_string()),
            ("ssl.ca.location", "/etc/ferry/kafka/ca.crt".to_string()),
        ]
    );
    assert_eq!(s.required_features(), ["ssl", "sasl_scram"]);
    let o = parse(OIDC);
    assert_eq!(o.validate(&[]), Ok(()));
    let props = o.properties();
    assert!(props.contains(&("sasl.oauthbearer.method", "oidc".to_string())));
    assert!(props.contains(&(
        "sasl.oauthbearer.token.endpoint.url",
        "https://idp.example.com/oauth2/token".to_string()
    )));
    assert!(props.contains(&("sasl.oauthbearer.client.secret", "s3cret".to_string())));
    assert_eq!(o.required_features(), ["ssl", "sasl_oauthbearer", "oidc"]);
}

#[test]
fn secrets_never_show_in_debug() {
    let text = format!("{:?}", parse(SCRAM));
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("<redacted>"));
    let text = format!("{:?}", parse(OIDC));
    assert!(!text.contains("s3cret"), "{text}");
}

#[test]
fn rejects_settings_that_cannot_work() {
    for args in [
        &["--sasl-mechanism", "PLAIN"][..],
        &["--security-protocol", "sasl_plaintext"],
        &["--security-protocol", "sasl_plaintext", "--sasl-mechanism", "PLAIN"],
        &[
            "--security-protocol",
            "sasl_ssl",
            "--sasl-mechanism",
            "SCRAM-SHA-256",
            "--sasl-username",
            "u",
        ],
        &["--sasl-username", "u", "--sasl-password", "p"],
        &["--ssl-ca-location", "/ca.pem"],
        &["--security-protocol", "ssl", "--ssl-certificate-location", "/c.pem"],
        &["--security-protocol", "ssl", "--ssl-key-password", "x"],
        &["--security-protocol", "sasl_ssl", "--sasl-mechanism", "OAUTHBEARER"],
        &[
            "--security-protocol",
            "sasl_ssl",
            "--sasl-mechanism",
            "OAUTHBEARER",
            "--sasl-oauthbearer-token-endpoint-url",
            "ftp://x",
            "--sasl-oauthbearer-client-id",
            "a",
            "--sasl-oauthbearer-client-secret",
            "b",
        ],
        &[
            "--security-protocol",
            "sasl_ssl",
            "--sasl-mechanism",
            "PLAIN",
            "--sasl-username",
            "u",
            "--sasl-password",
            "p",
            "--sasl-oauthbearer-scope",
            "s",
        ],
    ] {
        assert!(parse(args).validate(&[]).is_err(), "{args:?} should be rejected");
    }
    let plain = parse(&[
        "--security-protocol",
        "sasl_plaintext",
        "--sasl-mechanism",
        "PLAIN",
        "--sasl-username",
        "u",
        "--sasl-password",
        "p",
    ]);
    assert_eq!(plain.validate(&[]), Ok(()));
    let clash = [("sasl.username".to_string(), "other".to_string())];
    assert!(plain.validate(&clash).is_err(), "one property set two ways");
    assert_eq!(
        parse(&[]).validate(&[("security.protocol".into(), "SASL_SSL".into())]),
        Ok(()),
        "properties alone are fine (the manifests pass TLS and SASL that way)"
    );
}

#[test]
fn names_the_build_a_setting_needs() {
    let default_build = "gzip,snappy,sasl,regex,lz4,sasl_plain,plugins";
    let s = parse(SCRAM);
    let e = s.check_supported(default_build).expect_err("needs ssl").0;
    assert!(e.contains("ssl, sasl_scram") && e.contains("--features tls"), "{e}");
    assert_eq!(
        s.check_supported("gzip,ssl,sasl,sasl_plain,sasl_scram,sasl_oauthbearer"),
        Ok(())
    );
    let e = parse(OIDC)
        .check_supported("gzip,ssl,sasl,sasl_plain,sasl_scram,sasl_oauthbearer")
        .expect_err("needs oidc")
        .0;
    assert!(e.contains("lacks oidc") && e.contains("--features oidc"), "{e}");
}

/// librdkafka checks property names and values when a client is created (no connection is
/// made to create it): every mapping this build supports must be accepted, and every one it
/// does not must be refused by [`KafkaSecurity::check_supported`] first.
#[test]
fn librdkafka_accepts_the_properties_it_supports() {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::FutureProducer;
    let builtin = librdkafka_features().expect("builtin.features");
    eprintln!(
        "librdkafka {} builtin.features: {builtin}",
        rdkafka::util::get_rdkafka_version().1
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["--security-protocol", "plaintext"],
        vec![
            "--security-protocol",
            "sasl_plaintext",
            "--sasl-mechanism",
            "PLAIN",
            "--sasl-username",
            "u",
            "--sasl-password",
            "p",
        ],
        vec!["--security-protocol", "ssl"],
        SCRAM.to_vec(),
        SCRAM
            .iter()
            .map(|a| if *a == "SCRAM-SHA-512" { "SCRAM-SHA-256" } else { a })
            .collect(),
        OIDC.to_vec(),
    ];
    let mut accepted = 0;
    for args in cases {
        let s = parse(&args);
        s.validate(&[]).expect("valid");
        if s.check_supported(&builtin).is_err() {
            continue;
        }
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1").set("group.id", "g");
        for (k, v) in s.properties() {
            c.set(k, v);
        }
        if let Err(e) = c.create::<BaseConsumer>() {
            panic!("{args:?}: the consumer refused: {e}");
        }
        if let Err(e) = c.create::<FutureProducer>() {
            panic!("{args:?}: the producer refused: {e}");
        }
        accepted += 1;
    }
    assert!(accepted >= 2, "plaintext and SASL/PLAIN work in every build");
}
