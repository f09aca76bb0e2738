use super::*;

async fn store() -> (tempfile::TempDir, FileStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStore::open(dir.path().join("snapshots")).await.expect("open");
    (dir, store)
}

fn age(store: &FileStore, key: &str, by: Duration) {
    let file = fs::File::options().write(true).open(store.path(key)).expect("open");
    file.set_modified(SystemTime::now() - by).expect("set mtime");
}

#[tokio::test]
async fn a_put_leaves_only_the_value_behind() {
    let (_dir, store) = store().await;
    store
        .put("ferry/ab/manifest", Bytes::from_static(b"one"))
        .await
        .expect("put");
    store
        .put("ferry/ab/manifest", Bytes::from_static(b"two"))
        .await
        .expect("put");
    let names: Vec<_> = fs::read_dir(store.root().join("ferry/ab"))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(names, ["manifest"], "no temporary file is left behind");
    assert_eq!(
        store.get("ferry/ab/manifest", 16).await.expect("get"),
        Some(Bytes::from_static(b"two"))
    );
}

#[tokio::test]
async fn a_key_below_a_file_is_absent_not_an_error() {
    let (_dir, store) = store().await;
    store.put("ferry/ab", Bytes::from_static(b"x")).await.expect("put");
    assert_eq!(store.get("ferry/ab/manifest", 16).await.expect("get"), None);
    assert_eq!(
        store.list("ferry/ab/manifest").await.expect("list"),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn sweep_goes_by_mtime_and_removes_stale_temporary_files_and_empty_directories() {
    let (_dir, store) = store().await;
    for key in ["ferry/old/manifest", "ferry/old/piece-000000", "ferry/new/manifest"] {
        store.put(key, Bytes::from_static(b"v")).await.expect("put");
    }
    let stale_tmp = store.root().join("ferry/new/.manifest.tmp-dead");
    fs::write(&stale_tmp, b"torn").expect("write");
    fs::File::options()
        .write(true)
        .open(&stale_tmp)
        .expect("open")
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .expect("mtime");
    age(&store, "ferry/old/manifest", Duration::from_secs(7200));
    age(&store, "ferry/old/piece-000000", Duration::from_secs(7200));

    let removed = store
        .sweep_expired("ferry", Duration::from_secs(3600))
        .await
        .expect("sweep");

    assert_eq!(removed, 2, "temporary files are removed but not counted as keys");
    assert_eq!(store.list("").await.expect("list"), ["ferry/new/manifest"]);
    assert!(!stale_tmp.exists());
    assert!(
        !store.root().join("ferry/old").exists(),
        "the emptied directory is gone"
    );
    assert!(store.root().exists(), "the root stays even when empty");
}

#[tokio::test]
async fn sweep_of_the_whole_store_keeps_the_root() {
    let (_dir, store) = store().await;
    store.put("a/b", Bytes::from_static(b"v")).await.expect("put");
    age(&store, "a/b", Duration::from_secs(10));
    assert_eq!(store.sweep_expired("", Duration::from_secs(1)).await.expect("sweep"), 1);
    assert!(store.root().is_dir());
    store
        .put("a/b", Bytes::from_static(b"again"))
        .await
        .expect("a put after a sweep recreates the directories");
}

#[tokio::test]
async fn listing_skips_symbolic_links_out_of_the_root() {
    let (dir, store) = store().await;
    let outside = dir.path().join("outside");
    fs::create_dir_all(&outside).expect("mkdir");
    fs::write(outside.join("secret"), b"s").expect("write");
    std::os::unix::fs::symlink(&outside, store.root().join("link")).expect("symlink");
    assert_eq!(store.list("").await.expect("list"), Vec::<String>::new());
    assert_eq!(
        store.list("link").await.expect("list"),
        Vec::<String>::new(),
        "a prefix that is a link is not followed either"
    );
    store.sweep_expired("", Duration::ZERO).await.expect("sweep");
    store.sweep_expired("link", Duration::ZERO).await.expect("sweep");
    assert!(
        outside.join("secret").exists(),
        "a sweep never follows a link out of the root"
    );
}

/// A file system call that never returns (a hung mount) is abandoned at its caller's deadline,
/// other calls still run, and the runtime shuts down without waiting for the hung thread. Reads
/// no longer wait for anything (a FIFO is refused at once), so the hang is a call of the test's
/// own, on the store's threads.
#[test]
fn a_hung_call_is_abandoned_at_its_deadline_and_does_not_hold_up_shutdown() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (dir, store) = runtime.block_on(store());
    let (release, hang) = std::sync::mpsc::channel::<()>();
    runtime.block_on(async {
        let hung = store.blocking(move || {
            let _ = hang.recv();
            Ok(())
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), hung).await.is_err(),
            "the call hangs until released"
        );
        store
            .put("ferry/cd/manifest", Bytes::from_static(b"m"))
            .await
            .expect("another call runs while one hangs");
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(runtime);
        let _ = tx.send(());
    });
    let shut_down = rx.recv_timeout(Duration::from_secs(60));
    // Let the hung thread go, whatever the outcome.
    drop(release);
    assert!(shut_down.is_ok(), "the runtime waited for a hung file system call");
    drop(dir);
}

/// Puts `make` where the file of `key` would be, and reads the key.
async fn get_what_is_there(make: impl FnOnce(&Path)) -> Result<Option<Bytes>, StoreError> {
    let (_dir, store) = store().await;
    let path = store.path("ferry/ab/manifest");
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    make(&path);
    // Far more than any of these holds, so that only the kind of file can refuse them; the
    // deadline turns a read that hangs or never ends into a failure instead of a stuck test.
    let read = store.get("ferry/ab/manifest", 1 << 30);
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("refused at once, not read")
}

#[tokio::test]
async fn a_link_to_dev_zero_is_refused_without_being_read() {
    let got = get_what_is_there(|path| std::os::unix::fs::symlink("/dev/zero", path).expect("symlink")).await;
    assert!(
        matches!(
            got,
            Err(StoreError::NotAValue {
                found: "a symbolic link",
                ..
            })
        ),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_link_to_a_regular_file_is_refused_too() {
    let got = get_what_is_there(|path| {
        let target = path.with_file_name("elsewhere");
        fs::write(&target, b"v").expect("write");
        std::os::unix::fs::symlink(&target, path).expect("symlink")
    })
    .await;
    assert!(
        matches!(
            got,
            Err(StoreError::NotAValue {
                found: "a symbolic link",
                ..
            })
        ),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let got = get_what_is_there(|path| {
        let made = std::process::Command::new("mkfifo").arg(path).status().expect("mkfifo");
        assert!(made.success(), "mkfifo {}", path.display());
    })
    .await;
    assert!(
        matches!(got, Err(StoreError::NotAValue { found: "a FIFO", .. })),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_directory_is_refused() {
    let got = get_what_is_there(|path| fs::create_dir(path).expect("mkdir")).await;
    assert!(
        matches!(
            got,
            Err(StoreError::NotAValue {
                found: "a directory",
                ..
            })
        ),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_value_over_the_limit_is_refused_and_one_at_the_limit_read() {
    let (_dir, store) = store().await;
    let value = Bytes::from(vec![7u8; 1000]);
    store.put("ferry/ab/piece", value.clone()).await.expect("put");
    let got = store.get("ferry/ab/piece", 999).await;
    assert!(
        matches!(&got, Err(StoreError::TooLarge { key, limit: 999 }) if key == "ferry/ab/piece"),
        "{got:?}"
    );
    assert!(got.expect_err("too large").is_refused_value());
    assert_eq!(store.get("ferry/ab/piece", 1000).await.expect("get"), Some(value));
    assert_eq!(store.get("ferry/ab/missing", 0).await.expect("get"), None);
}

#[tokio::test]
async fn relative_roots_are_refused() {
    assert!(matches!(
        FileStore::open(PathBuf::from("relative")).await,
        Err(StoreError::Config { .. })
    ));
}
