//! The coordinator's gRPC service: `WorkerService` for worker agents and `SweepService` for
//! the command-line client, one server, one bearer token, optional TLS; a scheduling tick;
//! an optional HTTP endpoint with `/metrics` and `/healthz`.
//!
//! Handlers translate wire types with [`crate::convert`], run store calls on blocking
//! threads (SQLite never blocks the async runtime), and map errors to gRPC statuses.

pub mod artifacts;
pub mod auth;
pub mod metrics;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use lorasweep_proto::v1 as pb;
use lorasweep_proto::v1::sweep_service_server::{SweepService, SweepServiceServer};
use lorasweep_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use lorasweep_proto::PROTOCOL_VERSION;

use crate::convert::{self, ConvertError};
use crate::domain::{
    is_valid_artifact_name, ArtifactInfo, ArtifactRecord, ReportOutcome, Timestamp, WorkerRecord,
};
use crate::graph::JobGraph;
use crate::ids::{JobId, WorkerId};
use crate::scheduler::{schedule, SchedulerConfig};
use crate::spec::Sweep;
use crate::store::{LeaseRef, NewSweep, Store, StoreError};

use self::artifacts::{is_sha256_hex, receive_upload, relative_path, Declared};
use self::auth::RequireToken;

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

struct State {
    store: Arc<dyn Store>,
    artifact_dir: PathBuf,
    scheduler: SchedulerConfig,
    heartbeat_interval: Duration,
}

fn store_status(error: StoreError) -> Status {
    match &error {
        StoreError::NotFound { .. } => Status::not_found(error.to_string()),
        StoreError::InvalidPlan(_) => Status::invalid_argument(error.to_string()),
        _ if error.is_retryable() => Status::unavailable(error.to_string()),
        _ => {
            tracing::error!(%error, "store failure");
            Status::internal(error.to_string())
        }
    }
}

fn bad_field(error: ConvertError) -> Status {
    Status::invalid_argument(error.to_string())
}

fn check_protocol(version: u32) -> Result<(), Status> {
    if version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "protocol version mismatch: worker speaks {version}, coordinator speaks {PROTOCOL_VERSION}; run the same lorasweep version on both"
    )))
}

fn lease_ref(job: u64, epoch: u64, worker: &str) -> Result<LeaseRef, Status> {
    Ok(LeaseRef {
        job: convert::job_id("job_id", job).map_err(bad_field)?,
        epoch,
        worker: convert::worker_id("worker_id", worker).map_err(bad_field)?,
    })
}

fn outcome_response(outcome: ReportOutcome) -> pb::JobOutcomeResponse {
    match outcome {
        ReportOutcome::Accepted => pb::JobOutcomeResponse {
            accepted: true,
            reason: String::new(),
        },
        ReportOutcome::Ignored(reason) => pb::JobOutcomeResponse {
            accepted: false,
            reason,
        },
    }
}

impl State {
    async fn with_store<T, F>(&self, body: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || body(store.as_ref()))
            .await
            .map_err(|error| Status::internal(format!("store task failed: {error}")))?
            .map_err(store_status)
    }

    async fn schedule_round(&self) -> Result<(), Status> {
        let config = self.scheduler;
        self.with_store(move |store| {
            store
                .schedule_round(Timestamp::now(), config, &mut |snapshot| schedule(snapshot))
                .map(|_| ())
        })
        .await
    }

    fn worker_record(&self, id: &str, host: &str, gpus: &[u32]) -> Result<WorkerRecord, Status> {
        let mut gpus = gpus.to_vec();
        gpus.sort_unstable();
        gpus.dedup();
        Ok(WorkerRecord {
            id: convert::worker_id("worker_id", id).map_err(bad_field)?,
            host: host.to_string(),
            gpus,
            last_heartbeat: Timestamp::now(),
        })
    }
}

struct WorkerApi {
    state: Arc<State>,
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        check_protocol(request.protocol_version)?;
        let worker = self
            .state
            .worker_record(&request.worker_id, &request.host, &request.gpus)?;
        tracing::info!(worker = worker.id.as_str(), host = worker.host.as_str(), gpus = ?worker.gpus, "worker registered");
        self.state
            .with_store(move |store| store.register_worker(&worker))
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: self.state.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: self.state.scheduler.lease_ttl.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        check_protocol(request.protocol_version)?;
        let worker = self
            .state
            .worker_record(&request.worker_id, &request.host, &request.gpus)?;
        let mut running = Vec::with_capacity(request.running.len());
        for job in &request.running {
            running.push((
                convert::job_id("RunningJob.job_id", job.job_id).map_err(bad_field)?,
                job.epoch,
            ));
        }
        let lease_ttl = self.state.scheduler.lease_ttl;
        let stop = self
            .state
            .with_store(move |store| store.heartbeat(&worker, &running, lease_ttl))
            .await?;
        Ok(Response::new(pb::HeartbeatResponse {
            stop: stop
                .into_iter()
                .map(|(job, epoch)| pb::RunningJob {
                    job_id: job.0,
                    epoch,
                })
                .collect(),
        }))
    }

    async fn poll_work(
        &self,
        request: Request<pb::PollWorkRequest>,
    ) -> Result<Response<pb::PollWorkResponse>, Status> {
        let worker: WorkerId =
            convert::worker_id("worker_id", &request.get_ref().worker_id).map_err(bad_field)?;
        self.state.schedule_round().await?;
        let assignments = self
            .state
            .with_store(move |store| store.take_assignments(&worker))
            .await?;
        Ok(Response::new(pb::PollWorkResponse {
            assignments: assignments
                .iter()
                .map(convert::assignment_to_proto)
                .collect(),
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let request = request.into_inner();
        check_protocol(request.protocol_version)?;
        let worker: WorkerId =
            convert::worker_id("worker_id", &request.worker_id).map_err(bad_field)?;
        let logged = worker.clone();
        let requeued = self
            .state
            .with_store(move |store| store.retire_worker(&worker, Timestamp::now()))
            .await?;
        tracing::info!(
            worker = logged.as_str(),
            requeued = ?requeued.iter().map(|job| job.0).collect::<Vec<_>>(),
            "worker left"
        );
        Ok(Response::new(pb::LeaveResponse {
            requeued_job_ids: requeued.iter().map(|job| job.0).collect(),
        }))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ProgressRequest>,
    ) -> Result<Response<pb::ProgressResponse>, Status> {
        let request = request.into_inner();
        let lease = lease_ref(request.job_id, request.epoch, &request.worker_id)?;
        let progress = convert::progress_from_proto(&request);
        let outcome = self
            .state
            .with_store(move |store| store.record_progress(&lease, &progress))
            .await?;
        Ok(Response::new(pb::ProgressResponse {
            keep_going: outcome.is_accepted(),
        }))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadChunk {
                part: Some(pb::upload_chunk::Part::Header(header)),
            }) => header,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first upload message must be the header",
                ))
            }
            None => return Err(Status::invalid_argument("empty upload")),
        };
        if !is_valid_artifact_name(&header.name) {
            return Err(Status::invalid_argument(format!(
                "invalid artifact name {:?}: expected 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'",
                header.name
            )));
        }
        if !is_sha256_hex(&header.sha256) {
            return Err(Status::invalid_argument(
                "UploadHeader.sha256 must be 64 lowercase hex digits",
            ));
        }
        let kind = convert::artifact_kind("UploadHeader.kind", &header.kind).map_err(bad_field)?;
        let lease = lease_ref(header.job_id, header.epoch, &header.worker_id)?;
        let check = lease.clone();
        if !self
            .state
            .with_store(move |store| store.lease_is_current(&check))
            .await?
        {
            return Err(Status::failed_precondition(format!(
                "stale lease: worker {} does not hold job {} at epoch {}",
                lease.worker, lease.job, lease.epoch
            )));
        }
        let relative = relative_path(lease.job.0, lease.epoch, &header.name);
        let declared = Declared {
            name: header.name.clone(),
            size: header.size,
            sha256: header.sha256.clone(),
        };
        let (sender, receiver) = mpsc::channel::<Vec<u8>>(4);
        let root = self.state.artifact_dir.clone();
        let target = relative.clone();
        let writer = tokio::task::spawn_blocking(move || {
            receive_upload(receiver, &root, &target, &declared)
        });
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(pb::upload_chunk::Part::Data(bytes)) => {
                    if sender.send(bytes).await.is_err() {
                        break; // the writer gave up (too many bytes); its error follows
                    }
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "only data may follow the upload header",
                    ))
                }
            }
        }
        drop(sender);
        writer
            .await
            .map_err(|error| Status::internal(format!("upload task failed: {error}")))?
            .map_err(|error| Status::data_loss(error.to_string()))?;
        let record = ArtifactRecord {
            info: ArtifactInfo {
                job: lease.job,
                name: header.name.clone(),
                sha256: header.sha256.clone(),
                size: header.size,
                kind,
                step: header.step,
            },
            relative_path: relative.clone(),
        };
        let stored = record.clone();
        let outcome = self
            .state
            .with_store(move |store| store.put_artifact(&lease, &stored, Timestamp::now()))
            .await?;
        if let ReportOutcome::Ignored(reason) = outcome {
            let _ = tokio::fs::remove_file(self.state.artifact_dir.join(&relative)).await;
            return Err(Status::failed_precondition(reason));
        }
        tracing::info!(
            job = record.info.job.0,
            name = record.info.name.as_str(),
            size = record.info.size,
            "artifact stored"
        );
        Ok(Response::new(pb::UploadResponse {
            artifact: Some(convert::artifact_to_proto(&record.info)),
        }))
    }

    type DownloadArtifactStream = ReceiverStream<Result<pb::DownloadChunk, Status>>;

    async fn download_artifact(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let request = request.into_inner();
        let job: JobId = convert::job_id("job_id", request.job_id).map_err(bad_field)?;
        let name = request.name.clone();
        let record = self
            .state
            .with_store(move |store| store.artifact(job, &name))
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("job {job} has no artifact {:?}", request.name))
            })?;
        let path = self.state.artifact_dir.join(&record.relative_path);
        let (sender, receiver) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut info = Some(convert::artifact_to_proto(&record.info));
            let result = artifacts::read_chunks(&path, |data| {
                sender
                    .blocking_send(Ok(pb::DownloadChunk {
                        artifact: info.take(),
                        data,
                    }))
                    .is_ok()
            });
            if let Err(error) = result {
                let _ = sender.blocking_send(Err(Status::internal(format!(
                    "cannot read artifact {}: {error}",
                    path.display()
                ))));
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn complete_job(
        &self,
        request: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::JobOutcomeResponse>, Status> {
        let request = request.into_inner();
        let lease = lease_ref(request.job_id, request.epoch, &request.worker_id)?;
        let result = convert::json("CompleteJobRequest.result_json", &request.result_json)
            .map_err(bad_field)?;
        let cache_key = Some(request.cache_key).filter(|key| !key.is_empty());
        let logged = lease.clone();
        let outcome = self
            .state
            .with_store(move |store| {
                store.complete_job(&lease, &result, cache_key.as_deref(), Timestamp::now())
            })
            .await?;
        match &outcome {
            ReportOutcome::Accepted => tracing::info!(
                job = logged.job.0,
                epoch = logged.epoch,
                worker = logged.worker.as_str(),
                "job succeeded"
            ),
            ReportOutcome::Ignored(reason) => tracing::info!(
                job = logged.job.0,
                epoch = logged.epoch,
                reason = reason.as_str(),
                "completion ignored"
            ),
        }
        Ok(Response::new(outcome_response(outcome)))
    }

    async fn fail_job(
        &self,
        request: Request<pb::FailJobRequest>,
    ) -> Result<Response<pb::JobOutcomeResponse>, Status> {
        let request = request.into_inner();
        let lease = lease_ref(request.job_id, request.epoch, &request.worker_id)?;
        let kind = convert::failure_kind_from_proto(request.kind).map_err(bad_field)?;
        let logged = lease.clone();
        let error = request.error.clone();
        let outcome = self
            .state
            .with_store(move |store| store.fail_job(&lease, &error, kind, Timestamp::now()))
            .await?;
        tracing::warn!(
            job = logged.job.0,
            epoch = logged.epoch,
            worker = logged.worker.as_str(),
            kind = ?kind,
            accepted = outcome.is_accepted(),
            error = request.error.as_str(),
            "job attempt failed"
        );
        Ok(Response::new(outcome_response(outcome)))
    }

    async fn lookup_cache(
        &self,
        request: Request<pb::CacheLookupRequest>,
    ) -> Result<Response<pb::CacheLookupResponse>, Status> {
        let request = request.into_inner();
        let lease = lease_ref(request.job_id, request.epoch, &request.worker_id)?;
        if request.cache_key.is_empty() {
            return Err(Status::invalid_argument(
                "CacheLookupRequest.cache_key is empty",
            ));
        }
        let key = request.cache_key.clone();
        let hit = self
            .state
            .with_store(move |store| store.lookup_cache(&lease, &key, Timestamp::now()))
            .await?;
        Ok(Response::new(match hit {
            Some(hit) => {
                tracing::info!(
                    job = request.job_id,
                    source = hit.source.0,
                    "probe cache hit"
                );
                pb::CacheLookupResponse {
                    hit: true,
                    result_json: hit.result.to_string(),
                    artifacts: hit
                        .artifacts
                        .iter()
                        .map(convert::artifact_to_proto)
                        .collect(),
                    source_job_id: hit.source.0,
                }
            }
            None => pb::CacheLookupResponse {
                hit: false,
                result_json: String::new(),
                artifacts: Vec::new(),
                source_job_id: 0,
            },
        }))
    }

    async fn publish_rendezvous(
        &self,
        request: Request<pb::RendezvousPublish>,
    ) -> Result<Response<pb::RendezvousPublishResponse>, Status> {
        let request = request.into_inner();
        let lease = lease_ref(request.job_id, request.epoch, &request.worker_id)?;
        let blob = request.blob;
        match self
            .state
            .with_store(move |store| store.publish_rendezvous(&lease, &blob))
            .await?
        {
            ReportOutcome::Accepted => Ok(Response::new(pb::RendezvousPublishResponse {})),
            ReportOutcome::Ignored(reason) => Err(Status::failed_precondition(reason)),
        }
    }

    async fn fetch_rendezvous(
        &self,
        request: Request<pb::RendezvousFetch>,
    ) -> Result<Response<pb::RendezvousFetchResponse>, Status> {
        let request = request.into_inner();
        let lease = lease_ref(request.job_id, request.epoch, &request.worker_id)?;
        let check = lease.clone();
        if !self
            .state
            .with_store(move |store| store.lease_is_current(&check))
            .await?
        {
            return Err(Status::failed_precondition(format!(
                "stale lease: worker {} does not hold job {} at epoch {}",
                lease.worker, lease.job, lease.epoch
            )));
        }
        let blob = self
            .state
            .with_store(move |store| store.fetch_rendezvous(&lease))
            .await?;
        Ok(Response::new(pb::RendezvousFetchResponse { blob }))
    }
}

struct SweepApi {
    state: Arc<State>,
}

#[tonic::async_trait]
impl SweepService for SweepApi {
    async fn submit_sweep(
        &self,
        request: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let request = request.into_inner();
        let file_name = if request.file_name.is_empty() {
            "sweep.yaml".to_string()
        } else {
            request.file_name.clone()
        };
        let outcome = self
            .state
            .with_store(move |store| {
                let base_dir =
                    (!request.base_dir.is_empty()).then(|| PathBuf::from(&request.base_dir));
                let sweep =
                    match Sweep::from_submitted(&request.yaml, &file_name, base_dir.as_deref()) {
                        Ok(sweep) => sweep,
                        Err(errors) => return Ok(Err(errors.to_string())),
                    };
                let graph = JobGraph::plan(&sweep);
                if request.reuse_existing {
                    // The same text resumes a sweep only with the same jobs: relative paths in
                    // it name other files when it is submitted from another folder.
                    let keys: BTreeSet<&str> =
                        graph.jobs().iter().map(|job| job.key.0.as_str()).collect();
                    for existing in store.find_sweeps_by_spec(&request.yaml)? {
                        let status = store.sweep_status(existing)?;
                        let same = status.jobs.len() == keys.len()
                            && status
                                .jobs
                                .iter()
                                .all(|job| keys.contains(job.key.0.as_str()));
                        if same {
                            return Ok(Ok((existing, status.jobs.len(), true)));
                        }
                    }
                }
                let id = store.create_sweep(
                    NewSweep {
                        name: &sweep.name,
                        file_name: &file_name,
                        spec_yaml: &request.yaml,
                        jobs: graph.jobs(),
                        max_attempts: sweep.resources.max_attempts,
                    },
                    Timestamp::now(),
                )?;
                Ok(Ok((id, graph.jobs().len(), false)))
            })
            .await?;
        let (sweep, jobs, existing) = outcome
            .map_err(|errors| Status::invalid_argument(format!("invalid sweep:\n{errors}")))?;
        tracing::info!(sweep = sweep.0, jobs, existing, "sweep submitted");
        Ok(Response::new(pb::SubmitSweepResponse {
            sweep_id: sweep.0,
            jobs: u32::try_from(jobs).unwrap_or(u32::MAX),
            existing,
        }))
    }

    async fn sweep_status(
        &self,
        request: Request<pb::SweepRef>,
    ) -> Result<Response<pb::SweepStatusResponse>, Status> {
        let sweep = convert::sweep_id("sweep_id", request.get_ref().sweep_id).map_err(bad_field)?;
        let status = self
            .state
            .with_store(move |store| store.sweep_status(sweep))
            .await?;
        Ok(Response::new(convert::status_to_proto(&status)))
    }

    async fn cancel_sweep(
        &self,
        request: Request<pb::SweepRef>,
    ) -> Result<Response<pb::CancelSweepResponse>, Status> {
        let sweep = convert::sweep_id("sweep_id", request.get_ref().sweep_id).map_err(bad_field)?;
        let cancelled = self
            .state
            .with_store(move |store| store.cancel_sweep(sweep, Timestamp::now()))
            .await?;
        tracing::info!(sweep = sweep.0, cancelled, "sweep cancelled");
        Ok(Response::new(pb::CancelSweepResponse {
            cancelled_jobs: cancelled,
        }))
    }

    async fn results(
        &self,
        request: Request<pb::SweepRef>,
    ) -> Result<Response<pb::ResultsResponse>, Status> {
        let sweep = convert::sweep_id("sweep_id", request.get_ref().sweep_id).map_err(bad_field)?;
        let results = self
            .state
            .with_store(move |store| store.sweep_results(sweep))
            .await?;
        Ok(Response::new(convert::results_to_proto(&results)))
    }

    async fn list_sweeps(
        &self,
        _request: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let sweeps = self.state.with_store(|store| store.list_sweeps()).await?;
        Ok(Response::new(pb::ListSweepsResponse {
            sweeps: sweeps.iter().map(convert::summary_to_proto).collect(),
        }))
    }
}
