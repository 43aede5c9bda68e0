//! The stored results a report is made from, as files: `sweep.json` (the sweep and every job
//! with its parameters, state, timings, result and artifact list) and `probes/job-ID.json`
//! (each succeeded probe's `probe.json`). `lorasweep report` writes them under `data/` of
//! its output folder, so a report can be made again, or elsewhere, without the coordinator
//! (`--from`); the report tests use hand-made ones as fixtures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use lorasweep_contract::ProbeResult;
use lorasweep_coordinator::domain::{
    ArtifactInfo, ArtifactKind, JobRecord, JobResult, JobState, Progress, SweepRecord,
    SweepResults, Timestamp,
};
use lorasweep_coordinator::graph::{JobKey, JobKind};
use lorasweep_coordinator::ids::{JobId, SweepId, WorkerId};

/// The file holding the sweep and its jobs.
pub const SWEEP_FILE: &str = "sweep.json";

/// The folder holding the probes' `probe.json`, one `job-ID.json` per probe job.
pub const PROBES_DIR: &str = "probes";

/// Everything a report is made from: the stored results and the probe files.
#[derive(Debug, Clone)]
pub struct ReportInput {
    /// The sweep and its jobs, as the coordinator stores them.
    pub results: SweepResults,
    /// The full probe result of each succeeded probe job that has one.
    pub probes: BTreeMap<JobId, ProbeResult>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSweep {
    sweep: StoredSweepRecord,
    jobs: Vec<StoredJob>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSweepRecord {
    id: u64,
    name: String,
    file_name: String,
    spec_yaml: String,
    created_ms: u64,
    cancelled_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredJob {
    id: u64,
    key: String,
    kind: String,
    model: String,
    task: String,
    params: Value,
    #[serde(default)]
    deps: Vec<u64>,
    #[serde(default = "one")]
    gpus: u32,
    state: String,
    attempts: u32,
    max_attempts: u32,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    workers: Vec<String>,
    queued_ms: u64,
    #[serde(default)]
    started_ms: Option<u64>,
    #[serde(default)]
    finished_ms: Option<u64>,
    #[serde(default)]
    artifacts: Vec<StoredArtifact>,
}

fn one() -> u32 {
    1
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredArtifact {
    name: String,
    sha256: String,
    size: u64,
    kind: String,
    #[serde(default)]
    step: u64,
}

fn to_stored(results: &SweepResults) -> StoredSweep {
    let record = &results.sweep;
    StoredSweep {
        sweep: StoredSweepRecord {
            id: record.id.0,
            name: record.name.clone(),
            file_name: record.file_name.clone(),
            spec_yaml: record.spec_yaml.clone(),
            created_ms: record.created.0,
            cancelled_ms: record.cancelled.map(|time| time.0),
        },
        jobs: results
            .jobs
            .iter()
            .map(|outcome| {
                let job = &outcome.job;
                StoredJob {
                    id: job.id.0,
                    key: job.key.0.clone(),
                    kind: job.kind.name().to_string(),
                    model: job.model.clone(),
                    task: job.task.clone(),
                    params: job.params.clone(),
                    deps: job.deps.iter().map(|dep| dep.0).collect(),
                    gpus: job.gpus,
                    state: job.state.name().to_string(),
                    attempts: job.attempts,
                    max_attempts: job.max_attempts,
                    last_error: job.last_error.clone(),
                    result: job.result.clone(),
                    workers: job
                        .workers
                        .iter()
                        .map(|worker| worker.as_str().to_string())
                        .collect(),
                    queued_ms: job.queued_at.0,
                    started_ms: job.started_at.map(|time| time.0),
                    finished_ms: job.finished_at.map(|time| time.0),
                    artifacts: outcome
                        .artifacts
                        .iter()
                        .map(|artifact| StoredArtifact {
                            name: artifact.name.clone(),
                            sha256: artifact.sha256.clone(),
                            size: artifact.size,
                            kind: artifact.kind.name().to_string(),
                            step: artifact.step,
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

fn from_stored(stored: StoredSweep, file: &Path) -> Result<SweepResults> {
    let sweep_id = SweepId(stored.sweep.id);
    let mut jobs = Vec::with_capacity(stored.jobs.len());
    for (index, job) in stored.jobs.into_iter().enumerate() {
        let at = || format!("{}: jobs[{index}] (id {})", file.display(), job.id);
        let kind = lorasweep_coordinator::domain::job_kind_from_name(&job.kind)
            .with_context(|| format!("{}: field kind: unknown job kind {:?}", at(), job.kind))?;
        let state = JobState::from_name(&job.state)
            .with_context(|| format!("{}: field state: unknown job state {:?}", at(), job.state))?;
        let workers = job
            .workers
            .iter()
            .map(|worker| WorkerId::new(worker.clone()))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: field workers", at()))?;
        let mut artifacts = Vec::with_capacity(job.artifacts.len());
        for artifact in &job.artifacts {
            let artifact_kind = ArtifactKind::from_name(&artifact.kind).with_context(|| {
                format!(
                    "{}: artifact {:?}: unknown kind {:?}",
                    at(),
                    artifact.name,
                    artifact.kind
                )
            })?;
            artifacts.push(ArtifactInfo {
                job: JobId(job.id),
                name: artifact.name.clone(),
                sha256: artifact.sha256.clone(),
                size: artifact.size,
                kind: artifact_kind,
                step: artifact.step,
            });
        }
        jobs.push(JobResult {
            job: JobRecord {
                id: JobId(job.id),
                sweep: sweep_id,
                key: JobKey(job.key),
                kind,
                model: job.model,
                task: job.task,
                params: job.params,
                deps: job.deps.into_iter().map(JobId).collect(),
                gpus: job.gpus,
                state,
                attempts: job.attempts,
                max_attempts: job.max_attempts,
                epoch: 0,
                last_error: job.last_error,
                result: job.result,
                workers,
                progress: Progress::default(),
                queued_at: Timestamp(job.queued_ms),
                started_at: job.started_ms.map(Timestamp),
                finished_at: job.finished_ms.map(Timestamp),
            },
            artifacts,
        });
    }
    Ok(SweepResults {
        sweep: SweepRecord {
            id: sweep_id,
            name: stored.sweep.name,
            file_name: stored.sweep.file_name,
            spec_yaml: stored.sweep.spec_yaml,
            created: Timestamp(stored.sweep.created_ms),
            cancelled: stored.sweep.cancelled_ms.map(Timestamp),
        },
        jobs,
    })
}

/// The path of a probe job's `probe.json` inside a snapshot folder.
pub fn probe_path(dir: &Path, job: JobId) -> PathBuf {
    dir.join(PROBES_DIR).join(format!("job-{}.json", job.0))
}

/// Writes the sweep's jobs as `DIR/sweep.json` (the probe files are written by whoever
/// fetched them, at [`probe_path`]).
pub fn save_sweep(results: &SweepResults, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(SWEEP_FILE);
    let text = serde_json::to_string_pretty(&to_stored(results))?;
    std::fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a JSON file, naming the file, line and column of a syntax or shape error.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|error| {
        anyhow::anyhow!(
            "{}:{}:{}: not {what}: {error}",
            path.display(),
            error.line(),
            error.column()
        )
    })
}

/// Reads a snapshot folder: `sweep.json`, and the `probe.json` of every succeeded probe job
/// listing one (an error names a missing or unreadable file).
pub fn load(dir: &Path) -> Result<ReportInput> {
    let sweep_path = dir.join(SWEEP_FILE);
    let stored: StoredSweep = read_json(&sweep_path, "a stored sweep")?;
    let results = from_stored(stored, &sweep_path)?;
    let mut probes = BTreeMap::new();
    for outcome in &results.jobs {
        if !lists_probe_file(outcome) {
            continue;
        }
        let path = probe_path(dir, outcome.job.id);
        if !path.exists() {
            bail!(
                "{}: probe job {} lists probe.json but the file is missing",
                path.display(),
                outcome.job.id.0
            );
        }
        let probe: ProbeResult = read_json(&path, "a probe result (probe.json)")?;
        probes.insert(outcome.job.id, probe);
    }
    Ok(ReportInput { results, probes })
}

/// Whether a job is a succeeded probe with a `probe.json` artifact.
pub fn lists_probe_file(outcome: &JobResult) -> bool {
    outcome.job.kind == JobKind::Probe
        && outcome.job.state == JobState::Succeeded
        && outcome
            .artifacts
            .iter()
            .any(|artifact| artifact.name == "probe.json")
}
