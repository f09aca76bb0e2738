//! The jars of the real Kafka that `ferry broker --kafka` runs: fetched once with Maven into a
//! cache, every one checked against the lock before the first use.
//!
//! The pom (`producer/kafka/pom.xml`) and the lock (`producer/kafka/jars.lock`, one
//! `<sha256>  <file name>` line per jar, as `sha256sum` writes them) are compiled into the
//! binary, so `ferry` works from any directory. The cache holds one directory per lock, named
//! after the Kafka version and a digest of the lock, so changing the pin fetches afresh instead of
//! trusting jars verified against an older lock. A fetch goes to a private directory that is
//! verified (missing, extra or changed jars are refused) and then renamed into place with a
//! marker file inside: the rename is the commit, so a fetch that was interrupted or refused is
//! never mistaken for a verified one. A file lock keeps two brokers that start together from
//! fetching at once. The limit: a verified directory is trusted from then on, not
//! hashed again at every start.
//!
//! Java and Maven come from the distribution's packages (`apt-get`) when they are missing.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::process::Command;
use tracing::info;

/// The pinned Kafka version: the `kafka.version` of the pom, checked by a test.
pub const KAFKA_VERSION: &str = "4.4.0";

/// The Maven project whose runtime classpath is the broker.
pub const POM: &str = include_str!("../../kafka/pom.xml");

/// The sha256 of every jar of that classpath (`scripts/update-kafka-lock.sh` writes it).
pub const LOCK: &str = include_str!("../../kafka/jars.lock");

/// Written inside a jar directory once every jar in it matched the lock.
const VERIFIED_MARKER: &str = ".verified";

/// The distribution packages that provide `java` and `mvn`.
const PACKAGES: &str = "openjdk-17-jre-headless maven";

/// Why the jars could not be fetched or trusted.
#[derive(Debug, thiserror::Error)]
pub enum JarsError {
    /// The compiled-in lock has a malformed line (a build from an edited tree).
    #[error("jars.lock line {line}: {reason}")]
    Lock { line: usize, reason: &'static str },
    /// Neither `--kafka-cache` nor `XDG_CACHE_HOME` nor `HOME` names a cache directory.
    #[error("no cache directory for the Kafka jars: set --kafka-cache, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A file in the cache could not be read or written.
    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `java` or `mvn` is missing and installing the packages failed.
    #[error(
        "{program} is missing and `apt-get install {PACKAGES}` failed; install Java 17+ and Maven yourself:\n{output}"
    )]
    Install { program: &'static str, output: String },
    /// Maven ran but did not fetch the classpath (no network, no repository, for example).
    #[error("Maven could not fetch the Kafka jars ({status}):\n{output}")]
    Fetch { status: String, output: String },
    /// The fetched jars are not the locked ones; they are deleted and nothing runs.
    #[error("the fetched Kafka jars do not match jars.lock ({0}); if the pom changed on purpose, run scripts/update-kafka-lock.sh")]
    Mismatch(Mismatch),
    /// A blocking task (hashing) panicked or was cancelled.
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// The jar names and their sha256, hex, as the lock lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock(BTreeMap<String, String>);

/// How a set of jars differs from the lock.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// Locked jars that were not fetched.
    pub missing: Vec<String>,
    /// Fetched jars the lock does not list.
    pub extra: Vec<String>,
    /// Jars whose content differs from the locked digest.
    pub changed: Vec<String>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (label, names) in [
            ("missing", &self.missing),
            ("not locked", &self.extra),
            ("digest differs", &self.changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{label}: {}", names.join(", ")));
            }
        }
        f.write_str(&parts.join("; "))
    }
}

impl Lock {
    /// Parses `sha256sum` output: a 64-digit lowercase hex digest, two spaces, a file name.
    pub fn parse(text: &str) -> Result<Self, JarsError> {
        let mut jars = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let bad = |reason| JarsError::Lock {
                line: index + 1,
                reason,
            };
            let Some((digest, name)) = line.split_once("  ") else {
                return Err(bad("expected `<sha256>  <jar>`"));
            };
            if digest.len() != 64 || !digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(bad("the digest is not 64 lowercase hex digits"));
            }
            if !name.ends_with(".jar") || name.contains('/') {
                return Err(bad("the name is not a plain jar file name"));
            }
            if jars.insert(name.to_string(), digest.to_string()).is_some() {
                return Err(bad("the jar is listed twice"));
            }
        }
        if jars.is_empty() {
            return Err(JarsError::Lock {
                line: 0,
                reason: "the lock lists no jars",
            });
        }
        Ok(Lock(jars))
    }

    /// Compares `found` (jar name to sha256) with the lock; equal sets pass.
    pub fn check(&self, found: &BTreeMap<String, String>) -> Result<(), Mismatch> {
        let mut mismatch = Mismatch::default();
        for (name, digest) in &self.0 {
            match found.get(name) {
                None => mismatch.missing.push(name.clone()),
                Some(actual) if actual != digest => mismatch.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        mismatch.extra = found
            .keys()
            .filter(|name| !self.0.contains_key(*name))
            .cloned()
            .collect();
        if mismatch == Mismatch::default() {
            Ok(())
        } else {
            Err(mismatch)
        }
    }
}

/// `$XDG_CACHE_HOME/ferry-kafka`, else `$HOME/.cache/ferry-kafka`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let absolute = |name| std::env::var_os(name).map(PathBuf::from).filter(|p| p.is_absolute());
    absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|home| home.join(".cache")))
        .map(|cache| cache.join("ferry-kafka"))
}

/// The directory of verified jars for the compiled-in lock, fetching them first if needed.
pub async fn ensure(cache: Option<&Path>) -> Result<PathBuf, JarsError> {
    let lock = Lock::parse(LOCK)?;
    let cache = cache
        .map(Path::to_path_buf)
        .or_else(default_cache_dir)
        .ok_or(JarsError::NoCacheDir)?;
    let version_dir = cache.join(format!("{KAFKA_VERSION}-{}", &sha256_hex(LOCK.as_bytes())[..12]));
    let jars = version_dir.join("jars");
    if jars.join(VERIFIED_MARKER).exists() {
        return Ok(jars);
    }
    ensure_program("mvn").await?;
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| JarsError::Io { action, path, source }
    };
    std::fs::create_dir_all(&version_dir).map_err(io_err("create", &version_dir))?;
    // One fetch at a time per cache: two brokers started together on an empty cache (parallel
    // tests) would otherwise run two Maven processes on one local repository. The second waits
    // here and then finds the jars verified. The lock is released when `_fetching` drops.
    let lock_path = version_dir.join("fetch.lock");
    let lock_file = std::fs::File::create(&lock_path).map_err(io_err("create", &lock_path))?;
    let _fetching = tokio::task::spawn_blocking(move || lock_file.lock().map(|()| lock_file))
        .await?
        .map_err(io_err("lock", &lock_path))?;
    if jars.join(VERIFIED_MARKER).exists() {
        return Ok(jars);
    }
    let pom = version_dir.join("pom.xml");
    // The pom and the fetch directory are still private to this process, so that a fetch
    // interrupted by a kill is never taken for a finished one.
    let pom_tmp = version_dir.join(format!("pom.xml.{}", std::process::id()));
    std::fs::write(&pom_tmp, POM).map_err(io_err("write", &pom_tmp))?;
    std::fs::rename(&pom_tmp, &pom).map_err(io_err("write", &pom))?;
    let partial = version_dir.join(format!("jars.partial.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    info!(version = KAFKA_VERSION, cache = %version_dir.display(), "fetching the Kafka jars with Maven (once)");
    let started = std::time::Instant::now();
    let output = Command::new("mvn")
        .args(["-B", "-q", "-f"])
        .arg(&pom)
        .arg("dependency:copy-dependencies")
        .arg(format!("-DoutputDirectory={}", partial.display()))
        .arg("-DincludeScope=runtime")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| JarsError::Io {
            action: "run",
            path: "mvn".into(),
            source,
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(JarsError::Fetch {
            status: output.status.to_string(),
            output: tail(&output.stdout, &output.stderr),
        });
    }
    let found = {
        let partial = partial.clone();
        tokio::task::spawn_blocking(move || digest_jars(&partial)).await?
    }
    .map_err(io_err("hash the jars in", &partial))?;
    if let Err(mismatch) = lock.check(&found) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(JarsError::Mismatch(mismatch));
    }
    let marker = partial.join(VERIFIED_MARKER);
    std::fs::write(&marker, format!("{KAFKA_VERSION}\n")).map_err(io_err("write", &marker))?;
    if let Err(source) = std::fs::rename(&partial, &jars) {
        let _ = std::fs::remove_dir_all(&partial);
        // Another broker may have committed the same verified jars first.
        if !jars.join(VERIFIED_MARKER).exists() {
            return Err(JarsError::Io {
                action: "move the verified jars to",
                path: jars,
                source,
            });
        }
    }
    info!(
        jars = found.len(),
        seconds = started.elapsed().as_secs_f64(),
        "Kafka jars fetched and verified"
    );
    Ok(jars)
}

/// Makes sure `program` (`java` or `mvn`) runs, installing Java and Maven with `apt-get` if it
/// does not: as root directly, otherwise through `sudo -n` (which fails rather than prompts).
pub async fn ensure_program(program: &'static str) -> Result<(), JarsError> {
    let runs = |program| async move {
        Command::new(program)
            .arg("-version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|status| status.success())
    };
    if runs(program).await {
        return Ok(());
    }
    info!(program, packages = PACKAGES, "not found; installing with apt-get");
    let script = format!(
        "if [ \"$(id -u)\" = 0 ]; then s=; else s='sudo -n'; fi; \
         $s apt-get update -q && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -q --no-install-recommends {PACKAGES}"
    );
    let output = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let failed = |output| JarsError::Install { program, output };
    match output {
        Ok(output) if output.status.success() && runs(program).await => Ok(()),
        Ok(output) => Err(failed(tail(&output.stdout, &output.stderr))),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// The sha256 of every `.jar` in `dir`, by file name.
fn digest_jars(dir: &Path) -> io::Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".jar") {
            let mut file = std::fs::File::open(entry.path())?;
            let mut hasher = Sha256::new();
            let mut buffer = vec![0; 1 << 16];
            loop {
                let read = file.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
            }
            found.insert(name, hex(&hasher.finalize()));
        }
    }
    Ok(found)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last lines of a command's output, for an error message.
pub(crate) fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(stdout), String::from_utf8_lossy(stderr));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(n, d)| (n.to_string(), d.to_string())).collect()
    }

    #[test]
    fn the_compiled_in_lock_parses_and_pins_the_pom_version() -> anyhow::Result<()> {
        let lock = Lock::parse(LOCK)?;
        assert!(lock.0.contains_key(&format!("kafka_2.13-{KAFKA_VERSION}.jar")));
        assert!(lock.0.contains_key(&format!("kafka-clients-{KAFKA_VERSION}.jar")));
        assert!(POM.contains(&format!("<kafka.version>{KAFKA_VERSION}</kafka.version>")));
        Ok(())
    }

    #[test]
    fn malformed_lock_lines_are_refused() {
        let a = "a".repeat(64);
        for bad in [
            "",
            "abc  x.jar",
            &format!("{a} x.jar"),
            &format!("{a}  x.txt"),
            &format!("{a}  d/x.jar"),
        ] {
            assert!(Lock::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Lock::parse(&format!("{a}  x.jar\n{a}  x.jar")).is_err());
    }

    #[test]
    fn check_reports_missing_extra_and_changed_jars() -> anyhow::Result<()> {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let lock = Lock::parse(&format!("{a}  one.jar\n{a}  two.jar\n"))?;
        assert_eq!(lock.check(&digests(&[("one.jar", &a), ("two.jar", &a)])), Ok(()));
        let Err(mismatch) = lock.check(&digests(&[("one.jar", &b), ("three.jar", &a)])) else {
            anyhow::bail!("a different jar set passed");
        };
        assert_eq!(mismatch.missing, ["two.jar"]);
        assert_eq!(mismatch.extra, ["three.jar"]);
        assert_eq!(mismatch.changed, ["one.jar"]);
        assert_eq!(
            mismatch.to_string(),
            "missing: two.jar; not locked: three.jar; digest differs: one.jar"
        );
        Ok(())
    }

    #[test]
    fn digests_match_sha256sum() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("x.jar"), b"abc")?;
        std::fs::write(dir.path().join("notes.txt"), b"ignored")?;
        let found = digest_jars(dir.path())?;
        // sha256("abc"), the FIPS 180-2 test vector.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(found, digests(&[("x.jar", expected)]));
        Ok(())
    }
}
