//! Where snapshots are kept: byte blobs under string keys, in a durable store chosen by URL.
//!
//! A snapshot is only useful if it outlives the worker that wrote it, so every backend is a
//! service or disk that survives the pod: a mounted volume ([`FileStore`]), an object store
//! (S3, GCS, Azure Blob, through [`ObjectStoreBackend`]) or Redis ([`RedisStore`]). `memory://`
//! exists for tests and local runs only; it dies with the process.
//!
//! The contract every backend keeps:
//!
//! - [`SnapshotStore::put`] returns only once the value is durable in that backend's terms, and
//!   replaces atomically: a reader sees the old value or the new one, never a torn mix.
//! - [`SnapshotStore::get`] is bounded: the caller says how many bytes it expects at most, and a
//!   larger value is refused ([`StoreError::TooLarge`]) having been read no further than that,
//!   so a value that is huge, or (on a file store) a link to `/dev/zero`, cannot grow the worker.
//!   What a value may be (a regular file, a string) is checked the same way
//!   ([`StoreError::NotAValue`]). Both are data the worker cannot use, not an outage: the caller
//!   treats them like a value that does not verify.
//! - Keys are `/`-separated ASCII paths such as `ferry/<hex>/manifest` (see [`check_key`]).
//!   A *prefix* is matched segment by segment: the keys under `ferry/ab` are `ferry/ab` itself
//!   and those that start with `ferry/ab/`, so `ferry/abc/manifest` is not under it. Deleting
//!   the "prefix" that is one key (`ferry/ab/piece-000003`) deletes just that key. A trailing
//!   `/` changes nothing, and the empty prefix names the whole store.
//! - Expiry is coarse: [`SnapshotStore::sweep_expired`] removes keys whose last write is older
//!   than a TTL. The TTL must be far longer than the longest generation, or the early pieces of a
//!   live snapshot would be swept while its manifest still names them (the resume would then
//!   fail to verify and start over: wasteful, never wrong).
//!
//! The limit: no backend offers transactions across keys. Writing a snapshot's pieces and then
//! its manifest is how the format gets an atomic commit point out of single-key atomicity.
//!
//! Failures are never fatal to a generation: a failed write is skipped and counted, a failed
//! read means the request starts from the beginning (see [`StoreError`]). Nor may a store that
//! hangs hold a request up: the worker reaches its store through a [`DeadlineStore`], which gives
//! every call a deadline.

mod deadline;
mod file;
mod object;
mod redis;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use self::deadline::{DeadlineStore, FaultKind, LogLimiter, StoreFaults, StoreOp};
pub use self::file::FileStore;
pub use self::object::ObjectStoreBackend;
pub use self::redis::RedisStore;

/// The URL forms [`open`] accepts, for error messages and documentation.
pub const SUPPORTED_URLS: &str = "file:///absolute/path, s3://bucket[/prefix], gs://bucket[/prefix], \
     az://container[/prefix], memory://, redis://host[:port][/db], rediss://host[:port][/db]";

/// A durable key-value store for snapshot blobs. Object-safe: the worker holds an
/// `Arc<dyn SnapshotStore>` chosen at start-up by [`open`].
#[async_trait]
pub trait SnapshotStore: Send + Sync + Debug {
    /// Stores `value` under `key`, replacing any previous value atomically. Returns once the
    /// value is durable in the backend's terms (see each backend's documentation).
    async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError>;

    /// The value under `key`, or `None` if there is none. A value longer than `max_bytes` is
    /// refused with [`StoreError::TooLarge`], and is never read whole: a backend reads or
    /// transfers at most about `max_bytes + 1` bytes of it. Every caller knows what it expects
    /// (a manifest, a piece of a known length, a reply record), so there is no unbounded read.
    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError>;

    /// Removes `key`. Removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Removes every key under `prefix`: a request's whole snapshot, or, given a key, that one
    /// key (for one key, [`SnapshotStore::delete`] is cheaper: it lists nothing). Removing
    /// nothing is not an error. The empty prefix is refused, so that a bug cannot wipe every
    /// snapshot at once.
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError>;

    /// Every key under `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Removes the keys under `prefix` whose last write is older than `ttl`, and says how many
    /// it removed. This reclaims the snapshots of requests whose answer was never committed
    /// (dead-lettered, abandoned); the snapshots of answered requests are deleted at once.
    async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, StoreError>;
}

/// The store of a worker started without `--snapshot-store`: it keeps nothing. Writes succeed
/// and are forgotten, reads find nothing, so a worker without a store runs the same code as one
/// with a store that is always empty ([`crate::snapshot::Snapshots::none`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStore;

#[async_trait]
impl SnapshotStore for NoStore {
    async fn put(&self, _key: &str, _value: Bytes) -> Result<(), StoreError> {
        Ok(())
    }

    async fn get(&self, _key: &str, _max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
        Ok(None)
    }

    async fn delete(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn delete_prefix(&self, _prefix: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn list(&self, _prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    async fn sweep_expired(&self, _prefix: &str, _ttl: Duration) -> Result<usize, StoreError> {
        Ok(0)
    }
}

/// Why a store operation failed. Every variant is handled the same way on the data path: a
/// failed snapshot write is skipped and counted (the generation goes on, it just has an older
/// snapshot to resume from), and a failed read means the request starts from the beginning.
/// Only [`open`] failing at start-up stops the worker, because it means the configuration is
/// wrong (or, for a file store, that its volume is missing or hangs).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL or one of its options is malformed, names an unknown scheme, or is
    /// rejected by the backend's builder. Raised by [`open`] only: fix the configuration.
    #[error("invalid snapshot store configuration {url:?}: {reason}")]
    Config {
        /// The URL as given (credentials are never part of it for object stores; a Redis
        /// password in the URL is redacted).
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A key or prefix breaks the rules of [`check_key`]. A bug in the caller: the operation
    /// is skipped like any other failure, and the log says which key.
    #[error("invalid snapshot key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key or prefix.
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// The store could not be reached, or did not answer in time: network, DNS, connection
    /// refused or dropped, timeout. Usually transient; the next snapshot tries again.
    #[error("snapshot store {backend} unavailable: {source}")]
    Unavailable {
        /// Which backend ("s3", "redis", ...).
        backend: &'static str,
        /// The underlying error.
        source: BoxError,
    },

    /// The store refused our credentials or their permissions. Persistent until an operator
    /// fixes the credentials: every snapshot will fail the same way, so alert on this one.
    #[error("snapshot store {backend} denied access: {source}")]
    Denied {
        /// Which backend.
        backend: &'static str,
        /// The underlying error.
        source: BoxError,
    },

    /// A local filesystem operation failed: disk full, read-only or missing volume, a
    /// permission problem on the directory.
    #[error("snapshot store I/O error: cannot {op} {path}: {source}")]
    Io {
        /// What we were doing ("write", "rename", "list", ...).
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The store did not answer within its deadline (`--snapshot-store-timeout`), and the call
    /// was abandoned. It may still take effect later: see [`DeadlineStore`].
    #[error("snapshot store {op} did not answer within {after:?}")]
    Timeout {
        /// The operation ("get", "put", ...).
        op: &'static str,
        /// The deadline it was given.
        after: Duration,
    },

    /// Not tried: the store timed out or could not be reached moments ago, and is left alone for
    /// a short cool-down (see [`DeadlineStore`]).
    #[error("snapshot store {op} skipped: the store failed to answer moments ago (retried in {left:?})")]
    Skipped {
        /// The operation ("get", "put", ...).
        op: &'static str,
        /// How long the cool-down still lasts.
        left: Duration,
    },

    /// The value under `key` is longer than the reader's limit (see [`SnapshotStore::get`]),
    /// which read no more of it than that. Not an outage: the value is treated like one that does
    /// not verify (a snapshot is discarded and the request starts over; a ledger entry or a done
    /// marker is ignored).
    #[error("snapshot store value {key:?} is larger than the {limit} bytes its reader allows")]
    TooLarge {
        /// The key.
        key: String,
        /// The most bytes the reader accepts.
        limit: usize,
    },

    /// What is stored under `key` is not a value: on a file store, something other than a
    /// regular file (a symbolic link, a directory, a FIFO, a device); on Redis, a key of
    /// another type. Nothing is read from it. Handled like [`StoreError::TooLarge`].
    #[error("snapshot store key {key:?} holds {found}, not a value")]
    NotAValue {
        /// The key.
        key: String,
        /// What is there instead ("a symbolic link", "a FIFO", ...).
        found: &'static str,
    },

    /// Any other error the backend reported: an unexpected response, a protocol error, a
    /// server-side failure.
    #[error("snapshot store {backend} failed: {source}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The underlying error.
        source: BoxError,
    },
}

/// A boxed error from a backend's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl StoreError {
    /// A short, fixed name for the kind of failure, for a metric label (never a key or a
    /// request id).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Config { .. } => "config",
            StoreError::InvalidKey { .. } => "invalid_key",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::Denied { .. } => "denied",
            StoreError::Io { .. } => "io",
            StoreError::Timeout { .. } => "timeout",
            StoreError::Skipped { .. } => "skipped",
            StoreError::TooLarge { .. } => "too_large",
            StoreError::NotAValue { .. } => "not_a_value",
            StoreError::Backend { .. } => "backend",
        }
    }

    /// Whether the store answered, but with a value the caller must not use
    /// ([`StoreError::TooLarge`], [`StoreError::NotAValue`]): handled like a value that does not
    /// verify, not like a store that cannot be read.
    pub fn is_refused_value(&self) -> bool {
        matches!(self, StoreError::TooLarge { .. } | StoreError::NotAValue { .. })
    }

    fn config(url: &str, reason: impl Into<String>) -> Self {
        StoreError::Config {
            url: redact(url),
            reason: reason.into(),
        }
    }
}

/// Opens the store that `url` names. `ttl` is how long a key lives after its last write; only
/// Redis uses it here (every put sets it as the key's expiry), the other backends expire keys
/// when [`SnapshotStore::sweep_expired`] is called with a TTL of the caller's choosing.
///
/// | URL | backend |
/// |---|---|
/// | `file:///abs/path` | [`FileStore`]: files under that directory, created if missing |
/// | `s3://bucket[/prefix]` | S3 or an S3-compatible server, configured by the `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...) |
/// | `gs://bucket[/prefix]` | Google Cloud Storage, configured by the `GOOGLE_*` environment variables |
/// | `az://container[/prefix]` | Azure Blob Storage, configured by the `AZURE_*` environment variables |
/// | `memory://` | in the process's memory: tests and local runs only |
/// | `redis://[user:password@]host[:port][/db]`, `rediss://...` | [`RedisStore`]; `rediss` is TLS |
///
/// No backend connects here: a store that is down at start-up only makes the first snapshots
/// fail, and they are not fatal.
pub async fn open(url: &str, ttl: Duration) -> Result<Arc<dyn SnapshotStore>, StoreError> {
    open_with_options(url, ttl, std::iter::empty::<(&str, &str)>()).await
}

/// [`open`], giving up after `timeout`: only the file store does I/O when it opens (it creates
/// its directory), and on a hung mount that would never return.
pub async fn open_within(url: &str, ttl: Duration, timeout: Duration) -> Result<Arc<dyn SnapshotStore>, StoreError> {
    tokio::time::timeout(timeout, open(url, ttl))
        .await
        .unwrap_or(Err(StoreError::Timeout {
            op: "open",
            after: timeout,
        }))
}

/// [`open`], with object store settings given explicitly rather than read from the environment
/// alone. `options` are `object_store` configuration keys (for S3: `aws_endpoint`,
/// `aws_access_key_id`, `aws_secret_access_key`, `aws_region`, `aws_allow_http`, ...), and
/// override the environment. Tests use this to point at a local S3 server without touching the
/// process environment, which parallel tests share. Other schemes take no options.
pub async fn open_with_options<I, K, V>(
    url: &str,
    ttl: Duration,
    options: I,
) -> Result<Arc<dyn SnapshotStore>, StoreError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: Into<String>,
{
    let parsed =
        url::Url::parse(url).map_err(|e| StoreError::config(url, format!("{e}; supported: {SUPPORTED_URLS}")))?;
    let options: Vec<(String, String)> = options
        .into_iter()
        .map(|(k, v)| (k.as_ref().to_string(), v.into()))
        .collect();
    let no_options = || {
        if options.is_empty() {
            Ok(())
        } else {
            Err(StoreError::config(
                url,
                format!("the {} scheme takes no options", parsed.scheme()),
            ))
        }
    };
    match parsed.scheme() {
        "file" => {
            no_options()?;
            let root = parsed
                .to_file_path()
                .map_err(|()| StoreError::config(url, "a file URL needs an absolute local path: file:///abs/path"))?;
            Ok(Arc::new(FileStore::open(root).await?))
        }
        "memory" => {
            no_options()?;
            Ok(Arc::new(ObjectStoreBackend::memory()))
        }
        "s3" | "gs" | "az" => Ok(Arc::new(ObjectStoreBackend::from_url(&parsed, &options)?)),
        "redis" | "rediss" => {
            no_options()?;
            Ok(Arc::new(RedisStore::open(url, ttl)?))
        }
        other => Err(StoreError::config(
            url,
            format!("unknown scheme {other:?}; supported: {SUPPORTED_URLS}"),
        )),
    }
}

/// Checks that `key` is a valid key: non-empty, `/`-separated segments of ASCII letters,
/// digits, `-`, `_` and `.`, no empty segment (so no leading, trailing or doubled `/`), and no
/// segment starting with `.`.
///
/// The narrow alphabet is what lets every backend map keys without escaping: they are valid
/// file names, object store paths and Redis keys with no glob characters (`*?[]\`) to quote in
/// a `SCAN MATCH` pattern. Dot-names are reserved for the file backend's temporary files, and
/// exclude `.` and `..`, so a key can never leave the store's directory.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let invalid = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return invalid("empty");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return invalid("empty segment (leading, trailing or doubled '/')");
        }
        if segment.starts_with('.') {
            return invalid("a segment starts with '.'");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return invalid("only ASCII letters, digits, '-', '_', '.' and '/' are allowed");
        }
    }
    Ok(())
}

/// Checks a prefix and returns it without a trailing `/`. The empty prefix (or `/`) names the
/// whole store; any other prefix follows the rules of a key.
pub(crate) fn check_prefix(prefix: &str) -> Result<&str, StoreError> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if !trimmed.is_empty() {
        check_key(trimmed)?;
    }
    Ok(trimmed)
}

/// Like [`check_prefix`], but refuses the whole store: for deletions.
pub(crate) fn check_delete_prefix(prefix: &str) -> Result<&str, StoreError> {
    let trimmed = check_prefix(prefix)?;
    if trimmed.is_empty() {
        return Err(StoreError::InvalidKey {
            key: prefix.to_string(),
            reason: "refusing to delete the whole store",
        });
    }
    Ok(trimmed)
}

/// `url` with any password replaced, for error messages and logs: `redis://user:pw@host` becomes
/// `redis://user:REDACTED@host`, and `rediss://:pw@host` (Redis' password-only form)
/// `rediss://:REDACTED@host`. A URL that does not parse (so that where its password ends is
/// unclear) keeps only its scheme and what follows the last `@` of its authority.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        // `user:secret@host` parses too, as scheme `user` and path `secret@host`: a URL
        // without an authority is treated as one that does not parse.
        Ok(mut parsed) if !parsed.cannot_be_a_base() => {
            if parsed.password().is_some() {
                // Setting a password only fails for URLs that cannot have one, and this one has one.
                let _ = parsed.set_password(Some("REDACTED"));
            }
            parsed.to_string()
        }
        _ => {
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), url),
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}REDACTED@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests;
