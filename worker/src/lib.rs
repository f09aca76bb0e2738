//! Ferry's worker: consumes generation requests from Kafka, answers them with a local LLM, and
//! commits each request's offset only once its answer is safely published.
//!
//! # Layout
//!
//! Data flows top to bottom:
//!
//! - [`config`]: every setting, from flags or `FERRY_*` environment variables, validated once.
//! - [`consumer`]: the Kafka loop. Reads a message, runs it through [`intake`], hands it to the
//!   engine, publishes the reply or dead-letter record, waits for the broker's acknowledgement,
//!   and only then commits the offset.
//! - [`intake`]: bytes to a valid [`ferry_schemas::Request`], or the reason it is not one.
//! - [`engine`]: request to prompt tokens, and the generation loop with sampling and stop rules,
//!   run on a thread of its own.
//! - [`model`]: the GGUF model: our llama forward pass with an explicit per-sequence KV cache,
//!   the tokenizer and the chat template.
//! - [`snapshot`]: periodic KV-cache snapshots to a durable store, and resuming from them.
//! - [`reply`]: building the reply and dead-letter messages, cut to fit one Kafka record.
//! - [`reply_topics`]: which reply topics a request may name.
//! - [`offsets`]: the commit position of a partition when requests finish out of order.
//! - [`ops`]: what operators see: `/healthz`, `/readyz`, `/metrics`, JSON logs, trace context,
//!   and the accelerator health monitor and circuit breaker that drain and restart the worker.

pub mod config;
pub mod consumer;
pub mod engine;
pub mod intake;
pub mod model;
pub mod offsets;
pub mod ops;
pub mod reply;
pub mod reply_topics;
pub mod snapshot;

/// Ferry's quantised matrix products, re-exported so that tests and benches can name a path.
pub use ferry_kernels as kernels;

/// Checks of the layout that the compiler does not make (see `ARCHITECTURE.md`).
#[cfg(test)]
mod tidy {
    use std::path::{Path, PathBuf};

    /// Every `.rs` file under `dir`.
    fn sources(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("a source folder") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                out.extend(sources(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
        out
    }

    /// The path that starts `text`: words and `::`, and `{...}` groups (which may span lines).
    fn path_at(text: &str) -> &str {
        let mut depth = 0usize;
        for (i, c) in text.char_indices() {
            let ends = match c {
                '{' => {
                    depth += 1;
                    false
                }
                '}' if depth > 0 => {
                    depth -= 1;
                    false
                }
                c if c.is_alphanumeric() || c == '_' || c == ':' => false,
                ',' | ' ' | '\n' | '\t' | '*' => depth == 0,
                _ => true,
            };
            if ends {
                return &text[..i];
            }
        }
        text
    }

    /// The model and the engine know nothing of persistence, Kafka, settings or operations: the
    /// engine offers state through its own `Checkpoint` hook, which `snapshot/` implements.
    #[test]
    fn model_and_engine_import_nothing_from_the_layers_above() {
        // Read at run time, so a binary built in another clone reads this clone's files.
        let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("src");
        let forbidden = ["snapshot", "consumer", "config", "ops", "intake", "reply", "offsets"];
        let mut found = Vec::new();
        for layer in ["model", "engine"] {
            let files = sources(&root.join(layer));
            assert!(!files.is_empty(), "no sources under {layer}/");
            for file in files {
                let text = std::fs::read_to_string(&file).expect("readable");
                // Each path from `crate::`, `use` groups included (across lines), names a
                // module above if any of its words is one.
                for (at, _) in text.match_indices("crate::") {
                    let words: Vec<&str> = path_at(&text[at..])
                        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .collect();
                    if let Some(module) = forbidden.iter().find(|m| words.contains(m)) {
                        let line = text[..at].lines().count();
                        found.push(format!("{}:{line}: crate::{module}", file.display()));
                    }
                }
            }
        }
        assert!(
            found.is_empty(),
            "model/ or engine/ imports a layer above it:\n{}",
            found.join("\n")
        );
    }

    /// Every record the worker writes goes through the publisher's gate
    /// (`consumer/publish/gate.rs`): no other file makes a Kafka record, except the transaction's
    /// replay of records that came through the gate before.
    #[test]
    fn only_the_gate_makes_kafka_records() {
        let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("src");
        let allowed = [
            root.join("consumer/publish/gate.rs"),
            root.join("consumer/transaction.rs"),
        ];
        let mut found = Vec::new();
        let mut in_gate = 0;
        for file in sources(&root) {
            let text = std::fs::read_to_string(&file).expect("readable");
            // Spelled in two halves, so that this file does not match itself.
            for (kind, how) in [("FutureRecord", "::to"), ("BaseRecord", "::to"), ("FutureRecord", " {")] {
                let marker = format!("{kind}{how}");
                let n = text.matches(&marker).count();
                if n == 0 {
                    continue;
                }
                if allowed.contains(&file) {
                    in_gate += n;
                } else {
                    found.push(format!("{}: {marker}", file.display()));
                }
            }
        }
        assert!(
            in_gate > 0,
            "the gate itself makes no record: is this test still looking?"
        );
        assert!(found.is_empty(), "records made outside the gate:\n{}", found.join("\n"));
    }
}
