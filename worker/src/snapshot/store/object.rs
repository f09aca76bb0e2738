//! Snapshots in an object store (S3 and S3-compatible servers, Google Cloud Storage, Azure Blob
//! Storage) or in memory, through the `object_store` crate.
//!
//! Key `a/b` of a store opened at `s3://bucket/root` is the object `root/a/b` in `bucket`. A
//! put is a single PUT request: when it returns, the object store has acknowledged the whole
//! object, and readers see the old object or the new one, never a mix (S3 and the others
//! promise read-after-write consistency and atomic replacement of a single object).
//!
//! Expiry goes by each object's `last_modified` as the listing reports it, which is the
//! server's clock; it is compared with ours, so the TTL should dwarf any plausible clock skew.
//! A bucket lifecycle rule that expires objects under the prefix does the same job without a
//! sweeper, and is a good belt to these braces.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use url::Url;

use super::{check_delete_prefix, check_key, check_prefix, SnapshotStore, StoreError};

/// How long a request, retries included, may take before the store gives up. The crate's
/// default (3 minutes, 10 retries) suits batch jobs; a snapshot that cannot be written in 30
/// seconds is better skipped, since a fresher one follows.
const RETRY_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_RETRIES: usize = 3;

/// A [`SnapshotStore`] over any `object_store` backend.
#[derive(Clone)]
pub struct ObjectStoreBackend {
    /// The client for the bucket or container.
    store: Arc<dyn ObjectStore>,
    /// Where our keys start inside the bucket: the URL's path. Empty for the bucket's root.
    root: Path,
    /// The backend's name, for errors: "s3", "gcs", "azure" or "memory".
    backend: &'static str,
}

impl fmt::Debug for ObjectStoreBackend {
    // The store's own `Debug` would print its configuration, credentials included.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreBackend")
            .field("store", &self.store.to_string())
            .field("root", &self.root.as_ref())
            .finish()
    }
}

impl ObjectStoreBackend {
    /// A store in this process's memory, for tests and local runs.
    pub fn memory() -> Self {
        Self {
            store: Arc::new(object_store::memory::InMemory::new()),
            root: Path::default(),
            backend: "memory",
        }
    }

    /// A store for an `s3://`, `gs://` or `az://` URL. Settings come from the backend's
    /// standard environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`), then from `options`,
    /// which override them; an option the backend does not know is an error, not ignored.
    pub fn from_url(url: &Url, options: &[(String, String)]) -> Result<Self, StoreError> {
        let config_error = |reason: String| StoreError::config(url.as_str(), reason);
        let retry = RetryConfig {
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
            ..RetryConfig::default()
        };
        let (store, backend): (Arc<dyn ObjectStore>, _) = match url.scheme() {
            "s3" => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let mut builder = AmazonS3Builder::from_env().with_url(url.as_str()).with_retry(retry);
                for (key, value) in options {
                    let key: AmazonS3ConfigKey = key.parse().map_err(|e| config_error(format!("{e}")))?;
                    builder = builder.with_config(key, value);
                }
                (
                    Arc::new(builder.build().map_err(|e| config_error(e.to_string()))?),
                    "s3",
                )
            }
            "gs" => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let mut builder = GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry);
                for (key, value) in options {
                    let key: GoogleConfigKey = key.parse().map_err(|e| config_error(format!("{e}")))?;
                    builder = builder.with_config(key, value);
                }
                (
                    Arc::new(builder.build().map_err(|e| config_error(e.to_string()))?),
                    "gcs",
                )
            }
            "az" => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let mut builder = MicrosoftAzureBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry);
                for (key, value) in options {
                    let key: AzureConfigKey = key.parse().map_err(|e| config_error(format!("{e}")))?;
                    builder = builder.with_config(key, value);
                }
                (
                    Arc::new(builder.build().map_err(|e| config_error(e.to_string()))?),
                    "azure",
                )
            }
            other => return Err(config_error(format!("{other} is not an object store scheme"))),
        };
        let root = Path::from_url_path(url.path()).map_err(|e| config_error(e.to_string()))?;
        Ok(Self { store, root, backend })
    }

    /// The object a key lives in.
    fn location(&self, key: &str) -> Result<Path, StoreError> {
        let full = if self.root.as_ref().is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.root.as_ref())
        };
        // Valid keys are valid object paths; refuse rather than panic if that ever changes.
        Path::parse(&full).map_err(|_| StoreError::InvalidKey {
            key: key.to_string(),
            reason: "not a valid object path",
        })
    }

    /// The object prefix that a checked key prefix (maybe empty) names.
    fn prefix_location(&self, prefix: &str) -> Result<Path, StoreError> {
        if prefix.is_empty() {
            Ok(self.root.clone())
        } else {
            self.location(prefix)
        }
    }

    /// The key an object holds, or `None` for an object under the root that is not one of
    /// ours (a name we could never have written).
    fn key_of(&self, location: &Path) -> Option<String> {
        let parts: Vec<_> = location.prefix_match(&self.root)?.collect();
        let key = parts.iter().map(|p| p.as_ref()).collect::<Vec<_>>().join("/");
        check_key(&key).is_ok().then_some(key)
    }

    /// The objects under a checked key prefix, with their metadata. An object store lists
    /// `prefix/...` only, so the object named by the prefix itself is asked for separately.
    async fn objects(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let mut objects = self.objects_below(prefix).await?;
        if !prefix.is_empty() {
            match self.store.head(&self.location(prefix)?).await {
                Ok(meta) => objects.push(meta),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(objects)
    }

    /// The objects strictly below a checked key prefix (`prefix/...`).
    async fn objects_below(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let location = self.prefix_location(prefix)?;
        let listed = if location.as_ref().is_empty() {
            self.store.list(None)
        } else {
            self.store.list(Some(&location))
        };
        listed.try_collect().await.map_err(|e| self.error(e))
    }

    /// Deletes `locations`; an object already gone is not an error.
    async fn delete_all(&self, locations: Vec<Path>) -> Result<(), StoreError> {
        let stream = futures::stream::iter(locations.into_iter().map(Ok)).boxed();
        let mut results = self.store.delete_stream(stream);
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(())
    }

    fn error(&self, e: object_store::Error) -> StoreError {
        classify(self.backend, e)
    }
}

#[async_trait]
impl SnapshotStore for ObjectStoreBackend {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        let location = self.location(key)?;
        self.store
            .put(&location, PutPayload::from(value))
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// One GET. The object's size comes with the response's headers, before its body: a larger
    /// object is refused there, and its body is dropped unread. The body is then read no
    /// further than `max_bytes + 1` bytes, whatever the headers said. (A ranged GET would bound
    /// the transfer by itself, but S3 answers a range on an empty object with an error.)
    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let location = self.location(key)?;
        let found = match self.store.get(&location).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        let too_large = || StoreError::TooLarge {
            key: key.to_string(),
            limit: max_bytes,
        };
        let size = found.range.end.saturating_sub(found.range.start);
        if size > max_bytes as u64 {
            return Err(too_large());
        }
        // At most `max_bytes`, as just checked.
        let mut value = Vec::with_capacity(size as usize);
        let mut body = found.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.error(e))?;
            if value.len() + chunk.len() > max_bytes {
                return Err(too_large());
            }
            value.extend_from_slice(&chunk);
        }
        Ok(Some(Bytes::from(value)))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        self.delete_all(vec![self.location(key)?]).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let prefix = check_delete_prefix(prefix)?;
        // The object the prefix itself names is deleted blindly, which saves a request:
        // deleting a missing object is not an error.
        let mut locations = vec![self.location(prefix)?];
        locations.extend(self.objects_below(prefix).await?.into_iter().map(|meta| meta.location));
        self.delete_all(locations).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = check_prefix(prefix)?;
        let mut keys: Vec<String> = self
            .objects(prefix)
            .await?
            .iter()
            .filter_map(|meta| self.key_of(&meta.location))
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, StoreError> {
        let prefix = check_prefix(prefix)?;
        let Some(cutoff) = SystemTime::now().checked_sub(ttl) else {
            return Ok(0);
        };
        let expired: Vec<Path> = self
            .objects(prefix)
            .await?
            .into_iter()
            .filter(|meta| SystemTime::from(meta.last_modified) < cutoff && self.key_of(&meta.location).is_some())
            .map(|meta| meta.location)
            .collect();
        let count = expired.len();
        self.delete_all(expired).await?;
        Ok(count)
    }
}

/// Sorts an `object_store` error into our kinds. Transport failures (connect, send, timeout)
/// are recognised by the HTTP error in the chain of causes; everything else the server said
/// that is not about credentials is a backend error.
fn classify(backend: &'static str, e: object_store::Error) -> StoreError {
    use object_store::client::{HttpError, HttpErrorKind};
    match e {
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            StoreError::Denied {
                backend,
                source: Box::new(e),
            }
        }
        e => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut transport = false;
            while let Some(c) = cause {
                if let Some(http) = c.downcast_ref::<HttpError>() {
                    transport = matches!(
                        http.kind(),
                        HttpErrorKind::Connect
                            | HttpErrorKind::Request
                            | HttpErrorKind::Timeout
                            | HttpErrorKind::Interrupted
                    );
                    break;
                }
                cause = c.source();
            }
            if transport {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_round_trip_list_and_delete() {
        let store = ObjectStoreBackend::memory();
        store
            .put("ferry/a/manifest", Bytes::from_static(b"m"))
            .await
            .expect("put");
        store
            .put("ferry/a/piece-000000", Bytes::from_static(b"p"))
            .await
            .expect("put");
        store
            .put("ferry/ab/manifest", Bytes::from_static(b"other"))
            .await
            .expect("put");
        assert_eq!(
            store.get("ferry/a/manifest", 1).await.expect("get"),
            Some(Bytes::from_static(b"m"))
        );
        assert_eq!(store.get("ferry/a/missing", 1).await.expect("get"), None);
        assert!(matches!(
            store.get("ferry/ab/manifest", 4).await,
            Err(StoreError::TooLarge { limit: 4, .. })
        ));
        assert_eq!(
            store.list("ferry/a").await.expect("list"),
            ["ferry/a/manifest", "ferry/a/piece-000000"]
        );
        store.delete_prefix("ferry/a/").await.expect("delete");
        assert_eq!(store.list("").await.expect("list"), ["ferry/ab/manifest"]);
        store
            .delete_prefix("ferry/nothing")
            .await
            .expect("deleting nothing is fine");
    }

    #[tokio::test]
    async fn memory_sweep_goes_by_last_modified() {
        let store = ObjectStoreBackend::memory();
        store
            .put("ferry/a/manifest", Bytes::from_static(b"m"))
            .await
            .expect("put");
        assert_eq!(
            store
                .sweep_expired("ferry", Duration::from_secs(3600))
                .await
                .expect("sweep"),
            0
        );
        assert_eq!(store.list("ferry").await.expect("list").len(), 1);
        // A zero TTL makes everything written before now expired; the in-memory store stamps
        // objects with the same clock, so no waiting is needed, only a strictly later "now".
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut removed = 0;
        while removed == 0 && std::time::Instant::now() < deadline {
            removed = store.sweep_expired("ferry", Duration::ZERO).await.expect("sweep");
        }
        assert_eq!(removed, 1);
        assert_eq!(store.list("ferry").await.expect("list"), Vec::<String>::new());
    }

    #[test]
    fn keys_live_under_the_url_path() {
        let url = Url::parse("s3://bucket/some/root").expect("url");
        let options = [
            ("aws_region".to_string(), "us-east-1".to_string()),
            ("aws_access_key_id".to_string(), "AKIDEXAMPLE".to_string()),
            ("aws_secret_access_key".to_string(), "very-secret-key".to_string()),
        ];
        let store = ObjectStoreBackend::from_url(&url, &options).expect("s3 store");
        let location = store.location("ferry/a/manifest").expect("location");
        assert_eq!(location.as_ref(), "some/root/ferry/a/manifest");
        assert_eq!(store.key_of(&location).as_deref(), Some("ferry/a/manifest"));
        assert_eq!(store.key_of(&Path::from("elsewhere/x")), None);
        assert!(
            !format!("{store:?}").contains("very-secret-key"),
            "Debug never shows credentials"
        );
    }

    #[test]
    fn unknown_options_are_refused() {
        let url = Url::parse("s3://bucket").expect("url");
        let options = [("aws_no_such_setting".to_string(), "1".to_string())];
        assert!(matches!(
            ObjectStoreBackend::from_url(&url, &options),
            Err(StoreError::Config { .. })
        ));
    }
}
