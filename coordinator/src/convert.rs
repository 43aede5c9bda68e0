//! Protobuf ⇄ domain conversions: the only place in the coordinator crate where wire types
//! meet domain types. Decoding checks every field and names the one that is wrong.

use serde_json::Value;

use lorasweep_proto::v1 as pb;

use crate::domain::{
    job_kind_from_name, ArtifactInfo, ArtifactKind, DependencyOutput, FailureKind, JobAssignment,
    JobRecord, JobResult, JobState, Progress, RankSlot, StateCounts, SweepRecord, SweepResults,
    SweepStatus, SweepSummary, Timestamp,
};
use crate::graph::{JobKey, JobKind};
use crate::ids::{JobId, SweepId, WorkerId};

/// A wire message with a field that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field {field}: {detail}")]
pub struct ConvertError {
    /// The field, e.g. `JobAssignment.kind`.
    pub field: &'static str,
    /// What is wrong.
    pub detail: String,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> ConvertError {
    ConvertError {
        field,
        detail: detail.into(),
    }
}

/// A positive job id.
pub fn job_id(field: &'static str, value: u64) -> Result<JobId, ConvertError> {
    if value == 0 {
        return Err(invalid(field, "job id 0 does not exist"));
    }
    Ok(JobId(value))
}

/// A positive sweep id.
pub fn sweep_id(field: &'static str, value: u64) -> Result<SweepId, ConvertError> {
    if value == 0 {
        return Err(invalid(field, "sweep id 0 does not exist"));
    }
    Ok(SweepId(value))
}

/// A valid worker id.
pub fn worker_id(field: &'static str, value: &str) -> Result<WorkerId, ConvertError> {
    WorkerId::new(value).map_err(|error| invalid(field, error.to_string()))
}

/// A JSON document.
pub fn json(field: &'static str, text: &str) -> Result<Value, ConvertError> {
    serde_json::from_str(text).map_err(|error| invalid(field, format!("not JSON: {error}")))
}

/// Job parameters from their versioned wire envelope (the schema checked; the worker reads
/// the fields into the typed contract).
fn params(field: &'static str, text: &str) -> Result<Value, ConvertError> {
    lorasweep_contract::from_wire(text).map_err(|error| invalid(field, error.to_string()))
}

fn kind(field: &'static str, name: &str) -> Result<JobKind, ConvertError> {
    job_kind_from_name(name).ok_or_else(|| invalid(field, format!("unknown job kind {name:?}")))
}

fn state(field: &'static str, name: &str) -> Result<JobState, ConvertError> {
    JobState::from_name(name).ok_or_else(|| invalid(field, format!("unknown job state {name:?}")))
}

/// An artifact kind by name.
pub fn artifact_kind(field: &'static str, name: &str) -> Result<ArtifactKind, ConvertError> {
    ArtifactKind::from_name(name).ok_or_else(|| {
        invalid(
            field,
            format!("unknown artifact kind {name:?}; expected output or checkpoint"),
        )
    })
}

/// Domain → wire.
pub fn artifact_to_proto(info: &ArtifactInfo) -> pb::ArtifactInfo {
    pb::ArtifactInfo {
        job_id: info.job.0,
        name: info.name.clone(),
        sha256: info.sha256.clone(),
        size: info.size,
        kind: info.kind.name().to_string(),
        step: info.step,
    }
}

/// Wire → domain.
pub fn artifact_from_proto(info: &pb::ArtifactInfo) -> Result<ArtifactInfo, ConvertError> {
    Ok(ArtifactInfo {
        job: job_id("ArtifactInfo.job_id", info.job_id)?,
        name: info.name.clone(),
        sha256: info.sha256.clone(),
        size: info.size,
        kind: artifact_kind("ArtifactInfo.kind", &info.kind)?,
        step: info.step,
    })
}

fn rank_to_proto(slot: &RankSlot) -> pb::RankSlot {
    pb::RankSlot {
        rank: slot.rank,
        gpu: slot.gpu,
    }
}

/// Domain → wire.
pub fn assignment_to_proto(assignment: &JobAssignment) -> pb::JobAssignment {
    pb::JobAssignment {
        job_id: assignment.job.0,
        sweep_id: assignment.sweep.0,
        key: assignment.key.0.clone(),
        kind: assignment.kind.name().to_string(),
        model: assignment.model.clone(),
        task: assignment.task.clone(),
        params_json: lorasweep_contract::wire(&assignment.params),
        epoch: assignment.epoch,
        attempt: assignment.attempt,
        world_size: assignment.world_size,
        local_ranks: assignment.local_ranks.iter().map(rank_to_proto).collect(),
        dependencies: assignment
            .dependencies
            .iter()
            .map(|dep| pb::DependencyOutput {
                job_id: dep.job.0,
                key: dep.key.0.clone(),
                kind: dep.kind.name().to_string(),
                result_json: dep.result.to_string(),
                artifacts: dep.artifacts.iter().map(artifact_to_proto).collect(),
            })
            .collect(),
        resume_from: assignment.resume_from.as_ref().map(artifact_to_proto),
    }
}

/// Wire → domain.
pub fn assignment_from_proto(
    assignment: &pb::JobAssignment,
) -> Result<JobAssignment, ConvertError> {
    if assignment.world_size == 0 {
        return Err(invalid("JobAssignment.world_size", "must be at least 1"));
    }
    if assignment.local_ranks.is_empty() {
        return Err(invalid(
            "JobAssignment.local_ranks",
            "no rank for this worker",
        ));
    }
    if let Some(slot) = assignment
        .local_ranks
        .iter()
        .find(|slot| slot.rank >= assignment.world_size)
    {
        return Err(invalid(
            "JobAssignment.local_ranks",
            format!(
                "rank {} outside world size {}",
                slot.rank, assignment.world_size
            ),
        ));
    }
    let mut dependencies = Vec::with_capacity(assignment.dependencies.len());
    for dep in &assignment.dependencies {
        dependencies.push(DependencyOutput {
            job: job_id("DependencyOutput.job_id", dep.job_id)?,
            key: JobKey(dep.key.clone()),
            kind: kind("DependencyOutput.kind", &dep.kind)?,
            result: json("DependencyOutput.result_json", &dep.result_json)?,
            artifacts: dep
                .artifacts
                .iter()
                .map(artifact_from_proto)
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(JobAssignment {
        job: job_id("JobAssignment.job_id", assignment.job_id)?,
        sweep: sweep_id("JobAssignment.sweep_id", assignment.sweep_id)?,
        key: JobKey(assignment.key.clone()),
        kind: kind("JobAssignment.kind", &assignment.kind)?,
        model: assignment.model.clone(),
        task: assignment.task.clone(),
        params: params("JobAssignment.params_json", &assignment.params_json)?,
        epoch: assignment.epoch,
        attempt: assignment.attempt,
        world_size: assignment.world_size,
        local_ranks: assignment
            .local_ranks
            .iter()
            .map(|slot| RankSlot {
                rank: slot.rank,
                gpu: slot.gpu,
            })
            .collect(),
        dependencies,
        resume_from: assignment
            .resume_from
            .as_ref()
            .map(artifact_from_proto)
            .transpose()?,
    })
}

/// Wire → domain.
pub fn progress_from_proto(request: &pb::ProgressRequest) -> Progress {
    Progress {
        step: request.step,
        total_steps: request.total_steps,
        loss: request.loss,
        tokens_per_second: request.tokens_per_second,
        message: request.message.clone(),
    }
}

/// Domain → wire.
pub fn failure_kind_to_proto(kind: FailureKind) -> pb::FailureKind {
    match kind {
        FailureKind::Retryable => pb::FailureKind::Retryable,
        FailureKind::Permanent => pb::FailureKind::Permanent,
        FailureKind::Interrupted => pb::FailureKind::Interrupted,
    }
}

/// Wire → domain (an unspecified kind counts as retryable).
pub fn failure_kind_from_proto(value: i32) -> Result<FailureKind, ConvertError> {
    match pb::FailureKind::try_from(value) {
        Ok(pb::FailureKind::Unspecified | pb::FailureKind::Retryable) => Ok(FailureKind::Retryable),
        Ok(pb::FailureKind::Permanent) => Ok(FailureKind::Permanent),
        Ok(pb::FailureKind::Interrupted) => Ok(FailureKind::Interrupted),
        Err(_) => Err(invalid(
            "FailJobRequest.kind",
            format!("unknown failure kind {value}"),
        )),
    }
}

fn counts_to_proto(counts: &StateCounts) -> Vec<pb::StateCount> {
    counts
        .iter()
        .map(|(state, count)| pb::StateCount {
            state: state.name().to_string(),
            count: *count,
        })
        .collect()
}

fn counts_from_proto(
    field: &'static str,
    counts: &[pb::StateCount],
) -> Result<StateCounts, ConvertError> {
    let mut result: StateCounts = JobState::ALL.into_iter().map(|state| (state, 0)).collect();
    for count in counts {
        result.insert(state(field, &count.state)?, count.count);
    }
    Ok(result)
}

/// Domain → wire.
pub fn job_to_proto(job: &JobRecord) -> pb::JobStatus {
    pb::JobStatus {
        job_id: job.id.0,
        key: job.key.0.clone(),
        kind: job.kind.name().to_string(),
        model: job.model.clone(),
        task: job.task.clone(),
        state: job.state.name().to_string(),
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        gpus: job.gpus,
        last_error: job.last_error.clone(),
        workers: job
            .workers
            .iter()
            .map(|worker| worker.as_str().to_string())
            .collect(),
        step: job.progress.step,
        total_steps: job.progress.total_steps,
        loss: job.progress.loss,
        tokens_per_second: job.progress.tokens_per_second,
        message: job.progress.message.clone(),
        queued_ms: job.queued_at.0,
        started_ms: job.started_at.map(|time| time.0),
        finished_ms: job.finished_at.map(|time| time.0),
        params_json: lorasweep_contract::wire(&job.params),
        deps: job.deps.iter().map(|dep| dep.0).collect(),
        epoch: job.epoch,
        result_json: job.result.as_ref().map(Value::to_string),
    }
}

/// Wire → domain.
pub fn job_from_proto(sweep: SweepId, job: &pb::JobStatus) -> Result<JobRecord, ConvertError> {
    Ok(JobRecord {
        id: job_id("JobStatus.job_id", job.job_id)?,
        sweep,
        key: JobKey(job.key.clone()),
        kind: kind("JobStatus.kind", &job.kind)?,
        model: job.model.clone(),
        task: job.task.clone(),
        params: params("JobStatus.params_json", &job.params_json)?,
        deps: job
            .deps
            .iter()
            .map(|dep| job_id("JobStatus.deps", *dep))
            .collect::<Result<_, _>>()?,
        gpus: job.gpus,
        state: state("JobStatus.state", &job.state)?,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        epoch: job.epoch,
        last_error: job.last_error.clone(),
        result: job
            .result_json
            .as_deref()
            .map(|text| json("JobStatus.result_json", text))
            .transpose()?,
        workers: job
            .workers
            .iter()
            .map(|worker| worker_id("JobStatus.workers", worker))
            .collect::<Result<_, _>>()?,
        progress: Progress {
            step: job.step,
            total_steps: job.total_steps,
            loss: job.loss,
            tokens_per_second: job.tokens_per_second,
            message: job.message.clone(),
        },
        queued_at: Timestamp(job.queued_ms),
        started_at: job.started_ms.map(Timestamp),
        finished_at: job.finished_ms.map(Timestamp),
    })
}

/// Domain → wire.
pub fn status_to_proto(status: &SweepStatus) -> pb::SweepStatusResponse {
    pb::SweepStatusResponse {
        sweep_id: status.id.0,
        name: status.name.clone(),
        file_name: status.file_name.clone(),
        created_ms: status.created.0,
        cancelled_ms: status.cancelled.map(|time| time.0),
        ended: status.ended,
        counts: counts_to_proto(&status.counts),
        jobs: status.jobs.iter().map(job_to_proto).collect(),
    }
}

/// Wire → domain.
pub fn status_from_proto(status: &pb::SweepStatusResponse) -> Result<SweepStatus, ConvertError> {
    let id = sweep_id("SweepStatusResponse.sweep_id", status.sweep_id)?;
    Ok(SweepStatus {
        id,
        name: status.name.clone(),
        file_name: status.file_name.clone(),
        created: Timestamp(status.created_ms),
        cancelled: status.cancelled_ms.map(Timestamp),
        counts: counts_from_proto("SweepStatusResponse.counts", &status.counts)?,
        ended: status.ended,
        jobs: status
            .jobs
            .iter()
            .map(|job| job_from_proto(id, job))
            .collect::<Result<_, _>>()?,
    })
}

/// Domain → wire.
pub fn results_to_proto(results: &SweepResults) -> pb::ResultsResponse {
    pb::ResultsResponse {
        sweep_id: results.sweep.id.0,
        name: results.sweep.name.clone(),
        file_name: results.sweep.file_name.clone(),
        yaml: results.sweep.spec_yaml.clone(),
        created_ms: results.sweep.created.0,
        cancelled_ms: results.sweep.cancelled.map(|time| time.0),
        jobs: results
            .jobs
            .iter()
            .map(|result| pb::JobResult {
                job: Some(job_to_proto(&result.job)),
                artifacts: result.artifacts.iter().map(artifact_to_proto).collect(),
            })
            .collect(),
    }
}

/// Wire → domain.
pub fn results_from_proto(results: &pb::ResultsResponse) -> Result<SweepResults, ConvertError> {
    let id = sweep_id("ResultsResponse.sweep_id", results.sweep_id)?;
    let mut jobs = Vec::with_capacity(results.jobs.len());
    for result in &results.jobs {
        let job = result
            .job
            .as_ref()
            .ok_or_else(|| invalid("JobResult.job", "missing"))?;
        jobs.push(JobResult {
            job: job_from_proto(id, job)?,
            artifacts: result
                .artifacts
                .iter()
                .map(artifact_from_proto)
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(SweepResults {
        sweep: SweepRecord {
            id,
            name: results.name.clone(),
            file_name: results.file_name.clone(),
            spec_yaml: results.yaml.clone(),
            created: Timestamp(results.created_ms),
            cancelled: results.cancelled_ms.map(Timestamp),
        },
        jobs,
    })
}

/// Domain → wire.
pub fn summary_to_proto(summary: &SweepSummary) -> pb::SweepSummary {
    pb::SweepSummary {
        sweep_id: summary.id.0,
        name: summary.name.clone(),
        cancelled: summary.cancelled,
        ended: summary.ended,
        created_ms: summary.created.0,
        counts: counts_to_proto(&summary.counts),
    }
}

/// Wire → domain.
pub fn summary_from_proto(summary: &pb::SweepSummary) -> Result<SweepSummary, ConvertError> {
    Ok(SweepSummary {
        id: sweep_id("SweepSummary.sweep_id", summary.sweep_id)?,
        name: summary.name.clone(),
        created: Timestamp(summary.created_ms),
        cancelled: summary.cancelled,
        counts: counts_from_proto("SweepSummary.counts", &summary.counts)?,
        ended: summary.ended,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_assignment() -> JobAssignment {
        let artifact = ArtifactInfo {
            job: JobId(3),
            name: "page.json".to_string(),
            sha256: "ab".repeat(32),
            size: 120,
            kind: ArtifactKind::Output,
            step: 0,
        };
        JobAssignment {
            job: JobId(7),
            sweep: SweepId(2),
            key: JobKey("train-1".to_string()),
            kind: JobKind::Train,
            model: "smollm2-135m".to_string(),
            task: "math".to_string(),
            params: json!({"rank": 8, "lr": 0.0002}),
            epoch: 4,
            attempt: 2,
            world_size: 2,
            local_ranks: vec![RankSlot { rank: 1, gpu: 3 }],
            dependencies: vec![DependencyOutput {
                job: JobId(3),
                key: JobKey("probe-1".to_string()),
                kind: JobKind::Probe,
                result: json!({"top": [1, 2]}),
                artifacts: vec![artifact.clone()],
            }],
            resume_from: Some(ArtifactInfo {
                job: JobId(7),
                name: "checkpoint-000050".to_string(),
                kind: ArtifactKind::Checkpoint,
                step: 50,
                ..artifact
            }),
        }
    }

    #[test]
    fn assignments_survive_the_round_trip() {
        let assignment = sample_assignment();
        let back = assignment_from_proto(&assignment_to_proto(&assignment)).unwrap();
        assert_eq!(back, assignment);
    }

    #[test]
    fn a_bad_field_is_named() {
        let mut wire = assignment_to_proto(&sample_assignment());
        wire.kind = "finetune".to_string();
        let error = assignment_from_proto(&wire).unwrap_err();
        assert_eq!(error.field, "JobAssignment.kind");
        let mut wire = assignment_to_proto(&sample_assignment());
        wire.local_ranks[0].rank = 2;
        assert_eq!(
            assignment_from_proto(&wire).unwrap_err().field,
            "JobAssignment.local_ranks"
        );
        let mut wire = assignment_to_proto(&sample_assignment());
        wire.params_json = "{".to_string();
        assert_eq!(
            assignment_from_proto(&wire).unwrap_err().field,
            "JobAssignment.params_json"
        );
        let mut wire = assignment_to_proto(&sample_assignment());
        wire.params_json = r#"{"schema":99,"params":{}}"#.to_string();
        let error = assignment_from_proto(&wire).unwrap_err();
        assert_eq!(error.field, "JobAssignment.params_json");
        assert!(error.to_string().contains("schema 99"), "{error}");
    }

    #[test]
    fn failure_kinds_map_both_ways() {
        for kind in [
            FailureKind::Retryable,
            FailureKind::Permanent,
            FailureKind::Interrupted,
        ] {
            assert_eq!(
                failure_kind_from_proto(failure_kind_to_proto(kind) as i32).unwrap(),
                kind
            );
        }
        assert!(failure_kind_from_proto(42).is_err());
    }
}
