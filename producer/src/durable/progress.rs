//! What the application sees of one request: the text streamed so far, then the outcome.
//!
//! [`StreamText`] is the resume-safe chunk rule of the reply contract (`ferry_schemas::Chunk`):
//! keep the highest `seq` seen and append a chunk's text only when its seq is higher, which
//! drops the chunks a resumed generation sends again and the duplicates of a redelivered
//! request. [`Events`] turns the growing text into deltas for any number of readers, each at its
//! own pace, without a buffer per reader: the text lives once, in a `watch` channel, and each
//! reader remembers how much of it it has handed out.

use ferry_schemas::Reply;
use futures::Stream;
use tokio::sync::watch;

/// The text of a streamed answer, assembled from chunks that may come more than once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamText {
    text: String,
    /// The highest seq appended; `None` before the first chunk.
    last_seq: Option<u32>,
}

impl StreamText {
    /// Appends `text` if `seq` is above every seq seen so far; returns whether it did.
    pub fn push(&mut self, seq: u32, text: &str) -> bool {
        if self.last_seq.is_some_and(|last| seq <= last) {
            return false;
        }
        self.last_seq = Some(seq);
        self.text.push_str(text);
        true
    }

    /// Brings the text to the final response's text, which is authoritative: when the chunks so
    /// far are a prefix of it (always, if the worker keeps the contract), the rest is appended,
    /// so the streamed text ends equal to the answer even when the request did not stream.
    /// Returns false, and changes nothing, when they are not.
    pub fn finish(&mut self, final_text: &str) -> bool {
        if !final_text.starts_with(&self.text) {
            return false;
        }
        self.text.replace_range(.., final_text);
        true
    }

    /// The text so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A final reply: a response or an error.
    Reply(Reply),
    /// The deadline passed with no final reply.
    Expired {
        id: String,
        /// Milliseconds since the Unix epoch.
        deadline_ms: i64,
    },
}

impl Outcome {
    /// The request's id.
    pub fn id(&self) -> &str {
        match self {
            Outcome::Reply(reply) => reply.id(),
            Outcome::Expired { id, .. } => id,
        }
    }

    /// The outcome as one JSON object: the reply itself, or `{"kind": "expired", ...}` in the
    /// same shape (`ferry request --fan-out` prints these, one per line).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Outcome::Reply(reply) => serde_json::to_value(reply).unwrap_or_default(),
            Outcome::Expired { id, deadline_ms } => {
                serde_json::json!({"kind": "expired", "id": id, "deadline_ms": deadline_ms})
            }
        }
    }
}

/// The state a request's readers watch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    pub stream: StreamText,
    /// Set once, when the outcome is in the journal.
    pub outcome: Option<Outcome>,
}

/// One step of a request as [`Events`] hands it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text of a streamed answer. The deltas of a response concatenate to its text.
    Text(String),
    /// The outcome; the last event.
    Done(Outcome),
}

/// A request's events: text deltas as they arrive, then [`Event::Done`]. A reader that starts
/// late gets the text so far as its first delta.
#[derive(Debug)]
pub struct Events {
    progress: watch::Receiver<Progress>,
    /// Bytes of the text already handed out; always at a character boundary, because the text
    /// only grows by whole strings (or is replaced by a final text it is a prefix of).
    given: usize,
    done: bool,
}

impl Events {
    pub(crate) fn new(progress: watch::Receiver<Progress>) -> Self {
        Events {
            progress,
            given: 0,
            done: false,
        }
    }

    /// The next event; `None` after [`Event::Done`], or when the request was forgotten or the
    /// client stopped before an outcome.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            {
                let progress = self.progress.borrow_and_update();
                let text = progress.stream.text();
                if text.len() > self.given {
                    let delta = text.get(self.given..).unwrap_or_default().to_string();
                    self.given = text.len();
                    return Some(Event::Text(delta));
                }
                if let Some(outcome) = &progress.outcome {
                    self.done = true;
                    return Some(Event::Done(outcome.clone()));
                }
            }
            if self.progress.changed().await.is_err() {
                self.done = true;
                return None;
            }
        }
    }

    /// The same events as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Event> {
        futures::stream::unfold(self, |mut events| async move {
            let event = events.next().await?;
            Some((event, events))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_stream_drops_what_it_already_has() {
        // A worker sends steps 0..=3, dies, and the next resumes from its snapshot at step 2:
        // steps 2 and 3 come again, with the same text, then the rest. Seqs have gaps where a
        // step released no text.
        let mut s = StreamText::default();
        let sent = [
            (0, "Once"),
            (1, " upon"),
            (3, " a"),
            (5, " time"),
            (3, " a"),
            (5, " time"),
            (6, ","),
        ];
        let appended: Vec<bool> = sent.iter().map(|(seq, text)| s.push(*seq, text)).collect();
        assert_eq!(appended, [true, true, true, true, false, false, true]);
        assert_eq!(s.text(), "Once upon a time,");
    }

    #[test]
    fn a_chunk_older_than_the_newest_is_dropped_even_when_unseen() {
        // Chunks of one key stay in order on a partition; a lower seq after a higher one can only
        // be a redelivered request starting over, whose text the higher seq already covers.
        let mut s = StreamText::default();
        assert!(s.push(4, "abc"));
        assert!(!s.push(2, "x"));
        assert_eq!(s.text(), "abc");
    }

    #[test]
    fn the_final_text_completes_the_stream_when_it_extends_it() {
        let mut s = StreamText::default();
        s.push(0, "Hello");
        assert!(s.finish("Hello, world"));
        assert_eq!(s.text(), "Hello, world");
        let mut unstreamed = StreamText::default();
        assert!(unstreamed.finish("all at once"));
        assert_eq!(unstreamed.text(), "all at once");
        let mut broken = StreamText::default();
        broken.push(0, "Goodbye");
        assert!(!broken.finish("Hello"));
        assert_eq!(broken.text(), "Goodbye");
    }

    fn expired(id: &str) -> Outcome {
        Outcome::Expired {
            id: id.into(),
            deadline_ms: 7,
        }
    }

    #[tokio::test]
    async fn events_give_deltas_then_the_outcome_and_a_late_reader_catches_up() {
        let (tx, rx) = watch::channel(Progress::default());
        let mut early = Events::new(rx.clone());
        tx.send_modify(|p| {
            p.stream.push(0, "ab");
        });
        assert_eq!(early.next().await, Some(Event::Text("ab".into())));
        tx.send_modify(|p| {
            p.stream.push(1, "c");
            p.stream.push(1, "c");
            p.stream.push(2, "dé");
        });
        assert_eq!(early.next().await, Some(Event::Text("cdé".into())));
        let mut late = Events::new(rx);
        tx.send_modify(|p| p.outcome = Some(expired("r")));
        assert_eq!(late.next().await, Some(Event::Text("abcdé".into())));
        assert_eq!(late.next().await, Some(Event::Done(expired("r"))));
        assert_eq!(late.next().await, None);
        assert_eq!(early.next().await, Some(Event::Done(expired("r"))));
    }

    #[tokio::test]
    async fn events_end_when_the_request_is_dropped() {
        let (tx, rx) = watch::channel(Progress::default());
        let mut events = Events::new(rx);
        drop(tx);
        assert_eq!(events.next().await, None);
    }

    #[test]
    fn an_expired_outcome_prints_like_a_reply() {
        assert_eq!(
            expired("r").to_json(),
            serde_json::json!({"kind": "expired", "id": "r", "deadline_ms": 7})
        );
    }
}
