//! Logs: `tracing` to stderr, so stdout carries only a command's output (the bootstrap line,
//! the reply, the published offsets) and can be piped.
//!
//! librdkafka's own log lines reach `tracing` through the `log` facade, which
//! `tracing-subscriber` bridges when it is installed.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors in Kubernetes.
    Json,
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter is not valid tracing filter syntax.
    #[error("invalid log filter {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("could not install the log subscriber: {0}")]
    Install(String),
}

/// Installs the global subscriber. Call once, at start-up.
pub fn init(filter: &str, format: LogFormat) -> Result<(), TelemetryError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|source| TelemetryError::Filter {
        filter: filter.to_string(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; in a file or a pipe they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(env_filter);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| TelemetryError::Install(e.to_string()))
}
