//! Streaming a generation's text in chunks that survive an interruption and a resume.
//!
//! A sequence's text grows a token at a time, but its tail is not final while a stop string
//! could still complete there: generation stops *before* a stop string, so text that might be
//! its beginning must not reach a client yet. [`Release`] holds back the last
//! `longest stop string - 1` bytes (moved down to a character boundary) until the generation
//! finishes, and then releases everything that is left of the final, stop-truncated text.
//!
//! Each chunk is numbered by the step that released it: step `n` is the one taken with `n`
//! tokens generated before it. The amount released depends only on the text, so a generation
//! resumed from a snapshot of `k` tokens re-derives exactly what the interrupted run had released
//! after step `k - 1`, and its step `n` releases exactly the bytes the original step `n` did. A
//! client that keeps the highest chunk number it has seen and appends only chunks numbered higher
//! therefore rebuilds the final text, however often chunks were sent again.
//!
//! The limit: a deadline ends a generation where it is. If a resumed run (after a crash that lost
//! tokens) hits its deadline before it regains the point the interrupted run had streamed to, the
//! final text is shorter than what that client already holds; the reply is authoritative.

/// A piece of a generation's text for a streaming client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    /// The step that released this text (the number of tokens generated before it). Strictly
    /// increasing within a run; a resumed run repeats the numbers of the steps it repeats, with
    /// the same text.
    pub seq: u32,
    /// The text newly released by that step; never empty.
    pub text: String,
}

/// How much of a generation's text has been released to the stream.
///
/// Invariant: `released` is a character boundary of the text, and the text never shrinks below
/// it. Text grows only at its end, and a stop string found by a step ends inside the text that
/// step added, so it starts at or after `old length - (longest - 1)`, which is never below what
/// was released before that step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Bytes held back at the end of unfinished text: the longest stop string's length, less one.
    hold: usize,
    /// Bytes of the text released so far.
    released: usize,
}

impl Release {
    /// Nothing released yet, for a generation that stops before any of `stop`.
    pub fn new(stop: &[String]) -> Self {
        let longest = stop.iter().map(String::len).max().unwrap_or(0);
        Self {
            hold: longest.saturating_sub(1),
            released: 0,
        }
    }

    /// What a generation that has (unfinished) `text` so far has released: the same amount the
    /// uninterrupted run had released when its text was `text`.
    pub fn resumed(stop: &[String], text: &str) -> Self {
        let mut release = Self::new(stop);
        release.released = release.safe(text);
        release
    }

    /// Bytes of the text released so far.
    pub fn released(&self) -> usize {
        self.released
    }

    /// The longest prefix of unfinished `text` that no stop string can still reach into.
    fn safe(&self, text: &str) -> usize {
        let mut at = text.len().saturating_sub(self.hold);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    }

    /// The text newly releasable from `text` (the generation's text so far); all of what is left
    /// once the generation has `finished`.
    pub fn advance<'t>(&mut self, text: &'t str, finished: bool) -> &'t str {
        let to = if finished { text.len() } else { self.safe(text) };
        // The invariant makes `released <= to` and a boundary; `get` keeps a broken caller from
        // panicking the engine thread (it would stream nothing rather than a wrong slice).
        let new = text.get(self.released..to).unwrap_or_default();
        self.released = self.released.max(to);
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// Feeds successive texts (the last one final) and collects the chunks, as a sequence would.
    fn stream(stop: &[String], texts: &[&str]) -> Vec<String> {
        let mut r = Release::new(stop);
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| r.advance(t, i + 1 == texts.len()).to_string())
            .collect()
    }

    #[test]
    fn without_stops_everything_is_released_at_once() {
        assert_eq!(stream(&[], &["a", "ab", "abc"]), ["a", "b", "c"]);
    }

    #[test]
    fn a_stop_string_split_across_steps_is_never_streamed() {
        // The text grows "Hello E", "Hello EN", then "Hello END" is found and truncated.
        let stop = stops(&["END"]);
        let chunks = stream(&stop, &["Hello E", "Hello EN", "Hello "]);
        assert_eq!(chunks.concat(), "Hello ");
        for (i, c) in chunks.iter().enumerate() {
            assert!(
                !c.contains('E') && !c.contains('N'),
                "chunk {i} {c:?} leaks the stop string"
            );
        }
        // "E" and then "EN" are held back while they could still become "END".
        assert_eq!(chunks, ["Hello", " ", ""]);
    }

    #[test]
    fn the_hold_back_moves_down_to_a_character_boundary() {
        let stop = stops(&["xyz"]);
        let mut r = Release::new(&stop);
        // "éa" is 3 bytes; releasing all but 2 would cut "é" in half, so nothing goes out.
        assert_eq!(r.advance("éa", false), "");
        assert_eq!(r.advance("éab", false), "é");
        assert_eq!(r.advance("éabc", false), "a");
        assert_eq!(r.released(), 3);
        // Released text is never taken back, even for a text shorter than it (which a sequence
        // never passes).
        assert_eq!(r.advance("éa", false), "");
        assert_eq!(r.released(), 3);
        assert_eq!(r.advance("éabc", true), "bc");
    }

    #[test]
    fn chunks_concatenate_to_the_final_text() {
        let stop = stops(&["</s>", "\n\n"]);
        let full = "Grüße, 世界! one two\nthree";
        // Grow it a character at a time, as a decoder would release it.
        let mut texts: Vec<&str> = full.char_indices().skip(1).map(|(i, _)| &full[..i]).collect();
        texts.push(full);
        assert_eq!(stream(&stop, &texts).concat(), full);
    }

    #[test]
    fn a_resumed_release_picks_up_where_the_original_was() {
        let stop = stops(&["STOP"]);
        let texts = [
            "The",
            "The quick",
            "The quick brown",
            "The quick brown fox",
            "The quick brown fox",
        ];
        let original = stream(&stop, &texts);
        for k in 1..texts.len() - 1 {
            // Resumed with the text after step k - 1; steps k onwards re-emit the same chunks.
            let mut r = Release::resumed(&stop, texts[k - 1]);
            let rest: Vec<String> = texts[k..]
                .iter()
                .enumerate()
                .map(|(i, t)| r.advance(t, k + i + 1 == texts.len()).to_string())
                .collect();
            assert_eq!(rest, original[k..], "resumed after step {}", k - 1);
        }
    }
}
