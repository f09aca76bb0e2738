//! The schema files' numbers and enums against the crate's constants and types, each limit
//! probed at its edge from both sides, and replies of one kind carrying another's fields.

use super::*;

/// The number at `pointer` in a schema file, as an exact integer.
fn integer_at(file: &str, pointer: &str) -> u64 {
    schema(file)
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{file}#{pointer} is not an integer"))
}

#[test]
fn schema_numbers_equal_the_crate_constants() {
    let r = "request.schema.json";
    let as_u64 = |n: usize| u64::try_from(n).expect("limits fit in u64");
    for (pointer, expected) in [
        ("/properties/version/const", u64::from(SCHEMA_VERSION)),
        ("/properties/version/default", u64::from(SCHEMA_VERSION)),
        ("/properties/id/minLength", 1),
        ("/properties/id/maxLength", as_u64(MAX_ID_LEN)),
        ("/properties/model/maxLength", as_u64(MAX_MODEL_LEN)),
        ("/properties/messages/minItems", 1),
        ("/properties/messages/maxItems", as_u64(MAX_MESSAGES)),
        ("/$defs/chat_message/properties/content/maxLength", as_u64(MAX_TEXT_LEN)),
        ("/properties/prompt/minLength", 1),
        ("/properties/prompt/maxLength", as_u64(MAX_TEXT_LEN)),
        ("/properties/max_tokens/minimum", 1),
        ("/properties/max_tokens/maximum", u64::from(MAX_MAX_TOKENS)),
        ("/properties/max_tokens/default", u64::from(DEFAULT_MAX_TOKENS)),
        ("/properties/top_k/maximum", u64::from(MAX_TOP_K)),
        ("/properties/seed/maximum", u64::MAX),
        ("/properties/stop/maxItems", as_u64(MAX_STOP)),
        ("/properties/stop/items/minLength", 1),
        ("/properties/stop/items/maxLength", as_u64(MAX_STOP_LEN)),
        ("/properties/reply_to/maxLength", as_u64(MAX_TOPIC_LEN)),
        ("/properties/metadata/x-max-json-bytes", as_u64(MAX_METADATA_BYTES)),
    ] {
        assert_eq!(integer_at(r, pointer), expected, "{r}#{pointer}");
    }
    let request = schema(r);
    assert_eq!(
        request
            .pointer("/properties/temperature/maximum")
            .and_then(Value::as_f64),
        Some(MAX_TEMPERATURE)
    );
    assert_eq!(
        request
            .pointer("/properties/temperature/minimum")
            .and_then(Value::as_f64),
        Some(0.0)
    );
    assert_eq!(
        request
            .pointer("/properties/top_p/exclusiveMinimum")
            .and_then(Value::as_f64),
        Some(0.0)
    );
    assert_eq!(
        request.pointer("/properties/top_p/maximum").and_then(Value::as_f64),
        Some(1.0)
    );

    let topic_pattern = "^[a-zA-Z0-9._-]+$";
    assert_eq!(
        request.pointer("/properties/reply_to/pattern"),
        Some(&json!(topic_pattern))
    );
    let dead_letter = schema("dead_letter.schema.json");
    assert_eq!(
        dead_letter.pointer("/properties/source/properties/topic/pattern"),
        Some(&json!(topic_pattern))
    );
    assert_eq!(
        integer_at(
            "dead_letter.schema.json",
            "/properties/source/properties/topic/maxLength"
        ),
        as_u64(MAX_TOPIC_LEN)
    );

    // `stream` is the one boolean: off unless asked for, on both sides.
    assert_eq!(request.pointer("/properties/stream/default"), Some(&json!(false)));
    let minimal: Request =
        serde_json::from_value(json!({ "id": "r", "prompt": "p" })).expect("a minimal request parses");
    assert!(!minimal.stream, "a request without `stream` must not stream");

    assert_eq!(
        integer_at("chunk.schema.json", "/properties/seq/maximum"),
        u64::from(u32::MAX)
    );
    for file in [
        "response.schema.json",
        "error.schema.json",
        "chunk.schema.json",
        "dead_letter.schema.json",
    ] {
        assert_eq!(
            integer_at(file, "/properties/version/const"),
            u64::from(SCHEMA_VERSION),
            "{file}"
        );
    }
}

/// The strings of a schema `enum`, in order.
fn enum_at(file: &str, pointer: &str) -> Vec<String> {
    let values = schema(file).pointer(pointer).and_then(Value::as_array).cloned();
    let values = values.unwrap_or_else(|| panic!("{file}#{pointer} is not an enum"));
    values
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{file}#{pointer}: {v} is not a string"))
                .to_string()
        })
        .collect()
}

fn serde_names<T: Serialize>(values: &[T]) -> Vec<String> {
    values
        .iter()
        .map(|v| match serde_json::to_value(v) {
            Ok(Value::String(s)) => s,
            other => panic!("an enum variant should serialise to a string, got {other:?}"),
        })
        .collect()
}

#[test]
fn schema_enums_equal_the_rust_enums() {
    // The matches have no wildcard arm, so a new variant stops this test from compiling until
    // it is listed here, and then the comparison with the schema fails until the schema has it.
    let roles = [Role::System, Role::User, Role::Assistant];
    for role in roles {
        match role {
            Role::System | Role::User | Role::Assistant => {}
        }
    }
    let finish = [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::ContextLength,
        FinishReason::Deadline,
    ];
    for reason in finish {
        match reason {
            FinishReason::Stop | FinishReason::Length | FinishReason::ContextLength | FinishReason::Deadline => {}
        }
    }
    use ErrorCode::*;
    let codes = ErrorCode::ALL;
    for code in codes {
        match code {
            InvalidJson | InvalidSchema | InvalidRequest | PromptTooLong | UnknownModel | TemplateError
            | EngineError | AttemptsExhausted | ReplyTopicForbidden | ReplyTopicUnwritable | ReplyTooLarge => {}
        }
    }
    let outcomes = [AttemptOutcome::Died, AttemptOutcome::Failed, AttemptOutcome::Suspended];
    for outcome in outcomes {
        match outcome {
            AttemptOutcome::Died | AttemptOutcome::Failed | AttemptOutcome::Suspended => {}
        }
    }
    // One reply of each kind, from the examples; the match makes a new kind fail to compile here.
    let kinds: Vec<&str> = ["response.json", "error.json", "chunk.json"]
        .iter()
        .map(|file| {
            let reply: Reply = serde_json::from_value(read_json(&crate_dir().join("examples").join(file)))
                .unwrap_or_else(|e| panic!("examples/{file}: {e}"));
            match reply {
                Reply::Response(_) | Reply::Error(_) | Reply::Chunk(_) => reply.kind(),
            }
        })
        .collect();

    assert_eq!(
        enum_at("request.schema.json", "/$defs/chat_message/properties/role/enum"),
        serde_names(&roles)
    );
    assert_eq!(
        enum_at("response.schema.json", "/properties/finish_reason/enum"),
        serde_names(&finish)
    );
    assert_eq!(
        enum_at("error.schema.json", "/$defs/error_code/enum"),
        serde_names(&codes)
    );
    assert_eq!(
        enum_at("dead_letter.schema.json", "/$defs/attempt/properties/outcome/enum"),
        serde_names(&outcomes)
    );
    assert_eq!(enum_at("reply.schema.json", "/properties/kind/enum"), kinds);
}

/// A valid request with one field replaced.
fn request_with(field: &str, value: Value) -> Value {
    let mut request = json!({ "id": "edge", "prompt": "p" });
    if field == "messages" {
        request.as_object_mut().expect("an object").remove("prompt");
    }
    request[field] = value;
    request
}

/// Whether the Rust side accepts `request`: it parses and validates.
fn rust_accepts(request: &Value) -> bool {
    serde_json::from_value::<Request>(request.clone()).is_ok_and(|r| r.validate().is_ok())
}

/// Builds a request whose probed field has the given size.
type BuildRequest = Box<dyn Fn(u64) -> Value>;

#[test]
fn each_limit_holds_at_its_edge_in_schema_and_rust() {
    let schema = validator("request.schema.json");
    let r = "request.schema.json";
    let text = |n: u64| "x".repeat(usize::try_from(n).expect("a limit fits in usize"));
    let message = |content: String| json!({ "role": "user", "content": content });
    // Each case builds a request from a size; `limit` is read from the schema, so the case checks
    // that the schema's number is exactly where the Rust side starts to refuse.
    let cases: Vec<(&str, u64, BuildRequest)> = vec![
        (
            "id",
            integer_at(r, "/properties/id/maxLength"),
            Box::new(move |n| request_with("id", json!(text(n)))),
        ),
        (
            "model",
            integer_at(r, "/properties/model/maxLength"),
            Box::new(move |n| request_with("model", json!(text(n)))),
        ),
        (
            "prompt",
            integer_at(r, "/properties/prompt/maxLength"),
            Box::new(move |n| request_with("prompt", json!(text(n)))),
        ),
        (
            "content",
            integer_at(r, "/$defs/chat_message/properties/content/maxLength"),
            Box::new(move |n| request_with("messages", json!([message(text(n))]))),
        ),
        (
            "messages",
            integer_at(r, "/properties/messages/maxItems"),
            Box::new(move |n| request_with("messages", Value::Array((0..n).map(|_| message("hi".into())).collect()))),
        ),
        (
            "stop",
            integer_at(r, "/properties/stop/maxItems"),
            Box::new(|n| request_with("stop", json!((0..n).map(|i| i.to_string()).collect::<Vec<_>>()))),
        ),
        (
            "stop[0]",
            integer_at(r, "/properties/stop/items/maxLength"),
            Box::new(move |n| request_with("stop", json!([text(n)]))),
        ),
        (
            "reply_to",
            integer_at(r, "/properties/reply_to/maxLength"),
            Box::new(move |n| request_with("reply_to", json!(text(n)))),
        ),
        (
            "max_tokens",
            integer_at(r, "/properties/max_tokens/maximum"),
            Box::new(|n| request_with("max_tokens", json!(n))),
        ),
        (
            "top_k",
            integer_at(r, "/properties/top_k/maximum"),
            Box::new(|n| request_with("top_k", json!(n))),
        ),
        (
            "metadata",
            integer_at(r, "/properties/metadata/x-max-json-bytes"),
            // `{"k":""}` is 8 bytes of JSON; the string fills the rest. The schema cannot state
            // a size in bytes of JSON, so only the Rust side is probed here.
            Box::new(move |n| request_with("metadata", json!({ "k": text(n - 8) }))),
        ),
    ];
    for (name, limit, build) in cases {
        let at = build(limit);
        let over = build(limit + 1);
        assert!(rust_accepts(&at), "{name}: Rust refuses the limit {limit}");
        assert!(
            !rust_accepts(&over),
            "{name}: Rust accepts {} (limit {limit})",
            limit + 1
        );
        assert_schema_accepts(&schema, &at, &format!("{name} at its limit {limit}"));
        if name != "metadata" {
            assert!(
                !schema.is_valid(&over),
                "{name}: the schema accepts {} (limit {limit})",
                limit + 1
            );
        }
    }

    // The fractional limits, from both sides.
    let max_temperature = schema_number(r, "/properties/temperature/maximum");
    for (field, ok, bad) in [
        ("temperature", max_temperature, max_temperature + 0.01),
        ("top_p", 1.0, 1.01),
        ("top_p", 0.001, 0.0),
    ] {
        let (ok, bad) = (request_with(field, json!(ok)), request_with(field, json!(bad)));
        assert!(
            rust_accepts(&ok) && schema.is_valid(&ok),
            "{field}: {ok} should be accepted"
        );
        assert!(
            !rust_accepts(&bad) && !schema.is_valid(&bad),
            "{field}: {bad} should be refused"
        );
    }
}

fn schema_number(file: &str, pointer: &str) -> f64 {
    schema(file)
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{file}#{pointer} is not a number"))
}

#[test]
fn a_reply_of_one_kind_with_the_others_fields_is_refused() {
    // The `kind` tag decides the shape on both sides: an error body labelled `response` must fail.
    let reply = validator("reply.schema.json");
    let mut mislabelled = read_json(&crate_dir().join("examples/error.json"));
    mislabelled["kind"] = json!("response");
    assert!(
        !reply.is_valid(&mislabelled),
        "the schema accepts an error labelled as a response"
    );
    assert!(
        serde_json::from_value::<Reply>(mislabelled).is_err(),
        "serde accepts an error labelled as a response"
    );

    let mut mislabelled = read_json(&crate_dir().join("examples/chunk.json"));
    mislabelled["kind"] = json!("response");
    assert!(
        !reply.is_valid(&mislabelled),
        "the schema accepts a chunk labelled as a response"
    );
    assert!(
        serde_json::from_value::<Reply>(mislabelled).is_err(),
        "serde accepts a chunk labelled as a response"
    );

    let mut unknown = read_json(&crate_dir().join("examples/response.json"));
    unknown["kind"] = json!("partial");
    assert!(!reply.is_valid(&unknown), "the schema accepts an unknown kind");
    assert!(
        serde_json::from_value::<Reply>(unknown).is_err(),
        "serde accepts an unknown kind"
    );
}
