//! Reading back what is on a topic: every message up to the end it had when asked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_schemas::{Reply, Response};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::cluster::Cluster;
use crate::unique;

/// A message as read back: key, value and headers (as text), and where it stands.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Cluster {
    /// Every message of partition 0 of `topic` up to its current end, as (key, value, offset).
    pub fn read_all(&self, topic: &str) -> Vec<(String, Vec<u8>, i64)> {
        self.read_records(topic, Some(0))
            .into_iter()
            .map(|r| (r.key, r.value, r.offset))
            .collect()
    }

    /// Every message of partition 0 of `topic` up to its current end, with its headers.
    pub fn read_all_with_headers(&self, topic: &str) -> Vec<Record> {
        self.read_records(topic, Some(0))
    }

    /// Every message of every partition of `topic` up to its current end, as
    /// (partition, key, value, offset), partition by partition in offset order.
    pub fn read_all_partitions(&self, topic: &str) -> Vec<(i32, String, Vec<u8>, i64)> {
        self.read_records(topic, None)
            .into_iter()
            .map(|r| (r.partition, r.key, r.value, r.offset))
            .collect()
    }

    /// Every reply on `topic`, partition by partition in log order; panics on a message that is
    /// not a reply.
    pub fn replies(&self, topic: &str) -> Vec<Reply> {
        self.read_records(topic, None)
            .into_iter()
            .map(|r| serde_json::from_slice(&r.value).unwrap_or_else(|e| panic!("not a reply ({e}): {}", r.key)))
            .collect()
    }

    /// The final responses on `topic`, by request id (chunks are passed over); panics on an
    /// error reply.
    pub fn responses(&self, topic: &str) -> BTreeMap<String, Vec<Response>> {
        responses(self.replies(topic))
    }

    /// The high watermark (the offset the next message will get) of every partition of `topic`,
    /// indexed by partition.
    pub fn high_watermarks(&self, reader: &BaseConsumer, topic: &str) -> Vec<i64> {
        let md = reader
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        assert!(partitions > 0, "topic {topic} has no partitions");
        (0..partitions as i32)
            .map(|p| high_watermark(reader, topic, p))
            .collect()
    }

    /// The messages of one partition of `topic` (or of all of them) up to the end each had when
    /// asked, partition by partition in offset order.
    fn read_records(&self, topic: &str, only: Option<i32>) -> Vec<Record> {
        let c = self.reader(&unique("reader"));
        let highs: Vec<(i32, i64)> = match only {
            Some(p) => vec![(p, high_watermark(&c, topic, p))],
            None => self
                .high_watermarks(&c, topic)
                .into_iter()
                .enumerate()
                .map(|(p, h)| (p as i32, h))
                .collect(),
        };
        let mut tpl = TopicPartitionList::new();
        for (p, _) in &highs {
            tpl.add_partition_offset(topic, *p, Offset::Beginning).expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let total: i64 = highs.iter().map(|(_, h)| h).sum();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (out.len() as i64) < total {
            assert!(
                Instant::now() < deadline,
                "read {} of {total} messages of {topic}",
                out.len()
            );
            let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
                continue;
            };
            // Messages published after the watermarks were read are not asked for.
            let high = highs.iter().find(|(p, _)| *p == m.partition()).map_or(0, |(_, h)| *h);
            if m.offset() >= high {
                continue;
            }
            out.push(record(&m));
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }
}

fn high_watermark(reader: &BaseConsumer, topic: &str, partition: i32) -> i64 {
    reader
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .expect("watermarks")
        .1
}

fn record(m: &impl Message) -> Record {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_string(), x.value.map(text).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    Record {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(text).unwrap_or_default(),
        value: m.payload().unwrap_or_default().to_vec(),
        headers,
    }
}

/// The final responses among `replies`, by request id (chunks are passed over); panics on an
/// error reply.
pub fn responses(replies: impl IntoIterator<Item = Reply>) -> BTreeMap<String, Vec<Response>> {
    let mut out: BTreeMap<String, Vec<Response>> = BTreeMap::new();
    for reply in replies {
        match reply {
            Reply::Response(r) => out.entry(r.id.clone()).or_default().push(r),
            Reply::Error(e) => panic!("{} answered with an error: {:?}", e.id, e.error),
            Reply::Chunk(_) => {}
        }
    }
    out
}
