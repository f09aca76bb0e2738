use super::*;

fn spec(extra: &[&str]) -> WorkerSpec {
    WorkerSpec {
        model: "m.gguf".into(),
        weights: "q8-0".into(),
        topic: "req".into(),
        reply_topic: "rep".into(),
        group_id: "g".into(),
        snapshot_dir: "/tmp/snap".into(),
        defaults: vec![("--threads".into(), "1".into()), ("--max-in-flight".into(), "2".into())],
        extra: extra.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn worker_args_name_the_worker_and_let_extra_args_override_defaults() {
    let args = spec(&["--max-in-flight=4", "--resume", "tokens"]).args("worker-3", "127.0.0.1:9");
    let joined = args.join(" ");
    assert!(joined.contains("--worker-id worker-3"));
    assert!(joined.contains("--bootstrap-servers 127.0.0.1:9"));
    assert!(joined.contains("--snapshot-store file:///tmp/snap"));
    assert!(joined.contains("--threads 1"));
    assert!(!joined.contains("--max-in-flight 2"), "overridden: {joined}");
    assert!(joined.ends_with("--max-in-flight=4 --resume tokens"));
}

#[test]
fn signals_change_the_state_and_drop_leaves_nothing_running() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut p = Proc::spawn("sleeper", Command::new("sleep").arg("30"), dir.path().join("s.log"))?;
    p.signal(Signal::Stop)?;
    assert_eq!(p.state, State::Frozen);
    p.signal(Signal::Cont)?;
    assert_eq!(p.state, State::Running);
    p.signal(Signal::Term)?;
    assert_eq!(p.state, State::Stopping);
    let killed = wait_or_kill(std::slice::from_mut(&mut p), Duration::from_secs(5));
    assert!(killed.is_empty(), "sleep exits on SIGTERM");
    assert!(matches!(p.state, State::Exited(_)));
    assert!(
        p.signal(Signal::Kill).is_err(),
        "no signal to a process that has exited"
    );
    Ok(())
}

#[test]
fn a_process_that_ignores_the_grace_period_is_killed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("trap '' TERM; exec sleep 30");
    let mut p = Proc::spawn("stubborn", &mut cmd, dir.path().join("s.log"))?;
    std::thread::sleep(Duration::from_millis(200));
    p.signal(Signal::Term)?;
    let killed = wait_or_kill(std::slice::from_mut(&mut p), Duration::from_millis(300));
    assert_eq!(killed, ["stubborn"]);
    assert!(matches!(p.state, State::Exited(_)));
    Ok(())
}
