//! Does a rule's ranking predict the gain training realises? The validity panel of each
//! (model, task) ([`ValidityTask`]): every panel adapter's realised gain over the base model,
//! and per rule Kendall's τ-b between the rule's scores and those gains, where the realised
//! best module sits in the rule's ranking, and how often the rule's top module is the best
//! one, seed by seed.
//!
//! The panel's jobs are found by their parameters: the report plans the sweep's panel
//! ([`lorasweep_coordinator::graph::validity_points`]) and takes the stored train jobs whose
//! parameters are a panel point's, and the probes whose parameters are a panel rule's.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use lorasweep_contract::{JobParams, ProbeResult, Rule};
use lorasweep_coordinator::domain::{JobRecord, JobResult, JobState};
use lorasweep_coordinator::graph::{
    canonical_json, placement_probe, train_params, validity_points, JobKind,
};
use lorasweep_coordinator::ids::JobId;
use lorasweep_coordinator::spec::Sweep;

use super::configs::task_metric;
use super::page::merge_probes;
use super::params::{file_part, lenient, StoredParams};
use crate::stats;

/// The validity panels of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ValidityModel {
    /// The model id.
    pub model: String,
    /// One panel per task.
    pub tasks: Vec<ValidityTask>,
}

/// The validity panel of one (model, task).
#[derive(Debug, Clone, Serialize)]
pub struct ValidityTask {
    /// The task id.
    pub task: String,
    /// The task's metric.
    pub metric: String,
    /// Whether a higher metric is better (the gain is signed so that higher is better).
    pub higher_is_better: bool,
    /// The base model's score.
    pub base: Option<f64>,
    /// Train seeds with at least one scored panel adapter.
    pub seeds: Vec<u64>,
    /// Every module with a scored panel adapter, highest mean gain first.
    pub modules: Vec<PanelModule>,
    /// Panel jobs (train or eval) not succeeded yet or failed.
    pub missing: usize,
    /// One row per rule, in the panel's rule order.
    pub rules: Vec<RuleValidity>,
    /// The plot's file name.
    pub plot_file: String,
}

/// One module of the panel and the gain its single-module adapter realised.
#[derive(Debug, Clone, Serialize)]
pub struct PanelModule {
    /// Module path.
    pub module: String,
    /// Mean gain over seeds: the metric minus the base model's (negated when lower is
    /// better).
    pub gain: f64,
    /// The gain per train seed (the mean when several panel jobs trained it with one seed).
    pub gain_by_seed: BTreeMap<u64, f64>,
    /// Mean held-out loss reduction (base loss − adapter loss), when the evals report a loss.
    pub loss_gain: Option<f64>,
}

/// How well one rule's ranking predicted the realised gains.
#[derive(Debug, Clone, Serialize)]
pub struct RuleValidity {
    /// The rule.
    pub rule: String,
    /// Probe seeds merged (0: no probe result yet).
    pub probe_seeds: usize,
    /// Panel modules compared.
    pub modules: usize,
    /// Kendall's τ-b between the rule's score and the mean gain over the panel.
    pub tau: Option<f64>,
    /// Its two-sided permutation p-value (none below [`stats::TAU_MIN_PAIRS`] modules).
    pub tau_p: Option<f64>,
    /// τ-b between the rule's score and the held-out loss reduction.
    pub loss_tau: Option<f64>,
    /// Where the realised best module sits in the rule's ranking of every module (1 = its top).
    pub best_rank: Option<usize>,
    /// The rule's top module.
    pub top1: Option<String>,
    /// Seeds whose realised best module is the rule's top module.
    pub top1_hits: usize,
    /// Seeds compared for `top1_hits`.
    pub top1_seeds: usize,
    /// (module, the rule's score as a fraction of the modules it outranks, 1 = its top,
    /// mean gain) for each panel module: the plot's points.
    #[serde(skip)]
    pub points: Vec<(String, f64, f64)>,
}

/// What the report reads of a stored train summary.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StoredModules {
    #[serde(deserialize_with = "lenient")]
    modules: Option<Vec<StoredModule>>,
}

#[derive(Debug, Deserialize)]
struct StoredModule {
    name: String,
}

/// The one adapted module of a succeeded train job.
fn single_module(job: &JobRecord) -> Option<String> {
    let result = job.result.as_ref()?;
    let modules = StoredModules::deserialize(result).ok()?.modules?;
    match modules.as_slice() {
        [only] => Some(only.name.clone()),
        _ => None,
    }
}

fn number(job: &JobRecord, read: impl Fn(&Value) -> Option<&Value>) -> Option<f64> {
    read(job.result.as_ref()?)?
        .as_f64()
        .filter(|value| value.is_finite())
}

fn score(job: &JobRecord) -> Option<f64> {
    number(job, |result| result.get("score"))
}

fn loss(job: &JobRecord) -> Option<f64> {
    number(job, |result| result.get("metrics")?.get("loss"))
}

/// The panel of a sweep, as the report matches it: the canonical parameters of every panel
/// train job, and per rule the canonical parameters of the probes it reads.
struct Panel {
    trains: HashSet<String>,
    probes: Vec<(Rule, HashSet<String>)>,
}

impl Panel {
    fn of(sweep: &Sweep) -> Option<Panel> {
        let validity = sweep.report.validity.as_ref()?;
        let points = validity_points(sweep);
        let trains = points
            .iter()
            .map(|point| canonical_json(&JobParams::Train(train_params(point)).to_value()))
            .collect();
        let probes = validity
            .rules
            .iter()
            .map(|rule| {
                let wanted: HashSet<String> = points
                    .iter()
                    .filter(|point| point.train.placement.rule() == Some(*rule))
                    .filter_map(placement_probe)
                    .flat_map(|inputs| {
                        inputs
                            .seeds
                            .iter()
                            .map(|seed| {
                                canonical_json(&JobParams::Probe(inputs.probe(*seed)).to_value())
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                (*rule, wanted)
            })
            .collect();
        Some(Panel { trains, probes })
    }
}

/// The canonical parameters of the panel's train jobs that are not also sweep points: the
/// rows the configuration tables leave out (the validity table shows them).
pub(super) fn panel_only_trains(sweep: Option<&Sweep>) -> HashSet<String> {
    let Some(sweep) = sweep else {
        return HashSet::new();
    };
    let Some(panel) = Panel::of(sweep) else {
        return HashSet::new();
    };
    let points: HashSet<String> = sweep
        .points()
        .iter()
        .map(|point| canonical_json(&JobParams::Train(train_params(point)).to_value()))
        .collect();
    panel.trains.difference(&points).cloned().collect()
}

/// The validity panels of one model; empty when the sweep asks for none.
pub(super) fn validity_model(
    model: &str,
    tasks: &[String],
    sweep: Option<&Sweep>,
    jobs: &[JobResult],
    probe_files: &BTreeMap<JobId, ProbeResult>,
) -> Option<ValidityModel> {
    let panel = Panel::of(sweep?)?;
    let tasks = tasks
        .iter()
        .map(|task| validity_task(model, task, &panel, jobs, probe_files))
        .collect();
    Some(ValidityModel {
        model: model.to_string(),
        tasks,
    })
}

fn validity_task(
    model: &str,
    task: &str,
    panel: &Panel,
    jobs: &[JobResult],
    probe_files: &BTreeMap<JobId, ProbeResult>,
) -> ValidityTask {
    let of_pair = |kind: JobKind| -> Vec<&JobRecord> {
        jobs.iter()
            .map(|job| &job.job)
            .filter(|job| job.model == model && job.task == task && job.kind == kind)
            .collect()
    };
    let evals = of_pair(JobKind::Eval);
    let eval_results: Vec<&JobResult> = jobs
        .iter()
        .filter(|job| job.job.model == model && job.job.task == task)
        .filter(|job| job.job.kind == JobKind::Eval)
        .collect();
    let (metric, higher_is_better) = task_metric(task, &eval_results);
    let sign = if higher_is_better { 1.0 } else { -1.0 };
    let succeeded = |job: &&JobRecord| job.state == JobState::Succeeded;
    let base_eval = evals
        .iter()
        .copied()
        .filter(succeeded)
        .find(|eval| StoredParams::of(eval).adapter.is_none());
    let base = base_eval.and_then(score);
    let base_loss = base_eval.and_then(loss);
    let eval_of: HashMap<JobId, &JobRecord> = evals
        .iter()
        .flat_map(|eval| eval.deps.iter().map(move |dep| (*dep, *eval)))
        .collect();

    // (module, seed) → the gains (and loss reductions) of the panel jobs that trained it.
    let mut gains: BTreeMap<String, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    let mut loss_gains: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut missing = 0;
    for train in of_pair(JobKind::Train) {
        if !panel.trains.contains(&canonical_json(&train.params)) {
            continue;
        }
        let eval = eval_of.get(&train.id).copied();
        let scored = eval.filter(succeeded).and_then(score);
        let (Some(module), Some(seed), Some(scored), Some(base)) = (
            (train.state == JobState::Succeeded)
                .then(|| single_module(train))
                .flatten(),
            StoredParams::of(train).seed,
            scored,
            base,
        ) else {
            missing += 1;
            continue;
        };
        gains
            .entry(module.clone())
            .or_default()
            .entry(seed)
            .or_default()
            .push(sign * (scored - base));
        if let (Some(adapter_loss), Some(base_loss)) = (eval.and_then(loss), base_loss) {
            loss_gains
                .entry(module)
                .or_default()
                .push(base_loss - adapter_loss);
        }
    }
    let mut modules: Vec<PanelModule> = gains
        .into_iter()
        .map(|(module, by_seed)| {
            let gain_by_seed: BTreeMap<u64, f64> = by_seed
                .into_iter()
                .filter_map(|(seed, values)| Some((seed, stats::mean(&values)?)))
                .collect();
            let per_seed: Vec<f64> = gain_by_seed.values().copied().collect();
            PanelModule {
                gain: stats::mean(&per_seed).unwrap_or(f64::NAN),
                loss_gain: loss_gains
                    .get(&module)
                    .and_then(|values| stats::mean(values)),
                module,
                gain_by_seed,
            }
        })
        .collect();
    modules.sort_by(|a, b| b.gain.total_cmp(&a.gain).then(a.module.cmp(&b.module)));
    let mut seeds: Vec<u64> = modules
        .iter()
        .flat_map(|module| module.gain_by_seed.keys().copied())
        .collect();
    seeds.sort_unstable();
    seeds.dedup();

    let probes = of_pair(JobKind::Probe);
    let rules = panel
        .probes
        .iter()
        .map(|(rule, wanted)| {
            let files: Vec<&ProbeResult> = probes
                .iter()
                .filter(|probe| probe.state == JobState::Succeeded)
                .filter(|probe| wanted.contains(&canonical_json(&probe.params)))
                .filter_map(|probe| probe_files.get(&probe.id))
                .collect();
            rule_validity(*rule, &files, &modules, &seeds)
        })
        .collect();
    ValidityTask {
        task: task.to_string(),
        metric,
        higher_is_better,
        base,
        seeds,
        modules,
        missing,
        rules,
        plot_file: format!("validity_{}_{}.svg", file_part(model), file_part(task)),
    }
}

fn rule_validity(
    rule: Rule,
    files: &[&ProbeResult],
    modules: &[PanelModule],
    seeds: &[u64],
) -> RuleValidity {
    let mut row = RuleValidity {
        rule: rule.name().to_string(),
        probe_seeds: files.len(),
        modules: 0,
        tau: None,
        tau_p: None,
        loss_tau: None,
        best_rank: None,
        top1: None,
        top1_hits: 0,
        top1_seeds: 0,
        points: Vec::new(),
    };
    let Some(mut scored) = merge_probes(files) else {
        return row;
    };
    // The rule's ranking: highest score first, ties by name (as the engine places).
    scored.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.name.cmp(&b.name)));
    let position: HashMap<&str, usize> = scored
        .iter()
        .enumerate()
        .map(|(index, module)| (module.name.as_str(), index))
        .collect();
    let score_of: HashMap<&str, f64> = scored
        .iter()
        .map(|module| (module.name.as_str(), module.score))
        .collect();
    let compared: Vec<&PanelModule> = modules
        .iter()
        .filter(|module| score_of.contains_key(module.module.as_str()) && module.gain.is_finite())
        .collect();
    let rule_scores: Vec<f64> = compared
        .iter()
        .map(|module| score_of[module.module.as_str()])
        .collect();
    let realised: Vec<f64> = compared.iter().map(|module| module.gain).collect();
    row.modules = compared.len();
    row.tau = stats::kendall_tau_b(&rule_scores, &realised);
    row.tau_p = stats::kendall_tau_p(&rule_scores, &realised);
    let with_loss: Vec<(f64, f64)> = compared
        .iter()
        .zip(&rule_scores)
        .filter_map(|(module, score)| Some((*score, module.loss_gain?)))
        .collect();
    let (loss_scores, loss_gains): (Vec<f64>, Vec<f64>) = with_loss.into_iter().unzip();
    row.loss_tau = stats::kendall_tau_b(&loss_scores, &loss_gains);
    // `modules` is sorted by mean gain: the first compared one is the realised best.
    row.best_rank = compared
        .first()
        .map(|best| position[best.module.as_str()] + 1);
    row.top1 = scored.first().map(|module| module.name.clone());
    if let Some(top1) = &row.top1 {
        for seed in seeds {
            let best = compared
                .iter()
                .filter_map(|module| Some((module, module.gain_by_seed.get(seed)?)))
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.module.cmp(&a.0.module)));
            if let Some((best, _)) = best {
                row.top1_seeds += 1;
                row.top1_hits += usize::from(&best.module == top1);
            }
        }
    }
    let last = scored.len().saturating_sub(1).max(1) as f64;
    row.points = compared
        .iter()
        .map(|module| {
            let fraction = 1.0 - position[module.module.as_str()] as f64 / last;
            (module.module.clone(), fraction, module.gain)
        })
        .collect();
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorasweep_contract::{ModuleKind, ModuleScore, Placement, ProbeSettings};
    use lorasweep_coordinator::domain::{SweepRecord, SweepResults, Timestamp};
    use lorasweep_coordinator::ids::SweepId;
    use serde_json::json;

    use crate::aggregate::{build, test_job};
    use crate::snapshot::ReportInput;

    const SPEC: &str = "version: 1\nname: v\nmodels: [smollm2-135m]\ntasks: [math]\n\
                        probe: {always: false}\n\
                        sweep: {grid: {placement: [all], seed: [0, 1]}}\n\
                        report: {validity: {panel: 3, rules: [grad]}}\n";

    const MODULES: [&str; 6] = ["A", "B", "C", "D", "E", "F"];

    /// Module `letter` is `layers.N.mlp.down_proj` with N its place in the alphabet.
    fn name(letter: &str) -> String {
        let layer = MODULES.iter().position(|m| *m == letter).unwrap();
        format!("layers.{layer}.mlp.down_proj")
    }

    fn probe_file(scores: [f64; 6]) -> ProbeResult {
        let modules = MODULES
            .iter()
            .zip(scores)
            .enumerate()
            .map(|(layer, (_, score))| ModuleScore {
                name: format!("layers.{layer}.mlp.down_proj"),
                layer,
                kind: ModuleKind::DownProj,
                score,
                share: 0.0,
                top_r_share: None,
            })
            .collect();
        ProbeResult {
            model: "m".into(),
            model_digest: String::new(),
            data: "math".into(),
            data_digest: String::new(),
            settings: ProbeSettings::default(),
            modules,
            dominant: String::new(),
            top1_share: 0.0,
            share_by_kind: BTreeMap::new(),
            share_by_layer: Vec::new(),
            batch_argmax: Vec::new(),
            argmax_stability: 1.0,
            tokens: 0,
            wall_s: 0.0,
            peak_rss_gib: None,
        }
    }

    /// grad ranks A B C D E F; random ranks D E A B C F. Gains over the base (0.30): A +0.10,
    /// B +0.05, C +0.07 (seed 0) and +0.12 (seed 1), D −0.02, E 0.
    fn input() -> ReportInput {
        let sweep = Sweep::from_yaml_str(SPEC, "v.yaml", None).unwrap();
        let mut jobs = Vec::new();
        let mut probes = BTreeMap::new();
        let mut next = 1;
        let mut add = |jobs: &mut Vec<JobResult>, kind, params, deps, result| {
            let mut job = test_job(next, kind, params, deps, result);
            job.job.task = "math".to_string();
            jobs.push(job);
            next += 1;
            next - 1
        };
        let base = add(
            &mut jobs,
            JobKind::Eval,
            json!({"adapter": null}),
            vec![],
            json!({"score": 0.30}),
        );
        let _ = base;
        let mut probe_ids = HashMap::new();
        for (rule, scores) in [
            (Rule::Grad, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]),
            (Rule::Random, [4.0, 3.0, 2.0, 6.0, 5.0, 1.0]),
        ] {
            let point = validity_points(&sweep)
                .into_iter()
                .find(|point| point.train.placement.rule() == Some(rule))
                .unwrap();
            let inputs = placement_probe(&point).unwrap();
            let params = JobParams::Probe(inputs.probe(inputs.seeds[0])).to_value();
            let id = add(&mut jobs, JobKind::Probe, params, vec![], json!({}));
            probes.insert(JobId(id), probe_file(scores));
            probe_ids.insert(rule, (id, probe_file(scores).ranking()));
        }
        let gain = |module: &str, seed: u64| match module {
            "A" => 0.10,
            "B" => 0.05,
            "C" if seed == 0 => 0.07,
            "C" => 0.12,
            "D" => -0.02,
            _ => 0.0,
        };
        for point in validity_points(&sweep).into_iter().chain(sweep.points()) {
            let params = JobParams::Train(train_params(&point)).to_value();
            let seed = point.train.seed;
            let (deps, module) = match point.train.placement {
                Placement::All => (vec![], None),
                ref placement => {
                    let (probe, ranking) = &probe_ids[&placement.rule().unwrap()];
                    let position = match placement {
                        Placement::Ranked(k, _) => k - 1,
                        _ => 0,
                    };
                    let module = ranking[position].to_string();
                    let layer: usize = module.split('.').nth(1).unwrap().parse().unwrap();
                    (vec![*probe], Some(MODULES[layer]))
                }
            };
            let result = match module {
                Some(letter) => json!({"modules": [{"name": name(letter), "rank": 16}]}),
                None => json!({"modules": [{"name": "x", "rank": 16}, {"name": "y", "rank": 16}]}),
            };
            let score = 0.30 + module.map_or(0.2, |letter| gain(letter, seed));
            let train = add(&mut jobs, JobKind::Train, params, deps, result);
            let key = format!("train-{train}");
            add(
                &mut jobs,
                JobKind::Eval,
                json!({"adapter": key}),
                vec![train],
                json!({"score": score}),
            );
        }
        ReportInput {
            results: SweepResults {
                sweep: SweepRecord {
                    id: SweepId(1),
                    name: "v".to_string(),
                    file_name: "v.yaml".to_string(),
                    spec_yaml: SPEC.to_string(),
                    created: Timestamp(0),
                    cancelled: None,
                },
                jobs,
            },
            probes,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn each_rule_is_scored_against_the_realised_gains() {
        let report = build(&input());
        let [model] = report.validity.as_slice() else {
            panic!("one model: {:#?}", report.validity);
        };
        let [task] = model.tasks.as_slice() else {
            panic!("one task");
        };
        assert_eq!(task.seeds, [0, 1]);
        assert_eq!(task.missing, 0);
        let order: Vec<&str> = task.modules.iter().map(|m| m.module.as_str()).collect();
        // A (0.10) before C (mean 0.095), B, E, D.
        assert_eq!(
            order,
            [name("A"), name("C"), name("B"), name("E"), name("D")]
        );
        assert!(close(task.modules[1].gain, 0.095));
        let [grad, random] = task.rules.as_slice() else {
            panic!("grad and random: {:#?}", task.rules);
        };
        assert_eq!(
            (grad.rule.as_str(), random.rule.as_str()),
            ("grad", "random")
        );
        // grad: 8 concordant, 2 discordant pairs of 10 (B–C, D–E).
        assert_eq!(grad.modules, 5);
        assert!(close(grad.tau.unwrap(), 0.6));
        // |τ| ≥ 0.6 for 28 of the 120 orders (≤ 2 or ≥ 8 inversions).
        assert!(close(grad.tau_p.unwrap(), 28.0 / 120.0));
        assert_eq!(grad.best_rank, Some(1));
        assert_eq!(grad.top1.as_deref(), Some(name("A").as_str()));
        // Seed 0's best is A (its top), seed 1's is C.
        assert_eq!((grad.top1_hits, grad.top1_seeds), (1, 2));
        assert!(close(random.tau.unwrap(), -0.6));
        assert_eq!(random.best_rank, Some(3));
        assert_eq!((random.top1_hits, random.top1_seeds), (0, 2));
        // The panel's jobs stay out of the configuration table: only `all` is a row.
        let rows: Vec<&str> = report.groups[0]
            .rows
            .iter()
            .map(|row| row.label.as_str())
            .collect();
        assert_eq!(rows, ["all"], "{rows:?}");
    }
}
