use clap::Parser;

use super::*;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    chaos: ChaosArgs,
}

fn parse(args: &[&str]) -> Result<ChaosArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("chaos").chain(args.iter().copied())).map(|c| c.chaos)
}

#[test]
fn defaults_are_the_make_chaos_scenario() -> anyhow::Result<()> {
    let a = parse(&[])?;
    assert_eq!((a.workers, a.requests, a.concurrency, a.partitions), (3, 150, 6, 3));
    assert_eq!((a.scenario, a.rate, a.duration), (Scenario::Default, None, None));
    assert_eq!(a.fault_every, Duration::from_secs(8));
    assert_eq!(a.restart_delay, Duration::from_secs(2));
    assert_eq!(a.fault_kinds.len(), 6, "every kind of fault");
    assert!(a.fault_kinds.contains(&Kind::BrokerCrash));
    assert_eq!(a.broker, BrokerKind::Kafka, "real Kafka unless asked for the mock");
    assert_eq!(a.out, PathBuf::from("target/chaos"));
    assert!(!a.autoscale && a.bootstrap_servers.is_none());
    Ok(())
}

#[test]
fn flags_parse_and_conflicts_are_refused() -> anyhow::Result<()> {
    let a = parse(&[
        "--scenario",
        "drill",
        "--fault-kinds",
        "evict,crash",
        "--rate",
        "0.5",
        "--worker-arg=--resume",
        "--worker-arg",
        "tokens",
        "--autoscale",
        "--max-replicas",
        "5",
    ])?;
    assert_eq!(a.scenario, Scenario::Drill);
    assert_eq!(a.fault_kinds, [Kind::Evict, Kind::Crash]);
    assert_eq!(a.rate, Some(0.5));
    assert_eq!(a.worker_args, ["--resume", "tokens"]);
    assert_eq!(parse(&[])?.delivery, "at-least-once");
    assert!(parse(&["--delivery", "twice"]).is_err());
    assert_eq!(scaler_spec(&a).max_replicas, 5);
    assert_eq!(
        scaler_spec(&parse(&[])?).max_replicas,
        3,
        "the partition count by default"
    );
    assert!(parse(&["--rate", "1", "--concurrency", "2"]).is_err());
    assert!(parse(&["--fault-kinds", "meteor"]).is_err());
    Ok(())
}

#[test]
fn max_tokens_caps_every_prompt() -> anyhow::Result<()> {
    let uncapped = prompts(&parse(&[])?)?;
    let capped = prompts(&parse(&["--max-tokens", "20"])?)?;
    assert_eq!(capped.len(), uncapped.len());
    for (c, u) in capped.iter().zip(uncapped.iter()) {
        let u_max = u.as_request().max_tokens.unwrap_or(ferry_schemas::DEFAULT_MAX_TOKENS);
        assert_eq!(c.as_request().max_tokens, Some(u_max.min(20)));
        assert_eq!(c.as_request().messages, u.as_request().messages);
    }
    Ok(())
}
