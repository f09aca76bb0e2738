//! The tokenizer, built from the GGUF file's own vocabulary and merges.
//!
//! candle's `Tokenizer::from_gguf` assumes the llama pre-tokenizer and adds a prefix space,
//! which is wrong for GPT-2-style BPE models such as SmolLM2 (`tokenizer.ggml.pre = "smollm"`).
//! This builds what those models' `tokenizer.json` describes: digits split one by one, then
//! byte-level pre-tokenisation with the GPT-2 regex and no prefix space. Control tokens (GGUF
//! token type 3, such as `<|im_start|>`) are special tokens: they are recognised as wholes in
//! the input and skipped when decoding.

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use super::llama::{md, md_string};
use super::ModelError;

/// GGUF token type of control tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;

/// Text to token ids and back.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with control tokens read as plain text: for what a caller wrote in a
    /// chat message, where `<|im_start|>` must stay text and never open a turn of its own.
    plain: tokenizers::Tokenizer,
    /// The control tokens' texts.
    controls: Vec<String>,
    /// The ids that end a generation: the model's end-of-sequence token and its end-of-text
    /// token when it has one (base-model style prompts end with the latter).
    eos_ids: Vec<u32>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, ModelError> {
        let model = md_string(ct, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model {model:?}; this engine builds byte-level BPE (gpt2) tokenizers"
            )));
        }
        let tokens: Vec<String> = md(ct, "tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()?;
        let merges: Vec<(String, String)> = md(ct, "tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| {
                let m = v.to_string()?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| candle_core::Error::Msg(format!("malformed merge {m:?}")))
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<Result<_, _>>()?,
            None => vec![],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre: Vec<PreTokenizerWrapper> = vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()];
        inner.with_pre_tokenizer(Some(Sequence::new(pre)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        inner.add_special_tokens(&special);
        let controls: Vec<String> = special.iter().map(|t| t.content.clone()).collect();
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);

        let id_of = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok());
        let eos = id_of("tokenizer.ggml.eos_token_id")
            .ok_or_else(|| ModelError::MissingMetadata("tokenizer.ggml.eos_token_id".into()))?;
        let mut eos_ids = vec![eos];
        if let Some(eot) = tokens.iter().position(|t| t == "<|endoftext|>") {
            if eot as u32 != eos {
                eos_ids.push(eot as u32);
            }
        }
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned()).unwrap_or_default();
        Ok(Self {
            inner,
            plain,
            controls,
            eos_ids,
            bos_token: name(id_of("tokenizer.ggml.bos_token_id")),
            eos_token: name(Some(eos)),
        })
    }

    /// Token ids of `text`. Special tokens written in the text (such as `<|im_start|>`) become
    /// their ids, as the chat template needs; nothing is added around the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with control tokens read as plain text: `<|im_start|>` written in
    /// `text` becomes the ids of its characters, not the control token.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .plain
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether `text` contains the text of a control token.
    pub fn contains_control(&self, text: &str) -> bool {
        self.controls.iter().any(|c| text.contains(c.as_str()))
    }

    /// Text of `ids`, special tokens left out. Bytes that do not form UTF-8 yet (a character
    /// split across tokens) come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of token ids into text a piece at a time, never emitting half a
/// character: a token that ends inside a multi-byte character is held back until the character
/// is complete. Decoding re-reads only a short window of recent tokens, not the whole output.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    /// Start of the window decoded for context (byte-level BPE needs none, but other decoders
    /// join tokens differently at word starts).
    prefix_offset: usize,
    /// Tokens before this one have been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder whose first `emitted` tokens of `ids` were already turned into text (resuming).
    pub fn starting_at(emitted: usize) -> Self {
        Self {
            prefix_offset: emitted,
            read_offset: emitted,
        }
    }

    /// The new text that `ids` (all tokens so far) adds, if any is complete.
    pub fn next(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<Option<String>, ModelError> {
        let prefix = tokenizer.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full.get(prefix.len()..).map(str::to_string);
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(delta)
        } else {
            Ok(None)
        }
    }

    /// Whatever text is still held back, at the end of generation.
    pub fn flush(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, ModelError> {
        let prefix = tokenizer.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&ids[self.prefix_offset..])?;
        self.prefix_offset = ids.len();
        self.read_offset = ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
