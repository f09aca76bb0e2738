//! Ferry's command-line tool and client library: publish requests, await their replies, and
//! host a local Kafka-protocol broker for development and tests.
//!
//! Ferry's workers read [`ferry_schemas::Request`]s from a Kafka topic and publish a
//! [`ferry_schemas::Reply`] keyed by the request's id to the request's `reply_to` topic. This
//! crate is the caller's side of that contract. It talks to workers only through Kafka and never
//! imports the worker.
//!
//! # Layout
//!
//! - [`cli`]: the command line as clap types; every flag also reads a `FERRY_...` variable.
//! - [`client`]: publish a request keyed by its id; request-and-wait for the reply.
//! - [`bootstrap`]: the bootstrap-servers file that `ferry broker` writes and clients wait for.
//! - [`broker`]: `ferry broker`: an embedded librdkafka mock cluster, or with `--kafka` a real
//!   single-node Apache Kafka run as a child JVM.
//! - [`topics`]: create a topic in a way that works on both the mock and a real cluster.
//! - [`request`]: `ferry request`: build a request from flags, await and print its reply.
//! - [`durable`]: the durable caller: a journal and a consumer group in Kafka, so a caller that
//!   restarts under the same identity collects the answers to what it sent before.
//! - [`caller`]: `ferry request --identity`: the command line as a durable caller, one request
//!   or a fan-out.
//! - [`publish`]: `ferry publish`: JSON lines from stdin to a topic.
//! - [`telemetry`]: tracing to stderr, as text or JSON.
//!
//! Data flows one way: `cli` parses flags into the argument structs, [`run`] hands each command
//! its arguments, and the commands use [`client`] for all Kafka traffic.

pub mod bootstrap;
pub mod broker;
pub mod caller;
pub mod cli;
pub mod client;
pub mod durable;
pub mod publish;
pub mod request;
pub mod telemetry;
pub mod topics;

use cli::{Cli, Command};

/// Anything that stops a `ferry` command, with the exit code the process reports for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bootstrap-servers file could not be read or written.
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    /// `ferry broker` failed to start or to serve.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// `ferry request` failed, got an error reply, or timed out.
    #[error(transparent)]
    Request(#[from] request::RequestError),
    /// `ferry publish` refused its input or failed to deliver it.
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
}

impl Error {
    /// The process exit code: 3 for an error reply, 4 for a request that got no reply in time,
    /// 1 for everything else (clap itself uses 2 for bad usage).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Request(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// Runs one command to completion.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Broker(args) => broker::serve(&args, broker::terminate_signal()).await?,
        // With `--identity`, a durable caller; otherwise a one-shot publish-and-wait.
        Command::Request(args) => match &args.identity {
            Some(identity) => caller::run(&args, identity).await?,
            None => request::run(&args).await?,
        },
        Command::Publish(args) => publish::run(&args).await?,
    }
    Ok(())
}
