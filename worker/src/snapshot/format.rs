//! The snapshot format: versioned, self-checking, incremental. Pure encoding and decoding.
//!
//! A generation's snapshot is a set of blobs under one prefix (see [`snapshot_prefix`]):
//!
//! - **pieces** (`piece-<n>`): the KV cache for a range of positions `[from, to)`, every layer's
//!   keys then values as little-endian f32, with a header giving the shape and a CRC-32 trailer.
//!   The cache only grows, so each snapshot writes only the positions added since the previous
//!   one: the cost of a snapshot is proportional to the new tokens.
//! - **the manifest** (`manifest`): which model and which request it belongs to (fingerprints),
//!   the generated token ids so far, and the list of pieces with their ranges and checksums.
//!   It is written last and replaces the previous one atomically: it is the commit point. Pieces
//!   it does not name are garbage.
//!
//! Invariant: a manifest with `n` generated tokens and KV pieces covers exactly the positions
//! `[0, prompt_len + n - 1)`: every token except the last generated one has been through the
//! model. The last one is fed on resume, the same single-token step the interrupted run was
//! about to take, so the logits after resuming are bit-identical to the uninterrupted run's.
//!
//! Anything that does not verify (torn write, bad checksum, unknown version, another model or
//! another request under the same key) decodes to an error, and the caller starts over.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::GenerationParams;

/// Version of the manifest and piece layouts. Readers reject any other.
pub const FORMAT_VERSION: u32 = 1;
/// Version of the engine's numerics. Bump it whenever a change to the forward pass could change
/// a single logit bit, so old snapshots are not resumed by an engine that computes differently.
pub const ENGINE_VERSION: u32 = 1;

const MANIFEST_MAGIC: &[u8] = b"FERRY-SNAPSHOT-MANIFEST\n";
const PIECE_MAGIC: &[u8; 8] = b"FERRYKV\0";

/// Why a snapshot blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The bytes do not start with the expected magic: not a snapshot, or torn at the start.
    #[error("not a snapshot blob (bad magic)")]
    Magic,
    /// Written by another format version.
    #[error("snapshot format version {0}, this worker reads {FORMAT_VERSION}")]
    Version(u32),
    /// The checksum does not match the content: a torn or corrupted write.
    #[error("checksum mismatch")]
    Checksum,
    /// The blob is shorter or longer than its header says.
    #[error("truncated or malformed: {0}")]
    Malformed(String),
    /// The snapshot belongs to another model (or engine version, or weight format).
    #[error("written for another model")]
    WrongModel,
    /// The snapshot belongs to another request that reused the id, or other parameters.
    #[error("written for another request")]
    WrongRequest,
}

/// Key of the manifest, relative to the request's prefix.
pub const MANIFEST: &str = "manifest";

/// What a manifest holds besides its tokens and pieces, at most: the magic, the checksum line,
/// the field names, two 64-digit fingerprints, the counters and the worker's name (a host or
/// pod name, at most 253 bytes), with room to spare for a name JSON has to escape.
const MANIFEST_OVERHEAD_BYTES: usize = 64 * 1024;
/// One generated token in the manifest's JSON, at most: a `u32` and a comma.
const TOKEN_JSON_BYTES: usize = "4294967295,".len();
/// One piece in the manifest's JSON, at most: the writer's name for it (`piece-<seq>-<tag>`,
/// with a `u64` sequence number) and four numbers at their widest, with the field names.
const PIECE_REF_JSON_BYTES: usize = 160;

/// The most bytes a manifest can take for a model whose context holds `context_length`
/// positions: a manifest names fewer generated tokens than that, and fewer pieces (each covers
/// one position at least). Readers refuse a larger manifest without reading it. 171 bytes a
/// position, so 22 MB at a context of 128k positions: small beside the pieces of such a
/// context, which it bounds.
pub fn max_manifest_bytes(context_length: usize) -> usize {
    context_length
        .saturating_mul(TOKEN_JSON_BYTES + PIECE_REF_JSON_BYTES)
        .saturating_add(MANIFEST_OVERHEAD_BYTES)
}

/// The prefix under which a request's snapshot lives: a hash of the topic and the request id,
/// so any worker that receives the request finds it, and ids need no escaping.
/// Benchmarks and tests that have no message use it; the worker uses [`request_prefix`].
pub fn snapshot_prefix(topic: &str, request_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    h.update(request_id.as_bytes());
    format!("ferry/{}/", &hex(&h.finalize())[..32])
}

/// The prefix of one request's entries (snapshot, ledger, done marker), bound to the request
/// itself: the request topic, the id, the reply topic its answer goes to, and the message's
/// exact bytes. A redelivery of the same message finds its entries; another request that
/// reuses the id (another caller, or the same caller with another prompt or reply topic) gets
/// entries of its own, so it can never be given another request's stored answer, resume
/// another's generation, or be settled by another's hand-off.
pub fn request_prefix(topic: &str, request_id: &str, reply_topic: &str, payload: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [topic.as_bytes(), request_id.as_bytes(), reply_topic.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(Sha256::digest(payload));
    format!("ferry/{}/", &hex(&h.finalize())[..32])
}

/// Identity of the numbers a model computes: the file, how its weights are held, where it runs,
/// and the engine version.
pub fn model_fingerprint(model_sha256: &str, weights: &str, device: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("engine-v{ENGINE_VERSION}|{model_sha256}|{weights}|{device}").as_bytes());
    hex(&h.finalize())
}

/// Identity of a request's generation: its prompt tokens and every parameter that shapes the
/// output.
pub fn request_fingerprint(prompt: &[u32], params: &GenerationParams) -> String {
    let mut h = Sha256::new();
    for t in prompt {
        h.update(t.to_le_bytes());
    }
    let s = &params.sampling;
    h.update(
        format!(
            "|{}|{}|{}|{}|{}|",
            s.temperature, s.top_p, s.top_k, s.seed, params.max_tokens
        )
        .as_bytes(),
    );
    for stop in &params.stop {
        h.update((stop.len() as u64).to_le_bytes());
        h.update(stop.as_bytes());
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A piece named by a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRef {
    /// Key of the piece, relative to the snapshot prefix.
    pub name: String,
    pub from: u32,
    pub to: u32,
    pub bytes: u64,
    pub crc32: u32,
}

/// The commit point of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub model: String,
    pub request: String,
    pub prompt_len: u32,
    /// Generated token ids so far; the sampler position is their count.
    pub tokens: Vec<u32>,
    /// KV pieces, contiguous from position 0. Empty in tokens-only snapshots.
    pub pieces: Vec<PieceRef>,
    /// How many workers have worked on this request, this snapshot's writer included.
    pub attempt: u32,
    pub worker: String,
    /// Increases with every manifest written for the request.
    pub seq: u64,
}

impl Manifest {
    /// Positions of the KV cache the pieces cover.
    pub fn kv_positions(&self) -> u32 {
        self.pieces.last().map_or(0, |p| p.to)
    }

    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a manifest always serialises");
        let mut out = Vec::with_capacity(MANIFEST_MAGIC.len() + json.len() + 9);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&json);
        out.extend_from_slice(format!("\n{:08x}", crc32fast::hash(&json)).as_bytes());
        out
    }

    /// Decodes and checks a manifest against the model and request it must belong to.
    pub fn decode(bytes: &[u8], model: &str, request: &str) -> Result<Self, FormatError> {
        let m = Self::peek(bytes)?;
        if m.model != model {
            return Err(FormatError::WrongModel);
        }
        if m.request != request {
            return Err(FormatError::WrongRequest);
        }
        m.check_coverage()?;
        Ok(m)
    }

    /// Decodes a manifest and checks its integrity (magic, checksum, version) but not whom it
    /// belongs to: for inspecting a store, never for resuming.
    pub fn peek(bytes: &[u8]) -> Result<Self, FormatError> {
        let body = bytes.strip_prefix(MANIFEST_MAGIC).ok_or(FormatError::Magic)?;
        if body.len() < 9 || body[body.len() - 9] != b'\n' {
            return Err(FormatError::Malformed("manifest has no checksum line".into()));
        }
        let (json, crc) = body.split_at(body.len() - 9);
        let crc = std::str::from_utf8(&crc[1..])
            .ok()
            .and_then(|s| u32::from_str_radix(s, 16).ok())
            .ok_or_else(|| FormatError::Malformed("manifest checksum is not hex".into()))?;
        if crc32fast::hash(json) != crc {
            return Err(FormatError::Checksum);
        }
        let m: Manifest = serde_json::from_slice(json).map_err(|e| FormatError::Malformed(e.to_string()))?;
        if m.version != FORMAT_VERSION {
            return Err(FormatError::Version(m.version));
        }
        Ok(m)
    }

    /// The pieces are contiguous from position 0 and cover every position but the last
    /// generated token's.
    fn check_coverage(&self) -> Result<(), FormatError> {
        let m = self;
        let mut at = 0;
        for p in &m.pieces {
            if p.from != at || p.to <= p.from {
                return Err(FormatError::Malformed(format!(
                    "piece {} covers [{}, {}), expected to start at {at}",
                    p.name, p.from, p.to
                )));
            }
            at = p.to;
        }
        if !m.pieces.is_empty() && (m.tokens.is_empty() || at as usize != m.prompt_len as usize + m.tokens.len() - 1) {
            return Err(FormatError::Malformed(format!(
                "pieces cover {at} positions, but prompt {} + tokens {} - 1 are cached",
                m.prompt_len,
                m.tokens.len()
            )));
        }
        Ok(())
    }
}

/// The shape of the KV cache: every piece must agree with the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layer: u32,
    pub n_kv_head: u32,
    pub head_dim: u32,
}

impl KvShape {
    /// f32 values per layer per tensor (keys or values) for `positions` positions.
    pub fn values_per_tensor(&self, positions: u32) -> usize {
        self.n_kv_head as usize * positions as usize * self.head_dim as usize
    }

    /// Bytes one cached position takes: keys and values of every layer, in f32 (the forward
    /// pass computes them in f32 on every device and the cache keeps them as computed).
    pub fn bytes_per_position(&self) -> usize {
        self.values_per_tensor(1) * 2 * self.n_layer as usize * std::mem::size_of::<f32>()
    }

    /// Bytes the encoded piece of `positions` positions takes, header and checksum included:
    /// what a reader expects of a piece, whatever its manifest says.
    pub fn piece_bytes(&self, positions: u32) -> u64 {
        let data = self.bytes_per_position() as u64 * u64::from(positions);
        (PIECE_HEADER + 4) as u64 + data
    }
}

/// A decoded piece: for every layer, keys and values for positions `[from, to)`, each laid out
/// position-major, `(to - from, n_kv_head, head_dim)`, so that consecutive pieces concatenate by
/// appending.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub from: u32,
    pub to: u32,
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Piece {
    /// Extends this piece with the one that follows it.
    pub fn append(&mut self, next: Piece) -> Result<(), FormatError> {
        if next.from != self.to || next.layers.len() != self.layers.len() {
            return Err(FormatError::Malformed(format!(
                "cannot append [{}, {}) to [{}, {})",
                next.from, next.to, self.from, self.to
            )));
        }
        for ((k, v), (nk, nv)) in self.layers.iter_mut().zip(next.layers) {
            k.extend(nk);
            v.extend(nv);
        }
        self.to = next.to;
        Ok(())
    }

    /// Size of the encoded piece.
    pub fn encoded_len(&self) -> usize {
        PIECE_HEADER + self.layers.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum::<usize>() + 4
    }
}

const PIECE_HEADER: usize = 8 + 4 * 6;

impl Piece {
    pub fn encode(&self, shape: KvShape) -> Vec<u8> {
        let per = shape.values_per_tensor(self.to - self.from);
        let mut out = Vec::with_capacity(PIECE_HEADER + self.layers.len() * per * 8 + 4);
        out.extend_from_slice(PIECE_MAGIC);
        for v in [
            FORMAT_VERSION,
            self.from,
            self.to,
            shape.n_layer,
            shape.n_kv_head,
            shape.head_dim,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for (k, v) in &self.layers {
            for x in k.iter().chain(v) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a piece and checks it against the model's shape and the manifest's entry.
    pub fn decode(bytes: &[u8], shape: KvShape, entry: &PieceRef) -> Result<Self, FormatError> {
        let view = PieceView::check(bytes, shape, entry)?;
        let layers = (0..shape.n_layer as usize)
            .map(|l| (view.keys(l).collect(), view.values(l).collect()))
            .collect();
        Ok(Self {
            from: view.from,
            to: view.to,
            layers,
        })
    }
}

/// A piece checked in place: its encoded bytes, verified (magic, version, checksum, shape, and
/// the range the manifest names), read value by value where they lie. What a restore decodes
/// from, so that the values go straight to the cache with no decoded copy of the piece between.
#[derive(Debug, Clone, Copy)]
pub struct PieceView<'a> {
    pub from: u32,
    pub to: u32,
    /// Every layer's keys then values, little-endian f32.
    data: &'a [u8],
    /// Bytes of one layer's keys (or values).
    tensor_bytes: usize,
}

impl<'a> PieceView<'a> {
    /// Checks a piece against the model's shape and the manifest's entry.
    pub fn check(bytes: &'a [u8], shape: KvShape, entry: &PieceRef) -> Result<Self, FormatError> {
        if bytes.len() < PIECE_HEADER + 4 || &bytes[..8] != PIECE_MAGIC {
            return Err(FormatError::Magic);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes(crc.try_into().map_err(|_| FormatError::Magic)?);
        if crc32fast::hash(body) != crc || crc != entry.crc32 || bytes.len() as u64 != entry.bytes {
            return Err(FormatError::Checksum);
        }
        let word =
            |i: usize| u32::from_le_bytes([body[8 + 4 * i], body[9 + 4 * i], body[10 + 4 * i], body[11 + 4 * i]]);
        if word(0) != FORMAT_VERSION {
            return Err(FormatError::Version(word(0)));
        }
        let (from, to) = (word(1), word(2));
        let got = KvShape {
            n_layer: word(3),
            n_kv_head: word(4),
            head_dim: word(5),
        };
        if got != shape {
            return Err(FormatError::WrongModel);
        }
        if (from, to) != (entry.from, entry.to) || to <= from {
            return Err(FormatError::Malformed(format!(
                "piece holds [{from}, {to}), manifest says [{}, {})",
                entry.from, entry.to
            )));
        }
        let per = shape.values_per_tensor(to - from);
        let data = &body[PIECE_HEADER..];
        if data.len() != shape.n_layer as usize * per * 8 {
            return Err(FormatError::Malformed("piece length does not match its shape".into()));
        }
        Ok(Self {
            from,
            to,
            data,
            tensor_bytes: per * 4,
        })
    }

    /// Positions the piece holds.
    pub fn positions(&self) -> usize {
        (self.to - self.from) as usize
    }

    /// Layer `layer`'s keys, position-major (`(to - from, n_kv_head, head_dim)`).
    pub fn keys(&self, layer: usize) -> impl Iterator<Item = f32> + 'a {
        self.tensor(2 * layer)
    }

    /// Layer `layer`'s values, laid out as its keys.
    pub fn values(&self, layer: usize) -> impl Iterator<Item = f32> + 'a {
        self.tensor(2 * layer + 1)
    }

    /// The `i`-th tensor of the piece (keys of layer 0, values of layer 0, keys of layer 1, ...);
    /// empty past the last.
    fn tensor(&self, i: usize) -> impl Iterator<Item = f32> + 'a {
        let data: &'a [u8] = self.data;
        let start = (i * self.tensor_bytes).min(data.len());
        let end = (start + self.tensor_bytes).min(data.len());
        data[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
}

#[cfg(test)]
mod tests;
