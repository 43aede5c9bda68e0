//! Starting the coordinator: its options, binding the gRPC (and optional metrics) sockets,
//! the scheduling tick, and the handle that waits for or stops a running server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use lorasweep_proto::v1::sweep_service_server::SweepServiceServer;
use lorasweep_proto::v1::worker_service_server::WorkerServiceServer;
use lorasweep_proto::PROTOCOL_VERSION;

use crate::domain::Timestamp;
use crate::scheduler::SchedulerConfig;
use crate::store::{Store, StoreError};

use super::auth::RequireToken;
use super::metrics;
use super::state::State;
use super::sweep_api::SweepApi;
use super::worker_api::WorkerApi;

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Where to listen for gRPC (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Where uploaded artifacts are kept.
    pub artifact_dir: PathBuf,
    /// The bearer token every call must carry; required unless `listen` is loopback.
    pub token: Option<String>,
    /// PEM certificate chain and private key, to serve TLS.
    pub tls: Option<TlsIdentity>,
    /// Lease and liveness timing.
    pub scheduler: SchedulerConfig,
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// How often a scheduling round runs without any poll.
    pub tick_interval: Duration,
    /// Where to serve `/metrics` and `/healthz` over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl CoordinatorOptions {
    /// Defaults for everything but the address and the artifact directory.
    pub fn new(listen: SocketAddr, artifact_dir: PathBuf) -> CoordinatorOptions {
        CoordinatorOptions {
            listen,
            artifact_dir,
            token: None,
            tls: None,
            scheduler: SchedulerConfig::default(),
            heartbeat_interval: Duration::from_secs(5),
            tick_interval: Duration::from_secs(1),
            metrics_listen: None,
        }
    }
}

/// A PEM certificate chain and key.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The private key, PEM.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("TlsIdentity { .. }")
    }
}

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Listening beyond loopback needs a token.
    #[error("refusing to listen on non-loopback address {address} without a token: pass --token-file or set LORASWEEP_TOKEN")]
    TokenRequired {
        /// The address asked for.
        address: SocketAddr,
    },
    /// A socket or directory could not be set up.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// TLS set-up or the gRPC transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The store failed at start-up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server task panicked or was aborted.
    #[error("coordinator task failed: {0}")]
    Task(String),
}

/// A started coordinator.
pub struct RunningCoordinator {
    /// The gRPC address it listens on.
    pub address: SocketAddr,
    /// The HTTP metrics address, when serving one.
    pub metrics_address: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
}

impl RunningCoordinator {
    /// Stops accepting calls, finishes those in flight, and returns.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// Runs until the server stops (after [`RunningCoordinator::shutdown`] or an error).
    pub async fn wait(self) -> Result<(), ServeError> {
        let outcome = self.server.await;
        let _ = self.shutdown.send(true);
        for task in self.background {
            let _ = task.await;
        }
        match outcome {
            Ok(result) => result.map_err(ServeError::from),
            Err(error) => Err(ServeError::Task(error.to_string())),
        }
    }

    /// A sender that stops the coordinator when `true` is sent (for signal handlers).
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Binds the sockets and starts serving. Leases found in the store get one lease time of
/// grace, so workers that outlived a coordinator restart can reconnect and carry on.
pub async fn start(
    store: Arc<dyn Store>,
    options: CoordinatorOptions,
) -> Result<RunningCoordinator, ServeError> {
    if options.token.is_none() && !options.listen.ip().is_loopback() {
        return Err(ServeError::TokenRequired {
            address: options.listen,
        });
    }
    for folder in [
        options.artifact_dir.clone(),
        options.artifact_dir.join("tmp"),
    ] {
        std::fs::create_dir_all(&folder).map_err(|source| ServeError::Io {
            context: format!("cannot create artifact directory {}", folder.display()),
            source,
        })?;
    }
    let grace_until = Timestamp::now().plus(options.scheduler.lease_ttl);
    let extended = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.extend_all_leases(grace_until))
            .await
            .map_err(|error| ServeError::Task(error.to_string()))??
    };
    if extended > 0 {
        tracing::info!(
            leases = extended,
            "gave running leases a grace period after start"
        );
    }
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Io {
            context: format!("cannot listen on {}", options.listen),
            source,
        })?;
    let address = listener.local_addr().map_err(|source| ServeError::Io {
        context: "cannot read the bound address".to_string(),
        source,
    })?;
    let (shutdown, shutdown_receiver) = watch::channel(false);
    let mut background = Vec::new();

    let metrics_address = match options.metrics_listen {
        Some(metrics_listen) => {
            let metrics_listener =
                TcpListener::bind(metrics_listen)
                    .await
                    .map_err(|source| ServeError::Io {
                        context: format!("cannot listen for metrics on {metrics_listen}"),
                        source,
                    })?;
            let bound = metrics_listener
                .local_addr()
                .map_err(|source| ServeError::Io {
                    context: "cannot read the metrics address".to_string(),
                    source,
                })?;
            background.push(tokio::spawn(metrics::serve(
                metrics_listener,
                store.clone(),
                options.scheduler.worker_timeout,
                shutdown_receiver.clone(),
            )));
            tracing::info!(address = %bound, "serving /metrics and /healthz");
            Some(bound)
        }
        None => None,
    };

    let state = Arc::new(State {
        store: store.clone(),
        artifact_dir: options.artifact_dir.clone(),
        scheduler: options.scheduler,
        heartbeat_interval: options.heartbeat_interval,
    });
    background.push(tokio::spawn(tick(
        state.clone(),
        options.tick_interval,
        shutdown_receiver.clone(),
    )));

    let check = RequireToken::new(options.token.as_deref());
    let mut builder = Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder.tls_config(
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
        )?;
    }
    let router = builder
        .add_service(WorkerServiceServer::with_interceptor(
            WorkerApi {
                state: state.clone(),
            },
            check.clone(),
        ))
        .add_service(SweepServiceServer::with_interceptor(
            SweepApi { state },
            check,
        ));
    let mut stop = shutdown_receiver;
    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        },
    ));
    tracing::info!(
        %address,
        tls = options.tls.is_some(),
        token = options.token.is_some(),
        protocol = PROTOCOL_VERSION,
        "coordinator listening"
    );
    Ok(RunningCoordinator {
        address,
        metrics_address,
        shutdown,
        server,
        background,
    })
}

/// Runs a scheduling round every `interval`, so leases expire and skips propagate even
/// when no worker polls.
async fn tick(state: Arc<State>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(status) = state.schedule_round().await {
            tracing::warn!(error = status.message(), "scheduling round failed");
        }
    }
}
