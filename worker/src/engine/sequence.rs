//! One generation, as a state machine that advances a token at a time.
//!
//! A [`Sequence`] owns everything that belongs to one request's generation: the prompt and
//! generated token ids, its KV cache, the logits for the next position, and the text so far.
//! [`Sequence::step`] emits one token; the caller decides when to step, so the same type serves
//! a simple loop, the engine thread's interleaving of several sequences, and snapshots.
//! Each step hands back the text it released to the stream (see [`super::stream`]).
//!
//! Invariant: after [`Sequence::prefill`], `cache.len() == prompt.len() + generated.len()` and
//! `next_logits` are the model's logits for the position after the last token, until the
//! sequence finishes.

use std::time::{Duration, Instant};

use ferry_schemas::FinishReason;

use super::sampler::{sample, SamplingParams};
use super::stream::{Release, StreamChunk};
use crate::model::{IncrementalDecoder, LayerValues, Model, ModelError, SequenceCache};

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
    prefill_time: Duration,
    decode_time: Duration,
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
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        }
    }

    /// Continues a generation from a snapshot: `tokens` were generated before the interruption,
    /// and `cache`, when given, holds the KV of every position but the last generated token's
    /// (the snapshot invariant). Without a cache, the prompt is prefilled and the tokens fed one
    /// at a time, exactly as the interrupted run computed them, so both ways continue with
    /// bit-identical logits.
    pub fn resume(
        model: &Model,
        prompt: Vec<u32>,
        params: GenerationParams,
        tokens: Vec<u32>,
        cache: Option<SequenceCache>,
    ) -> Result<Self, ModelError> {
        let Some(&last) = tokens.last() else {
            return Err(ModelError::Unsupported(
                "resuming needs at least one generated token".into(),
            ));
        };
        let mut seq = Self::new(model, prompt, params);
        let start = Instant::now();
        let fed = match cache {
            Some(cache) if cache.len() == seq.prompt.len() + tokens.len() - 1 => {
                seq.cache = cache;
                tokens.len() - 1
            }
            Some(cache) => {
                return Err(ModelError::Unsupported(format!(
                    "snapshot cache holds {} positions, expected {}",
                    cache.len(),
                    seq.prompt.len() + tokens.len() - 1
                )))
            }
            None => {
                model.weights.forward(&seq.prompt, &mut seq.cache)?;
                0
            }
        };
        for &t in &tokens[fed..tokens.len() - 1] {
            model.weights.forward(&[t], &mut seq.cache)?;
        }
        let logits = model.weights.forward(&[last], &mut seq.cache)?;
        seq.next_logits = Some(logits.to_vec1()?);
        seq.prefill_time += start.elapsed();
        seq.replay(model, tokens)?;
        Ok(seq)
    }

    /// A generation that produced `tokens` (none, for a fresh request), with its text rebuilt but
    /// no compute: it cannot step, only [`finish_now`](Self::finish_now). For a request whose
    /// deadline passed before it was started, so that a resumed one still answers with the text
    /// its snapshot had reached.
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
        self.generated = tokens;
        self.stream = Release::resumed(&self.params.stop, &self.text);
        Ok(())
    }

    /// Positions of the KV cache a snapshot taken now covers: all but the last generated
    /// token's. `None` before the first generated token, or once finished.
    pub fn snapshot_positions(&self) -> Option<usize> {
        (self.finish.is_none() && !self.generated.is_empty()).then(|| self.prompt.len() + self.generated.len() - 1)
    }

    /// Keys and values of positions `[from, to)`, position-major, for a snapshot piece.
    pub fn kv_values(&self, from: usize, to: usize) -> Result<LayerValues, ModelError> {
        self.cache.range_values(from, to)
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

    /// Runs the prompt through the model. The prompt must be shorter than the context window
    /// (the caller checks, so that an over-long prompt is rejected before any compute).
    pub fn prefill(&mut self, model: &Model) -> Result<(), ModelError> {
        let start = Instant::now();
        let logits = model.weights.forward(&self.prompt, &mut self.cache)?;
        self.next_logits = Some(logits.to_vec1()?);
        self.prefill_time += start.elapsed();
        Ok(())
    }

    /// Emits one token and, unless that ends the generation, computes the logits for the next.
    /// Returns the chunk this step released to the stream, numbered by the tokens generated
    /// before it; `None` when it released nothing (a character can span tokens, and text that
    /// could begin a stop string is held back until it cannot).
    pub fn step(&mut self, model: &Model) -> Result<Option<StreamChunk>, ModelError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let Some(logits) = self.next_logits.take() else {
            return Err(ModelError::Unsupported("step before prefill".into()));
        };
        let start = Instant::now();
        let number = self.generated.len();
        let token = sample(&logits, &self.params.sampling, number as u64);
        self.accept(model, token)?;
        if self.finish.is_none() {
            let logits = model.weights.forward(&[token], &mut self.cache)?;
            self.next_logits = Some(logits.to_vec1()?);
        }
        self.decode_time += start.elapsed();
        Ok(self.release(number))
    }

    /// Ends the generation where it is, for `reason` (a deadline): text held back for an
    /// incomplete character is released, and so is everything the stream still held back.
    /// Returns that last chunk, numbered as the step it replaces would have been. Does nothing
    /// to a finished sequence.
    pub fn finish_now(&mut self, model: &Model, reason: FinishReason) -> Result<Option<StreamChunk>, ModelError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        self.finish = Some(Finish {
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
            self.finish = Some(Finish {
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
            self.finish = Some(Finish {
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
            self.finish = Some(Finish {
                reason,
                stop_sequence: None,
            });
            self.flush(model)?;
        }
        Ok(())
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
            prefill_time: self.prefill_time,
            decode_time: self.decode_time,
        })
    }

    /// Prefills and steps until the generation ends.
    pub fn run(mut self, model: &Model) -> Result<Completion, ModelError> {
        if self.next_logits.is_none() && self.finish.is_none() {
            self.prefill(model)?;
        }
        while self.finish.is_none() {
            self.step(model)?;
        }
        self.into_completion()
    }

    /// The result of a finished sequence.
    pub fn into_completion(self) -> Result<Completion, ModelError> {
        let finish = self
            .finish
            .ok_or_else(|| ModelError::Unsupported("sequence has not finished".into()))?;
        Ok(Completion {
            text: self.text,
            finish,
            prompt_tokens: self.prompt.len(),
            tokens: self.generated,
            prefill: self.prefill_time,
            decode: self.decode_time,
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
