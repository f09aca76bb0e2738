//! `ferry-loadtest run`: drive load at a running fleet through Kafka, wait for the stragglers,
//! and report latency and throughput (a summary table on stdout, `report.json` and `chart.svg`
//! in the output folder). Exits 0 when every request got a final reply, 1 otherwise.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::chart::render_svg;
use crate::load::{drive, Limit, LoadSpec, Mode};
use crate::metrics::{Progress, Report};
use crate::prompts::PromptSet;
use crate::record::{FaultEvent, RequestRecord};
use crate::track::Tracker;

/// Concurrency of the closed loop when neither `--rate` nor `--concurrency` is given.
const DEFAULT_CONCURRENCY: usize = 4;
/// Requests sent when neither `--requests` nor `--duration` is given.
const DEFAULT_REQUESTS: usize = 100;

/// Flags of `ferry-loadtest run`. Every flag also reads a `FERRY_LOADTEST_*` variable.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Kafka bootstrap servers, comma-separated host:port pairs.
    #[arg(
        long,
        env = "FERRY_LOADTEST_BOOTSTRAP_SERVERS",
        default_value = "localhost:9092",
        conflicts_with = "bootstrap_file"
    )]
    pub bootstrap_servers: String,

    /// Read the bootstrap servers from this file instead (as `ferry broker --bootstrap-file`
    /// writes it), waiting up to `--bootstrap-wait` for it to appear.
    #[arg(long, env = "FERRY_LOADTEST_BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,

    /// How long to wait for `--bootstrap-file` to appear.
    #[arg(long, env = "FERRY_LOADTEST_BOOTSTRAP_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub bootstrap_wait: Duration,

    /// The request topic the workers consume.
    #[arg(long, env = "FERRY_LOADTEST_TOPIC", default_value = "ferry.requests")]
    pub topic: String,

    /// The topic replies come back on; every request names it in `reply_to`. It must exist.
    #[arg(long, env = "FERRY_LOADTEST_REPLY_TOPIC", default_value = "ferry.replies")]
    pub reply_topic: String,

    /// Open loop: Poisson arrivals at this mean rate (requests per second), whatever the
    /// answers do.
    #[arg(long, env = "FERRY_LOADTEST_RATE", conflicts_with = "concurrency")]
    pub rate: Option<f64>,

    /// Closed loop: keep this many requests in flight (the default, with 4).
    #[arg(long, env = "FERRY_LOADTEST_CONCURRENCY")]
    pub concurrency: Option<usize>,

    /// Send this many requests (the default, with 100).
    #[arg(long, env = "FERRY_LOADTEST_REQUESTS", conflicts_with = "duration")]
    pub requests: Option<usize>,

    /// Send for this long (`60s`, `5m`).
    #[arg(long, env = "FERRY_LOADTEST_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Prompt templates as JSON lines (requests without `id`); the shipped set when omitted.
    #[arg(long, env = "FERRY_LOADTEST_PROMPTS")]
    pub prompts: Option<PathBuf>,

    /// Seeds the arrivals, the order of prompts and the sampling seeds: the same seed sends the
    /// same requests.
    #[arg(long, env = "FERRY_LOADTEST_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Ask for streamed chunks, which measures time to first token.
    #[arg(long, env = "FERRY_LOADTEST_STREAM")]
    pub stream: bool,

    /// How long to wait for the last answers after the last request is sent.
    #[arg(long, env = "FERRY_LOADTEST_ANSWER_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub answer_timeout: Duration,

    /// Where `report.json` and `chart.svg` are written.
    #[arg(long, env = "FERRY_LOADTEST_OUT", default_value = "target/loadtest")]
    pub out: PathBuf,

    /// Prefix of request ids (`<prefix>-00042`); a random `lt-xxxxxxxx` when omitted, so runs
    /// sharing a reply topic never mistake each other's replies.
    #[arg(long, env = "FERRY_LOADTEST_ID_PREFIX")]
    pub id_prefix: Option<String>,
}

impl RunArgs {
    /// The load the flags describe, checked.
    pub fn load_spec(&self) -> anyhow::Result<LoadSpec> {
        let mode = match (self.rate, self.concurrency) {
            (Some(_), Some(_)) => bail!("give --rate (open loop) or --concurrency (closed loop), not both"),
            (Some(rate), None) if !(rate.is_finite() && rate > 0.0) => {
                bail!("--rate must be a positive number of requests per second, got {rate}")
            }
            (Some(rate_per_s), None) => Mode::Open { rate_per_s },
            (None, Some(0)) => bail!("--concurrency must be at least 1"),
            (None, concurrency) => Mode::Closed {
                concurrency: concurrency.unwrap_or(DEFAULT_CONCURRENCY),
            },
        };
        let limit = match (self.requests, self.duration) {
            (Some(_), Some(_)) => bail!("give --requests or --duration, not both"),
            (Some(0), None) => bail!("--requests must be at least 1"),
            (None, Some(d)) if d.is_zero() => bail!("--duration must be longer than zero"),
            (Some(n), None) => Limit::Requests(n),
            (None, Some(d)) => Limit::Duration(d),
            (None, None) => Limit::Requests(DEFAULT_REQUESTS),
        };
        Ok(LoadSpec {
            mode,
            limit,
            seed: self.seed,
            stream: self.stream,
        })
    }
}

/// Runs `ferry-loadtest run`: exit code 0 when every request got a final reply, 1 otherwise.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let spec = args.load_spec()?;
    let prompts = match &args.prompts {
        Some(path) => PromptSet::from_file(path)?,
        None => PromptSet::default_set(),
    };
    let bootstrap = resolve_bootstrap(
        &args.bootstrap_servers,
        args.bootstrap_file.as_deref(),
        args.bootstrap_wait,
    )
    .await?;
    let id_prefix = args
        .id_prefix
        .clone()
        .unwrap_or_else(|| format!("lt-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));

    let t0 = Instant::now();
    let tracker = {
        let (bootstrap, reply_topic) = (bootstrap.clone(), args.reply_topic.clone());
        tokio::task::spawn_blocking(move || Tracker::start(&bootstrap, &reply_topic, t0)).await??
    };
    let progress = Progress::start(&tracker, &spec.limit);
    progress.set_phase(describe(&spec));
    let sent = drive(
        &spec,
        &prompts,
        &tracker,
        &args.topic,
        &args.reply_topic,
        &id_prefix,
        Some(&progress),
    )
    .await?;
    progress.set_phase(format!(
        "sent {sent}; waiting up to {} for the last answers",
        humantime::format_duration(args.answer_timeout)
    ));
    let all_answered = tracker.wait_answered(args.answer_timeout).await;
    progress.finish();

    let elapsed = t0.elapsed();
    let records = tracker.records();
    let report = Report::build(&records, &[], elapsed);
    println!("{}", report.summary_table());
    let failures = tracker.publish_failures();
    if failures > 0 {
        println!("{failures} requests could not be published");
    }
    let (json, svg) = write_outputs(&args.out, &report, &records, &[], elapsed)?;
    println!("report: {}\nchart: {}", json.display(), svg.display());
    Ok(if all_answered && failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The bootstrap servers: `servers`, or the contents of `file` once it appears (within `wait`).
pub async fn resolve_bootstrap(servers: &str, file: Option<&Path>, wait: Duration) -> anyhow::Result<String> {
    let Some(path) = file else {
        return Ok(servers.to_string());
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::fs::read_to_string(path).await {
            Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read the bootstrap file {}", path.display())),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the bootstrap file {} did not appear within {wait:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `report.json` and `chart.svg` into `out` (created if missing) and returns their paths.
pub fn write_outputs(
    out: &Path,
    report: &Report,
    records: &[RequestRecord],
    faults: &[FaultEvent],
    elapsed: Duration,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json = out.join("report.json");
    let file = std::fs::File::create(&json).with_context(|| format!("cannot create {}", json.display()))?;
    serde_json::to_writer_pretty(std::io::BufWriter::new(file), report)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let svg = out.join("chart.svg");
    std::fs::write(&svg, render_svg(records, faults, elapsed))
        .with_context(|| format!("cannot write {}", svg.display()))?;
    Ok((json, svg))
}

/// What the load is, for the progress display.
fn describe(spec: &LoadSpec) -> String {
    let mode = match spec.mode {
        Mode::Open { rate_per_s } => format!("open loop at {rate_per_s} req/s"),
        Mode::Closed { concurrency } => format!("closed loop, {concurrency} in flight"),
    };
    let limit = match spec.limit {
        Limit::Requests(n) => format!("{n} requests"),
        Limit::Duration(d) => format!("for {}", humantime::format_duration(d)),
    };
    format!("sending: {mode}, {limit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|c| c.run)
    }

    #[test]
    fn defaults_to_a_closed_loop_of_four_for_100_requests() -> anyhow::Result<()> {
        let args = parse(&[])?;
        assert_eq!(args.topic, "ferry.requests");
        assert_eq!(args.reply_topic, "ferry.replies");
        assert_eq!(args.answer_timeout, Duration::from_secs(120));
        assert_eq!(args.out, PathBuf::from("target/loadtest"));
        let spec = args.load_spec()?;
        assert_eq!(spec.mode, Mode::Closed { concurrency: 4 });
        assert_eq!(spec.limit, Limit::Requests(100));
        assert!(!spec.stream);
        Ok(())
    }

    #[test]
    fn open_loop_for_a_duration() -> anyhow::Result<()> {
        let spec = parse(&["--rate", "2.5", "--duration", "90s", "--seed", "7", "--stream"])?.load_spec()?;
        assert_eq!(spec.mode, Mode::Open { rate_per_s: 2.5 });
        assert_eq!(spec.limit, Limit::Duration(Duration::from_secs(90)));
        assert_eq!((spec.seed, spec.stream), (7, true));
        Ok(())
    }

    #[test]
    fn exclusive_and_invalid_flags_are_refused() -> anyhow::Result<()> {
        assert!(parse(&["--rate", "1", "--concurrency", "2"]).is_err());
        assert!(parse(&["--requests", "1", "--duration", "1s"]).is_err());
        assert!(parse(&["--bootstrap-servers", "a:1", "--bootstrap-file", "/f"]).is_err());
        for bad in [
            &["--rate", "0"][..],
            &["--rate=-1"],
            &["--concurrency", "0"],
            &["--requests", "0"],
        ] {
            assert!(parse(bad)?.load_spec().is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn bootstrap_file_is_waited_for() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bootstrap");
        assert_eq!(resolve_bootstrap("h:1", None, Duration::ZERO).await?, "h:1");
        assert!(resolve_bootstrap("h:1", Some(&path), Duration::from_millis(60))
            .await
            .is_err());
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::fs::write(&path, "127.0.0.1:9\n")
            })
        };
        assert_eq!(
            resolve_bootstrap("h:1", Some(&path), Duration::from_secs(10)).await?,
            "127.0.0.1:9"
        );
        writer.await??;
        Ok(())
    }

    #[test]
    fn outputs_are_written() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let records = crate::metrics::tests::sample_records(5);
        let report = Report::build(&records, &[], Duration::from_secs(1));
        let (json, svg) = write_outputs(&dir.path().join("out"), &report, &records, &[], Duration::from_secs(1))?;
        let value: serde_json::Value = serde_json::from_slice(&std::fs::read(json)?)?;
        assert_eq!(value["counts"]["sent"], 7);
        assert!(std::fs::read_to_string(svg)?.starts_with("<svg"));
        Ok(())
    }
}
