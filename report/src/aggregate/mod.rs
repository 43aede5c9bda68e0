//! From stored results to the report's tables: one [`TaskGroup`] per (model, task) with a
//! row per configuration (train settings but the seed), a [`ModelSummary`] across tasks,
//! the PAGE findings per model ([`PageModel`]) and the tidy per-job table ([`JobTable`]).
//! Pure: plain data in, plain data out.
//!
//! This file owns the entry point ([`build`]), the [`Report`] and its [`SweepOverview`], and
//! the small helpers its parts share. It does not own the parts themselves:
//! - `configs`: the per-(model, task) configuration rows, seed scores, the paired comparison
//!   with the baseline and the summary across tasks;
//! - `page`: the PAGE findings (merged probes, Kendall's τ, argmax agreement);
//! - `jobs`: the tidy per-job table and its result columns;
//! - `validity`: the validity panel (each rule's ranking against the realised gains);
//! - `params`: parameters flattened to dotted keys, the varying train fields, labels,
//!   lenient reads of stored parameters and file-name parts.
//!
//! Every public item is re-exported here, so `crate::aggregate::X` is the path to use.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use lorasweep_coordinator::domain::{JobResult, JobState};
use lorasweep_coordinator::graph::{canonical_json, JobKind};
use lorasweep_coordinator::ids::JobId;
use lorasweep_coordinator::spec::Sweep;

use super::snapshot::ReportInput;

mod configs;
mod jobs;
mod page;
mod params;
mod validity;

pub use configs::{
    Comparison, ConfigRow, ModelSummary, ScoreCell, SeedScore, SummaryRow, TaskGroup,
};
pub use jobs::JobTable;
pub use page::{PageModel, PageTask, TauPair};
pub use params::{file_part, plain};
pub use validity::{PanelModule, RuleValidity, ValidityModel, ValidityTask};

use configs::{model_summary, task_group};
use jobs::job_table;
use page::page_model;
use params::{baseline_overrides, varying_fields};
use validity::{panel_only_trains, validity_model};

/// The aggregated report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The sweep and how far it got.
    pub sweep: SweepOverview,
    /// The baseline configurations' settings, e.g. `placement=all variant=lora`.
    pub baseline: Option<String>,
    /// One table per (model, task).
    pub groups: Vec<TaskGroup>,
    /// One summary across tasks per model.
    pub summaries: Vec<ModelSummary>,
    /// The PAGE findings per model.
    pub page: Vec<PageModel>,
    /// The validity panels per model (empty unless the sweep sets `report.validity`).
    pub validity: Vec<ValidityModel>,
    /// One row per job (written as `results.csv` and `results.json`).
    #[serde(skip)]
    pub jobs: JobTable,
}

/// The sweep and its progress.
#[derive(Debug, Clone, Serialize)]
pub struct SweepOverview {
    /// The sweep id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The file it was submitted as.
    pub file_name: String,
    /// Jobs in all.
    pub jobs: usize,
    /// Jobs per state (every state present).
    pub counts: BTreeMap<String, u32>,
    /// Jobs queued or running.
    pub pending: u32,
    /// Jobs failed, skipped or cancelled.
    pub unsuccessful: u32,
    /// Whether jobs are still pending or some did not succeed: the numbers are not final.
    pub partial: bool,
}

/// Builds the report from stored results and probe files.
pub fn build(input: &ReportInput) -> Report {
    let jobs = &input.results.jobs;
    let by_id: HashMap<JobId, &JobResult> = jobs.iter().map(|job| (job.job.id, job)).collect();
    // As the coordinator read it: relative paths from the file's folder, not looked for here
    // (a sweep of local models does not validate without its folder).
    let file_name = &input.results.sweep.file_name;
    let spec = Sweep::from_submitted(
        &input.results.sweep.spec_yaml,
        file_name,
        Some(
            std::path::Path::new(file_name)
                .parent()
                .unwrap_or(std::path::Path::new(".")),
        ),
    )
    .ok();
    let baseline_overrides = baseline_overrides(spec.as_ref());
    // The configuration tables leave out the validity panel's own jobs (its table shows them).
    let panel_only = panel_only_trains(spec.as_ref());
    let panel_ids: HashSet<JobId> = jobs
        .iter()
        .filter(|job| {
            job.job.kind == JobKind::Train && panel_only.contains(&canonical_json(&job.job.params))
        })
        .map(|job| job.job.id)
        .collect();
    let table_jobs: Vec<JobResult> = jobs
        .iter()
        .filter(|job| {
            let panel_eval = job.job.kind == JobKind::Eval
                && job.job.deps.iter().any(|dep| panel_ids.contains(dep));
            !panel_ids.contains(&job.job.id) && !panel_eval
        })
        .cloned()
        .collect();
    let fields = varying_fields(&table_jobs);
    let pairs = model_task_pairs(jobs);
    let groups: Vec<TaskGroup> = pairs
        .iter()
        .map(|(model, task)| {
            task_group(
                model,
                task,
                &table_jobs,
                &by_id,
                &fields,
                &baseline_overrides,
            )
        })
        .collect();
    let models: Vec<String> = unique(pairs.iter().map(|(model, _)| model.clone()));
    let summaries = models
        .iter()
        .map(|model| model_summary(model, &groups))
        .collect();
    let page = models
        .iter()
        .map(|model| page_model(model, jobs, &input.probes))
        .collect();
    let validity = models
        .iter()
        .filter_map(|model| {
            let tasks: Vec<String> = pairs
                .iter()
                .filter(|(of, _)| of == model)
                .map(|(_, task)| task.clone())
                .collect();
            validity_model(model, &tasks, spec.as_ref(), jobs, &input.probes)
        })
        .collect();
    Report {
        sweep: overview(input),
        baseline: (!baseline_overrides.is_empty()).then(|| {
            baseline_overrides
                .iter()
                .map(|(field, value)| format!("{field}={}", plain(value)))
                .collect::<Vec<_>>()
                .join(" ")
        }),
        groups,
        summaries,
        page,
        validity,
        jobs: job_table(jobs, &by_id),
    }
}

fn overview(input: &ReportInput) -> SweepOverview {
    let mut counts: BTreeMap<String, u32> = JobState::ALL
        .iter()
        .map(|state| (state.name().to_string(), 0))
        .collect();
    for job in &input.results.jobs {
        *counts.entry(job.job.state.name().to_string()).or_insert(0) += 1;
    }
    let count = |state: JobState| counts[state.name()];
    let pending = count(JobState::Queued) + count(JobState::Running);
    let unsuccessful =
        count(JobState::Failed) + count(JobState::Skipped) + count(JobState::Cancelled);
    SweepOverview {
        id: input.results.sweep.id.0,
        name: input.results.sweep.name.clone(),
        file_name: input.results.sweep.file_name.clone(),
        jobs: input.results.jobs.len(),
        counts,
        pending,
        unsuccessful,
        partial: pending > 0 || unsuccessful > 0,
    }
}

fn unique<T: Ord + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = BTreeSet::new();
    items.filter(|item| seen.insert(item.clone())).collect()
}

/// (model, task) pairs in the order their jobs first appear.
fn model_task_pairs(jobs: &[JobResult]) -> Vec<(String, String)> {
    unique(
        jobs.iter()
            .map(|job| (job.job.model.clone(), job.job.task.clone())),
    )
}

fn is_unsuccessful(state: JobState) -> bool {
    matches!(
        state,
        JobState::Failed | JobState::Skipped | JobState::Cancelled
    )
}

/// A succeeded job of sweep 1 on model `m`, task `chat`, for the tests of the parts.
#[cfg(test)]
pub(crate) fn test_job(
    id: u64,
    kind: JobKind,
    params: serde_json::Value,
    deps: Vec<u64>,
    result: serde_json::Value,
) -> JobResult {
    use lorasweep_coordinator::domain::{JobRecord, Progress, Timestamp};
    use lorasweep_coordinator::graph::JobKey;
    use lorasweep_coordinator::ids::SweepId;
    JobResult {
        job: JobRecord {
            id: JobId(id),
            sweep: SweepId(1),
            key: JobKey(format!("{}-{id}", kind.name())),
            kind,
            model: "m".to_string(),
            task: "chat".to_string(),
            params,
            deps: deps.into_iter().map(JobId).collect(),
            gpus: 1,
            state: JobState::Succeeded,
            attempts: 1,
            max_attempts: 1,
            epoch: 1,
            last_error: None,
            result: Some(result),
            workers: Vec::new(),
            progress: Progress::default(),
            queued_at: Timestamp(0),
            started_at: Some(Timestamp(0)),
            finished_at: Some(Timestamp(1000)),
        },
        artifacts: Vec::new(),
    }
}
