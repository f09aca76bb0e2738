//! The prompts a load test sends: templates read from JSON lines, each a request without its `id`.
//!
//! A template line is any request body of the contract (`schemas/request.schema.json`) minus the
//! `id`: `messages` or `prompt`, and optionally `max_tokens`, `temperature`, `top_p`, `top_k`,
//! `seed`, `stop`, `metadata` and the rest. The load generator fills in the id, the reply topic,
//! `stream`, and a seed when the template has none, so a sampled answer is reproducible from the
//! request alone (the chaos harness compares it with the uninterrupted reference).
//!
//! The shipped set (`loadtest/prompts.jsonl`) mixes chat questions, instructions, multi-turn
//! chats, raw-text continuations, short and long prompts, stop strings and sampled requests, with
//! `max_tokens` between 16 and 96, so a CPU worker answers each in a few seconds.

use std::path::Path;

use anyhow::{bail, Context};
use ferry_schemas::Request;
use serde_json::Value;

/// The shipped prompt set, compiled into the binary.
const DEFAULT_SET: &str = include_str!("../prompts.jsonl");

/// The id a template carries while it is checked and stored; replaced by every built request.
const TEMPLATE_ID: &str = "template";

/// One prompt: a valid request whose id, reply topic, `stream` and (when absent) seed are filled
/// in per request.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTemplate {
    request: Request,
    /// 1-based line number in its file, for messages about it.
    line: usize,
}

impl PromptTemplate {
    /// The template as a request with a placeholder id.
    pub fn as_request(&self) -> &Request {
        &self.request
    }

    /// The line of the file it came from, counting from 1.
    pub fn line(&self) -> usize {
        self.line
    }

    /// Whether it is a chat (`messages`) rather than raw text (`prompt`).
    pub fn is_chat(&self) -> bool {
        self.request.messages.is_some()
    }

    /// Whether it samples (a temperature above 0) rather than decoding greedily.
    pub fn is_sampled(&self) -> bool {
        self.request.temperature.is_some_and(|t| t > 0.0)
    }
}

/// An ordered set of prompt templates, never empty.
#[derive(Debug, Clone)]
pub struct PromptSet {
    templates: Vec<PromptTemplate>,
}

impl PromptSet {
    /// The set shipped with the load generator (`loadtest/prompts.jsonl`).
    pub fn default_set() -> PromptSet {
        Self::parse(DEFAULT_SET).expect("the shipped prompt set is valid: a unit test parses every line")
    }

    /// Reads a set from a JSON-lines file; blank lines and lines starting with `#` are skipped.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<PromptSet> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read prompts from {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid prompt file {}", path.display()))
    }

    /// Parses JSON lines of templates; every line must make a valid request.
    pub fn parse(text: &str) -> anyhow::Result<PromptSet> {
        let mut templates = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let request = parse_template(trimmed).with_context(|| format!("line {line_no}"))?;
            templates.push(PromptTemplate { request, line: line_no });
        }
        if templates.is_empty() {
            bail!("no prompts: every line is blank or a comment");
        }
        Ok(PromptSet { templates })
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Always false: a set holds at least one prompt. Here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// Template `i`. Panics when `i >= len()`, like slice indexing.
    pub fn get(&self, i: usize) -> &PromptTemplate {
        &self.templates[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &PromptTemplate> {
        self.templates.iter()
    }

    /// The request for template `i` with this id and reply topic. `seed` is used only when the
    /// template has none of its own, so a template's explicit seed always wins. `stream` is set
    /// when either the caller or the template asks for it.
    pub fn request(&self, i: usize, id: String, seed: u64, stream: bool, reply_to: &str) -> Request {
        let mut request = self.get(i).request.clone();
        request.id = id;
        request.reply_to = Some(reply_to.to_string());
        request.stream |= stream;
        request.seed.get_or_insert(seed);
        request
    }
}

/// Parses one template line: a JSON object without `id` that makes a valid request once an id
/// is added.
fn parse_template(line: &str) -> anyhow::Result<Request> {
    let mut value: Value = serde_json::from_str(line).context("not JSON")?;
    let Some(object) = value.as_object_mut() else {
        bail!("a template must be a JSON object");
    };
    if object.contains_key("id") {
        bail!("a template must not have an `id`: the load generator gives each request its own");
    }
    object.insert("id".into(), Value::String(TEMPLATE_ID.into()));
    let request: Request = serde_json::from_value(value).context("not a request")?;
    request.validate().context("not a valid request")?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_line_is_a_valid_template() {
        for (i, line) in DEFAULT_SET.lines().enumerate() {
            let request = parse_template(line).unwrap_or_else(|e| panic!("line {}: {e:#}", i + 1));
            let max = request
                .max_tokens
                .unwrap_or_else(|| panic!("line {}: no max_tokens", i + 1));
            assert!((16..=96).contains(&max), "line {}: max_tokens {max}", i + 1);
        }
    }

    #[test]
    fn shipped_set_is_large_and_varied() {
        let set = PromptSet::default_set();
        assert!(set.len() >= 100, "{} prompts", set.len());
        let chats = set.iter().filter(|t| t.is_chat()).count();
        let raw = set.len() - chats;
        let sampled = set.iter().filter(|t| t.is_sampled()).count();
        let seeded = set
            .iter()
            .filter(|t| t.is_sampled() && t.as_request().seed.is_some())
            .count();
        let with_stop = set.iter().filter(|t| !t.as_request().stop.is_empty()).count();
        let with_system = set
            .iter()
            .filter(|t| {
                t.as_request()
                    .messages
                    .as_ref()
                    .is_some_and(|m| m.iter().any(|m| m.role == ferry_schemas::Role::System))
            })
            .count();
        let multi_turn = set
            .iter()
            .filter(|t| t.as_request().messages.as_ref().is_some_and(|m| m.len() >= 3))
            .count();
        for (what, n) in [
            ("chats", chats),
            ("raw prompts", raw),
            ("sampled", sampled),
            ("sampled with their own seed", seeded),
            ("sampled without a seed", sampled - seeded),
            ("with stop strings", with_stop),
            ("with a system prompt", with_system),
            ("multi-turn", multi_turn),
        ] {
            assert!(n >= 5, "only {n} {what}");
        }
        let lengths: Vec<usize> = set
            .iter()
            .map(|t| serde_json::to_string(t.as_request()).map_or(0, |s| s.len()))
            .collect();
        let (short, long) = (lengths.iter().min(), lengths.iter().max());
        assert!(
            matches!((short, long), (Some(&s), Some(&l)) if l > 4 * s),
            "{short:?} {long:?}"
        );
    }

    #[test]
    fn built_requests_are_valid_and_keep_explicit_seeds() {
        let set = PromptSet::default_set();
        for i in 0..set.len() {
            let r = set.request(i, format!("lt-{i:05}"), 1000 + i as u64, i % 2 == 0, "ferry.replies");
            assert_eq!(r.validate(), Ok(()), "prompt {i}");
            assert_eq!(r.id, format!("lt-{i:05}"));
            assert_eq!(r.reply_to.as_deref(), Some("ferry.replies"));
            assert_eq!(r.stream, i % 2 == 0);
            let expected = set.get(i).as_request().seed.unwrap_or(1000 + i as u64);
            assert_eq!(r.seed, Some(expected), "prompt {i}");
        }
    }

    #[test]
    fn bad_lines_are_refused_with_their_line_number() {
        for (text, needle) in [
            ("{\"prompt\":\"a\"}\n{\"id\":\"x\",\"prompt\":\"b\"}", "line 2"),
            ("{\"prompt\":\"a\",\"max_tokens\":0}", "line 1"),
            ("{\"prompt\":\"a\",\"max_token\":3}", "line 1"),
            ("[1,2]", "line 1"),
            ("# only a comment\n\n", "no prompts"),
        ] {
            let err = PromptSet::parse(text).map(|s| s.len()).map_err(|e| format!("{e:#}"));
            assert!(matches!(&err, Err(e) if e.contains(needle)), "{text}: {err:?}");
        }
    }

    #[test]
    fn from_file_reads_comments_and_blank_lines() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "# two prompts\n{\"prompt\":\"Once\"}\n\n{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n",
        )?;
        let set = PromptSet::from_file(&path)?;
        assert_eq!(set.len(), 2);
        assert_eq!(set.get(1).line(), 4);
        assert!(set.get(1).is_chat());
        Ok(())
    }
}
