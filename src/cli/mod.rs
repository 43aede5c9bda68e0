//! Command implementations, one module per group of verbs.

pub mod assets;
pub mod batches;
pub mod bench;
pub mod client_verbs;
pub mod connect;
pub mod engine;
pub mod eval;
pub mod report;
pub mod run;
pub mod runtime;
pub mod score;
pub mod serve;
pub mod validate;

/// Structured logs on stderr; `RUST_LOG` sets the level (default `info`). Colours only
/// when stderr is a terminal, so log files (`lorasweep run`'s, a cluster's) stay plain text.
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
