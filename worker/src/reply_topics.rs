//! Which topics a request may name as its `reply_to`.
//!
//! Anyone who can write a request topic chooses where the worker writes its answer, so the
//! worker would otherwise write into any topic it may write: another caller's reply topic (a
//! forged answer under that caller's id), the callers' journal (an entry of another caller
//! erased by compaction), internal topics. [`ReplyTopicPolicy`] refuses, before any compute:
//!
//! - internal topics: Kafka's (`__consumer_offsets`, `__transaction_state`), and by the
//!   convention that tools beside Kafka follow, anything starting `_` (Schema Registry's
//!   `_schemas`, Confluent's `_confluent-*`, ksqlDB's), and Kafka Connect's default
//!   `connect-configs`, `connect-offsets` and `connect-status`;
//! - the fleet's own topics: every request topic, its dead-letter topic, the fallback topic and
//!   its dead-letter topic, the callers' journal topic (`--journal-topic`);
//! - on a shared cluster, every topic outside `--reply-topic-allow` (prefixes, or `re:` and a
//!   regular expression that must match the whole name). The worker's own `--reply-topic` is
//!   always allowed.
//!
//! The limit: the policy says where answers may go, not who may ask. Tenants that must not
//! read or forge each other's answers need a request topic (and a fleet, or at least an
//! allow-list) each, with Kafka ACLs that let a tenant write only its own request topic and read
//! only its own reply topics (README, "Sharing a cluster between tenants").
//!
//! Pure: no I/O.

use std::collections::HashSet;

use regex::Regex;

/// Kafka Connect's default internal topics (`config.storage.topic` and the others).
const CONNECT_TOPICS: [&str; 3] = ["connect-configs", "connect-offsets", "connect-status"];

/// One `--reply-topic-allow` entry.
#[derive(Debug, Clone)]
pub enum Allow {
    /// Topics whose name starts with this.
    Prefix(String),
    /// Topics whose whole name matches this.
    Pattern(Regex),
}

impl Allow {
    /// `re:<regex>` is a pattern (anchored at both ends), anything else a prefix.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(re) = s.strip_prefix("re:") {
            let anchored = format!("^(?:{re})$");
            return Regex::new(&anchored)
                .map(Allow::Pattern)
                .map_err(|e| format!("--reply-topic-allow {s:?}: not a regular expression: {e}"));
        }
        if s.is_empty() {
            return Err("--reply-topic-allow: an entry is empty".into());
        }
        Ok(Allow::Prefix(s.to_string()))
    }

    fn allows(&self, topic: &str) -> bool {
        match self {
            Allow::Prefix(p) => topic.starts_with(p.as_str()),
            Allow::Pattern(re) => re.is_match(topic),
        }
    }
}

/// Where a worker may publish answers.
#[derive(Debug, Clone)]
pub struct ReplyTopicPolicy {
    /// Topics no request may name: the fleet's own.
    forbidden: HashSet<String>,
    /// When not empty, a reply topic must match one of these (or be `default`).
    allow: Vec<Allow>,
    /// The worker's `--reply-topic`, for requests that name none.
    default: String,
}

impl ReplyTopicPolicy {
    /// `own` are the fleet's topics (request, dead-letter, fallback, journal).
    pub fn new(default: &str, own: impl IntoIterator<Item = String>, allow: Vec<Allow>) -> Self {
        Self {
            forbidden: own.into_iter().collect(),
            allow,
            default: default.to_string(),
        }
    }

    /// `Ok` when the worker may answer on `topic`, else why not (for the dead letter).
    pub fn check(&self, topic: &str) -> Result<(), String> {
        if topic.starts_with('_') || CONNECT_TOPICS.contains(&topic) {
            return Err(format!(
                "the reply topic {topic:?} is internal to Kafka or to a tool beside it"
            ));
        }
        if self.forbidden.contains(topic) {
            return Err(format!(
                "the reply topic {topic:?} is one of this fleet's own topics (requests, dead letters, fallback or journal)"
            ));
        }
        if topic == self.default || self.allow.is_empty() || self.allow.iter().any(|a| a.allows(topic)) {
            return Ok(());
        }
        Err(format!(
            "the reply topic {topic:?} is not allowed by this worker's --reply-topic-allow"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Vec<String> {
        [
            "ferry.requests",
            "ferry.requests.dlq",
            "ferry.fallback",
            "ferry.callers",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn internal_and_own_topics_are_refused() {
        let p = ReplyTopicPolicy::new("ferry.replies", own(), Vec::new());
        for t in [
            "__consumer_offsets",
            "__transaction_state",
            "__anything",
            "_schemas",
            "_confluent-command",
            "_confluent-ksql-default__command_topic",
            "connect-configs",
            "connect-offsets",
            "connect-status",
        ] {
            assert!(p.check(t).expect_err(t).contains("internal"), "{t}");
        }
        for t in own() {
            assert!(p.check(&t).is_err(), "{t}");
        }
        assert_eq!(p.check("ferry.replies"), Ok(()));
        assert_eq!(p.check("my-app.replies"), Ok(()), "no allow-list: any other topic");
    }

    #[test]
    fn an_allow_list_keeps_tenants_to_their_topics() {
        let allow = vec![
            Allow::parse("tenant-a.").expect("prefix"),
            Allow::parse(r"re:tenant-b\.replies\.[0-9]+").expect("regex"),
        ];
        let p = ReplyTopicPolicy::new("ferry.replies", own(), allow);
        assert_eq!(p.check("tenant-a.replies"), Ok(()));
        assert_eq!(p.check("tenant-b.replies.7"), Ok(()));
        assert!(
            p.check("tenant-b.replies.7x").is_err(),
            "the pattern matches the whole name"
        );
        assert!(p.check("xtenant-b.replies.7").is_err());
        assert!(p.check("tenant-c.replies").is_err());
        assert_eq!(p.check("ferry.replies"), Ok(()), "the worker's own reply topic");
        assert!(Allow::parse("re:(").is_err());
        assert!(Allow::parse(" ").is_err());
    }
}
