use super::*;

fn tp(p: i32) -> TopicPartition {
    ("t".to_string(), p)
}

/// Exactly-once turns: only the lowest running offset may commit, and a revoked partition's
/// requests have none.
#[test]
fn turns_go_in_offset_order_and_end_with_a_revocation() {
    let f = InFlight::new(Duration::from_millis(50));
    let epoch = f.start(&tp(0), 10, Arc::new(JobControl::default()));
    f.start(&tp(0), 11, Arc::new(JobControl::default()));
    assert_eq!(f.turn(&tp(0), 11, epoch), Turn::Wait, "10 still runs");
    assert_eq!(f.turn(&tp(0), 10, epoch), Turn::Ready);
    assert_eq!(f.finish(&tp(0), 10, epoch, None).map(|(p, _)| p), Some(11));
    assert_eq!(f.turn(&tp(0), 11, epoch), Turn::Ready);
    assert_eq!(f.while_same_epoch(&tp(0), epoch, || 7), Some(7));
    f.settle(&tp(0), 10);
    f.settle(&tp(0), 11);
    f.revoke_blocking(&[tp(0)]);
    assert_eq!(f.turn(&tp(0), 11, epoch), Turn::Gone);
    assert_eq!(f.while_same_epoch(&tp(0), epoch, || 7), None, "not under the old epoch");
}

#[test]
fn out_of_order_finishes_commit_in_order_and_release_prefixes() {
    let f = InFlight::new(Duration::from_millis(50));
    let c = || Arc::new(JobControl::default());
    let e0 = f.start(&tp(0), 10, c());
    let e1 = f.start(&tp(0), 11, c());
    assert_eq!(
        f.finish(&tp(0), 11, e1, Some("p11")),
        None,
        "10 still runs: a done marker"
    );
    f.settle(&tp(0), 11);
    assert_eq!(
        f.finish(&tp(0), 10, e0, Some("p10")),
        Some((12, vec!["p11".into(), "p10".into()]))
    );
    f.settle(&tp(0), 10);
    assert_eq!(f.registered(None), 0);
}

#[test]
fn revocation_suspends_waits_and_changes_the_epoch() {
    let f = Arc::new(InFlight::new(Duration::from_secs(5)));
    let control = Arc::new(JobControl::default());
    let epoch = f.start(&tp(1), 5, control.clone());
    let other = f.start(&tp(2), 7, Arc::new(JobControl::default()));
    // A request that settles once told to suspend, as the engine does.
    let settler = {
        let f = f.clone();
        let control = control.clone();
        std::thread::spawn(move || {
            while !control.suspend.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            f.settle(&tp(1), 5);
        })
    };
    assert!(f.revoke_blocking(&[tp(1)]).is_empty());
    settler.join().expect("settler");
    assert_eq!(f.registered(Some(&[tp(1)])), 0);
    assert!(!f.same_epoch(&tp(1), epoch));
    assert_eq!(
        f.finish(&tp(1), 5, epoch, None),
        None,
        "a revoked partition commits nothing"
    );
    assert_eq!(f.take_revoked(), [tp(1)]);
    // The other partition is untouched.
    assert!(f.same_epoch(&tp(2), other));
    assert_eq!(f.finish(&tp(2), 7, other, None), Some((8, vec![])));
}

#[test]
fn consumer_lag_is_read_from_librdkafka_statistics() {
    use rdkafka::statistics::{Partition, Topic};
    let mut topic = Topic::default();
    for (p, lag) in [(0, 4), (1, -1), (-1, -1)] {
        topic.partitions.insert(
            p,
            Partition {
                partition: p,
                consumer_lag: lag,
                ..Partition::default()
            },
        );
    }
    let mut stats = Statistics::default();
    stats.topics.insert("t".into(), topic);
    assert_eq!(consumer_lag(&stats), [(tp(0), 4)], "unknown lags are left out");
}

#[test]
fn revocation_gives_up_at_its_deadline() {
    let f = InFlight::new(Duration::from_millis(30));
    f.start(&tp(0), 1, Arc::new(JobControl::default()));
    // The request never settles, so only the deadline can end the wait: returning at all is
    // the proof (a wait without one would hang the test), whatever the machine's speed.
    f.revoke_blocking(&[tp(0)]);
    assert_eq!(f.registered(None), 1, "it stays registered until it settles");
}
