//! `ferry-loadtest`: drives real load through Kafka at real worker processes, optionally while it
//! evicts, kills and freezes them, and checks every answer at the end.
//!
//! It talks to the workers only through Kafka (and starts or signals their processes); it never
//! imports the worker crate. The uninterrupted reference answers come from `ferry-generate`, run
//! as a process on the same model.
//!
//! # Layout
//!
//! - [`record`]: what the harness observes per request and per fault (shared by every part).
//! - Load side: `prompts` (the prompt set), `load` (open and closed loop schedules), `track`
//!   (publishing requests and reading replies), `metrics` (HDR histograms, summary, report),
//!   `chart` (SVG of latency and throughput over time with faults marked), `run` (the `run`
//!   command).
//! - Chaos side: `fleet` (broker and worker processes), `faults` (schedules and scenarios),
//!   `autoscale` (KEDA's Kafka rule), `verify` (answers against the reference), `chaos` (the
//!   `chaos` command).

pub mod autoscale;
pub mod chaos;
pub mod chart;
pub mod faults;
pub mod fleet;
pub mod load;
pub mod metrics;
pub mod prompts;
pub mod record;
pub mod run;
pub mod track;
pub mod verify;
