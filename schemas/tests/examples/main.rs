//! Holds the two forms of the contract to each other: the JSON Schema files that a client in any
//! language reads, and the serde types the worker uses.
//!
//! Every example in `examples/` must validate against its schema, parse into its Rust type, pass
//! [`Request::validate`] where that applies, and come back unchanged from a round trip through
//! the type. Every example in `examples/invalid/` must be rejected by the schema *and* by the
//! Rust side, for the reason its entry in [`INVALID`] names. The numbers of the schema files are
//! compared with the constants of the crate, and each limit is probed at its edge from both
//! sides, so neither form can drift from the other unnoticed.
//!
//! The limit of this check: JSON Schema's `maxLength` counts characters while the Rust side counts
//! bytes, so the edges are probed with ASCII text, where the two agree.

mod contract;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use ferry_schemas::*;
use jsonschema::{Draft, Resource, Validator};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// The schema files, named as in their `$id`.
const SCHEMA_FILES: [&str; 6] = [
    "request.schema.json",
    "reply.schema.json",
    "response.schema.json",
    "error.schema.json",
    "chunk.schema.json",
    "dead_letter.schema.json",
];

/// This crate's folder: `cargo test` names it at run time, so a test binary built in another
/// clone that shares the build cache (CI's, under `~/.cache/ferry-target`) reads this clone's
/// files; the folder it was compiled in otherwise.
fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn schema(file: &str) -> Value {
    read_json(&crate_dir().join(file))
}

/// A validator for one schema file that resolves references to the other files from disk, never
/// from the network, and asserts `format` (so `date-time` is checked, not merely annotated).
fn validator(file: &str) -> Validator {
    let mut options = jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true);
    for other in SCHEMA_FILES {
        let contents = schema(other);
        let id = contents["$id"]
            .as_str()
            .unwrap_or_else(|| panic!("{other} has no $id"))
            .to_string();
        let resource = Resource::from_contents(contents).unwrap_or_else(|e| panic!("{other}: {e}"));
        options = options.with_resource(id, resource);
    }
    options
        .build(&schema(file))
        .unwrap_or_else(|e| panic!("{file} does not compile: {e}"))
}

/// The schema's complaints about `instance`, one line each; empty when it is valid.
fn schema_errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

fn assert_schema_accepts(validator: &Validator, instance: &Value, what: &str) {
    let errors = schema_errors(validator, instance);
    assert!(
        errors.is_empty(),
        "{what} should satisfy the schema:\n{}",
        errors.join("\n")
    );
}

/// The JSON files directly inside `dir`, sorted, as (file name, contents).
fn json_files(dir: &Path) -> Vec<(String, Value)> {
    let mut files: Vec<(String, Value)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let name = path
                .file_name()
                .expect("a file has a name")
                .to_string_lossy()
                .into_owned();
            (name, read_json(&path))
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// Parses `original` into `T`, writes it back, parses that again, and returns the first value and
/// what it wrote. Both parses must agree, so nothing is lost or invented on the way out.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(original: &Value, what: &str) -> (T, Value) {
    let first: T = serde_json::from_value(original.clone()).unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    let written = serde_json::to_value(&first).unwrap_or_else(|e| panic!("{what} does not serialise: {e}"));
    let second: T = serde_json::from_value(written.clone()).unwrap_or_else(|e| panic!("{what} re-read: {e}"));
    assert_eq!(first, second, "{what} changed on a round trip");
    (first, written)
}

#[test]
fn schema_files_are_2020_12_schemas_with_versioned_ids() {
    for file in SCHEMA_FILES {
        let s = schema(file);
        assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema", "{file}");
        assert_eq!(
            s["$id"],
            format!("https://ferry.dev/schemas/v{SCHEMA_VERSION}/{file}"),
            "{file}"
        );
        if let Err(e) = jsonschema::meta::validate(&s) {
            panic!("{file} is not a valid JSON Schema: {e}");
        }
        // Compiling resolves every `$ref`, so a dangling reference fails here.
        validator(file);
    }
}

/// Collects the path of every property schema under `node` that lacks a description.
fn undocumented(node: &Value, path: &str, missing: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                for (name, prop) in props {
                    let documented = prop
                        .get("description")
                        .and_then(Value::as_str)
                        .is_some_and(|d| !d.trim().is_empty());
                    if !documented {
                        missing.push(format!("{path}/properties/{name}"));
                    }
                }
            }
            for (key, child) in map {
                undocumented(child, &format!("{path}/{key}"), missing);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                undocumented(child, &format!("{path}/{i}"), missing);
            }
        }
        _ => {}
    }
}

#[test]
fn every_field_is_documented() {
    for file in SCHEMA_FILES {
        let mut missing = Vec::new();
        undocumented(&schema(file), file, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description:\n{}",
            missing.join("\n")
        );
        assert!(
            schema(file)["description"].is_string(),
            "{file} has no top-level description"
        );
    }
}

#[test]
fn valid_examples_satisfy_schema_and_types_and_round_trip() {
    let request = validator("request.schema.json");
    let reply = validator("reply.schema.json");
    let response = validator("response.schema.json");
    let error = validator("error.schema.json");
    let chunk = validator("chunk.schema.json");
    let dead_letter = validator("dead_letter.schema.json");

    let examples = json_files(&crate_dir().join("examples"));
    let names: BTreeSet<&str> = examples.iter().map(|(name, _)| name.as_str()).collect();
    for required in [
        "request-chat.json",
        "request-prompt.json",
        "response.json",
        "error.json",
        "chunk.json",
        "dead-letter.json",
        "dead-letter-attempts-exhausted.json",
    ] {
        assert!(names.contains(required), "examples/{required} is missing");
    }

    for (name, example) in &examples {
        let what = format!("examples/{name}");
        if name.starts_with("request-") {
            assert_schema_accepts(&request, example, &what);
            let (parsed, written) = round_trip::<Request>(example, &what);
            assert_eq!(parsed.validate(), Ok(()), "{what}");
            // `version` is the one field serde fills in on the way in; it is then written out.
            let mut expected = example.clone();
            expected
                .as_object_mut()
                .expect("a request is an object")
                .entry("version")
                .or_insert(json!(SCHEMA_VERSION));
            assert_eq!(written, expected, "{what} is not written back as it was read");
        } else if name.starts_with("response") || name.starts_with("error") || name.starts_with("chunk") {
            let (own, kind) = if name.starts_with("response") {
                (&response, "response")
            } else if name.starts_with("error") {
                (&error, "error")
            } else {
                (&chunk, "chunk")
            };
            assert_schema_accepts(own, example, &what);
            assert_schema_accepts(&reply, example, &what);
            let (parsed, written) = round_trip::<Reply>(example, &what);
            assert_eq!(parsed.kind(), kind, "{what}");
            assert_eq!(parsed.is_final(), kind != "chunk", "{what}");
            assert_eq!(parsed.id(), example["id"], "{what}");
            assert_eq!(&written, example, "{what} is not written back as it was read");
            // The body without its tag is the variant's own type, as the worker builds it.
            let mut body = example.clone();
            body.as_object_mut().expect("a reply is an object").remove("kind");
            match &parsed {
                Reply::Response(r) => assert_eq!(&round_trip::<Response>(&body, &what).0, r, "{what}"),
                Reply::Error(e) => assert_eq!(&round_trip::<ErrorReply>(&body, &what).0, e, "{what}"),
                Reply::Chunk(c) => assert_eq!(&round_trip::<Chunk>(&body, &what).0, c, "{what}"),
            }
        } else if name.starts_with("dead-letter") {
            assert_schema_accepts(&dead_letter, example, &what);
            let (parsed, written) = round_trip::<DeadLetter>(example, &what);
            assert_eq!(&written, example, "{what} is not written back as it was read");
            let payload = parsed
                .payload()
                .unwrap_or_else(|e| panic!("{what}: payload_base64: {e}"));
            assert_eq!(DeadLetter::encode_payload(&payload), parsed.payload_base64, "{what}");
        } else {
            panic!(
                "{what}: name it request-*, response*, error*, chunk* or dead-letter* so this test knows its schema"
            );
        }
    }
}

#[test]
fn the_full_request_example_sets_every_field() {
    let example = read_json(&crate_dir().join("examples/request-prompt.json"));
    let properties = schema("request.schema.json")["properties"]
        .as_object()
        .expect("request has properties")
        .clone();
    for field in properties.keys().filter(|f| *f != "messages") {
        assert!(
            example.get(field).is_some(),
            "examples/request-prompt.json should show `{field}`"
        );
    }
}

/// How the Rust side must reject an invalid example.
#[derive(Debug, Clone, Copy)]
enum Rejected {
    /// `serde_json` refuses it: wrong shape, type or field name.
    ByParsing,
    /// It parses, and [`Request::validate`] names this field.
    ByValidation(&'static str),
}

/// Every file in `examples/invalid/` and why it is invalid. A file named `chunk-*` is a reply
/// (checked against the chunk and reply schemas and parsed as a [`Reply`]); every other file is
/// a request.
const INVALID: &[(&str, Rejected)] = &[
    ("bad-topic-name.json", Rejected::ByValidation("reply_to")),
    ("chunk-negative-seq.json", Rejected::ByParsing),
    ("both-messages-and-prompt.json", Rejected::ByValidation("messages")),
    ("deadline-not-rfc3339.json", Rejected::ByParsing),
    ("empty-id.json", Rejected::ByValidation("id")),
    ("empty-messages.json", Rejected::ByValidation("messages")),
    ("empty-prompt.json", Rejected::ByValidation("prompt")),
    ("empty-stop-string.json", Rejected::ByValidation("stop[0]")),
    ("id-too-long.json", Rejected::ByValidation("id")),
    ("max-tokens-negative.json", Rejected::ByParsing),
    ("max-tokens-too-large.json", Rejected::ByValidation("max_tokens")),
    ("max-tokens-zero.json", Rejected::ByValidation("max_tokens")),
    ("missing-id.json", Rejected::ByParsing),
    ("neither-messages-nor-prompt.json", Rejected::ByValidation("messages")),
    ("prompt-not-a-string.json", Rejected::ByParsing),
    ("temperature-3.json", Rejected::ByValidation("temperature")),
    ("too-many-stop-strings.json", Rejected::ByValidation("stop")),
    ("top-k-too-large.json", Rejected::ByValidation("top_k")),
    ("top-p-above-one.json", Rejected::ByValidation("top_p")),
    ("top-p-zero.json", Rejected::ByValidation("top_p")),
    ("unknown-field.json", Rejected::ByParsing),
    ("unknown-message-field.json", Rejected::ByParsing),
    ("unknown-role.json", Rejected::ByParsing),
    ("version-2.json", Rejected::ByValidation("version")),
];

#[test]
fn invalid_examples_fail_schema_and_rust() {
    let request = validator("request.schema.json");
    let chunk = validator("chunk.schema.json");
    let reply = validator("reply.schema.json");
    let examples = json_files(&crate_dir().join("examples/invalid"));
    let on_disk: BTreeSet<&str> = examples.iter().map(|(name, _)| name.as_str()).collect();
    let listed: BTreeSet<&str> = INVALID.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        on_disk, listed,
        "examples/invalid/ and INVALID must list the same files"
    );

    for (name, example) in &examples {
        let what = format!("examples/invalid/{name}");
        if name.starts_with("chunk-") {
            assert!(
                !schema_errors(&chunk, example).is_empty(),
                "the chunk schema accepts {what}"
            );
            assert!(!reply.is_valid(example), "the reply schema accepts {what}");
            match serde_json::from_value::<Reply>(example.clone()) {
                Err(_) => continue,
                Ok(r) => panic!("{what} should not parse, got {r:?}"),
            }
        }
        assert!(
            !schema_errors(&request, example).is_empty(),
            "the schema accepts {what}"
        );
        let expected = INVALID
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| *r)
            .expect("listed above");
        let parsed = serde_json::from_value::<Request>(example.clone());
        match (expected, parsed) {
            (Rejected::ByParsing, Err(_)) => {}
            (Rejected::ByParsing, Ok(r)) => panic!("{what} should not parse, got {r:?}"),
            (Rejected::ByValidation(field), Ok(r)) => {
                assert_eq!(r.validate().map_err(|e| e.field), Err(field.to_string()), "{what}");
            }
            (Rejected::ByValidation(_), Err(e)) => panic!("{what} should parse and fail validation, but: {e}"),
        }
    }
}
