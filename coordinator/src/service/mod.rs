//! The coordinator's gRPC service: `WorkerService` for worker agents and `SweepService` for
//! the command-line client, one server, one bearer token, optional TLS; a scheduling tick;
//! an optional HTTP endpoint with `/metrics` and `/healthz`.
//!
//! Handlers translate wire types with [`crate::convert`], run store calls on blocking
//! threads (SQLite never blocks the async runtime), and map errors to gRPC statuses.

pub mod artifacts;
pub mod auth;
pub mod metrics;

mod server;
mod state;
mod sweep_api;
mod worker_api;

pub use self::server::{start, CoordinatorOptions, RunningCoordinator, ServeError, TlsIdentity};
