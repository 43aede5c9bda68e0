//! `SweepService`, the RPCs the command-line client calls: submit a sweep, its status, cancel
//! it, its results, and the list of sweeps.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use lorasweep_proto::v1 as pb;
use lorasweep_proto::v1::sweep_service_server::SweepService;

use crate::convert;
use crate::domain::Timestamp;
use crate::graph::JobGraph;
use crate::spec::Sweep;
use crate::store::NewSweep;

use super::state::{bad_field, State};

pub(super) struct SweepApi {
    pub(super) state: Arc<State>,
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
