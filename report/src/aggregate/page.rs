//! The PAGE findings of each model ([`PageModel`]): per (model, task) and probe settings a
//! [`PageTask`] with the probe seeds merged (mean PAGE, shares recomputed), the dominant
//! module, its share, argmax stability and shares per module kind; across tasks, Kendall's
//! τ-b between the PAGE score vectors ([`TauPair`]) and whether the argmax agrees.
//!
//! It does not draw the heatmaps (`crate::plots`) or write the tables (`crate::tables`);
//! it only names the heatmap files.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use lorasweep_contract::{ModuleKind, ModuleScore, ProbeResult};
use lorasweep_coordinator::domain::{JobRecord, JobResult, JobState};
use lorasweep_coordinator::graph::{canonical_json, JobKind};
use lorasweep_coordinator::ids::JobId;

use super::params::{file_part, lenient, plain, StoredParams};
use super::{is_unsuccessful, unique};
use crate::stats;

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

/// The probe settings of a probe job without its seed, as a canonical text.
fn probe_identity(job: &JobRecord) -> String {
    let mut params = job.params.clone();
    if let Value::Object(map) = &mut params {
        map.remove("seed");
    }
    canonical_json(&params)
}

/// Mean PAGE over seeds, shares recomputed, as the engine merges probes for training.
pub(super) fn merge_probes(probes: &[&ProbeResult]) -> Option<Vec<ModuleScore>> {
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

pub(super) fn page_model(
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
