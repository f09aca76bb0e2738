//! The bootstrap-servers file: how `ferry broker` tells other processes where it listens.
//!
//! The mock broker listens on a port the kernel picks, so a process started beside it cannot
//! know the address in advance. The broker writes it to a file; a client waits for the file.
//! The writer writes a temporary file in the same directory and renames it into place, and a
//! rename within one file system is atomic, so a reader sees either no file or the whole line,
//! never part of it. The limit: a file left behind by a broker that was killed with SIGKILL
//! still names the dead broker, so give each broker a fresh path (a temporary directory).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// How often [`wait_for_file`] looks for the file. The file appears once per broker, so a
/// short poll costs nothing and keeps the wait close to the moment it appears.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Why the bootstrap servers could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Writing the temporary file or renaming it into place failed.
    #[error("could not write the bootstrap file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file exists but could not be read.
    #[error("could not read the bootstrap file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file did not appear, or stayed empty, until the deadline.
    #[error("the bootstrap file {path} did not appear within {waited:.1?}")]
    Timeout { path: PathBuf, waited: Duration },
}

/// Writes `servers` and a newline to `path` atomically.
pub fn write_atomically(path: &Path, servers: &str) -> Result<(), BootstrapError> {
    let write_err = |source| BootstrapError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::new(io::ErrorKind::InvalidInput, "the path names no file")))?;
    // The temporary file must live in the same directory: a rename is only atomic within one
    // file system. The process id keeps two writers from sharing a temporary file.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(format!("{servers}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: a failed write should not leave a stray temporary file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

/// Waits until `path` exists and holds a non-empty line, then returns that line trimmed.
pub async fn wait_for_file(path: &Path, wait: Duration) -> Result<String, BootstrapError> {
    let deadline = Instant::now() + wait;
    loop {
        match tokio::fs::read_to_string(path).await {
            Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BootstrapError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(BootstrapError::Timeout {
                path: path.to_path_buf(),
                waited: wait,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn written_file_is_read_back_and_leaves_no_temporary_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bootstrap");
        write_atomically(&path, "127.0.0.1:1234")?;
        assert_eq!(wait_for_file(&path, Duration::ZERO).await?, "127.0.0.1:1234");
        let names = std::fs::read_dir(dir.path())?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()?;
        assert_eq!(names, [std::ffi::OsString::from("bootstrap")]);
        Ok(())
    }

    #[tokio::test]
    async fn waits_for_a_file_written_later() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bootstrap");
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                write_atomically(&path, "h:1,h:2")
            })
        };
        assert_eq!(wait_for_file(&path, Duration::from_secs(10)).await?, "h:1,h:2");
        writer.await??;
        Ok(())
    }

    #[tokio::test]
    async fn missing_file_times_out() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let result = wait_for_file(&dir.path().join("never"), Duration::from_millis(50)).await;
        assert!(matches!(result, Err(BootstrapError::Timeout { .. })), "{result:?}");
        Ok(())
    }
}
