//! From stored results to the report's tables: one [`TaskGroup`] per (model, task) with a
//! row per configuration (train settings but the seed), a [`ModelSummary`] across tasks,
//! the PAGE findings per model ([`PageModel`]) and the tidy per-job table ([`JobTable`]).
//! Pure: plain data in, plain data out.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use lorasweep_contract::{JobKey, Metric, ModuleKind, ModuleScore, NamedTask, ProbeResult};
use lorasweep_coordinator::domain::{JobRecord, JobResult, JobState};
use lorasweep_coordinator::graph::{canonical_json, JobKind};
use lorasweep_coordinator::ids::JobId;
use lorasweep_coordinator::spec::Sweep;

use super::snapshot::ReportInput;
use super::stats;

/// Train fields shown first when they vary, in this order; the others follow by name.
const LEADING_FIELDS: [&str; 4] = ["placement", "variant", "rank", "alpha"];

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

/// The table of one (model, task).
#[derive(Debug, Clone, Serialize)]
pub struct TaskGroup {
    /// The model id.
    pub model: String,
    /// The task id.
    pub task: String,
    /// The task's headline metric.
    pub metric: String,
    /// Whether a higher score is better (false for a loss).
    pub higher_is_better: bool,
    /// The train settings that tell the rows apart (the table's leading columns).
    pub fields: Vec<String>,
    /// The base model (no adapter).
    pub base: Option<ScoreCell>,
    /// One row per configuration, in sweep order.
    pub rows: Vec<ConfigRow>,
    /// The file name of the score against trainable parameters plot.
    pub plot_file: String,
}

/// One configuration of one (model, task), over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigRow {
    /// A short name of the settings, e.g. `dominant / lora / r=8`.
    pub label: String,
    /// The value of each of the group's [`TaskGroup::fields`].
    pub settings: BTreeMap<String, Value>,
    /// Whether this row is a baseline row.
    pub is_baseline: bool,
    /// Trainable adapter parameters (the mean over seeds, when they differ).
    pub trainable_parameters: Option<u64>,
    /// Trainable parameters as a percentage of vanilla LoRA's (placement `all`, variant
    /// `lora`, the other settings equal).
    pub percent_of_lora: Option<f64>,
    /// The eval score over seeds.
    pub score: ScoreCell,
    /// The paired difference to the matching baseline row (seeds paired).
    pub versus_baseline: Option<Comparison>,
    /// Mean train wall time over seeds, seconds.
    pub train_wall_s: Option<f64>,
    /// Mean training throughput over seeds.
    pub tokens_per_s: Option<f64>,
}

/// A score over seeds, with what is missing.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreCell {
    /// Mean of the scored seeds.
    pub mean: Option<f64>,
    /// Sample standard deviation (two seeds or more).
    pub std: Option<f64>,
    /// Seeds with a score.
    pub n: usize,
    /// Seeds whose train or eval job failed, was skipped or cancelled.
    pub failed: usize,
    /// Seeds still queued or running.
    pub pending: usize,
    /// Each seed.
    pub seeds: Vec<SeedScore>,
}

/// One seed of a configuration.
#[derive(Debug, Clone, Serialize)]
pub struct SeedScore {
    /// The train seed (none for the base model).
    pub seed: Option<u64>,
    /// `ok`, `pending`, or the state of the job that did not succeed.
    pub state: String,
    /// The eval score.
    pub score: Option<f64>,
    /// Why it has no score.
    pub error: Option<String>,
}

/// A paired difference to the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The baseline row's label.
    pub baseline: String,
    /// Mean of the per-seed differences (this row minus the baseline).
    pub mean: f64,
    /// 95% bootstrap interval, low end (two pairs or more).
    pub low: Option<f64>,
    /// 95% bootstrap interval, high end.
    pub high: Option<f64>,
    /// Seeds scored in both rows.
    pub pairs: usize,
    /// Whether the interval excludes 0.
    pub significant: bool,
    /// Whether this row is better than the baseline, when the interval excludes 0.
    pub better: Option<bool>,
}

/// The comparison across the tasks of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// The model id.
    pub model: String,
    /// Its tasks, in sweep order.
    pub tasks: Vec<String>,
    /// Each task's metric.
    pub metrics: Vec<String>,
    /// Whether every task has the same metric (so scores can be averaged).
    pub same_metric: bool,
    /// The base model first, then each configuration.
    pub rows: Vec<SummaryRow>,
}

/// One configuration across tasks.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    /// The configuration's label (`base model` for the base model).
    pub label: String,
    /// Mean score per task (none: not scored).
    pub scores: Vec<Option<f64>>,
    /// Rank per task among the scored rows (1 best; ties share).
    pub ranks: Vec<Option<f64>>,
    /// Mean rank over the scored tasks.
    pub average_rank: Option<f64>,
    /// Mean score over the tasks, when every task has the same metric.
    pub average_score: Option<f64>,
    /// Tasks scored.
    pub tasks_scored: usize,
}

/// The PAGE findings of one model.
#[derive(Debug, Clone, Serialize)]
pub struct PageModel {
    /// The model id.
    pub model: String,
    /// One entry per task (and probe settings).
    pub tasks: Vec<PageTask>,
    /// Kendall's τ-b between each pair of tasks' PAGE score vectors.
    pub kendall: Vec<TauPair>,
    /// Whether every task has the same dominant module (none with fewer than two tasks).
    pub argmax_agrees: Option<bool>,
}

/// The PAGE probe of one (model, task), merged over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct PageTask {
    /// The task id.
    pub task: String,
    /// The probe settings that tell this entry from others of the task (empty with one).
    pub settings: String,
    /// Probe seeds that succeeded.
    pub seeds: Vec<u64>,
    /// Probe jobs failed, skipped or cancelled.
    pub failed: usize,
    /// Probe jobs queued or running.
    pub pending: usize,
    /// The dominant module (the argmax of the mean PAGE).
    pub dominant: Option<String>,
    /// The dominant module's share.
    pub top1_share: Option<f64>,
    /// Mean over seeds of the fraction of batches agreeing with the seed's argmax.
    pub argmax_stability: Option<f64>,
    /// Share per module kind.
    pub share_by_kind: BTreeMap<String, f64>,
    /// Decoder layers probed (0 without the probe file).
    pub layers: usize,
    /// The heatmap's file name, when the probe files are there.
    pub heatmap_file: Option<String>,
    /// Every module's mean score and share (from the probe files).
    #[serde(skip)]
    pub modules: Vec<ModuleScore>,
}

/// Kendall's τ-b of two tasks' PAGE score vectors.
#[derive(Debug, Clone, Serialize)]
pub struct TauPair {
    /// The first task.
    pub first: String,
    /// The second task.
    pub second: String,
    /// τ-b (none when a vector is constant or modules do not match).
    pub tau: Option<f64>,
    /// Modules compared.
    pub modules: usize,
}

/// One row per job: ids, state, attempts, timings, every parameter and every metric.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobTable {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows, each with a value per column (null when it does not apply).
    pub rows: Vec<Vec<Value>>,
}

/// Builds the report from stored results and probe files.
pub fn build(input: &ReportInput) -> Report {
    let jobs = &input.results.jobs;
    let by_id: HashMap<JobId, &JobResult> = jobs.iter().map(|job| (job.job.id, job)).collect();
    let spec = Sweep::from_yaml_str(
        &input.results.sweep.spec_yaml,
        &input.results.sweep.file_name,
        None,
    )
    .ok();
    let baseline_overrides = baseline_overrides(spec.as_ref());
    let fields = varying_fields(jobs);
    let pairs = model_task_pairs(jobs);
    let groups: Vec<TaskGroup> = pairs
        .iter()
        .map(|(model, task)| task_group(model, task, jobs, &by_id, &fields, &baseline_overrides))
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

/// The value of a JSON scalar as plain text (strings without quotes).
pub fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(";"),
        other => other.to_string(),
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

/// Parameters flattened to dotted keys (`probe.rank`); arrays and scalars are leaves.
fn flatten(params: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, inner, out);
                }
            }
            leaf => {
                out.insert(prefix.to_string(), leaf.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", params, &mut out);
    out
}

/// The train settings (but the seed) that take more than one non-null value across the
/// sweep's train jobs: the columns that tell configurations apart.
fn varying_fields(jobs: &[JobResult]) -> Vec<String> {
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for job in jobs.iter().filter(|job| job.job.kind == JobKind::Train) {
        for (key, value) in flatten(&job.job.params) {
            if key != "seed" && !value.is_null() {
                values
                    .entry(key)
                    .or_default()
                    .insert(canonical_json(&value));
            }
        }
    }
    let mut fields: Vec<String> = values
        .into_iter()
        .filter(|(_, distinct)| distinct.len() > 1)
        .map(|(key, _)| key)
        .collect();
    fields.sort_by_key(|field| {
        (
            LEADING_FIELDS
                .iter()
                .position(|leading| leading == field)
                .unwrap_or(LEADING_FIELDS.len()),
            field.clone(),
        )
    });
    fields
}

/// The train settings of the baseline rows: the sweep file's `report.baseline` (or its
/// default, vanilla LoRA on every module); vanilla LoRA when the file cannot be read.
fn baseline_overrides(spec: Option<&Sweep>) -> Vec<(String, Value)> {
    match spec {
        Some(spec) => spec
            .report
            .baseline
            .as_ref()
            .map(|baseline| {
                baseline
                    .fields
                    .iter()
                    .map(|(field, value)| (field.name().to_string(), value.to_json()))
                    .collect()
            })
            .unwrap_or_default(),
        None => vanilla_lora(),
    }
}

fn vanilla_lora() -> Vec<(String, Value)> {
    vec![
        ("placement".to_string(), json!("all")),
        ("variant".to_string(), json!("lora")),
    ]
}

fn label_of(fields: &[String], settings: &BTreeMap<String, Value>, fallback: &Value) -> String {
    if fields.is_empty() {
        return plain(fallback);
    }
    fields
        .iter()
        .map(|field| {
            let value = settings.get(field).map_or("-".to_string(), plain);
            match field.as_str() {
                "placement" | "variant" => value,
                "rank" => format!("r={value}"),
                other => format!("{other}={value}"),
            }
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The task's metric name and whether higher is better: a named task's own metric, else
/// the eval job's `metric` (a user task's, `loss` by default).
fn task_metric(task: &str, evals: &[&JobResult]) -> (String, bool) {
    let metric = NamedTask::from_name(task)
        .map(NamedTask::metric)
        .or_else(|| {
            evals
                .iter()
                .find_map(|job| StoredParams::of(&job.job).metric)
        })
        .unwrap_or(Metric::Loss);
    (metric.name().to_string(), metric != Metric::Loss)
}

/// The parameters the report reads from a stored job, typed by the job contract. Lenient: a
/// field that is missing or of another type (a job stored by another version) is `None`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct StoredParams {
    #[serde(deserialize_with = "lenient")]
    seed: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    adapter: Option<JobKey>,
    #[serde(deserialize_with = "lenient")]
    metric: Option<Metric>,
}

impl StoredParams {
    fn of(job: &JobRecord) -> StoredParams {
        StoredParams::deserialize(&job.params).unwrap_or_default()
    }
}

/// What the report reads from a probe job's stored summary (the contract's `ProbeSummary`),
/// each field lenient like [`StoredParams`].
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct StoredProbeSummary {
    #[serde(deserialize_with = "lenient")]
    dominant: Option<String>,
    #[serde(deserialize_with = "lenient")]
    top1_share: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    argmax_stability: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    share_by_kind: Option<BTreeMap<String, Option<f64>>>,
}

impl StoredProbeSummary {
    fn of(summary: &Value) -> StoredProbeSummary {
        StoredProbeSummary::deserialize(summary).unwrap_or_default()
    }
}

/// A field that reads as `None` when it is null or does not fit its type.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

fn number(result: Option<&Value>, field: &str) -> Option<f64> {
    result
        .and_then(|result| result.get(field))
        .and_then(Value::as_f64)
}

fn is_unsuccessful(state: JobState) -> bool {
    matches!(
        state,
        JobState::Failed | JobState::Skipped | JobState::Cancelled
    )
}

/// One seed's outcome from its train job (none for the base model) and eval job.
fn seed_score(seed: Option<u64>, train: Option<&JobRecord>, eval: Option<&JobRecord>) -> SeedScore {
    let mut outcome = SeedScore {
        seed,
        state: "pending".to_string(),
        score: None,
        error: None,
    };
    for job in [train, eval].into_iter().flatten() {
        if is_unsuccessful(job.state) {
            outcome.state = job.state.name().to_string();
            outcome.error = Some(format!(
                "{} {}: {}",
                job.kind.name(),
                job.state.name(),
                job.last_error.clone().unwrap_or_default()
            ));
            return outcome;
        }
    }
    if let Some(eval) = eval.filter(|eval| eval.state == JobState::Succeeded) {
        match number(eval.result.as_ref(), "score").filter(|score| score.is_finite()) {
            Some(score) => {
                outcome.state = "ok".to_string();
                outcome.score = Some(score);
            }
            None => {
                outcome.state = "failed".to_string();
                outcome.error = Some("eval succeeded without a finite score".to_string());
            }
        }
    }
    outcome
}

fn score_cell(seeds: Vec<SeedScore>) -> ScoreCell {
    let scores: Vec<f64> = seeds.iter().filter_map(|seed| seed.score).collect();
    ScoreCell {
        mean: stats::mean(&scores),
        std: stats::sample_std(&scores),
        n: scores.len(),
        failed: seeds
            .iter()
            .filter(|seed| seed.state != "ok" && seed.state != "pending")
            .count(),
        pending: seeds.iter().filter(|seed| seed.state == "pending").count(),
        seeds,
    }
}

/// The row whose settings are `row`'s with `overrides` applied. An override of a field that
/// does not vary must equal its common value, else there is no such row.
fn matching_row(
    rows: &[ConfigRow],
    row: &ConfigRow,
    overrides: &[(String, Value)],
    fields: &[String],
    common: &BTreeMap<String, Value>,
) -> Option<usize> {
    if overrides.is_empty() {
        return None;
    }
    let mut target = row.settings.clone();
    for (field, value) in overrides {
        if fields.contains(field) {
            target.insert(field.clone(), value.clone());
        } else if common.get(field) != Some(value) {
            return None;
        }
    }
    rows.iter()
        .position(|candidate| candidate.settings == target)
}

fn task_group(
    model: &str,
    task: &str,
    jobs: &[JobResult],
    by_id: &HashMap<JobId, &JobResult>,
    fields: &[String],
    baseline: &[(String, Value)],
) -> TaskGroup {
    let of_pair = |kind: JobKind| -> Vec<&JobResult> {
        jobs.iter()
            .filter(|job| job.job.model == model && job.job.task == task && job.job.kind == kind)
            .collect()
    };
    let trains = of_pair(JobKind::Train);
    let evals = of_pair(JobKind::Eval);
    let (metric, higher_is_better) = task_metric(task, &evals);
    let eval_of: HashMap<JobId, &JobRecord> = evals
        .iter()
        .flat_map(|eval| eval.job.deps.iter().map(move |dep| (*dep, &eval.job)))
        .collect();
    let base_evals: Vec<&JobResult> = evals
        .iter()
        .copied()
        .filter(|eval| {
            StoredParams::of(&eval.job).adapter.is_none()
                && !eval
                    .job
                    .deps
                    .iter()
                    .any(|dep| by_id.get(dep).is_some_and(|d| d.job.kind == JobKind::Train))
        })
        .collect();
    let base = (!base_evals.is_empty()).then(|| {
        score_cell(
            base_evals
                .iter()
                .map(|eval| seed_score(None, None, Some(&eval.job)))
                .collect(),
        )
    });

    // Configurations in the order their first train job appears.
    let mut order: Vec<String> = Vec::new();
    let mut members: HashMap<String, Vec<&JobResult>> = HashMap::new();
    let mut settings_of: HashMap<String, BTreeMap<String, Value>> = HashMap::new();
    let mut common: BTreeMap<String, Value> = BTreeMap::new();
    for train in &trains {
        let flat = flatten(&train.job.params);
        for (key, value) in &flat {
            common.entry(key.clone()).or_insert_with(|| value.clone());
        }
        let settings: BTreeMap<String, Value> = fields
            .iter()
            .map(|field| {
                (
                    field.clone(),
                    flat.get(field).cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        let identity = canonical_json(&json!(settings));
        if !members.contains_key(&identity) {
            order.push(identity.clone());
            settings_of.insert(identity.clone(), settings);
        }
        members.entry(identity).or_default().push(train);
    }
    let mut rows: Vec<ConfigRow> = order
        .iter()
        .map(|identity| {
            let settings = settings_of[identity].clone();
            let runs = &members[identity];
            let fallback = runs
                .first()
                .and_then(|run| run.job.params.get("placement"))
                .cloned()
                .unwrap_or(Value::Null);
            let seeds: Vec<SeedScore> = runs
                .iter()
                .map(|train| {
                    let seed = StoredParams::of(&train.job).seed;
                    seed_score(seed, Some(&train.job), eval_of.get(&train.job.id).copied())
                })
                .collect();
            let succeeded: Vec<&JobRecord> = runs
                .iter()
                .map(|run| &run.job)
                .filter(|job| job.state == JobState::Succeeded)
                .collect();
            let train_numbers = |field: &str| -> Vec<f64> {
                succeeded
                    .iter()
                    .filter_map(|job| number(job.result.as_ref(), field))
                    .collect()
            };
            ConfigRow {
                label: label_of(fields, &settings, &fallback),
                settings,
                is_baseline: false,
                // Seeds may differ (a random placement picks other modules): the mean.
                trainable_parameters: stats::mean(&train_numbers("trainable_parameters"))
                    .map(|mean| mean.round() as u64),
                percent_of_lora: None,
                score: score_cell(seeds),
                versus_baseline: None,
                train_wall_s: stats::mean(&train_numbers("wall_s")),
                tokens_per_s: stats::mean(&train_numbers("tokens_per_s")),
            }
        })
        .collect();

    let vanilla = vanilla_lora();
    for index in 0..rows.len() {
        let row = &rows[index];
        let percent = matching_row(&rows, row, &vanilla, fields, &common).and_then(|lora| {
            match (row.trainable_parameters, rows[lora].trainable_parameters) {
                (Some(own), Some(reference)) if reference > 0 => {
                    Some(100.0 * own as f64 / reference as f64)
                }
                _ => None,
            }
        });
        let reference = matching_row(&rows, row, baseline, fields, &common);
        let comparison = reference
            .filter(|reference| *reference != index)
            .and_then(|reference| compare(row, &rows[reference], higher_is_better));
        rows[index].percent_of_lora = percent;
        rows[index].is_baseline = reference == Some(index);
        rows[index].versus_baseline = comparison;
    }
    TaskGroup {
        model: model.to_string(),
        task: task.to_string(),
        metric,
        higher_is_better,
        fields: fields.to_vec(),
        base,
        rows,
        plot_file: format!("score_{}_{}.svg", file_part(model), file_part(task)),
    }
}

/// The paired difference `row − baseline` over the seeds scored in both.
fn compare(row: &ConfigRow, baseline: &ConfigRow, higher_is_better: bool) -> Option<Comparison> {
    let baseline_scores: BTreeMap<Option<u64>, f64> = baseline
        .score
        .seeds
        .iter()
        .filter_map(|seed| seed.score.map(|score| (seed.seed, score)))
        .collect();
    let differences: Vec<f64> = row
        .score
        .seeds
        .iter()
        .filter_map(|seed| {
            let own = seed.score?;
            baseline_scores.get(&seed.seed).map(|base| own - base)
        })
        .collect();
    let mean = stats::mean(&differences)?;
    let interval = stats::paired_bootstrap(&differences);
    let significant = interval.is_some_and(|interval| interval.excludes_zero());
    Some(Comparison {
        baseline: baseline.label.clone(),
        mean,
        low: interval.map(|interval| interval.low),
        high: interval.map(|interval| interval.high),
        pairs: differences.len(),
        significant,
        better: significant.then_some((mean > 0.0) == higher_is_better),
    })
}

/// A model or task id as part of a file name: letters, digits, `.`, `_`, `-`.
pub fn file_part(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || "._-".contains(character) {
                character
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|character| character == '-' || character == '.');
    if trimmed.is_empty() {
        "unnamed".to_string()
    } else {
        trimmed.chars().take(60).collect()
    }
}

fn model_summary(model: &str, groups: &[TaskGroup]) -> ModelSummary {
    let groups: Vec<&TaskGroup> = groups.iter().filter(|group| group.model == model).collect();
    let tasks: Vec<String> = groups.iter().map(|group| group.task.clone()).collect();
    let metrics: Vec<String> = groups.iter().map(|group| group.metric.clone()).collect();
    let same_metric = metrics.windows(2).all(|pair| pair[0] == pair[1]);
    let base_label = "base model".to_string();
    let mut labels: Vec<String> = Vec::new();
    if groups.iter().any(|group| group.base.is_some()) {
        labels.push(base_label.clone());
    }
    labels.extend(unique(
        groups
            .iter()
            .flat_map(|group| group.rows.iter().map(|row| row.label.clone())),
    ));
    labels = unique(labels.into_iter());
    let mut scores = vec![vec![None; groups.len()]; labels.len()];
    let mut ranks = vec![vec![None; groups.len()]; labels.len()];
    for (column, group) in groups.iter().enumerate() {
        let mut scored: Vec<(usize, f64)> = Vec::new();
        for (line, label) in labels.iter().enumerate() {
            let mean = if *label == base_label {
                group.base.as_ref().and_then(|base| base.mean)
            } else {
                group
                    .rows
                    .iter()
                    .find(|row| row.label == *label)
                    .and_then(|row| row.score.mean)
            };
            scores[line][column] = mean;
            if let Some(mean) = mean {
                scored.push((line, mean));
            }
        }
        let values: Vec<f64> = scored.iter().map(|(_, mean)| *mean).collect();
        for ((line, _), rank) in scored
            .iter()
            .zip(stats::ranks(&values, group.higher_is_better))
        {
            ranks[*line][column] = Some(rank);
        }
    }
    let rows = labels
        .into_iter()
        .enumerate()
        .map(|(line, label)| {
            let own_ranks: Vec<f64> = ranks[line].iter().flatten().copied().collect();
            let own_scores: Vec<f64> = scores[line].iter().flatten().copied().collect();
            let complete = own_scores.len() == groups.len();
            SummaryRow {
                label,
                average_rank: stats::mean(&own_ranks),
                average_score: if same_metric && complete {
                    stats::mean(&own_scores)
                } else {
                    None
                },
                tasks_scored: own_scores.len(),
                scores: scores[line].clone(),
                ranks: ranks[line].clone(),
            }
        })
        .collect();
    ModelSummary {
        model: model.to_string(),
        tasks,
        metrics,
        same_metric,
        rows,
    }
}

/// The probe settings of a probe job without its seed, as a canonical text.
fn probe_identity(job: &JobRecord) -> String {
    let mut params = job.params.clone();
    if let Value::Object(map) = &mut params {
        map.remove("seed");
    }
    canonical_json(&params)
}

/// Mean PAGE over seeds, shares recomputed, as the engine merges probes for training.
fn merge_probes(probes: &[&ProbeResult]) -> Option<Vec<ModuleScore>> {
    let first = probes.first()?;
    let mut merged = first.modules.clone();
    for probe in &probes[1..] {
        let same_modules = probe.modules.len() == merged.len()
            && probe
                .modules
                .iter()
                .zip(&merged)
                .all(|(a, b)| a.name == b.name);
        if !same_modules {
            return None;
        }
    }
    let count = probes.len() as f64;
    for (index, module) in merged.iter_mut().enumerate() {
        module.score = probes
            .iter()
            .map(|probe| probe.modules[index].score)
            .sum::<f64>()
            / count;
    }
    let total: f64 = merged.iter().map(|module| module.score).sum();
    for module in &mut merged {
        module.share = if total > 0.0 {
            module.score / total
        } else {
            0.0
        };
    }
    Some(merged)
}

fn page_model(
    model: &str,
    jobs: &[JobResult],
    probe_files: &BTreeMap<JobId, ProbeResult>,
) -> PageModel {
    let probes: Vec<&JobResult> = jobs
        .iter()
        .filter(|job| job.job.model == model && job.job.kind == JobKind::Probe)
        .collect();
    let keys: Vec<(String, String)> = unique(
        probes
            .iter()
            .map(|job| (job.job.task.clone(), probe_identity(&job.job))),
    );
    let mut tasks: Vec<PageTask> = Vec::new();
    for (task, identity) in &keys {
        let settings_count = keys.iter().filter(|(other, _)| other == task).count();
        let members: Vec<&JobResult> = probes
            .iter()
            .copied()
            .filter(|job| job.job.task == *task && probe_identity(&job.job) == *identity)
            .collect();
        let succeeded: Vec<&JobResult> = members
            .iter()
            .copied()
            .filter(|job| job.job.state == JobState::Succeeded)
            .collect();
        let files: Vec<&ProbeResult> = succeeded
            .iter()
            .filter_map(|job| probe_files.get(&job.job.id))
            .collect();
        let settings = if settings_count > 1 {
            let params: Value = serde_json::from_str(identity).unwrap_or(Value::Null);
            describe_probe_settings(&params, &keys, task)
        } else {
            String::new()
        };
        let mut entry = PageTask {
            task: task.clone(),
            settings,
            seeds: succeeded
                .iter()
                .filter_map(|job| StoredParams::of(&job.job).seed)
                .collect(),
            failed: members
                .iter()
                .filter(|job| is_unsuccessful(job.job.state))
                .count(),
            pending: members
                .iter()
                .filter(|job| !job.job.state.is_final())
                .count(),
            dominant: None,
            top1_share: None,
            argmax_stability: None,
            share_by_kind: BTreeMap::new(),
            layers: 0,
            heatmap_file: None,
            modules: Vec::new(),
        };
        let merged = (files.len() == succeeded.len())
            .then(|| merge_probes(&files))
            .flatten();
        if let Some(modules) = merged {
            let best = modules.iter().max_by(|a, b| {
                a.score
                    .total_cmp(&b.score)
                    .then_with(|| b.name.cmp(&a.name))
            });
            entry.dominant = best.map(|module| module.name.clone());
            entry.top1_share = best.map(|module| module.share);
            entry.argmax_stability = stats::mean(
                &files
                    .iter()
                    .map(|file| file.argmax_stability)
                    .collect::<Vec<_>>(),
            );
            for kind in ModuleKind::ALL {
                let share: f64 = modules
                    .iter()
                    .filter(|module| module.kind == kind)
                    .map(|module| module.share)
                    .sum();
                if modules.iter().any(|module| module.kind == kind) {
                    entry.share_by_kind.insert(kind.name().to_string(), share);
                }
            }
            entry.layers = modules
                .iter()
                .map(|module| module.layer + 1)
                .max()
                .unwrap_or(0);
            let suffix = if entry.settings.is_empty() {
                String::new()
            } else {
                format!("_{}", file_part(&entry.settings))
            };
            entry.heatmap_file = Some(format!(
                "page_{}_{}{suffix}.svg",
                file_part(model),
                file_part(task)
            ));
            entry.modules = modules;
        } else if let Some(summary) = succeeded.first().and_then(|job| job.job.result.as_ref()) {
            // No probe file: the job's stored summary (first seed) is what there is.
            let summary = StoredProbeSummary::of(summary);
            entry.dominant = summary.dominant;
            entry.top1_share = summary.top1_share;
            entry.argmax_stability = summary.argmax_stability;
            if let Some(shares) = summary.share_by_kind {
                entry.share_by_kind = shares
                    .into_iter()
                    .filter_map(|(kind, share)| share.map(|share| (kind, share)))
                    .collect();
            }
        }
        tasks.push(entry);
    }
    // τ and argmax agreement between tasks: each task's first probe settings.
    let firsts: Vec<&PageTask> = {
        let mut seen = BTreeSet::new();
        tasks
            .iter()
            .filter(|entry| seen.insert(entry.task.clone()))
            .collect()
    };
    let mut kendall = Vec::new();
    for (index, first) in firsts.iter().enumerate() {
        for second in &firsts[index + 1..] {
            let scores_of = |entry: &PageTask| -> BTreeMap<String, f64> {
                entry
                    .modules
                    .iter()
                    .map(|module| (module.name.clone(), module.score))
                    .collect()
            };
            let (a, b) = (scores_of(first), scores_of(second));
            let shared: Vec<&String> = a.keys().filter(|name| b.contains_key(*name)).collect();
            let left: Vec<f64> = shared.iter().map(|name| a[*name]).collect();
            let right: Vec<f64> = shared.iter().map(|name| b[*name]).collect();
            kendall.push(TauPair {
                first: first.task.clone(),
                second: second.task.clone(),
                tau: stats::kendall_tau_b(&left, &right),
                modules: shared.len(),
            });
        }
    }
    let dominants: Vec<&String> = firsts
        .iter()
        .filter_map(|entry| entry.dominant.as_ref())
        .collect();
    let argmax_agrees = (firsts.len() > 1 && dominants.len() == firsts.len())
        .then(|| dominants.windows(2).all(|pair| pair[0] == pair[1]));
    PageModel {
        model: model.to_string(),
        tasks,
        kendall,
        argmax_agrees,
    }
}

/// The probe settings that differ between a task's probe entries, as `name=value` text.
fn describe_probe_settings(params: &Value, keys: &[(String, String)], task: &str) -> String {
    let others: Vec<Value> = keys
        .iter()
        .filter(|(other, _)| other == task)
        .filter_map(|(_, identity)| serde_json::from_str(identity).ok())
        .collect();
    let Value::Object(map) = params else {
        return String::new();
    };
    map.iter()
        .filter(|(key, value)| {
            others
                .iter()
                .any(|other| other.get(key.as_str()) != Some(value))
        })
        .map(|(key, value)| format!("{key}={}", plain(value)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Result fields written in this order (after the ids, state, timings and parameters).
const RESULT_COLUMNS: [&str; 13] = [
    "score",
    "n",
    "trainable_parameters",
    "final_loss",
    "tokens",
    "tokens_per_s",
    "wall_s",
    "resumed_from",
    "dominant",
    "top1_share",
    "argmax_stability",
    "estimator",
    "a_init",
];

fn job_table(jobs: &[JobResult], by_id: &HashMap<JobId, &JobResult>) -> JobTable {
    let mut records: Vec<Map<String, Value>> = Vec::with_capacity(jobs.len());
    for outcome in jobs {
        let job = &outcome.job;
        let mut record = Map::new();
        let mut put = |key: &str, value: Value| {
            record.insert(key.to_string(), value);
        };
        put("job_id", json!(job.id.0));
        put("key", json!(job.key.0));
        put("kind", json!(job.kind.name()));
        put("model", json!(job.model));
        put("task", json!(job.task));
        put("state", json!(job.state.name()));
        put("attempts", json!(job.attempts));
        put("max_attempts", json!(job.max_attempts));
        put("queued_at_ms", json!(job.queued_at.0));
        put("started_at_ms", json!(job.started_at.map(|time| time.0)));
        put("finished_at_ms", json!(job.finished_at.map(|time| time.0)));
        put(
            "run_s",
            match (job.started_at, job.finished_at) {
                (Some(started), Some(finished)) => {
                    json!(finished.millis_since(started) as f64 / 1000.0)
                }
                _ => Value::Null,
            },
        );
        put("last_error", json!(job.last_error));
        let train = match job.kind {
            JobKind::Train => Some(job),
            JobKind::Eval => job
                .deps
                .iter()
                .filter_map(|dep| by_id.get(dep))
                .find(|dep| dep.job.kind == JobKind::Train)
                .map(|dep| &dep.job),
            JobKind::Probe => None,
        };
        if let Some(train) = train {
            for (key, value) in flatten(&train.params) {
                match key.strip_prefix("probe.") {
                    Some(probe_key) => record.insert(format!("probe.{probe_key}"), value),
                    None => record.insert(format!("train.{key}"), value),
                };
            }
        }
        let prefix = match job.kind {
            JobKind::Probe => "probe",
            JobKind::Eval => "eval",
            JobKind::Train => "",
        };
        if !prefix.is_empty() {
            for (key, value) in flatten(&job.params) {
                record.insert(format!("{prefix}.{key}"), value);
            }
        }
        if let Some(result) = &job.result {
            for column in RESULT_COLUMNS {
                if let Some(value) = result.get(column) {
                    record.insert(column.to_string(), value.clone());
                }
            }
            if let Some(Value::Array(modules)) = result.get("modules") {
                record.insert("adapter_modules".to_string(), json!(modules.len()));
            }
            for nested in ["metrics", "share_by_kind"] {
                if let Some(Value::Object(map)) = result.get(nested) {
                    for (key, value) in map {
                        record.insert(format!("{nested}.{key}"), value.clone());
                    }
                }
            }
        }
        records.push(record);
    }
    let fixed = [
        "job_id",
        "key",
        "kind",
        "model",
        "task",
        "state",
        "attempts",
        "max_attempts",
        "queued_at_ms",
        "started_at_ms",
        "finished_at_ms",
        "run_s",
    ];
    let present: BTreeSet<&String> = records.iter().flat_map(|record| record.keys()).collect();
    let mut columns: Vec<String> = fixed.iter().map(|name| name.to_string()).collect();
    for prefix in ["train.", "probe.", "eval."] {
        columns.extend(
            present
                .iter()
                .filter(|name| name.starts_with(prefix))
                .map(|name| name.to_string()),
        );
    }
    columns.extend(
        RESULT_COLUMNS
            .iter()
            .chain(&["adapter_modules"])
            .filter(|name| present.iter().any(|present| present == *name))
            .map(|name| name.to_string()),
    );
    for prefix in ["metrics.", "share_by_kind."] {
        columns.extend(
            present
                .iter()
                .filter(|name| name.starts_with(prefix))
                .map(|name| name.to_string()),
        );
    }
    columns.push("last_error".to_string());
    let rows = records
        .iter()
        .map(|record| {
            columns
                .iter()
                .map(|column| record.get(column).cloned().unwrap_or(Value::Null))
                .collect()
        })
        .collect();
    JobTable { columns, rows }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorasweep_coordinator::domain::{
        JobRecord, Progress, SweepRecord, SweepResults, Timestamp,
    };
    use lorasweep_coordinator::graph::JobKey;
    use lorasweep_coordinator::ids::SweepId;

    fn job(id: u64, kind: JobKind, params: Value, deps: Vec<u64>, result: Value) -> JobResult {
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

    /// Two placements × two ranks × two seeds on the chat task (a loss), no sweep file: the
    /// default baseline (vanilla LoRA) applies, matched at the same rank.
    fn ranked_input() -> ReportInput {
        let mut jobs = vec![job(
            1,
            JobKind::Eval,
            json!({"adapter": null}),
            vec![],
            json!({"score": 2.0}),
        )];
        let mut next = 2;
        for placement in ["all", "dominant"] {
            for rank in [8u64, 16] {
                for seed in [0u64, 1] {
                    let parameters = if placement == "all" {
                        1000 * rank
                    } else {
                        10 * rank
                    };
                    // Dominant is worse by 0.1 at rank 8 and by 0.2 at rank 16.
                    let loss = match (placement, rank) {
                        ("all", _) => 1.5 + 0.01 * seed as f64,
                        (_, 8) => 1.6 + 0.01 * seed as f64,
                        _ => 1.7 + 0.01 * seed as f64,
                    };
                    jobs.push(job(
                        next,
                        JobKind::Train,
                        json!({"placement": placement, "variant": "lora", "rank": rank, "seed": seed}),
                        vec![],
                        json!({"trainable_parameters": parameters, "wall_s": 1.0, "tokens_per_s": 10.0}),
                    ));
                    jobs.push(job(
                        next + 1,
                        JobKind::Eval,
                        json!({"adapter": format!("train-{next}")}),
                        vec![next],
                        json!({"score": loss}),
                    ));
                    next += 2;
                }
            }
        }
        ReportInput {
            results: SweepResults {
                sweep: SweepRecord {
                    id: SweepId(1),
                    name: "ranked".to_string(),
                    file_name: "ranked.yaml".to_string(),
                    spec_yaml: "not: a sweep".to_string(),
                    created: Timestamp(0),
                    cancelled: None,
                },
                jobs,
            },
            probes: BTreeMap::new(),
        }
    }

    #[test]
    fn rows_compare_with_the_baseline_of_the_same_rank() {
        let report = build(&ranked_input());
        assert_eq!(
            report.baseline.as_deref(),
            Some("placement=all variant=lora")
        );
        let group = &report.groups[0];
        assert_eq!(group.fields, vec!["placement", "rank"]);
        assert!(!group.higher_is_better, "chat is scored by a loss");
        let labels: Vec<&str> = group.rows.iter().map(|row| row.label.as_str()).collect();
        assert_eq!(
            labels,
            vec![
                "all / r=8",
                "all / r=16",
                "dominant / r=8",
                "dominant / r=16"
            ]
        );
        assert!(group.rows[0].is_baseline && group.rows[1].is_baseline);
        let rank8 = group.rows[2].versus_baseline.as_ref().unwrap();
        assert_eq!(rank8.baseline, "all / r=8");
        assert!((rank8.mean - 0.1).abs() < 1e-9);
        assert_eq!(rank8.better, Some(false));
        let rank16 = group.rows[3].versus_baseline.as_ref().unwrap();
        assert_eq!(rank16.baseline, "all / r=16");
        assert!((rank16.mean - 0.2).abs() < 1e-9);
        assert_eq!(group.rows[3].percent_of_lora, Some(1.0));
        assert_eq!(group.base.as_ref().unwrap().mean, Some(2.0));
        // Lower loss ranks first; the base model is last.
        let summary = &report.summaries[0];
        assert_eq!(summary.rows[0].label, "base model");
        assert_eq!(summary.rows[0].ranks, vec![Some(5.0)]);
        assert_eq!(summary.rows[1].ranks, vec![Some(1.5)]);
        assert_eq!(report.jobs.rows.len(), 17);
    }

    #[test]
    fn file_parts_are_plain_names() {
        assert_eq!(file_part("smollm2-135m"), "smollm2-135m");
        assert_eq!(file_part("/data/my task.jsonl"), "data-my-task.jsonl");
        assert_eq!(file_part("///"), "unnamed");
    }
}
