//! One generation, as a state machine that advances a token at a time.
//!
//! A [`Sequence`] owns everything that belongs to one request's generation: the prompt and
//! generated token ids, its KV cache, the logits for the next position, and the text so far.
//! The compute is split from the bookkeeping so that the engine can batch several sequences'
//! compute into one forward pass:
//!
//! - [`Sequence::next_input`] says what the cache lacks next: a chunk of the prompt, or one
//!   generated token (the one just emitted, or one replayed on a resume);
//! - [`Sequence::accept_logits`] takes the logits of the pass that fed it;
//! - [`Sequence::emit`] samples the next token from those logits, with no compute.
//!
//! [`Sequence::step`] does all three for a caller with one sequence: it emits one token and
//! computes the logits for the next. Each emitted token hands back the text it released to the
//! stream (see [`super::stream`]).
//!
//! Invariant: a cache is built the same way whatever the schedule, so that a sequence's answer
//! does not depend on how its work was interleaved or batched, or whether it was resumed: the
//! prompt goes in chunks of exactly [`PREFILL_CHUNK`] tokens from position 0, and every
//! generated token on its own. Once caught up (`cache.len() == prompt.len() + generated.len()`),
//! `next_logits` are the model's logits for the position after the last token, until the next
//! token is emitted.

use std::time::{Duration, Instant};

use ferry_schemas::FinishReason;

use super::sampler::{sample, SamplingParams};
use super::stream::{Release, StreamChunk};
use crate::model::{BatchInput, IncrementalDecoder, Model, ModelError, SequenceCache};

/// Prompt tokens per forward pass of a prefill. A constant, not a setting: the chunking changes
/// the bits of the cache (attention sums in other shapes), and a snapshot taken by one worker
/// must resume token-exactly on another. 64 keeps a long prompt from stalling the sequences
/// decoding beside it for more than about one prefill chunk's compute per token.
pub const PREFILL_CHUNK: usize = 64;

/// What a sequence needs to know about its request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Generation stops before the first of these strings; it is not part of the text.
    pub stop: Vec<String>,
}

/// Why and how a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    /// The stop string that ended it, if one did.
    pub stop_sequence: Option<String>,
}

/// The result of a finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Generated token ids, the end-of-sequence token excluded.
    pub tokens: Vec<u32>,
    pub prefill: Duration,
    pub decode: Duration,
    /// Generated tokens the sequence was resumed with (from a snapshot, or replayed from its
    /// tokens); `None` when it started afresh. What the reply's `resumed_from_token` says.
    pub resumed_from: Option<u32>,
}

/// A generation in progress.
#[derive(Debug)]
pub struct Sequence {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    cache: SequenceCache,
    next_logits: Option<Vec<f32>>,
    params: GenerationParams,
    decoder: IncrementalDecoder,
    /// Text of the tokens the decoder has released so far.
    text: String,
    /// How much of `text` has gone to the stream.
    stream: Release,
    finish: Option<Finish>,
    /// When the sequence was made: prefill time runs from here to its first logits.
    started: Instant,
    /// When it first caught up; decode time runs from here to its finish.
    prefilled_at: Option<Instant>,
    prefill_time: Duration,
    decode_time: Duration,
    /// Tokens taken as generated when the sequence was made ([`Completion::resumed_from`]).
    resumed_from: Option<u32>,
}

impl Sequence {
    pub fn new(model: &Model, prompt: Vec<u32>, params: GenerationParams) -> Self {
        Self {
            prompt,
            generated: Vec::new(),
            cache: SequenceCache::new(&model.weights.config),
            next_logits: None,
            stream: Release::new(&params.stop),
            params,
            decoder: IncrementalDecoder::default(),
            text: String::new(),
            finish: None,
            started: Instant::now(),
            prefilled_at: None,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
            resumed_from: None,
        }
    }

    /// Continues a generation from a snapshot: `tokens` were generated before the interruption,
    /// and `cache`, when given, holds the KV of every position but the last generated token's
    /// (the snapshot invariant). Without a cache, the prompt is prefilled and the tokens fed one
    /// at a time, exactly as the interrupted run computed them, so both ways continue with
    /// bit-identical logits. Computes at once; [`Sequence::restore`] leaves that to the caller.
    pub fn resume(
        model: &Model,
        prompt: Vec<u32>,
        params: GenerationParams,
        tokens: Vec<u32>,
        cache: Option<SequenceCache>,
    ) -> Result<Self, ModelError> {
        let mut seq = Self::restore(model, prompt, params, tokens, cache)?;
        seq.prefill(model)?;
        Ok(seq)
    }

    /// [`Sequence::resume`] without the compute: the positions the cache lacks are fed by
    /// [`Sequence::next_input`] like a prompt, so the engine can batch them with other work.
    pub fn restore(
        model: &Model,
        prompt: Vec<u32>,
        params: GenerationParams,
        tokens: Vec<u32>,
        cache: Option<SequenceCache>,
    ) -> Result<Self, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Internal(
                "resuming needs at least one generated token".into(),
            ));
        }
        let mut seq = Self::new(model, prompt, params);
        if let Some(cache) = cache {
            let expected = seq.prompt.len() + tokens.len() - 1;
            if cache.len() != expected {
                return Err(ModelError::Internal(format!(
                    "snapshot cache holds {} positions, expected {expected}",
                    cache.len()
                )));
            }
            seq.cache = cache;
        }
        seq.replay(model, tokens)?;
        Ok(seq)
    }

    /// A generation that produced `tokens` (none, for a fresh request), with its text rebuilt and
    /// no compute done yet. For a request whose deadline passed before it was started, so that
    /// [`finish_now`](Self::finish_now) still answers with the text its snapshot had reached.
    pub fn from_tokens(
        model: &Model,
        prompt: Vec<u32>,
        params: GenerationParams,
        tokens: Vec<u32>,
    ) -> Result<Self, ModelError> {
        let mut seq = Self::new(model, prompt, params);
        seq.replay(model, tokens)?;
        Ok(seq)
    }

    /// Takes `tokens` as generated: rebuilds the text exactly as it was released, token by token,
    /// and what of it had gone to the stream.
    fn replay(&mut self, model: &Model, tokens: Vec<u32>) -> Result<(), ModelError> {
        for n in 1..=tokens.len() {
            let delta = self.decoder.next(&model.tokenizer, &tokens[..n])?.unwrap_or_default();
            self.text.push_str(&delta);
        }
        self.resumed_from = (!tokens.is_empty()).then(|| u32::try_from(tokens.len()).unwrap_or(u32::MAX));
        self.generated = tokens;
        self.stream = Release::resumed(&self.params.stop, &self.text);
        Ok(())
    }

    /// Positions of the KV cache a snapshot taken now covers: all but the last generated
    /// token's. `None` before the first generated token, or once finished.
    /// Also `None` while a resumed sequence is still rebuilding those positions.
    pub fn snapshot_positions(&self) -> Option<usize> {
        let end = (self.prompt.len() + self.generated.len()).checked_sub(1)?;
        (self.finish.is_none() && !self.generated.is_empty() && self.cache.len() >= end).then_some(end)
    }

    /// Keys and values of positions `[from, to)` for a snapshot piece, left on the device: see
    /// [`SequenceCache::range_tensors`].
    pub fn kv_tensors(
        &self,
        from: usize,
        to: usize,
    ) -> Result<Vec<(candle_core::Tensor, candle_core::Tensor)>, ModelError> {
        self.cache.range_tensors(from, to)
    }

    /// The text released so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    pub fn finish(&self) -> Option<&Finish> {
        self.finish.as_ref()
    }

    /// Whether the cache still lacks prompt positions: the next input is a prefill chunk.
    pub fn is_prefilling(&self) -> bool {
        self.finish.is_none() && self.cache.len() < self.prompt.len()
    }

    /// Whether the logits for the next token are ready, so [`Sequence::emit`] can run.
    pub fn can_emit(&self) -> bool {
        self.finish.is_none() && self.next_logits.is_some()
    }

    /// What the cache lacks next, for one forward pass: the next [`PREFILL_CHUNK`] tokens of the
    /// prompt, or else the next generated token not yet in the cache. `None` when the sequence
    /// has finished or its logits are ready to [`emit`](Self::emit).
    pub fn next_input(&mut self) -> Option<BatchInput<'_>> {
        if self.finish.is_some() || self.next_logits.is_some() {
            return None;
        }
        let pos = self.cache.len();
        let tokens = if pos < self.prompt.len() {
            &self.prompt[pos..(pos + PREFILL_CHUNK).min(self.prompt.len())]
        } else {
            std::slice::from_ref(self.generated.get(pos - self.prompt.len())?)
        };
        Some(BatchInput {
            tokens,
            cache: &mut self.cache,
        })
    }

    /// Takes the logits of the forward pass that fed [`next_input`](Self::next_input) (whose
    /// cache it extended). Kept only once the cache has caught up: a prompt chunk's or a replayed
    /// token's logits predict a token that is already known.
    pub fn accept_logits(&mut self, logits: &candle_core::Tensor) -> Result<(), ModelError> {
        if self.cache.len() < self.prompt.len() + self.generated.len() {
            return Ok(());
        }
        self.next_logits = Some(logits.to_vec1()?);
        if self.prefilled_at.is_none() {
            self.prefill_time = self.started.elapsed();
            self.prefilled_at = Some(Instant::now());
        }
        Ok(())
    }

    /// Computes, on the calling thread, everything the sequence lacks before it can emit its
    /// next token: its prompt (in chunks of [`PREFILL_CHUNK`]), and for a resumed or stepped
    /// sequence the generated tokens not yet in its cache. The prompt must be shorter than the
    /// context window (the caller checks, so that an over-long prompt is rejected before any
    /// compute).
    pub fn prefill(&mut self, model: &Model) -> Result<(), ModelError> {
        loop {
            let logits = match self.next_input() {
                Some(input) => model.weights.forward(input.tokens, input.cache)?,
                None => return Ok(()),
            };
            self.accept_logits(&logits)?;
        }
    }

    /// Samples one token from the ready logits and takes it: no compute. Returns the chunk this
    /// released to the stream, numbered by the tokens generated before it; `None` when it
    /// released nothing (a character can span tokens, and text that could begin a stop string is
    /// held back until it cannot).
    pub fn emit(&mut self, model: &Model) -> Result<Option<StreamChunk>, ModelError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let Some(logits) = self.next_logits.take() else {
            return Err(ModelError::Internal("emit before the logits are computed".into()));
        };
        let number = self.generated.len();
        let token = sample(&logits, &self.params.sampling, number as u64);
        self.accept(model, token)?;
        Ok(self.release(number))
    }

    /// Emits one token and, unless that ends the generation, computes the logits for the next
    /// (prefilling first if that was not done). Returns what [`emit`](Self::emit) released.
    pub fn step(&mut self, model: &Model) -> Result<Option<StreamChunk>, ModelError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        self.prefill(model)?;
        let chunk = self.emit(model)?;
        self.prefill(model)?;
        Ok(chunk)
    }

    /// Ends the generation where it is, for `reason` (a deadline): text held back for an
    /// incomplete character is released, and so is everything the stream still held back.
    /// Returns that last chunk, numbered as the step it replaces would have been. Does nothing
    /// to a finished sequence.
    pub fn finish_now(&mut self, model: &Model, reason: FinishReason) -> Result<Option<StreamChunk>, ModelError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        self.end(Finish {
            reason,
            stop_sequence: None,
        });
        self.next_logits = None;
        self.flush(model)?;
        Ok(self.release(self.generated.len()))
    }

    /// The text step `number` releases to the stream, if any.
    fn release(&mut self, number: usize) -> Option<StreamChunk> {
        let text = self.stream.advance(&self.text, self.finish.is_some());
        (!text.is_empty()).then(|| StreamChunk {
            // A sequence is shorter than the context window, far below u32::MAX tokens.
            seq: u32::try_from(number).unwrap_or(u32::MAX),
            text: text.to_string(),
        })
    }

    /// Records `token` and decides whether the generation is over.
    fn accept(&mut self, model: &Model, token: u32) -> Result<(), ModelError> {
        if model.tokenizer.is_eos(token) {
            self.end(Finish {
                reason: FinishReason::Stop,
                stop_sequence: None,
            });
            return self.flush(model);
        }
        self.generated.push(token);
        let old_len = self.text.len();
        let delta = self
            .decoder
            .next(&model.tokenizer, &self.generated)?
            .unwrap_or_default();
        self.text.push_str(&delta);
        if let Some((at, stop)) = find_stop(&self.text, old_len, &self.params.stop) {
            self.text.truncate(at);
            self.end(Finish {
                reason: FinishReason::Stop,
                stop_sequence: Some(stop),
            });
            return Ok(());
        }
        let reason = if self.generated.len() >= self.params.max_tokens {
            Some(FinishReason::Length)
        } else if self.prompt.len() + self.generated.len() >= model.context_length {
            Some(FinishReason::ContextLength)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.end(Finish {
                reason,
                stop_sequence: None,
            });
            self.flush(model)?;
        }
        Ok(())
    }

    /// Records how the generation ended, and its decode time.
    fn end(&mut self, finish: Finish) {
        self.finish = Some(finish);
        self.decode_time = self.prefilled_at.map_or(Duration::ZERO, |t| t.elapsed());
    }

    /// Releases text held back for an incomplete character, at the end of generation.
    fn flush(&mut self, model: &Model) -> Result<(), ModelError> {
        let rest = self.decoder.flush(&model.tokenizer, &self.generated)?;
        self.text.push_str(&rest);
        Ok(())
    }

    /// An independent copy of this generation, cache included, that continues exactly as this
    /// one would.
    pub fn fork(&self, model: &Model) -> Result<Self, ModelError> {
        Ok(Self {
            prompt: self.prompt.clone(),
            generated: self.generated.clone(),
            cache: self.cache.deep_copy(&model.weights.config)?,
            next_logits: self.next_logits.clone(),
            params: self.params.clone(),
            decoder: self.decoder.clone(),
            text: self.text.clone(),
            stream: self.stream.clone(),
            finish: self.finish.clone(),
            started: self.started,
            prefilled_at: self.prefilled_at,
            prefill_time: self.prefill_time,
            decode_time: self.decode_time,
            resumed_from: self.resumed_from,
        })
    }

    /// Prefills and steps until the generation ends.
    pub fn run(mut self, model: &Model) -> Result<Completion, ModelError> {
        while self.finish.is_none() {
            self.step(model)?;
        }
        self.into_completion()
    }

    /// The result of a finished sequence.
    pub fn into_completion(self) -> Result<Completion, ModelError> {
        let finish = self
            .finish
            .ok_or_else(|| ModelError::Internal("sequence has not finished".into()))?;
        Ok(Completion {
            text: self.text,
            finish,
            prompt_tokens: self.prompt.len(),
            tokens: self.generated,
            prefill: self.prefill_time,
            decode: self.decode_time,
            resumed_from: self.resumed_from,
        })
    }
}

/// The earliest stop string that occurs in `text` and ends after `old_len` (earlier text was
/// already checked), as (byte index where it starts, the string).
fn find_stop(text: &str, old_len: usize, stops: &[String]) -> Option<(usize, String)> {
    let longest = stops.iter().map(String::len).max()?;
    let mut from = old_len.saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s.clone())))
        .min_by_key(|(i, _)| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_found_across_pieces() {
        // "END" arrives split: "...E" was checked before, "ND" is new.
        assert_eq!(find_stop("abcEND", 4, &stops(&["END"])), Some((3, "END".into())));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(
            find_stop("x\n\nyEND", 0, &stops(&["END", "\n\n"])),
            Some((1, "\n\n".into()))
        );
    }

    #[test]
    fn old_text_is_not_searched_again() {
        assert_eq!(find_stop("END and more", 11, &stops(&["END"])), None);
    }

    #[test]
    fn multibyte_boundaries_are_respected() {
        assert_eq!(find_stop("héé!", 5, &stops(&["é!"])), Some((3, "é!".into())));
        assert_eq!(find_stop("abc", 3, &[]), None);
    }
}
