//! Snapshots as files under a directory: a persistent volume, or a shared file system that
//! another pod mounts after this one is evicted.
//!
//! Key `a/b/c` is the file `<root>/a/b/c`. A put writes a temporary file beside the target
//! (`.c.tmp-<random>`), fsyncs it, renames it over the target, and fsyncs the directory: the
//! rename is the atomic switch from the old value to the new one, and the two fsyncs make the
//! data and the rename survive a power cut. Directories a put creates are fsynced into their
//! parents too.
//!
//! Dot-names are never keys (see [`check_key`]), so temporary files never show up in listings.
//! A put interrupted by a crash leaves its temporary file behind; sweeps remove it once it is
//! older than the TTL.
//!
//! The limit: a key cannot also be a prefix of another key (`a/b` and `a/b/c`), because `a/b`
//! cannot be both a file and a directory. The snapshot format's keys never nest that way.
//!
//! File system calls on a hung mount (an NFS server gone away) never return, and no deadline can
//! interrupt a thread inside one. So each call runs on a thread of the store's own rather than
//! on tokio's blocking pool, whose threads the runtime waits for when the process exits: a
//! caller's deadline abandons the thread, and the process still exits. At most
//! [`MAX_CALLS`] run at once, so a hung mount holds a bounded number of threads; the calls beyond
//! them wait for a turn, and their deadline ends the wait.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{check_delete_prefix, check_key, check_prefix, SnapshotStore, StoreError};

/// How often a put retries after a concurrent sweep removed the (empty) directory it had just
/// created. One retry is almost always enough; the bound only stops a pathological loop.
const PUT_ATTEMPTS: usize = 3;

/// File system calls running at once, at most (see the module documentation).
pub const MAX_CALLS: usize = 16;

/// A [`SnapshotStore`] on the local file system.
#[derive(Debug, Clone)]
pub struct FileStore {
    /// The directory every key is relative to. Absolute, and it exists.
    root: PathBuf,
    /// A turn to run a file system call: [`MAX_CALLS`] permits.
    turns: Arc<Semaphore>,
}

impl FileStore {
    /// A store rooted at `root`, which must be absolute; it is created if missing.
    pub async fn open(root: PathBuf) -> Result<Self, StoreError> {
        if !root.is_absolute() {
            return Err(StoreError::Config {
                url: root.display().to_string(),
                reason: "the snapshot directory must be an absolute path".into(),
            });
        }
        let store = Self {
            root,
            turns: Arc::new(Semaphore::new(MAX_CALLS)),
        };
        let dir = store.root.clone();
        store
            .blocking(move || fs::create_dir_all(&dir).map_err(io_error("create", &dir)))
            .await?;
        Ok(store)
    }

    /// The directory the store writes under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        // Keys were checked: plain segments, no `.` or `..`, so the path stays under the root.
        key.split('/')
            .fold(self.root.clone(), |path, segment| path.join(segment))
    }
}

#[async_trait]
impl SnapshotStore for FileStore {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        let (root, path) = (self.root.clone(), self.path(key));
        self.blocking(move || write_atomically(&root, &path, &value)).await
    }

    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let (key, path) = (key.to_string(), self.path(key));
        self.blocking(move || read_bounded(&key, &path, max_bytes)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let path = self.path(key);
        self.blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(io_error("remove", &path)(e)),
        })
        .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let path = self.path(check_delete_prefix(prefix)?);
        self.blocking(move || {
            // A directory is a group of keys; anything else is the one key the prefix names.
            let removed = match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => Ok(()),
                Err(e) if is_absent(&e) => Ok(()),
                Err(e) => Err(io_error("remove", &path)(e)),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = check_prefix(prefix)?;
        let (root, dir) = (self.root.clone(), self.path_or_root(prefix));
        self.blocking(move || {
            let mut keys = Vec::new();
            walk(&root, &dir, &mut |path, _| {
                if let Some(key) = key_of(&root, path) {
                    keys.push(key);
                }
                Ok(())
            })?;
            keys.sort();
            Ok(keys)
        })
        .await
    }

    async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, StoreError> {
        let prefix = check_prefix(prefix)?;
        let (root, dir) = (self.root.clone(), self.path_or_root(prefix));
        self.blocking(move || sweep(&root, &dir, ttl)).await
    }
}

impl FileStore {
    fn path_or_root(&self, prefix: &str) -> PathBuf {
        if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix)
        }
    }
}

/// Writes `value` to `path` through a temporary file, fsync and rename (see the module doc).
fn write_atomically(root: &Path, path: &Path, value: &[u8]) -> Result<(), StoreError> {
    // Paths built by `FileStore::path` from a valid key always have a parent and a file name.
    let dir = path.parent().expect("a key's path has a parent");
    let name = path
        .file_name()
        .expect("a key's path has a file name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let mut attempt = 0;
    let mut file = loop {
        attempt += 1;
        create_dirs(root, dir)?;
        match fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => break file,
            // A sweep removed the directory between its creation and ours: create it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < PUT_ATTEMPTS => continue,
            Err(e) => return Err(io_error("create", &tmp)(e)),
        }
    };
    let written = file.write_all(value).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.map_err(io_error("write", &tmp)).and_then(|()| {
        fs::rename(&tmp, path).map_err(io_error("rename", path))?;
        sync_dir(dir)
    }) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The value in the file at `path`, if there is one: a regular file of at most `max_bytes`.
///
/// The file is opened without following a symbolic link (`O_NOFOLLOW`) and without waiting for
/// a writer (`O_NONBLOCK`, which a FIFO would otherwise need and which changes nothing for a
/// regular file), and what was opened must be a regular file: a link, a directory, a FIFO or a
/// device (`/dev/zero`) under a key is refused before anything is read from it. At most
/// `max_bytes + 1` bytes are read, so even a file that grows while it is read is bounded.
fn read_bounded(key: &str, path: &Path, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
    let not_a_value = |found| StoreError::NotAValue {
        key: key.to_string(),
        found,
    };
    let too_large = || StoreError::TooLarge {
        key: key.to_string(),
        limit: max_bytes,
    };
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if is_absent(&e) => return Ok(None),
        // What `O_NOFOLLOW` answers for a link.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(not_a_value("a symbolic link")),
        Err(e) => return Err(io_error("open", path)(e)),
    };
    let meta = file.metadata().map_err(io_error("stat", path))?;
    if !meta.is_file() {
        return Err(not_a_value(file_kind(&meta.file_type())));
    }
    if meta.len() > max_bytes as u64 {
        return Err(too_large());
    }
    // The length just read is at most `max_bytes`; the file may still grow meanwhile, and
    // `take` stops reading one byte past the limit.
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take((max_bytes as u64).saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io_error("read", path))?;
    if data.len() > max_bytes {
        return Err(too_large());
    }
    Ok(Some(Bytes::from(data)))
}

/// What a file that is not a regular file is, for [`StoreError::NotAValue`].
fn file_kind(t: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "something other than a regular file"
    }
}

/// Creates `dir` and its missing ancestors below `root`, fsyncing each new directory's parent
/// so that the new entry is durable before a file inside it is.
fn create_dirs(root: &Path, dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() || dir == root {
        return Ok(());
    }
    // `dir` is under `root`, so it has a parent.
    let parent = dir.parent().expect("a directory under the root has a parent");
    create_dirs(root, parent)?;
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("create directory", dir)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

/// Removes the files under `dir` last modified more than `ttl` ago, keys and stray temporary
/// files alike, then the directories that became empty. Counts the keys removed.
fn sweep(root: &Path, dir: &Path, ttl: Duration) -> Result<usize, StoreError> {
    let Some(cutoff) = SystemTime::now().checked_sub(ttl) else {
        return Ok(0);
    };
    let mut removed = 0;
    walk(root, dir, &mut |path, meta| {
        let modified = meta.modified().map_err(io_error("read the mtime of", path))?;
        if modified < cutoff {
            match fs::remove_file(path) {
                Ok(()) => removed += usize::from(key_of(root, path).is_some()),
                // Deleted by someone else meanwhile (a delete_prefix, another worker's sweep).
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(io_error("remove", path)(e)),
            }
        }
        Ok(())
    })?;
    remove_empty_dirs(dir, dir == root);
    Ok(removed)
}

/// Removes the empty directories under `dir`, and `dir` itself unless `keep`. Best effort: a
/// directory that a put has just filled again is not empty and stays.
fn remove_empty_dirs(dir: &Path, keep: bool) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path(), false);
            }
        }
    }
    if !keep {
        let _ = fs::remove_dir(dir);
    }
}

/// Calls `visit` on `start` if it is a regular file, or on every regular file under it,
/// recursively. A missing `start` has no files. The root may be a symbolic link (a volume is
/// often mounted through one) and is followed; no link below it is, `start` included when it is
/// a prefix below the root, so nothing outside is ever listed or removed.
fn walk(
    root: &Path,
    start: &Path,
    visit: &mut dyn FnMut(&Path, fs::Metadata) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let meta = if start == root {
        fs::metadata(start)
    } else {
        fs::symlink_metadata(start)
    };
    match meta {
        Ok(meta) if meta.is_file() => visit(start, meta),
        Ok(meta) if meta.is_dir() => walk_dir(start, visit),
        Ok(_) => Ok(()),
        Err(e) if is_absent(&e) => Ok(()),
        Err(e) => Err(io_error("stat", start)(e)),
    }
}

fn walk_dir(
    dir: &Path,
    visit: &mut dyn FnMut(&Path, fs::Metadata) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if is_absent(&e) => return Ok(()),
        Err(e) => return Err(io_error("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error("list", dir))?;
        let path = entry.path();
        // `DirEntry::metadata` does not follow symbolic links.
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if is_absent(&e) => continue,
            Err(e) => return Err(io_error("stat", &path)(e)),
        };
        if meta.is_dir() {
            walk_dir(&path, visit)?;
        } else if meta.is_file() {
            visit(&path, meta)?;
        }
    }
    Ok(())
}

/// The key a file under `root` stores, or `None` for a temporary file (or anything else that
/// is not a valid key).
fn key_of(root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root).ok()?;
    let segments: Option<Vec<&str>> = relative.components().map(|c| c.as_os_str().to_str()).collect();
    let key = segments?.join("/");
    check_key(&key).is_ok().then_some(key)
}

/// Whether an error means "there is nothing there": the file is missing, or one of its
/// ancestors is a file rather than a directory.
fn is_absent(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

impl FileStore {
    /// Runs blocking file system work on a thread of its own, once one of the store's turns is
    /// free (see the module documentation). Dropping the future abandons the work, which finishes
    /// (or hangs) on its thread with its turn still held.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let failed = |what: String| StoreError::Io {
            op: "run",
            path: PathBuf::new(),
            source: io::Error::other(what),
        };
        // The semaphore is never closed.
        let turn = self
            .turns
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("ferry-file-store".into())
            .spawn(move || {
                let result = work();
                drop(turn);
                let _ = tx.send(result);
            })
            .map_err(|e| failed(format!("cannot start a file store thread: {e}")))?;
        rx.await
            .unwrap_or_else(|_| Err(failed("the file store thread panicked".into())))
    }
}

#[cfg(test)]
mod tests;
