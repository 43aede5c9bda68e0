//! The configuration tables: one [`TaskGroup`] per (model, task) with a [`ConfigRow`] per
//! configuration (train settings but the seed), each row's [`ScoreCell`] over its seeds
//! ([`SeedScore`]), the paired [`Comparison`] with its baseline row, and the
//! [`ModelSummary`] that ranks the configurations across a model's tasks.
//!
//! It does not own how parameters are flattened or labelled (`params`), the PAGE findings
//! (`page`) or the per-job table (`jobs`).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{json, Value};

use lorasweep_contract::{Metric, NamedTask};
use lorasweep_coordinator::domain::{JobRecord, JobResult, JobState};
use lorasweep_coordinator::graph::{canonical_json, JobKind};
use lorasweep_coordinator::ids::JobId;

use super::params::{file_part, flatten, label_of, vanilla_lora, StoredParams};
use super::{is_unsuccessful, unique};
use crate::stats;

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

/// A paired difference to the baseline: this row minus the baseline row at the same seed.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The baseline row's label.
    pub baseline: String,
    /// Mean of the per-seed differences (this row minus the baseline).
    pub mean: f64,
    /// 95% t interval of the mean difference, low end (two pairs or more; not adjusted for
    /// the other comparisons of the table).
    pub low: Option<f64>,
    /// 95% t interval of the mean difference, high end.
    pub high: Option<f64>,
    /// Seeds scored in both rows.
    pub pairs: usize,
    /// Two-sided p-value of the sign-flip permutation test of the mean difference.
    pub p: Option<f64>,
    /// `p` after Holm's correction across the comparisons of this table.
    pub p_holm: Option<f64>,
    /// Cohen's d_z: mean / standard deviation of the differences (two pairs or more and a
    /// standard deviation above 0).
    pub d_z: Option<f64>,
    /// Whether the difference earns a label: at least five pairs and `p_holm` below 0.05.
    pub significant: bool,
    /// Whether this row is better than the baseline, when `significant`.
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

/// The task's metric name and whether higher is better: a named task's own metric, else
/// the eval job's `metric` (a user task's, `loss` by default).
pub(super) fn task_metric(task: &str, evals: &[&JobResult]) -> (String, bool) {
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

fn number(result: Option<&Value>, field: &str) -> Option<f64> {
    result
        .and_then(|result| result.get(field))
        .and_then(Value::as_f64)
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

pub(super) fn task_group(
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
            .and_then(|reference| compare(row, &rows[reference]));
        rows[index].percent_of_lora = percent;
        rows[index].is_baseline = reference == Some(index);
        rows[index].versus_baseline = comparison;
    }
    label_comparisons(&mut rows, higher_is_better);
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

/// The paired difference `row − baseline` over the seeds scored in both, before Holm's
/// correction and the label ([`label_comparisons`]).
fn compare(row: &ConfigRow, baseline: &ConfigRow) -> Option<Comparison> {
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
    let effect = stats::paired_effect(&differences)?;
    Some(Comparison {
        baseline: baseline.label.clone(),
        mean: effect.mean,
        low: effect.low,
        high: effect.high,
        pairs: effect.pairs,
        p: Some(effect.p),
        p_holm: None,
        d_z: effect.d_z,
        significant: false,
        better: None,
    })
}

/// Holm's correction across the table's comparisons (every row with a p-value), then the
/// labels: better or worse only with enough pairs and an adjusted p below 0.05.
fn label_comparisons(rows: &mut [ConfigRow], higher_is_better: bool) {
    let tested: Vec<usize> = (0..rows.len())
        .filter(|index| {
            rows[*index]
                .versus_baseline
                .as_ref()
                .is_some_and(|comparison| comparison.p.is_some())
        })
        .collect();
    let p_values: Vec<f64> = tested
        .iter()
        .filter_map(|index| rows[*index].versus_baseline.as_ref()?.p)
        .collect();
    for (index, adjusted) in tested.into_iter().zip(stats::holm(&p_values)) {
        if let Some(comparison) = rows[index].versus_baseline.as_mut() {
            comparison.p_holm = Some(adjusted);
            comparison.better = stats::verdict(
                comparison.pairs,
                adjusted,
                comparison.mean,
                higher_is_better,
            );
            comparison.significant = comparison.better.is_some();
        }
    }
}

pub(super) fn model_summary(model: &str, groups: &[TaskGroup]) -> ModelSummary {
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

#[cfg(test)]
mod tests {
    use super::*;
    use lorasweep_coordinator::domain::{SweepRecord, SweepResults, Timestamp};
    use lorasweep_coordinator::ids::SweepId;

    use crate::aggregate::build;
    use crate::aggregate::test_job as job;
    use crate::snapshot::ReportInput;
    /// Two placements × two ranks × `seeds` seeds on the chat task (a loss), no sweep file:
    /// the default baseline (vanilla LoRA) applies, matched at the same rank.
    fn ranked_input(seeds: u64) -> ReportInput {
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
                for seed in 0..seeds {
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
        let report = build(&ranked_input(2));
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
        // Two seeds, equal differences: no label, however consistent.
        assert_eq!(rank8.pairs, 2);
        assert!((rank8.p.unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(
            (rank8.better, rank8.significant, rank8.d_z),
            (None, false, None)
        );
        assert!(crate::tables::comparison_text(&group.rows[2])
            .ends_with(", n=2: too few seeds to tell"));
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
    fn eight_seeds_with_a_clear_difference_earn_a_label_after_holm() {
        let report = build(&ranked_input(8));
        let group = &report.groups[0];
        for row in &group.rows[2..] {
            let comparison = row.versus_baseline.as_ref().unwrap();
            assert_eq!(comparison.pairs, 8);
            // Every difference has the same sign: p = 2/256; two comparisons: Holm × 2.
            assert!((comparison.p.unwrap() - 2.0 / 256.0).abs() < 1e-12);
            assert!((comparison.p_holm.unwrap() - 4.0 / 256.0).abs() < 1e-12);
            // A higher loss is worse.
            assert_eq!(comparison.better, Some(false));
            assert!(comparison.significant);
            let text = crate::tables::comparison_text(row);
            assert!(text.ends_with(", p=0.016 (Holm) * worse"), "{text}");
        }
    }
}
