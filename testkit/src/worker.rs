//! `ferry-worker` command lines, built one way for the tests, the benches and the load tester.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_schemas::Request;

/// A worker's arguments: flags the harness sets, each dropped when the caller's own arguments set
/// it too (clap refuses a flag given twice), then the caller's arguments as they are.
#[derive(Debug, Clone, Default)]
pub struct WorkerArgs {
    defaults: Vec<(String, String)>,
    extra: Vec<String>,
}

impl WorkerArgs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `flag` to `value`, unless the caller's arguments set it ([`WorkerArgs::extra`]).
    /// Setting a flag again replaces its value.
    pub fn set(mut self, flag: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.defaults.iter_mut().find(|(f, _)| f == flag) {
            Some(slot) => slot.1 = value,
            None => self.defaults.push((flag.to_string(), value)),
        }
        self
    }

    /// Sets `flag` to `value` unless it is set already (here or by the caller's arguments).
    pub fn or_set(self, flag: &str, value: impl Into<String>) -> Self {
        if self.defaults.iter().any(|(f, _)| f == flag) || self.overrides(flag) {
            return self;
        }
        self.set(flag, value)
    }

    /// The worker's broker, model and name: what every worker is started with.
    pub fn basics(self, bootstrap: &str, model: &Path, name: &str) -> Self {
        self.set("--bootstrap-servers", bootstrap)
            .set("--model", model.display().to_string())
            .set("--worker-id", name)
    }

    /// The caller's own arguments, passed as they are after the harness's.
    pub fn extra<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.extra.extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Whether the caller's arguments set `flag` (as `--flag value` or `--flag=value`).
    pub fn overrides(&self, flag: &str) -> bool {
        self.extra
            .iter()
            .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|rest| rest.starts_with('=')))
    }

    /// The command line.
    pub fn build(&self) -> Vec<String> {
        let mut args: Vec<String> = self
            .defaults
            .iter()
            .filter(|(flag, _)| !self.overrides(flag))
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect();
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// The topics and the consumer group that one test's workers share, each named afresh.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub requests: String,
    pub replies: String,
    /// `<requests>.dlq`, the worker's default dead-letter topic.
    pub dlq: String,
    pub group: String,
}

impl Pipeline {
    pub fn new() -> Self {
        let requests = crate::unique("req");
        Self {
            dlq: format!("{requests}.dlq"),
            requests,
            replies: crate::unique("rep"),
            group: crate::unique("group"),
        }
    }

    /// The request, reply and dead-letter topics, to create.
    pub fn topics(&self) -> [&str; 3] {
        [&self.requests, &self.replies, &self.dlq]
    }

    /// The worker flags that name these topics and this group.
    pub fn args(&self) -> WorkerArgs {
        WorkerArgs::new()
            .set("--topic", &self.requests)
            .set("--reply-topic", &self.replies)
            .set("--group-id", &self.group)
    }
}

/// A cluster holding one [`Pipeline`]'s topics, and a `file://` snapshot store in the test's
/// directory: the set-up most worker tests share.
pub struct Setup {
    pub cluster: crate::Cluster,
    pub pipeline: Pipeline,
    /// The snapshot store's URL.
    pub store: String,
    /// The snapshot store's directory.
    pub store_dir: PathBuf,
}

impl Setup {
    /// A fresh pipeline whose topics have `partitions` partitions each.
    pub fn new(partitions: i32) -> Self {
        let pipeline = Pipeline::new();
        let cluster = crate::Cluster::start_with_partitions(&pipeline.topics(), partitions);
        let store = cluster.snapshot_store();
        let store_dir = cluster.snapshot_dir();
        Self {
            cluster,
            pipeline,
            store,
            store_dir,
        }
    }

    /// The flags that put a worker in this pipeline, with this store.
    pub fn args(&self) -> WorkerArgs {
        self.pipeline.args().set("--snapshot-store", &self.store)
    }

    /// Starts a worker named `name` with `args` on this set-up's cluster
    /// ([`crate::Cluster::start_worker`]).
    pub fn worker(&self, name: &str, args: WorkerArgs) -> crate::ChildGuard {
        self.cluster.start_worker(name, args, &[])
    }

    /// Publishes `request` to `partition` of the request topic, keyed by its id, and returns its
    /// offset. Blocks: for tests that do not run in a runtime.
    pub fn publish(&self, partition: i32, request: &Request) -> i64 {
        let producer = self.cluster.producer();
        let payload = serde_json::to_vec(request).expect("json");
        crate::block_on(
            self.cluster
                .publish_to(&producer, &self.pipeline.requests, partition, &request.id, &payload),
        )
    }

    /// The group's committed offset for `partition` of the request topic, if it has one.
    pub fn committed(&self, partition: i32) -> Option<i64> {
        let reader = self.cluster.reader(&self.pipeline.group);
        self.cluster.committed_in(&reader, &self.pipeline.requests, partition)
    }

    /// Waits until the group has committed `partition` of the request topic to `position` or
    /// past it.
    pub fn wait_committed(&self, partition: i32, position: i64, timeout: Duration) {
        let reader = self.cluster.reader(&self.pipeline.group);
        crate::wait_for(
            timeout,
            &format!("partition {partition} committed to {position}"),
            || {
                self.cluster
                    .committed_in(&reader, &self.pipeline.requests, partition)
                    .filter(|&c| c >= position)
            },
        );
    }
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
