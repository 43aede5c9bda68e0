//! How the client verbs, the worker and `report` reach the coordinator: the `--coordinator`,
//! token and TLS flags, and the client made from them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use lorasweep_coordinator::client::{ClientOptions, CoordinatorClient, COORDINATOR_ENV};
use lorasweep_coordinator::service::auth::token_from;

/// How to reach the coordinator (shared by the client verbs and the worker).
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The coordinator's URL.
    #[arg(long, env = COORDINATOR_ENV, default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// File holding the bearer token [default: $LORASWEEP_TOKEN].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an https coordinator.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name the coordinator's certificate carries, if not the URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
}

pub(crate) fn connect(args: &ConnectArgs) -> Result<CoordinatorClient> {
    let mut options = ClientOptions::new(args.coordinator.clone());
    options.token = token_from(args.token_file.as_deref())?;
    if let Some(ca) = &args.ca {
        options.ca_pem =
            Some(std::fs::read(ca).with_context(|| format!("cannot read --ca {}", ca.display()))?);
    }
    options.tls_domain = args.tls_domain.clone();
    Ok(CoordinatorClient::connect(&options)?)
}
