//! `WorkerService`, the RPCs worker agents call: register, heartbeat, poll for work, leave,
//! progress, artifact upload and download, job completion and failure, the probe cache, and
//! the rendezvous of multi-worker jobs.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use lorasweep_proto::v1 as pb;
use lorasweep_proto::v1::worker_service_server::WorkerService;
use lorasweep_proto::PROTOCOL_VERSION;

use crate::convert;
use crate::domain::{
    is_valid_artifact_name, ArtifactInfo, ArtifactRecord, ReportOutcome, Timestamp,
};
use crate::ids::{JobId, WorkerId};
use crate::store::LeaseRef;

use super::artifacts::{self, is_sha256_hex, receive_upload, relative_path, Declared};
use super::state::{bad_field, State};

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

pub(super) struct WorkerApi {
    pub(super) state: Arc<State>,
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
            .map_err(|error| {
                if error.is_disk_full() {
                    // Retryable: the worker waits and sends it again once space is freed.
                    tracing::error!(%error, "the artifact directory is full; upload refused");
                    Status::resource_exhausted(format!(
                        "the coordinator's artifact directory is full: {error}"
                    ))
                } else {
                    Status::data_loss(error.to_string())
                }
            })?;
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
