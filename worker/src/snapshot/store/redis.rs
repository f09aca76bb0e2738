//! Snapshots in Redis (or a protocol-compatible server such as Valkey): one string per key.
//!
//! A put is `SET key value PX <ttl>`: atomic, and when Redis acknowledges it the value is in
//! the server's memory. Whether it survives a Redis restart is Redis's configuration, not ours:
//! with `appendonly yes` and `appendfsync always` it is on disk before the reply, with
//! `appendfsync everysec` (the usual setting) up to a second of writes can be lost, and with
//! neither AOF nor RDB it does not survive at all. A lost snapshot only costs a restart from the
//! beginning, so `everysec` is a fair trade; size `maxmemory` for the snapshots in flight and
//! use a `volatile-*` eviction policy, since every snapshot key has a TTL.
//!
//! Expiry is Redis's own: every put sets the key's TTL to the one the store was opened with, so
//! orphaned snapshots vanish by themselves and [`SnapshotStore::sweep_expired`] has nothing to
//! do. Each key's TTL restarts at its last write, the same rule the other backends' sweeps
//! apply.
//!
//! Listing and prefix deletion walk the keyspace with `SCAN MATCH <prefix>/*`, which never
//! blocks the server the way `KEYS` would, but visits every key of the database: keep the
//! snapshots in a database (the URL's `/db`) or a server of their own, and delete single keys
//! with [`SnapshotStore::delete`], which is one `UNLINK` (the worker deletes a finished
//! request's keys that way, by name: see `Snapshots::delete`). Deletion uses `UNLINK`,
//! which frees large values in the background. The key alphabet (see [`check_key`]) has no glob
//! characters, so a prefix needs no quoting in the pattern. Single-node Redis only: a cluster
//! would need a `SCAN` per node.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{check_delete_prefix, check_key, check_prefix, redact, SnapshotStore, StoreError};

/// How many keys one `SCAN` step asks for, and one `UNLINK` removes. Larger steps mean fewer
/// round trips on a big keyspace; each is still a short, bounded amount of server work.
const SCAN_COUNT: usize = 1000;

/// A [`SnapshotStore`] in Redis.
#[derive(Clone)]
pub struct RedisStore {
    /// Reconnects by itself after the connection drops; a command issued meanwhile fails and
    /// the next one uses the new connection.
    connection: ConnectionManager,
    /// The expiry every put sets, in milliseconds (`SET ... PX`).
    ttl_ms: u64,
    /// The URL with any password redacted, for `Debug`.
    url: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

impl RedisStore {
    /// A store for a `redis://` or `rediss://` URL whose keys expire `ttl` after their last
    /// write. Does not connect: the first command does, so a Redis that is down at start-up
    /// only fails the first snapshots.
    pub fn open(url: &str, ttl: Duration) -> Result<Self, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Err(StoreError::config(
                url,
                "the Redis store needs a TTL of at least a millisecond",
            ));
        }
        install_crypto_provider();
        let client = redis::Client::open(url).map_err(|e| StoreError::config(url, e.to_string()))?;
        // Fail fast: a snapshot that cannot be written within seconds is skipped, and a fresher
        // one follows. The crate's defaults retry a reconnect for several seconds more.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::config(url, e.to_string()))?;
        Ok(Self {
            connection,
            ttl_ms,
            url: redact(url),
        })
    }

    /// The keys under a checked prefix: the prefix itself if it is a key, and the keys that
    /// `SCAN MATCH <prefix>/*` finds. Sorted and deduplicated (`SCAN` may return a key twice),
    /// leaving out keys that are not ours: other programs may share the database.
    async fn keys_under(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut connection = self.connection.clone();
        let mut found = Vec::new();
        if !prefix.is_empty() {
            let exists: bool = redis::cmd("EXISTS")
                .arg(prefix)
                .query_async(&mut connection)
                .await
                .map_err(classify)?;
            if exists {
                found.push(prefix.to_string());
            }
        }
        let pattern = if prefix.is_empty() {
            "*".to_string()
        } else {
            format!("{prefix}/*")
        };
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut connection)
                .await
                .map_err(classify)?;
            found.extend(keys.into_iter().filter(|k| check_key(k).is_ok()));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    async fn unlink(&self, keys: &[String]) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        for batch in keys.chunks(SCAN_COUNT) {
            redis::cmd("UNLINK")
                .arg(batch)
                .query_async::<()>(&mut connection)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }
}

#[async_trait]
impl SnapshotStore for RedisStore {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        redis::cmd("SET")
            .arg(key)
            .arg(value.as_ref())
            .arg("PX")
            .arg(self.ttl_ms)
            .query_async::<()>(&mut self.connection.clone())
            .await
            .map_err(classify)
    }

    /// `MULTI`, `STRLEN key`, `GETRANGE key 0 max_bytes`, `EXISTS key`, `EXEC`: one round trip,
    /// atomic, and never more than `max_bytes + 1` bytes of the value on the wire. `STRLEN`
    /// says whether the value fits; `EXISTS` tells an empty value from a missing key, which
    /// `STRLEN` and `GETRANGE` both answer with nothing.
    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        // `GETRANGE` takes a signed end; a limit past `i64::MAX` is none (a Redis string holds
        // at most 512 MB).
        let last = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let answer: redis::RedisResult<(u64, Vec<u8>, bool)> = redis::pipe()
            .atomic()
            .cmd("STRLEN")
            .arg(key)
            .cmd("GETRANGE")
            .arg(key)
            .arg(0)
            .arg(last)
            .cmd("EXISTS")
            .arg(key)
            .query_async(&mut self.connection.clone())
            .await;
        let (len, value, exists) = match answer {
            Ok(answer) => answer,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                return Err(StoreError::NotAValue {
                    key: key.to_string(),
                    found: "a key that is not a string",
                })
            }
            Err(e) => return Err(classify(e)),
        };
        if len > max_bytes as u64 || value.len() > max_bytes {
            return Err(StoreError::TooLarge {
                key: key.to_string(),
                limit: max_bytes,
            });
        }
        Ok(exists.then(|| Bytes::from(value)))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        self.unlink(&[key.to_string()]).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let prefix = check_delete_prefix(prefix)?;
        let keys = self.keys_under(prefix).await?;
        self.unlink(&keys).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.keys_under(check_prefix(prefix)?).await
    }

    /// Nothing to do: every key expires by itself, `ttl` after its last put (see the module
    /// documentation). Always removes 0 keys.
    async fn sweep_expired(&self, prefix: &str, _ttl: Duration) -> Result<usize, StoreError> {
        check_prefix(prefix)?;
        Ok(0)
    }
}

/// Sorts a Redis error into our kinds.
fn classify(e: redis::RedisError) -> StoreError {
    let backend = "redis";
    let denied = matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
    if denied {
        StoreError::Denied {
            backend,
            source: Box::new(e),
        }
    } else if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() || e.is_connection_dropped() {
        StoreError::Unavailable {
            backend,
            source: Box::new(e),
        }
    } else {
        StoreError::Backend {
            backend,
            source: Box::new(e),
        }
    }
}

/// Makes sure `rediss://` connections can build their TLS configuration.
///
/// The redis crate asks rustls for the process-wide default crypto provider, and rustls only
/// picks one by itself when exactly one is compiled in. This binary has two: `ring` (through
/// ureq) and `aws-lc-rs` (through `object_store`), so without a default every TLS connection
/// to Redis would panic. Installing one is idempotent in effect: if anything installed a
/// default first, that one stays.
fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
