//! A typed client of the coordinator, used by the command-line verbs and the worker agent.
//! It speaks domain types; wire types stay inside [`crate::convert`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::codegen::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use lorasweep_proto::v1 as pb;
use lorasweep_proto::v1::sweep_service_client::SweepServiceClient;
use lorasweep_proto::v1::worker_service_client::WorkerServiceClient;
use lorasweep_proto::PROTOCOL_VERSION;

use crate::convert::{self, ConvertError};
use crate::domain::{
    ArtifactInfo, ArtifactKind, CacheHit, FailureKind, JobAssignment, Progress, ReportOutcome,
    SweepResults, SweepStatus, SweepSummary,
};
use crate::ids::{JobId, SweepId, WorkerId};
use crate::service::artifacts::{digest_file, CHUNK_BYTES};
use crate::service::auth::{AttachToken, TokenError};
use crate::store::LeaseRef;

/// The environment variable the coordinator URL may come from.
pub const COORDINATOR_ENV: &str = "LORASWEEP_COORDINATOR";

/// Why a call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not usable.
    #[error("invalid coordinator url {url:?}: {detail}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// The token cannot be sent.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No connection could be made.
    #[error("cannot connect to the coordinator at {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The underlying error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The coordinator answered with an error.
    #[error("coordinator refused {call}: {message} ({code:?})")]
    Refused {
        /// The call.
        call: &'static str,
        /// The gRPC status code.
        code: Code,
        /// The coordinator's message.
        message: String,
    },
    /// The coordinator's answer does not decode.
    #[error("bad answer to {call}: {source}")]
    BadAnswer {
        /// The call.
        call: &'static str,
        /// The field that is wrong.
        #[source]
        source: ConvertError,
    },
    /// A local file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A downloaded artifact does not match its digest.
    #[error("download of {name} from job {job} is corrupt: sha256 {actual}, expected {expected}")]
    Corrupt {
        /// The job.
        job: JobId,
        /// The artifact.
        name: String,
        /// Digest received.
        actual: String,
        /// Digest expected.
        expected: String,
    },
}

impl ClientError {
    /// Whether the same call may succeed later (coordinator unreachable or busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Refused { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Unknown
            ),
            _ => false,
        }
    }

    /// The gRPC status code, when the coordinator answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn refused(call: &'static str) -> impl FnOnce(Status) -> ClientError {
    move |status| ClientError::Refused {
        call,
        code: status.code(),
        message: status.message().to_string(),
    }
}

fn bad_answer(call: &'static str) -> impl FnOnce(ConvertError) -> ClientError {
    move |source| ClientError::BadAnswer { call, source }
}

/// How to reach the coordinator.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// The bearer token, if the coordinator has one.
    pub token: Option<String>,
    /// A PEM CA certificate to trust for `https` (the coordinator's own or its CA).
    pub ca_pem: Option<Vec<u8>>,
    /// The name the certificate must carry, when it is not the URL's host.
    pub tls_domain: Option<String>,
}

impl ClientOptions {
    /// Options for a URL, no token, no TLS.
    pub fn new(url: impl Into<String>) -> ClientOptions {
        ClientOptions {
            url: url.into(),
            token: None,
            ca_pem: None,
            tls_domain: None,
        }
    }
}

type Intercepted = InterceptedService<Channel, AttachToken>;

/// A worker's identity and offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    /// Its id.
    pub id: WorkerId,
    /// Its host name.
    pub host: String,
    /// Its GPU slots (empty: one CPU slot).
    pub gpus: Vec<u32>,
}

/// What the coordinator asks of a registered worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a lease lives without a heartbeat.
    pub lease_ttl: Duration,
}

/// The answer to a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// The sweep.
    pub sweep: SweepId,
    /// Its jobs.
    pub jobs: u32,
    /// Whether an identical sweep was reused.
    pub existing: bool,
}

/// A connected client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct CoordinatorClient {
    workers: WorkerServiceClient<Intercepted>,
    sweeps: SweepServiceClient<Intercepted>,
}

impl CoordinatorClient {
    /// Connects (lazily: the first call opens the connection and may fail with
    /// [`ClientError::Refused`] and code `Unavailable`). Must be called inside a Tokio
    /// runtime (`Runtime::enter` or an async context).
    pub fn connect(options: &ClientOptions) -> Result<CoordinatorClient, ClientError> {
        let bad_url = |detail: String| ClientError::BadUrl {
            url: options.url.clone(),
            detail,
        };
        if !(options.url.starts_with("http://") || options.url.starts_with("https://")) {
            return Err(bad_url(
                "expected http://HOST:PORT or https://HOST:PORT".to_string(),
            ));
        }
        let mut endpoint = Endpoint::from_shared(options.url.clone())
            .map_err(|error| bad_url(error.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        if options.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &options.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some(domain) = &options.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::Connect {
                    url: options.url.clone(),
                    source,
                })?;
        }
        let channel = endpoint.connect_lazy();
        let token = AttachToken::new(options.token.as_deref())?;
        Ok(CoordinatorClient {
            workers: WorkerServiceClient::with_interceptor(channel.clone(), token.clone()),
            sweeps: SweepServiceClient::with_interceptor(channel, token),
        })
    }

    /// Registers a worker; fails with `FailedPrecondition` on a protocol mismatch.
    pub async fn register(&self, worker: &WorkerIdentity) -> Result<Registration, ClientError> {
        let response = self
            .workers
            .clone()
            .register(pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: worker.id.as_str().to_string(),
                host: worker.host.clone(),
                gpus: worker.gpus.clone(),
            })
            .await
            .map_err(refused("register"))?
            .into_inner();
        Ok(Registration {
            heartbeat_interval: Duration::from_millis(response.heartbeat_interval_ms.max(100)),
            lease_ttl: Duration::from_millis(response.lease_ttl_ms.max(1000)),
        })
    }

    /// Tells the coordinator this worker is leaving; returns the jobs it requeued.
    pub async fn leave(&self, worker: &WorkerId) -> Result<Vec<JobId>, ClientError> {
        let response = self
            .workers
            .clone()
            .leave(pb::LeaveRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: worker.as_str().to_string(),
            })
            .await
            .map_err(refused("leave"))?
            .into_inner();
        Ok(response.requeued_job_ids.into_iter().map(JobId).collect())
    }

    /// Heartbeats with the jobs the worker runs; returns those it must stop.
    pub async fn heartbeat(
        &self,
        worker: &WorkerIdentity,
        running: &[(JobId, u64)],
    ) -> Result<Vec<(JobId, u64)>, ClientError> {
        let response = self
            .workers
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: worker.id.as_str().to_string(),
                host: worker.host.clone(),
                gpus: worker.gpus.clone(),
                running: running
                    .iter()
                    .map(|(job, epoch)| pb::RunningJob {
                        job_id: job.0,
                        epoch: *epoch,
                    })
                    .collect(),
            })
            .await
            .map_err(refused("heartbeat"))?
            .into_inner();
        response
            .stop
            .iter()
            .map(|job| {
                Ok((
                    convert::job_id("RunningJob.job_id", job.job_id)
                        .map_err(bad_answer("heartbeat"))?,
                    job.epoch,
                ))
            })
            .collect()
    }

    /// Asks for work; returns the jobs newly leased to this worker.
    pub async fn poll_work(&self, worker: &WorkerId) -> Result<Vec<JobAssignment>, ClientError> {
        let response = self
            .workers
            .clone()
            .poll_work(pb::PollWorkRequest {
                worker_id: worker.as_str().to_string(),
            })
            .await
            .map_err(refused("poll work"))?
            .into_inner();
        response
            .assignments
            .iter()
            .map(|assignment| {
                convert::assignment_from_proto(assignment).map_err(bad_answer("poll work"))
            })
            .collect()
    }

    /// Reports progress; `false` means the job must stop (stale lease or cancelled).
    pub async fn report_progress(
        &self,
        lease: &LeaseRef,
        progress: &Progress,
    ) -> Result<bool, ClientError> {
        let response = self
            .workers
            .clone()
            .report_progress(pb::ProgressRequest {
                job_id: lease.job.0,
                epoch: lease.epoch,
                worker_id: lease.worker.as_str().to_string(),
                step: progress.step,
                total_steps: progress.total_steps,
                loss: progress.loss,
                tokens_per_second: progress.tokens_per_second,
                message: progress.message.clone(),
            })
            .await
            .map_err(refused("report progress"))?
            .into_inner();
        Ok(response.keep_going)
    }

    /// Uploads a local file as an artifact of the leased job, in chunks.
    pub async fn upload_artifact(
        &self,
        lease: &LeaseRef,
        path: &Path,
        name: &str,
        kind: ArtifactKind,
        step: u64,
    ) -> Result<ArtifactInfo, ClientError> {
        let owned = path.to_path_buf();
        let (sha256, size) = tokio::task::spawn_blocking(move || digest_file(&owned))
            .await
            .map_err(|error| ClientError::Io {
                context: "digest task failed".to_string(),
                source: std::io::Error::other(error.to_string()),
            })?
            .map_err(|source| ClientError::Io {
                context: format!("cannot read {}", path.display()),
                source,
            })?;
        let header = pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
                job_id: lease.job.0,
                epoch: lease.epoch,
                worker_id: lease.worker.as_str().to_string(),
                name: name.to_string(),
                kind: kind.name().to_string(),
                step,
                size,
                sha256,
            })),
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<pb::UploadChunk>(4);
        let owned = path.to_path_buf();
        // The chaos test's broken link: half the bytes, then the stream ends.
        let mut budget = if crate::faults::take_upload_abort(lease.worker.as_str()) {
            tracing::warn!(name, "LORASWEEP_FAULTS: this upload stops midway");
            size / 2
        } else {
            u64::MAX
        };
        let reader = tokio::task::spawn_blocking(move || {
            if sender.blocking_send(header).is_err() {
                return Ok(());
            }
            crate::service::artifacts::read_chunks(&owned, |mut data| {
                let whole = budget >= data.len() as u64;
                data.truncate(budget.min(data.len() as u64) as usize);
                budget -= data.len() as u64;
                sender
                    .blocking_send(pb::UploadChunk {
                        part: Some(pb::upload_chunk::Part::Data(data)),
                    })
                    .is_ok()
                    && whole
            })
        });
        let response = self
            .workers
            .clone()
            .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map_err(refused("upload artifact"))?
            .into_inner();
        reader
            .await
            .map_err(|error| ClientError::Io {
                context: "upload reader failed".to_string(),
                source: std::io::Error::other(error.to_string()),
            })?
            .map_err(|source| ClientError::Io {
                context: format!("cannot read {}", path.display()),
                source,
            })?;
        let artifact = response.artifact.ok_or_else(|| ClientError::BadAnswer {
            call: "upload artifact",
            source: ConvertError {
                field: "UploadResponse.artifact",
                detail: "missing".to_string(),
            },
        })?;
        convert::artifact_from_proto(&artifact).map_err(bad_answer("upload artifact"))
    }

    /// Downloads an artifact to `destination` (written to a temporary file beside it, its
    /// SHA-256 checked, then renamed into place).
    pub async fn download_artifact(
        &self,
        job: JobId,
        name: &str,
        destination: &Path,
    ) -> Result<ArtifactInfo, ClientError> {
        let mut stream = self
            .workers
            .clone()
            .download_artifact(pb::DownloadRequest {
                job_id: job.0,
                name: name.to_string(),
            })
            .await
            .map_err(refused("download artifact"))?
            .into_inner();
        let io = |context: String| move |source| ClientError::Io { context, source };
        if let Some(parent) = destination.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(format!("cannot create {}", parent.display())))?;
        }
        let temporary = PathBuf::from(format!("{}.part", destination.display()));
        let mut file = tokio::fs::File::create(&temporary)
            .await
            .map_err(io(format!("cannot create {}", temporary.display())))?;
        let mut hasher = Sha256::new();
        let mut info: Option<ArtifactInfo> = None;
        let received: Result<(), ClientError> = async {
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(refused("download artifact"))?
            {
                if let Some(artifact) = &chunk.artifact {
                    info = Some(
                        convert::artifact_from_proto(artifact)
                            .map_err(bad_answer("download artifact"))?,
                    );
                }
                hasher.update(&chunk.data);
                file.write_all(&chunk.data)
                    .await
                    .map_err(io(format!("cannot write {}", temporary.display())))?;
            }
            file.sync_all()
                .await
                .map_err(io(format!("cannot write {}", temporary.display())))?;
            Ok(())
        }
        .await;
        let checked = received.and_then(|()| {
            let info = info.ok_or_else(|| ClientError::BadAnswer {
                call: "download artifact",
                source: ConvertError {
                    field: "DownloadChunk.artifact",
                    detail: "missing from the first message".to_string(),
                },
            })?;
            let actual = hex::encode(hasher.finalize());
            if actual != info.sha256 {
                return Err(ClientError::Corrupt {
                    job,
                    name: name.to_string(),
                    actual,
                    expected: info.sha256,
                });
            }
            Ok(info)
        });
        match checked {
            Ok(info) => {
                tokio::fs::rename(&temporary, destination)
                    .await
                    .map_err(io(format!(
                        "cannot move download to {}",
                        destination.display()
                    )))?;
                Ok(info)
            }
            Err(error) => {
                let _ = tokio::fs::remove_file(&temporary).await;
                Err(error)
            }
        }
    }

    /// Reports success (rank 0 only) with the result and an optional cache key.
    pub async fn complete_job(
        &self,
        lease: &LeaseRef,
        result: &serde_json::Value,
        cache_key: Option<&str>,
    ) -> Result<ReportOutcome, ClientError> {
        let response = self
            .workers
            .clone()
            .complete_job(pb::CompleteJobRequest {
                job_id: lease.job.0,
                epoch: lease.epoch,
                worker_id: lease.worker.as_str().to_string(),
                result_json: result.to_string(),
                cache_key: cache_key.unwrap_or_default().to_string(),
            })
            .await
            .map_err(refused("complete job"))?
            .into_inner();
        Ok(outcome(response))
    }

    /// Reports a failed attempt.
    pub async fn fail_job(
        &self,
        lease: &LeaseRef,
        error: &str,
        kind: FailureKind,
    ) -> Result<ReportOutcome, ClientError> {
        let response = self
            .workers
            .clone()
            .fail_job(pb::FailJobRequest {
                job_id: lease.job.0,
                epoch: lease.epoch,
                worker_id: lease.worker.as_str().to_string(),
                error: error.to_string(),
                kind: convert::failure_kind_to_proto(kind) as i32,
            })
            .await
            .map_err(refused("fail job"))?
            .into_inner();
        Ok(outcome(response))
    }

    /// Looks a result up by content key; on a hit its artifacts are attached to the job.
    pub async fn lookup_cache(
        &self,
        lease: &LeaseRef,
        cache_key: &str,
    ) -> Result<Option<CacheHit>, ClientError> {
        let response = self
            .workers
            .clone()
            .lookup_cache(pb::CacheLookupRequest {
                job_id: lease.job.0,
                epoch: lease.epoch,
                worker_id: lease.worker.as_str().to_string(),
                cache_key: cache_key.to_string(),
            })
            .await
            .map_err(refused("lookup cache"))?
            .into_inner();
        if !response.hit {
            return Ok(None);
        }
        let artifacts = response
            .artifacts
            .iter()
            .map(convert::artifact_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad_answer("lookup cache"))?;
        Ok(Some(CacheHit {
            source: convert::job_id("CacheLookupResponse.source_job_id", response.source_job_id)
                .map_err(bad_answer("lookup cache"))?,
            result: convert::json("CacheLookupResponse.result_json", &response.result_json)
                .map_err(bad_answer("lookup cache"))?,
            artifacts,
        }))
    }

    /// Rank 0 publishes its rendezvous bytes for the other ranks.
    pub async fn publish_rendezvous(
        &self,
        lease: &LeaseRef,
        blob: &[u8],
    ) -> Result<(), ClientError> {
        self.workers
            .clone()
            .publish_rendezvous(pb::RendezvousPublish {
                job_id: lease.job.0,
                epoch: lease.epoch,
                worker_id: lease.worker.as_str().to_string(),
                blob: blob.to_vec(),
            })
            .await
            .map_err(refused("publish rendezvous"))?;
        Ok(())
    }

    /// The rendezvous bytes of the lease's attempt, once rank 0 has published them.
    pub async fn fetch_rendezvous(&self, lease: &LeaseRef) -> Result<Option<Vec<u8>>, ClientError> {
        let response = self
            .workers
            .clone()
            .fetch_rendezvous(pb::RendezvousFetch {
                job_id: lease.job.0,
                epoch: lease.epoch,
                worker_id: lease.worker.as_str().to_string(),
            })
            .await
            .map_err(refused("fetch rendezvous"))?
            .into_inner();
        Ok(response.blob)
    }

    /// Submits a sweep file's text; relative paths in it are kept as written.
    pub async fn submit_sweep(
        &self,
        yaml: &str,
        file_name: &str,
        reuse_existing: bool,
    ) -> Result<Submitted, ClientError> {
        self.submit_sweep_from(yaml, file_name, None, reuse_existing)
            .await
    }

    /// Submits a sweep file's text; relative model and task paths in it are taken from
    /// `base_dir` (the file's folder, made absolute).
    pub async fn submit_sweep_from(
        &self,
        yaml: &str,
        file_name: &str,
        base_dir: Option<&Path>,
        reuse_existing: bool,
    ) -> Result<Submitted, ClientError> {
        let response = self
            .sweeps
            .clone()
            .submit_sweep(pb::SubmitSweepRequest {
                yaml: yaml.to_string(),
                file_name: file_name.to_string(),
                reuse_existing,
                base_dir: base_dir
                    .map(|dir| dir.display().to_string())
                    .unwrap_or_default(),
            })
            .await
            .map_err(refused("submit"))?
            .into_inner();
        Ok(Submitted {
            sweep: convert::sweep_id("SubmitSweepResponse.sweep_id", response.sweep_id)
                .map_err(bad_answer("submit"))?,
            jobs: response.jobs,
            existing: response.existing,
        })
    }

    /// A sweep's jobs and counts.
    pub async fn sweep_status(&self, sweep: SweepId) -> Result<SweepStatus, ClientError> {
        let response = self
            .sweeps
            .clone()
            .sweep_status(pb::SweepRef { sweep_id: sweep.0 })
            .await
            .map_err(refused("status"))?
            .into_inner();
        convert::status_from_proto(&response).map_err(bad_answer("status"))
    }

    /// Cancels a sweep; returns how many jobs were cancelled.
    pub async fn cancel_sweep(&self, sweep: SweepId) -> Result<u32, ClientError> {
        let response = self
            .sweeps
            .clone()
            .cancel_sweep(pb::SweepRef { sweep_id: sweep.0 })
            .await
            .map_err(refused("cancel"))?
            .into_inner();
        Ok(response.cancelled_jobs)
    }

    /// A sweep's results and artifacts.
    pub async fn results(&self, sweep: SweepId) -> Result<SweepResults, ClientError> {
        let response = self
            .sweeps
            .clone()
            .results(pb::SweepRef { sweep_id: sweep.0 })
            .await
            .map_err(refused("results"))?
            .into_inner();
        convert::results_from_proto(&response).map_err(bad_answer("results"))
    }

    /// Every sweep, newest first.
    pub async fn list_sweeps(&self) -> Result<Vec<SweepSummary>, ClientError> {
        let response = self
            .sweeps
            .clone()
            .list_sweeps(pb::ListSweepsRequest {})
            .await
            .map_err(refused("list sweeps"))?
            .into_inner();
        response
            .sweeps
            .iter()
            .map(|summary| convert::summary_from_proto(summary).map_err(bad_answer("list sweeps")))
            .collect()
    }
}

fn outcome(response: pb::JobOutcomeResponse) -> ReportOutcome {
    if response.accepted {
        ReportOutcome::Accepted
    } else {
        ReportOutcome::Ignored(response.reason)
    }
}

/// The chunk size uploads use (the same as downloads).
pub const UPLOAD_CHUNK_BYTES: usize = CHUNK_BYTES;
