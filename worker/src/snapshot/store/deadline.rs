//! A deadline on every store call, so that a sick store never holds up an answer.
//!
//! [`DeadlineStore`] wraps the backend the worker opened. Every call gets `--snapshot-store-timeout`
//! (a put also gets time for its bytes, at [`FLOOR_BYTES_PER_SECOND`]); a call that has not
//! answered by then is abandoned and fails with [`StoreError::Timeout`]. Its caller treats that
//! like any other store failure: the request is served without the snapshot or the ledger entry
//! (see [`super::StoreError`]). A store that timed out, or could not be reached at all, is then
//! not asked again for a short cool-down that doubles while it stays down (up to
//! [`MAX_COOL_DOWN`]): calls fail at once with [`StoreError::Skipped`], so a hung store costs one
//! deadline now and then instead of one per call.
//!
//! Every failure is counted in [`StoreFaults`] (`ferry_snapshot_store_errors_total{op,kind}`)
//! and logged here, at most once per [`LOG_INTERVAL`] and operation, with the number of failures
//! the interval held; callers log theirs at debug level only, so an outage of any length costs a
//! few log lines a minute.
//!
//! The limit: an abandoned call is not undone. A put that times out may still land later (Redis
//! executes a command it has received; a file store's thread finishes its write), which is why
//! nothing depends on a failed put having had no effect: a late manifest names pieces written
//! before it, and a late ledger entry or done marker only outlives its request until the TTL.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
// Tokio's clock, which tests can pause and advance.
use tokio::time::Instant;
use tracing::warn;

use super::{SnapshotStore, StoreError};

/// The slowest transfer a put is allowed before it counts as hung: a put of `n` bytes gets
/// `n / FLOOR_BYTES_PER_SECOND` on top of the store timeout, so a large full copy of a KV cache is
/// not mistaken for a hung store.
pub const FLOOR_BYTES_PER_SECOND: f64 = 16.0 * 1024.0 * 1024.0;
/// The longest a store that keeps failing is left alone before it is tried again.
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(15);
/// At most one warning per operation in this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// A sweep walks a whole store and runs off the request path: it gets this long, however short
/// the store timeout.
pub const SWEEP_DEADLINE: Duration = Duration::from_secs(300);

/// A store operation, as the metric's `op` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Get,
    Put,
    Delete,
    List,
    Sweep,
}

impl StoreOp {
    pub const ALL: [StoreOp; 5] = [
        StoreOp::Get,
        StoreOp::Put,
        StoreOp::Delete,
        StoreOp::List,
        StoreOp::Sweep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Get => "get",
            StoreOp::Put => "put",
            StoreOp::Delete => "delete",
            StoreOp::List => "list",
            StoreOp::Sweep => "sweep",
        }
    }

    /// The word a log line uses: "snapshot store write failed".
    fn verb(self) -> &'static str {
        match self {
            StoreOp::Get => "read",
            StoreOp::Put => "write",
            StoreOp::Delete => "delete",
            StoreOp::List => "list",
            StoreOp::Sweep => "sweep",
        }
    }
}

/// How a store call failed, as the metric's `kind` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// No answer within the deadline.
    Timeout,
    /// Not tried: the store timed out or was unreachable moments ago.
    Skipped,
    /// Any other failure the store reported.
    Error,
}

impl FaultKind {
    pub const ALL: [FaultKind; 3] = [FaultKind::Timeout, FaultKind::Skipped, FaultKind::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Timeout => "timeout",
            FaultKind::Skipped => "skipped",
            FaultKind::Error => "error",
        }
    }

    fn of(e: &StoreError) -> Self {
        match e {
            StoreError::Timeout { .. } => FaultKind::Timeout,
            StoreError::Skipped { .. } => FaultKind::Skipped,
            _ => FaultKind::Error,
        }
    }
}

/// Failed store calls, by operation and kind, and the log limiter of each operation. Shared by
/// every [`DeadlineStore`] of a worker and read by `/metrics`.
#[derive(Debug, Default)]
pub struct StoreFaults {
    counts: [[AtomicU64; FaultKind::ALL.len()]; StoreOp::ALL.len()],
    logs: [LogLimiter; StoreOp::ALL.len()],
}

impl StoreFaults {
    /// How many calls of `op` failed with `kind`.
    pub fn count(&self, op: StoreOp, kind: FaultKind) -> u64 {
        self.counts[index(&StoreOp::ALL, op)][index(&FaultKind::ALL, kind)].load(Relaxed)
    }

    /// Counts a failure of `op` and logs it, unless this operation logged one less than
    /// [`LOG_INTERVAL`] ago.
    pub fn record(&self, op: StoreOp, e: &StoreError) {
        let kind = FaultKind::of(e);
        self.counts[index(&StoreOp::ALL, op)][index(&FaultKind::ALL, kind)].fetch_add(1, Relaxed);
        if let Some(suppressed) = self.logs[index(&StoreOp::ALL, op)].admit(Instant::now()) {
            warn!(
                op = op.as_str(),
                kind = kind.as_str(),
                suppressed,
                error = %e,
                "snapshot store {} failed; going on without it (at most one such line per {}s; `suppressed` counts the others)",
                op.verb(),
                LOG_INTERVAL.as_secs()
            );
        }
    }
}

fn index<T: PartialEq>(all: &[T], x: T) -> usize {
    all.iter().position(|y| *y == x).unwrap_or(0)
}

/// Lets one log line through per interval, and counts the ones it held back.
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// When the last line went out, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    /// `Some(held back since the last line)` if a line may go out at `now`, `None` if not.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        // Two plain numbers: a panic elsewhere leaves nothing inconsistent.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, held) = &mut *state;
        match *last {
            Some(at) if now.saturating_duration_since(at) < LOG_INTERVAL => {
                *held += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(held))
            }
        }
    }
}

/// When the store may be asked again after it timed out or could not be reached.
#[derive(Debug, Default)]
struct CoolDown {
    /// Calls fail at once until then.
    until: Option<Instant>,
    /// Timed-out or unreachable calls since the last answer; each doubles the next cool-down.
    strikes: u32,
}

impl CoolDown {
    /// How much longer calls are skipped, if they are.
    fn remaining(&self, now: Instant) -> Option<Duration> {
        self.until
            .map(|until| until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// A call found the store down at `now`: skip it for `base` × 2^(strikes), at most
    /// [`MAX_COOL_DOWN`].
    fn strike(&mut self, now: Instant, base: Duration) {
        let wait = base.saturating_mul(1u32 << self.strikes.min(10)).min(MAX_COOL_DOWN);
        self.strikes = self.strikes.saturating_add(1);
        self.until = Some(now + wait);
    }

    fn answered(&mut self) {
        *self = Self::default();
    }
}

/// A [`SnapshotStore`] whose every call has a deadline (see the module documentation).
#[derive(Debug)]
pub struct DeadlineStore {
    inner: Arc<dyn SnapshotStore>,
    /// The deadline of a call that moves few bytes: `--snapshot-store-timeout`.
    timeout: Duration,
    faults: Arc<StoreFaults>,
    cool_down: Mutex<CoolDown>,
}

impl DeadlineStore {
    /// `inner` with a deadline of `timeout` on every call, counting failures in `faults`.
    pub fn new(inner: Arc<dyn SnapshotStore>, timeout: Duration, faults: Arc<StoreFaults>) -> Self {
        Self {
            inner,
            timeout,
            faults,
            cool_down: Mutex::default(),
        }
    }

    /// The store calls go to.
    pub fn inner(&self) -> &Arc<dyn SnapshotStore> {
        &self.inner
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn cool_down(&self) -> std::sync::MutexGuard<'_, CoolDown> {
        // An instant and a count: a panic elsewhere leaves nothing inconsistent.
        self.cool_down.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn call<T>(
        &self,
        op: StoreOp,
        deadline: Duration,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let skipped = self.cool_down().remaining(Instant::now());
        let result = match skipped {
            Some(left) => Err(StoreError::Skipped { op: op.as_str(), left }),
            None => match tokio::time::timeout(deadline, call).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Timeout {
                    op: op.as_str(),
                    after: deadline,
                }),
            },
        };
        match &result {
            Ok(_) => self.cool_down().answered(),
            // The store answered; what it holds is the caller's to judge, not a store fault, so
            // it is neither counted nor logged here (the caller warns about it).
            Err(e) if e.is_refused_value() => {
                self.cool_down().answered();
                return result;
            }
            Err(StoreError::Timeout { .. } | StoreError::Unavailable { .. }) => {
                self.cool_down().strike(Instant::now(), self.timeout)
            }
            Err(_) => {}
        }
        if let Err(e) = &result {
            self.faults.record(op, e);
        }
        result
    }
}

#[async_trait]
impl SnapshotStore for DeadlineStore {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        let transfer = Duration::from_secs_f64(value.len() as f64 / FLOOR_BYTES_PER_SECOND);
        self.call(StoreOp::Put, self.timeout + transfer, self.inner.put(key, value))
            .await
    }

    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
        self.call(StoreOp::Get, self.timeout, self.inner.get(key, max_bytes))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call(StoreOp::Delete, self.timeout, self.inner.delete(key)).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        self.call(StoreOp::Delete, self.timeout, self.inner.delete_prefix(prefix))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.call(StoreOp::List, self.timeout, self.inner.list(prefix)).await
    }

    async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, StoreError> {
        self.call(
            StoreOp::Sweep,
            SWEEP_DEADLINE.max(self.timeout),
            self.inner.sweep_expired(prefix, ttl),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose calls take `delay` each (forever for `None`), then answer from memory.
    #[derive(Debug)]
    struct Sick {
        delay: Option<Duration>,
        inner: Arc<dyn SnapshotStore>,
        calls: AtomicU64,
    }

    impl Sick {
        fn new(delay: Option<Duration>) -> Arc<Self> {
            Arc::new(Self {
                delay,
                inner: Arc::new(super::super::ObjectStoreBackend::memory()),
                calls: AtomicU64::new(0),
            })
        }

        async fn wait(&self) {
            self.calls.fetch_add(1, Relaxed);
            match self.delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        }
    }

    #[async_trait]
    impl SnapshotStore for Sick {
        async fn put(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
            self.wait().await;
            self.inner.put(key, value).await
        }
        async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<Bytes>, StoreError> {
            self.wait().await;
            self.inner.get(key, max_bytes).await
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.wait().await;
            self.inner.delete(key).await
        }
        async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
            self.wait().await;
            self.inner.delete_prefix(prefix).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.wait().await;
            self.inner.list(prefix).await
        }
        async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, StoreError> {
            self.wait().await;
            self.inner.sweep_expired(prefix, ttl).await
        }
    }

    fn bounded(inner: Arc<Sick>, timeout: Duration) -> (DeadlineStore, Arc<StoreFaults>) {
        let faults = Arc::new(StoreFaults::default());
        (DeadlineStore::new(inner, timeout, faults.clone()), faults)
    }

    // Paused time: the deadlines pass in virtual time, so the tests neither wait nor depend on
    // the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn a_store_that_never_answers_times_out_and_is_then_skipped() {
        let sick = Sick::new(None);
        let (store, faults) = bounded(sick.clone(), Duration::from_secs(2));
        let err = store.get("ferry/a/manifest", 1024).await.expect_err("never answers");
        assert!(matches!(err, StoreError::Timeout { op: "get", .. }), "{err}");
        assert_eq!(err.kind(), "timeout");

        // Within the cool-down the store is not asked at all.
        let err = store
            .put("ferry/a/manifest", Bytes::from_static(b"m"))
            .await
            .expect_err("skipped");
        assert!(matches!(err, StoreError::Skipped { op: "put", .. }), "{err}");
        assert_eq!(sick.calls.load(Relaxed), 1);

        // After it, the store is asked again; each timeout doubles the cool-down.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            store.delete("ferry/a/manifest").await,
            Err(StoreError::Timeout { op: "delete", .. })
        ));
        assert_eq!(sick.calls.load(Relaxed), 2);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(matches!(store.list("ferry/a").await, Err(StoreError::Skipped { .. })));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(store.list("ferry/a").await, Err(StoreError::Timeout { .. })));

        assert_eq!(faults.count(StoreOp::Get, FaultKind::Timeout), 1);
        assert_eq!(faults.count(StoreOp::Put, FaultKind::Skipped), 1);
        assert_eq!(faults.count(StoreOp::Delete, FaultKind::Timeout), 1);
        assert_eq!(faults.count(StoreOp::List, FaultKind::Skipped), 1);
        assert_eq!(faults.count(StoreOp::List, FaultKind::Timeout), 1);
        assert_eq!(faults.count(StoreOp::Get, FaultKind::Error), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_store_within_the_deadline_answers() {
        let (store, faults) = bounded(Sick::new(Some(Duration::from_millis(1500))), Duration::from_secs(2));
        store
            .put("ferry/a/manifest", Bytes::from_static(b"m"))
            .await
            .expect("put in time");
        assert_eq!(
            store.get("ferry/a/manifest", 1024).await.expect("get in time"),
            Some(Bytes::from_static(b"m"))
        );
        for op in StoreOp::ALL {
            for kind in FaultKind::ALL {
                assert_eq!(faults.count(op, kind), 0, "{op:?} {kind:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_store_times_out_and_an_answer_ends_the_cool_down() {
        let (store, faults) = bounded(Sick::new(Some(Duration::from_secs(3))), Duration::from_secs(2));
        assert!(matches!(
            store.get("ferry/a/x", 1024).await,
            Err(StoreError::Timeout { .. })
        ));
        tokio::time::advance(Duration::from_secs(2)).await;
        // A put of a large value gets time for its bytes: 3 s is within 2 s + 32 MiB at 16 MiB/s.
        let big = Bytes::from(vec![0u8; 32 * 1024 * 1024]);
        store.put("ferry/a/piece", big).await.expect("a large put gets longer");
        assert!(store.cool_down().remaining(Instant::now()).is_none());
        assert_eq!(store.cool_down().strikes, 0, "an answer resets the cool-down");
        assert_eq!(faults.count(StoreOp::Get, FaultKind::Timeout), 1);
        assert_eq!(faults.count(StoreOp::Put, FaultKind::Timeout), 0);
    }

    /// A value over its reader's limit is the caller's to judge: the store answered, so it is
    /// no store fault and starts no cool-down.
    #[tokio::test(start_paused = true)]
    async fn a_refused_value_is_not_a_store_fault() {
        let (store, faults) = bounded(Sick::new(Some(Duration::ZERO)), Duration::from_secs(2));
        store
            .put("ferry/a/manifest", Bytes::from_static(b"twelve bytes"))
            .await
            .expect("put");
        let err = store.get("ferry/a/manifest", 11).await.expect_err("over the limit");
        assert!(matches!(err, StoreError::TooLarge { limit: 11, .. }), "{err}");
        assert!(store.cool_down().remaining(Instant::now()).is_none());
        for kind in FaultKind::ALL {
            assert_eq!(faults.count(StoreOp::Get, kind), 0, "{kind:?}");
        }
    }

    #[test]
    fn cool_downs_double_up_to_the_cap() {
        let mut c = CoolDown::default();
        let t = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..6 {
            c.strike(t, Duration::from_secs(2));
            waits.push(c.remaining(t).expect("cooling down").as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 15, 15, 15]);
        assert_eq!(c.remaining(t + MAX_COOL_DOWN), None);
    }

    #[test]
    fn the_limiter_lets_one_line_through_per_interval_and_counts_the_rest() {
        let limiter = LogLimiter::default();
        let t = Instant::now();
        assert_eq!(limiter.admit(t), Some(0));
        for s in 1..10 {
            assert_eq!(limiter.admit(t + Duration::from_secs(s)), None);
        }
        assert_eq!(limiter.admit(t + LOG_INTERVAL), Some(9));
        assert_eq!(limiter.admit(t + LOG_INTERVAL + Duration::from_secs(1)), None);
        assert_eq!(limiter.admit(t + LOG_INTERVAL * 3), Some(1));
    }
}
