use super::*;
use std::sync::atomic::AtomicU8;

fn state(breaker: u32) -> (Arc<HealthState>, watch::Receiver<u32>) {
    let (tx, rx) = watch::channel(0u32);
    let s = Arc::new(HealthState::new(Arc::new(tx), breaker, Duration::from_secs(30)));
    (s, rx)
}

#[test]
fn the_breaker_counts_different_requests_in_a_row() {
    let mut b = CircuitBreaker::new(3);
    assert!(!b.record_failure("a"));
    assert!(!b.record_failure("a"), "a retry of the same request counts once");
    assert!(!b.record_failure("b"));
    b.record_success();
    assert_eq!(b.streak(), 0, "a success resets the streak");
    assert!(!b.record_failure("c"));
    assert!(!b.record_failure("d"));
    assert!(b.record_failure("e"), "the third different request opens it");
    assert!(b.is_open());
    assert!(!b.record_failure("f"), "it opens once");
    b.record_success();
    assert!(b.is_open(), "and never closes");
    let mut off = CircuitBreaker::new(0);
    assert!((0..100).all(|i| !off.record_failure(&i.to_string())));
}

#[test]
fn readiness_needs_the_model_and_an_assignment_and_no_drain() {
    let (s, _rx) = state(5);
    assert_eq!(s.readiness(), Err("loading the model".into()));
    s.set_model_loaded();
    assert!(s
        .readiness()
        .expect_err("no assignment yet")
        .contains("first assignment"));
    s.set_consuming();
    assert_eq!(s.readiness(), Ok(()));
    s.set_draining();
    assert_eq!(s.readiness(), Err("draining".into()));
}

#[test]
fn liveness_fails_only_when_a_started_loop_stands_still() {
    let (s, _rx) = state(5);
    let later = Instant::now() + Duration::from_secs(3600);
    assert!(s.liveness_at(later).is_ok(), "before the loop starts (model loading)");
    s.beat();
    assert!(s.liveness().is_ok());
    assert!(s.liveness_at(later).expect_err("stalled").contains("has not run"));
    s.set_draining();
    assert!(s.liveness_at(later).is_ok(), "a drain stops the loop on purpose");
}

#[test]
fn an_open_breaker_trips_the_drain_once() {
    let (s, rx) = state(2);
    s.set_model_loaded();
    s.set_consuming();
    s.generation_failed("a", "boom");
    assert!(s.readiness().is_ok());
    s.generation_failed("b", "boom");
    let why = s.readiness().expect_err("tripped");
    assert!(why.starts_with("circuit breaker open"), "{why}");
    assert_eq!(*rx.borrow(), 1, "the drain was requested as a first signal");
    assert!(s.exit_reason().is_some());
    s.trip(Trip::Accelerator("later".into()));
    assert_eq!(*rx.borrow(), 1, "a second trip is not a second signal");
    assert!(s.exit_reason().is_some_and(|r| r.starts_with("circuit breaker")));
}

#[test]
fn a_trip_during_a_signalled_drain_does_not_cut_it_short() {
    let (s, rx) = state(1);
    s.signals.send_modify(|n| *n += 1); // SIGTERM
    s.trip(Trip::Accelerator("x".into()));
    assert_eq!(*rx.borrow(), 1);
    assert!(s.exit_reason().is_some());
}

/// A source whose answer the test flips.
struct Flip(AtomicU8);

impl HealthSource for Flip {
    fn name(&self) -> String {
        "fake:0".into()
    }
    fn check(&self) -> Health {
        match self.0.load(Ordering::Acquire) {
            0 => Health::Healthy,
            1 => Health::Degraded("hot".into()),
            _ => Health::Unrecoverable("CUDA_ERROR_ECC_UNCORRECTABLE".into()),
        }
    }
}

#[tokio::test]
async fn the_monitor_trips_on_an_unrecoverable_error() {
    let (s, mut rx) = state(5);
    s.set_model_loaded();
    s.set_consuming();
    let source = Arc::new(Flip(AtomicU8::new(1)));
    let task = tokio::spawn(monitor(source.clone(), Duration::from_millis(5), s.clone()));
    // Degraded is reported but keeps the worker ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock(&s.degraded).is_empty() {
        assert!(Instant::now() < deadline, "degraded state never seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.readiness(), Ok(()));
    source.0.store(2, Ordering::Release);
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("the drain is requested")
        .expect("sender alive");
    assert_eq!(*rx.borrow(), 1);
    let why = s.readiness().expect_err("tripped");
    assert_eq!(why, "accelerator unhealthy: fake:0: CUDA_ERROR_ECC_UNCORRECTABLE");
    assert_eq!(s.exit_reason(), Some(why));
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the monitor stops after a trip")
        .expect("no panic");
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(HealthGauges(s.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
    assert!(text.contains("ferry_accelerator_unrecoverable 1\n"), "{text}");
    assert!(text.contains("ferry_ready 0\n"));
}

#[test]
fn one_sources_recovery_does_not_clear_anothers_degraded_report() {
    let (s, _rx) = state(5);
    assert!(s.observe("nvml:GPU-1", Health::Degraded("91 °C".into())));
    assert!(s.observe("cuda:0", Health::Healthy));
    assert_eq!(
        lock(&s.degraded).get("nvml:GPU-1").map(String::as_str),
        Some("91 °C"),
        "the CUDA check's health leaves NVML's report standing"
    );
    assert!(s.observe("nvml:GPU-1", Health::Healthy));
    assert!(lock(&s.degraded).is_empty(), "NVML's own recovery clears it");
}
