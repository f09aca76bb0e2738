//! The model: weights, tokenizer and chat template, all read from one GGUF file.
//!
//! [`ModelSource`] says where the file comes from (a local path, or a Hugging Face Hub reference
//! downloaded into a cache directory); [`fetch`] makes it a verified local file (downloading it
//! under a lock that processes sharing the cache take turns on, then checking its sha256 when
//! one is pinned), which is all `ferry-worker --fetch-model-only` does; [`Model::load`] fetches
//! it the same way and builds the three parts. Everything here is immutable once loaded and shared by
//! every sequence; per-sequence state (the KV cache) lives in [`cache::SequenceCache`].

mod attention;
pub mod cache;
pub mod chat;
pub mod closeness;
mod linear;
pub mod llama;
pub mod tokenizer;

use std::fs::{OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::Device;
use sha2::{Digest, Sha256};

pub use cache::{allocated_positions, CacheRestore, LayerValues, SequenceCache, CACHE_CHUNK};
pub use chat::ChatTemplate;
pub use linear::{Kernels, WeightFormat};
pub use llama::{BatchInput, LlamaConfig, LlamaWeights};
pub use tokenizer::{IncrementalDecoder, Tokenizer};

/// Everything that can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading the file failed. The worker cannot start.
    #[error("cannot read the model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file's sha256 is not the pinned one. The worker cannot start.
    #[error(
        "model file {path} has sha256 {actual}, expected {expected} (--model-sha256): refusing to serve it; \
         fix the pin, or delete the file from the cache to fetch it again"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// Downloading from the Hugging Face Hub failed. The worker cannot start.
    #[error("cannot fetch {reference} from the Hugging Face Hub: {message}")]
    Hub { reference: String, message: String },
    /// The lock that serialises downloads into the cache directory could not be taken.
    #[error("cannot lock the model cache {path}: {source}")]
    CacheLock { path: PathBuf, source: std::io::Error },
    /// A metadata key the engine needs is absent. The worker cannot start.
    #[error("the GGUF file has no {0:?} metadata")]
    MissingMetadata(String),
    /// A metadata value cannot describe a model: a count of zero, or heads that do not divide
    /// what they split. The worker cannot start.
    #[error("the GGUF file's {key:?} metadata is {value}, {why}")]
    InvalidMetadata { key: String, value: usize, why: String },
    /// The file describes a model this engine does not run. The worker cannot start.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The kernels asked for (`--kernels`) cannot run on this CPU. The worker cannot start.
    #[error("{0}")]
    Kernels(String),
    /// The tokenizer could not be built, or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile (at start-up) or to render (a request's chat, which
    /// is then dead-lettered).
    #[error("chat template: {0}")]
    Template(String),
    /// A forward pass would run past the context window.
    #[error("the context window of {context_length} tokens is full")]
    ContextFull { context_length: usize },
    /// The accelerator ran out of memory in a tensor operation: the worker's failure, not the
    /// request's (it is handed to the fallback topic, or retried alone). Classified once, where
    /// candle's errors become this type (see [`ModelError::from`]).
    #[error("{0}")]
    OutOfMemory(String),
    /// A tensor operation failed otherwise.
    #[error("{0}")]
    Backend(String),
    /// A broken invariant of the engine: an input its caller should not have passed, or a bug.
    /// The request fails; the worker goes on.
    #[error("{0}")]
    Internal(String),
}

impl From<candle_core::Error> for ModelError {
    /// candle's errors, classified: out of memory (see [`is_out_of_memory`]) or another backend
    /// failure. The only place where error text is read for its meaning.
    fn from(e: candle_core::Error) -> Self {
        let text = e.to_string();
        if is_out_of_memory(&text) {
            ModelError::OutOfMemory(text)
        } else {
            ModelError::Backend(text)
        }
    }
}

impl ModelError {
    /// This failure as it reaches each job of a batched forward pass that it failed (the error
    /// is not `Clone`, and every job gets one): its kind kept, its text saying so.
    pub fn of_batch(&self) -> ModelError {
        let text = format!("the batched forward pass failed: {self}");
        match self {
            ModelError::OutOfMemory(_) => ModelError::OutOfMemory(text),
            ModelError::ContextFull { context_length } => ModelError::ContextFull {
                context_length: *context_length,
            },
            ModelError::Internal(_) => ModelError::Internal(text),
            _ => ModelError::Backend(text),
        }
    }
}

/// Whether a backend error's text means the accelerator ran out of memory: candle's CUDA
/// backend reports the driver's `CUDA_ERROR_OUT_OF_MEMORY` (as `DriverError(CUDA_ERROR_OUT_OF_MEMORY,
/// "out of memory")`), cuBLAS its `CUBLAS_STATUS_ALLOC_FAILED`, the runtime API
/// `cudaErrorMemoryAllocation`. candle's errors carry the CUDA error only as text, so this is
/// read once, where they become [`ModelError`]. On the CPU an allocation that fails aborts the
/// process instead (Rust's allocator does not return an error), which the attempts ledger
/// counts as a death.
fn is_out_of_memory(error: &str) -> bool {
    const MARKERS: [&str; 4] = [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "cudaErrorMemoryAllocation",
        "out of memory",
    ];
    let lower = error.to_ascii_lowercase();
    MARKERS.iter().any(|m| lower.contains(&m.to_ascii_lowercase()))
}

/// Where the GGUF file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A file on local disk (or a mounted volume).
    Path(PathBuf),
    /// `hf://<owner>/<repo>/<file>[@<revision>]`: a file of a Hugging Face Hub model repository,
    /// downloaded once into the cache directory and read from there afterwards.
    Hub {
        repo: String,
        file: String,
        revision: Option<String>,
    },
}

impl std::str::FromStr for ModelSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("hf://") else {
            return Ok(ModelSource::Path(PathBuf::from(s)));
        };
        let (rest, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (rest, None),
        };
        let mut parts = rest.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(owner), Some(repo), Some(file)) if !owner.is_empty() && !repo.is_empty() && !file.is_empty() => {
                Ok(ModelSource::Hub {
                    repo: format!("{owner}/{repo}"),
                    file: file.to_string(),
                    revision,
                })
            }
            _ => Err(format!(
                "{s:?} is not of the form hf://<owner>/<repo>/<file.gguf>[@<revision>]"
            )),
        }
    }
}

/// The lock file in a model cache directory, held while a process may download into it.
pub const CACHE_LOCK_FILE: &str = ".ferry-fetch.lock";

/// An exclusive lock on a model cache directory, released when dropped (or when its process
/// dies: the kernel drops a `flock` with the last descriptor, so a crashed downloader never
/// leaves the others waiting).
///
/// hf-hub locks each download itself, but gives up after five seconds, so of several pods
/// starting together on a node all but one would fail; with this lock around it they wait their
/// turn, and the ones after the first find the file in the cache.
#[derive(Debug)]
pub struct CacheLock {
    /// `None` for a cache this process may only read: nothing can be downloaded into it, so
    /// there is nothing to take turns on.
    _file: Option<std::fs::File>,
}

impl CacheLock {
    /// Takes the lock on `dir` (created if missing), waiting as long as another process holds
    /// it.
    pub fn acquire(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(CACHE_LOCK_FILE);
        let err = |source| ModelError::CacheLock {
            path: path.clone(),
            source,
        };
        let opened = std::fs::create_dir_all(dir)
            .and_then(|()| OpenOptions::new().create(true).truncate(false).write(true).open(&path));
        let file = match opened {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => {
                tracing::warn!(lock = %path.display(), error = %e, "the model cache is read-only here: reading it without the lock");
                return Ok(Self { _file: None });
            }
            Err(e) => return Err(err(e)),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                tracing::info!(lock = %path.display(), "another process is fetching into the model cache: waiting for it");
                file.lock().map_err(err)?;
            }
            Err(TryLockError::Error(e)) => return Err(err(e)),
        }
        Ok(Self { _file: Some(file) })
    }
}

impl ModelSource {
    /// The local path of the file, downloading it first for a Hub reference (under the cache
    /// directory's [`CacheLock`]).
    pub fn resolve(&self, cache_dir: Option<&Path>) -> Result<PathBuf, ModelError> {
        match self {
            ModelSource::Path(p) => Ok(p.clone()),
            ModelSource::Hub { repo, file, revision } => {
                let cache = cache_dir
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| hf_hub::Cache::from_env().path().clone());
                let _lock = CacheLock::acquire(&cache)?;
                let reference = format!("hf://{repo}/{file}");
                let hub_err = |e: hf_hub::api::sync::ApiError| ModelError::Hub {
                    reference: reference.clone(),
                    message: e.to_string(),
                };
                let builder = hf_hub::api::sync::ApiBuilder::from_env()
                    .with_progress(false)
                    .with_cache_dir(cache);
                let api = builder.build().map_err(hub_err)?;
                let repo = hf_hub::Repo::with_revision(
                    repo.clone(),
                    hf_hub::RepoType::Model,
                    revision.clone().unwrap_or_else(|| "main".into()),
                );
                api.repo(repo).get(file).map_err(hub_err)
            }
        }
    }
}

/// How to load the model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub source: ModelSource,
    /// Where Hub downloads are kept (a volume shared by the pods of a node).
    pub cache_dir: Option<PathBuf>,
    /// The file's expected sha256, lowercase hex; loading fails on a mismatch.
    pub sha256: Option<String>,
    pub weights: WeightFormat,
    /// The name requests use for this model; the file's stem when not given.
    pub name: Option<String>,
    /// Caps the context window below the model's own (to bound KV-cache memory).
    pub max_context: Option<usize>,
    /// Which code runs the Q8_0 matrix products on the CPU.
    pub kernels: Kernels,
}

impl LoadOptions {
    /// `source` with `weights`, and nothing else pinned, renamed or capped.
    pub fn new(source: ModelSource, weights: WeightFormat) -> Self {
        Self {
            source,
            cache_dir: None,
            sha256: None,
            weights,
            name: None,
            max_context: None,
            kernels: Kernels::Auto,
        }
    }
}

/// A model file on local disk, its sha256 computed and, when one was pinned, checked.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    /// Lowercase hex.
    pub sha256: String,
    /// Time spent resolving (for a Hub reference: finding or downloading) the file.
    pub resolve_time: Duration,
    /// Time spent hashing it.
    pub hash_time: Duration,
}

/// Makes the model a verified local file: resolves `opts.source` (downloading a Hub reference
/// into the cache unless it is there), hashes the file and compares the hash with `opts.sha256`.
pub fn fetch(opts: &LoadOptions) -> Result<Fetched, ModelError> {
    let started = Instant::now();
    let path = opts.source.resolve(opts.cache_dir.as_deref())?;
    let resolve_time = started.elapsed();
    let sha256 = file_sha256(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let hash_time = started.elapsed() - resolve_time;
    if let Some(expected) = &opts.sha256 {
        if !expected.eq_ignore_ascii_case(&sha256) {
            return Err(ModelError::Checksum {
                path,
                expected: expected.clone(),
                actual: sha256,
            });
        }
    }
    Ok(Fetched {
        path,
        sha256,
        resolve_time,
        hash_time,
    })
}

/// A loaded model, ready to serve.
pub struct Model {
    /// The name requests may ask for in their `model` field.
    pub name: String,
    /// sha256 of the GGUF file, lowercase hex: the model's identity.
    pub sha256: String,
    pub weights: LlamaWeights,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// The context window in tokens: the model's own, or the operator's lower cap.
    pub context_length: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Fetches and verifies the file (see [`fetch`]), then reads it.
    pub fn load(opts: &LoadOptions, device: &Device) -> Result<Self, ModelError> {
        let Fetched {
            path,
            sha256,
            resolve_time,
            hash_time,
        } = fetch(opts)?;
        tracing::info!(
            path = %path.display(),
            sha256 = %sha256,
            verified = opts.sha256.is_some(),
            resolve_ms = resolve_time.as_millis() as u64,
            hash_ms = hash_time.as_millis() as u64,
            "model file ready"
        );
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::io::BufReader::new(std::fs::File::open(&path).map_err(io)?);
        let ct = gguf_file::Content::read(&mut file)?;
        let tokenizer = Tokenizer::from_gguf(&ct)?;
        let template = match ct.metadata.get("tokenizer.chat_template") {
            Some(v) => Some(ChatTemplate::new(v.to_string()?)?),
            None => None,
        };
        let weights = LlamaWeights::from_gguf(&ct, &mut file, opts.weights, opts.kernels, device)?;
        let context_length = match opts.max_context {
            Some(cap) => cap.min(weights.config.context_length),
            None => weights.config.context_length,
        };
        let name = opts.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        Ok(Self {
            name,
            sha256,
            weights,
            tokenizer,
            template,
            context_length,
        })
    }
}

/// sha256 of a file, lowercase hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!("models/a.gguf".parse(), Ok(ModelSource::Path("models/a.gguf".into())));
        assert_eq!(
            "hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2.gguf@v1".parse(),
            Ok(ModelSource::Hub {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF".into(),
                file: "smollm2.gguf".into(),
                revision: Some("v1".into()),
            })
        );
        assert!("hf://only-owner".parse::<ModelSource>().is_err());
    }

    #[test]
    fn processes_take_turns_on_the_cache_lock() {
        use std::sync::mpsc;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = CacheLock::acquire(dir.path()).expect("first lock");
        let (tx, rx) = mpsc::channel();
        let path = dir.path().to_path_buf();
        // A second open file description conflicts with the first, as a second process would.
        let waiter = std::thread::spawn(move || {
            let lock = CacheLock::acquire(&path).expect("second lock");
            tx.send(Instant::now()).expect("send");
            drop(lock);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the second taker must wait while the first holds the lock"
        );
        let released = Instant::now();
        drop(first);
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("taken once released");
        assert!(got >= released);
        waiter.join().expect("no panic");
    }

    #[test]
    fn fetch_verifies_a_local_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(b"abc"))
            .expect("write");
        // sha256("abc")
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let mut opts = LoadOptions::new(ModelSource::Path(path.clone()), WeightFormat::Native);
        opts.sha256 = Some(sha.to_uppercase());
        let f = fetch(&opts).expect("verified");
        assert_eq!((f.path, f.sha256.as_str()), (path, sha));
        opts.sha256 = Some("0".repeat(64));
        let e = fetch(&opts).expect_err("mismatch").to_string();
        assert!(e.contains(sha) && e.contains(&"0".repeat(64)), "{e}");
    }

    #[test]
    fn out_of_memory_errors_are_recognised() {
        for e in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "the batched forward pass failed: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cublas error: CUBLAS_STATUS_ALLOC_FAILED",
            "cudaErrorMemoryAllocation",
            "CUDA out of memory. Tried to allocate 2.00 GiB",
        ] {
            assert!(is_out_of_memory(e), "{e}");
            let classified = ModelError::from(candle_core::Error::Msg(e.to_string()));
            assert!(matches!(classified, ModelError::OutOfMemory(_)), "{e}");
            assert!(matches!(classified.of_batch(), ModelError::OutOfMemory(_)), "{e}");
        }
        for e in [
            "the context window of 2048 tokens is full",
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")",
            "fault injection: the engine failed",
        ] {
            assert!(!is_out_of_memory(e), "{e}");
            let classified = ModelError::from(candle_core::Error::Msg(e.to_string()));
            assert!(matches!(classified, ModelError::Backend(_)), "{e}");
        }
    }
}
