//! Every read of a resume is bounded by what the manifest and the model allow, and a blob over
//! its bound is a snapshot that does not verify: discarded, never read whole.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::engine::Prepared;
use crate::snapshot::format::{self, Piece, PieceRef, FORMAT_VERSION, MANIFEST};
use crate::snapshot::{store, Snapshots};

const PREFIX: &str = "ferry/0123456789abcdef0123456789abcdef/";
const PIECE: &str = "piece-000001-0abc1234";

fn config() -> LlamaConfig {
    LlamaConfig {
        n_layer: 2,
        n_head: 2,
        n_kv_head: 1,
        head_dim: 4,
        embedding_length: 8,
        context_length: 64,
        rms_norm_eps: 1e-5,
        rope_freq_base: 10_000.0,
        vocab_size: 32,
    }
}

fn shape() -> KvShape {
    let c = config();
    KvShape {
        n_layer: c.n_layer as u32,
        n_kv_head: c.n_kv_head as u32,
        head_dim: c.head_dim as u32,
    }
}

/// A store that records the limit of every read, and answers from another.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn SnapshotStore>,
    reads: Mutex<Vec<(String, usize)>>,
}

impl Recording {
    fn reads(&self) -> Vec<(String, usize)> {
        self.reads.lock().expect("not poisoned").clone()
    }
}

#[async_trait]
impl SnapshotStore for Recording {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.inner.put(key, value).await
    }
    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
        self.reads
            .lock()
            .expect("not poisoned")
            .push((key.to_string(), max_bytes));
        self.inner.get(key, max_bytes).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        self.inner.delete_prefix(prefix).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, StoreError> {
        self.inner.sweep_expired(prefix, ttl).await
    }
}

/// A file store behind a recorder, and the service over it.
struct Fixture {
    _dir: tempfile::TempDir,
    files: Arc<dyn SnapshotStore>,
    recording: Arc<Recording>,
    snaps: Snapshots,
    prepared: Prepared,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let files: Arc<dyn SnapshotStore> = Arc::new(
        store::FileStore::open(dir.path().join("snapshots"))
            .await
            .expect("file store"),
    );
    let recording = Arc::new(Recording {
        inner: files.clone(),
        reads: Mutex::default(),
    });
    Fixture {
        _dir: dir,
        files,
        snaps: Snapshots::for_tests(recording.clone(), config()),
        recording,
        prepared: Prepared::greedy(vec![1, 2, 3], 8),
    }
}

impl Fixture {
    /// A valid snapshot of the prompt and two generated tokens: one piece of 4 positions.
    /// Returns the piece's bytes and the manifest.
    fn snapshot(&self) -> (Vec<u8>, Manifest) {
        let per = shape().values_per_tensor(4);
        let layers = (0..2).map(|l| (vec![l as f32; per], vec![-(l as f32); per])).collect();
        let piece = Piece { from: 0, to: 4, layers }.encode(shape());
        let manifest = Manifest {
            version: FORMAT_VERSION,
            model: format::model_fingerprint("test", "f32", "cpu"),
            request: format::request_fingerprint(&self.prepared.prompt, &self.prepared.params),
            prompt_len: 3,
            tokens: vec![10, 11],
            pieces: vec![PieceRef {
                name: PIECE.into(),
                from: 0,
                to: 4,
                bytes: piece.len() as u64,
                crc32: u32::from_le_bytes(piece[piece.len() - 4..].try_into().expect("4 bytes")),
            }],
            attempt: 1,
            worker: "w-1".into(),
            seq: 1,
        };
        (piece, manifest)
    }

    async fn store(&self, piece: Vec<u8>, manifest: &[u8]) {
        self.files
            .put(&format!("{PREFIX}{PIECE}"), piece.into())
            .await
            .expect("put piece");
        self.files
            .put(&format!("{PREFIX}{MANIFEST}"), Bytes::copy_from_slice(manifest))
            .await
            .expect("put manifest");
    }

    async fn load(&self) -> Result<Option<Restored>, ResumeError> {
        let store: Arc<dyn SnapshotStore> = self.recording.clone();
        let request = format::request_fingerprint(&self.prepared.prompt, &self.prepared.params);
        let model = format::model_fingerprint("test", "f32", "cpu");
        load(&store, PREFIX, &model, &request, &config(), &Device::Cpu).await
    }

    /// `find` found nothing, discarded the snapshot, and deleted it.
    async fn assert_discarded(&self) {
        assert!(self.snaps.find(PREFIX, &self.prepared).await.is_none());
        assert_eq!(self.snaps.stats.discarded.load(Relaxed), 1, "counted as a bad snapshot");
        assert_eq!(
            self.files.list(PREFIX).await.expect("list"),
            Vec::<String>::new(),
            "and deleted"
        );
    }
}

#[tokio::test]
async fn a_valid_snapshot_resumes_and_each_read_is_capped_at_what_it_should_hold() {
    let f = fixture().await;
    let (piece, manifest) = f.snapshot();
    let piece_len = piece.len();
    f.store(piece, &manifest.encode()).await;
    let found = f.snaps.find(PREFIX, &f.prepared).await.expect("resumes");
    assert_eq!(found.manifest, manifest);
    assert_eq!(
        f.recording.reads(),
        [
            (
                format!("{PREFIX}{MANIFEST}"),
                format::max_manifest_bytes(config().context_length)
            ),
            (format!("{PREFIX}{PIECE}"), piece_len),
        ]
    );
}

#[tokio::test]
async fn a_piece_larger_than_its_manifest_says_is_refused_and_discarded() {
    let f = fixture().await;
    let (mut piece, manifest) = f.snapshot();
    let limit = piece.len();
    piece.resize(piece.len() + (1 << 20), 0);
    f.store(piece, &manifest.encode()).await;
    let loaded = f.load().await;
    assert!(
        matches!(&loaded, Err(ResumeError::Refused(StoreError::TooLarge { key, limit: l }))
            if *key == format!("{PREFIX}{PIECE}") && *l == limit),
        "{loaded:?}"
    );
    f.assert_discarded().await;
}

#[tokio::test]
async fn a_manifest_that_gives_a_piece_more_bytes_than_its_positions_take_is_refused_unread() {
    let f = fixture().await;
    let (piece, mut manifest) = f.snapshot();
    manifest.pieces[0].bytes = 1 << 40;
    f.store(piece, &manifest.encode()).await;
    let loaded = f.load().await;
    assert!(
        matches!(loaded, Err(ResumeError::Format(FormatError::Malformed(_)))),
        "{loaded:?}"
    );
    assert!(
        f.recording.reads().iter().all(|(key, _)| !key.ends_with(PIECE)),
        "the piece was never read: {:?}",
        f.recording.reads()
    );
    f.assert_discarded().await;
}

#[tokio::test]
async fn a_manifest_of_more_positions_than_the_context_is_refused_unread() {
    let f = fixture().await;
    let (piece, mut manifest) = f.snapshot();
    // Coverage holds (the pieces cover the prompt and the tokens but the last), the context
    // does not: this is how a manifest would ask for pieces of any size.
    manifest.prompt_len = 1 << 20;
    manifest.pieces[0].to = manifest.prompt_len + 1;
    manifest.pieces[0].bytes = shape().piece_bytes(manifest.pieces[0].to);
    f.store(piece, &manifest.encode()).await;
    let loaded = f.load().await;
    assert!(
        matches!(loaded, Err(ResumeError::Format(FormatError::Malformed(_)))),
        "{loaded:?}"
    );
    assert!(f.recording.reads().iter().all(|(key, _)| !key.ends_with(PIECE)));
}

#[tokio::test]
async fn a_manifest_larger_than_the_context_allows_is_refused_and_discarded() {
    let f = fixture().await;
    let (piece, _) = f.snapshot();
    let huge = vec![b'x'; format::max_manifest_bytes(config().context_length) + 1];
    f.store(piece, &huge).await;
    let loaded = f.load().await;
    assert!(
        matches!(loaded, Err(ResumeError::Refused(StoreError::TooLarge { .. }))),
        "{loaded:?}"
    );
    f.assert_discarded().await;
}

#[tokio::test]
async fn a_manifest_that_is_a_link_is_refused_and_the_link_removed() {
    let f = fixture().await;
    let (piece, manifest) = f.snapshot();
    f.store(piece, &manifest.encode()).await;
    let store = store::FileStore::open(f._dir.path().join("snapshots"))
        .await
        .expect("file store");
    let path = store.root().join(PREFIX.trim_end_matches('/')).join(MANIFEST);
    std::fs::remove_file(&path).expect("remove");
    std::os::unix::fs::symlink("/dev/zero", &path).expect("symlink");
    let loaded = tokio::time::timeout(Duration::from_secs(10), f.load())
        .await
        .expect("refused at once, not read");
    assert!(
        matches!(loaded, Err(ResumeError::Refused(StoreError::NotAValue { .. }))),
        "{loaded:?}"
    );
    f.assert_discarded().await;
    assert!(std::fs::symlink_metadata(&path).is_err(), "the link is gone");
}
