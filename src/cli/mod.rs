//! Command implementations, one module per group of verbs.

pub mod assets;
pub mod bench;
pub mod engine;
pub mod eval;
pub mod orchestrate;
pub mod report;
pub mod score;
pub mod validate;

/// Structured logs on stderr; `RUST_LOG` sets the level (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
