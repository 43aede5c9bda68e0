//! The job graph: a validated [`Sweep`] expanded into probe → train → eval jobs.
//!
//! For every (model, task):
//! - one probe job per probe seed, distinct probe settings and placement rule, when some
//!   train point reads a probe (placements `dominant`, `dominant:KIND`, `top_k`,
//!   `budget_matched`, each with its `@RULE`, PAGE by default), and a PAGE probe when the
//!   sweep asks for probes anyway (`probe.always`, the default); a rule's probe keeps only
//!   the settings it reads (see [`placement_probe`]): `kappa`, a function of the weights, has
//!   one seed;
//! - one train job per sweep point, depending on the probes of its rule and probe settings
//!   (every seed: the engine uses their mean score) when its placement reads a probe;
//! - one eval job per train job, and one eval of the base model;
//! - with `report.validity`, the panel's single-module train jobs ([`validity_points`]),
//!   their probes and evals, planned like the sweep's own (a panel job equal to a sweep
//!   point's, e.g. `dominant@grad` at the first point's settings, is that job).
//!
//! A job's key is a content hash of its kind, model, task and parameters, so the same sweep
//! always gives the same keys, and two points that resolve to the same job share it.
//! Jobs come out probes first, then trains, then evals, so every job's dependencies come
//! before it.

use lorasweep_contract::{EvalParams, JobParams, ProbeInputs, ProbeParams, Rule, TrainParams};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};

use crate::spec::{Placement, ProbeSettings, Sweep, SweepPoint, TaskRef, Variant};

/// Hex digits of the sha256 kept in a key (64 bits).
const KEY_HEX_DIGITS: usize = 16;

pub use lorasweep_contract::{JobKey, JobKind};

/// One job of the graph, before it is stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannedJob {
    /// Content-hash key.
    pub key: JobKey,
    /// What it does.
    pub kind: JobKind,
    /// The model's id ([`crate::spec::ModelRef::id`]).
    pub model: String,
    /// The task's id ([`crate::spec::TaskRef::id`]).
    pub task: String,
    /// Every resolved setting of the job (see [`probe_params`], [`train_params`],
    /// [`eval_params`]).
    pub params: Value,
    /// Jobs that must succeed first.
    pub deps: Vec<JobKey>,
    /// GPUs it needs.
    pub gpus: u32,
}

/// Jobs per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct JobCounts {
    /// Probe jobs.
    pub probe: usize,
    /// Train jobs.
    pub train: usize,
    /// Eval jobs.
    pub eval: usize,
}

impl JobCounts {
    /// All jobs.
    pub fn total(&self) -> usize {
        self.probe + self.train + self.eval
    }
}

/// The planned jobs of one sweep, dependencies before dependents.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobGraph {
    jobs: Vec<PlannedJob>,
    index: HashMap<JobKey, usize>,
}

impl JobGraph {
    /// Expands a sweep into its jobs.
    pub fn plan(sweep: &Sweep) -> JobGraph {
        let mut points = sweep.points();
        points.extend(validity_points(sweep));
        let mut probes = Collector::default();
        let mut trains = Collector::default();
        let mut evals = Collector::default();
        for model in &sweep.models {
            let model_id = model.id();
            for task in &sweep.tasks {
                let task_id = task.id();
                let job = |params: JobParams, deps: Vec<JobKey>, gpus: u32| {
                    let kind = params.kind();
                    let params = params.to_value();
                    PlannedJob {
                        key: job_key(kind, &model_id, &task_id, &params),
                        kind,
                        model: model_id.clone(),
                        task: task_id.clone(),
                        params,
                        deps,
                        gpus,
                    }
                };
                evals.add(job(
                    JobParams::Eval(eval_params(sweep, task, None)),
                    Vec::new(),
                    1,
                ));
                if sweep.probe.always {
                    for point in &points {
                        for &seed in &sweep.probe.seeds {
                            probes.add(job(
                                JobParams::Probe(probe_params(&point.probe, seed)),
                                Vec::new(),
                                1,
                            ));
                        }
                    }
                }
                for point in &points {
                    let mut probe_keys = Vec::new();
                    if let Some(inputs) = placement_probe(point) {
                        for &seed in &inputs.seeds {
                            let probe = job(JobParams::Probe(inputs.probe(seed)), Vec::new(), 1);
                            probe_keys.push(probe.key.clone());
                            probes.add(probe);
                        }
                    }
                    let train = job(
                        JobParams::Train(train_params(point)),
                        probe_keys,
                        sweep.resources.gpus_per_job,
                    );
                    let train_key = train.key.clone();
                    trains.add(train);
                    evals.add(job(
                        JobParams::Eval(eval_params(sweep, task, Some(&train_key))),
                        vec![train_key],
                        1,
                    ));
                }
            }
        }
        let mut jobs = probes.jobs;
        jobs.extend(trains.jobs);
        jobs.extend(evals.jobs);
        let index = jobs
            .iter()
            .enumerate()
            .map(|(position, job)| (job.key.clone(), position))
            .collect();
        JobGraph { jobs, index }
    }

    /// The jobs, dependencies before dependents.
    pub fn jobs(&self) -> &[PlannedJob] {
        &self.jobs
    }

    /// The jobs, by value.
    pub fn into_jobs(self) -> Vec<PlannedJob> {
        self.jobs
    }

    /// The job with this key.
    pub fn get(&self, key: &JobKey) -> Option<&PlannedJob> {
        self.index.get(key).map(|position| &self.jobs[*position])
    }

    /// Jobs per kind.
    pub fn counts(&self) -> JobCounts {
        let mut counts = JobCounts::default();
        for job in &self.jobs {
            match job.kind {
                JobKind::Probe => counts.probe += 1,
                JobKind::Train => counts.train += 1,
                JobKind::Eval => counts.eval += 1,
            }
        }
        counts
    }
}

/// Jobs in first-seen order, each key once.
#[derive(Default)]
struct Collector {
    keys: HashSet<JobKey>,
    jobs: Vec<PlannedJob>,
}

impl Collector {
    fn add(&mut self, job: PlannedJob) {
        if self.keys.insert(job.key.clone()) {
            self.jobs.push(job);
        }
    }
}

/// The validity panel's points (none without `report.validity`): for each train seed of the
/// sweep (in first-seen order), each rule of the panel and each position k in 1..=panel, the
/// sweep's first point with one adapter on the module the rule ranks k-th (`dominant@RULE`
/// for k = 1, so the panel shares the sweep's own DomLoRA jobs at those settings, then
/// `ranked:k@RULE`). The `random` rule's ranking is a seeded draw: its top `panel` are the
/// panel's random modules. Modules that several rules rank high are trained once per rule
/// that ranks them (the graph is planned before any probe runs); the report averages them.
pub fn validity_points(sweep: &Sweep) -> Vec<SweepPoint> {
    let Some(validity) = &sweep.report.validity else {
        return Vec::new();
    };
    let points = sweep.points();
    let Some(first) = points.first() else {
        return Vec::new();
    };
    let mut seeds: Vec<u64> = Vec::new();
    for point in &points {
        if !seeds.contains(&point.train.seed) {
            seeds.push(point.train.seed);
        }
    }
    let mut panel = Vec::new();
    for &seed in &seeds {
        for &rule in &validity.rules {
            for position in 1..=validity.panel {
                let mut point = first.clone();
                point.train.seed = seed;
                point.train.placement = if position == 1 {
                    Placement::Dominant(rule)
                } else {
                    Placement::Ranked(position, rule)
                };
                panel.push(point);
            }
        }
    }
    panel
}

/// The PAGE probe settings: every probe setting (alpha: the one in effect) and the seeds
/// whose probes a train job averages.
fn probe_inputs(probe: &ProbeSettings) -> ProbeInputs {
    ProbeInputs {
        batches: probe.batches,
        batch_size: probe.batch_size,
        max_len: probe.max_len,
        rank: probe.rank,
        alpha: probe.effective_alpha(),
        estimator: probe.estimator,
        a_init: probe.a_init,
        seeds: probe.seeds.clone(),
        rule: Rule::Page,
    }
}

/// The probe a point's placement reads, if it reads one: the sweep's probe settings under the
/// placement's rule, with `grad-rank`'s r the point's train rank (the rank of the adapter it
/// places), and every setting the rule does not read at its default
/// ([`ProbeInputs::normalized`]), so points that differ only there share their probes.
pub fn placement_probe(point: &SweepPoint) -> Option<ProbeInputs> {
    let rule = point.train.placement.rule()?;
    let mut inputs = ProbeInputs {
        rule,
        ..probe_inputs(&point.probe)
    };
    if rule == Rule::GradRank {
        inputs.rank = point.train.rank;
    }
    Some(inputs.normalized())
}

/// Parameters of a probe job: every probe setting (alpha: the one in effect), and its seed.
pub fn probe_params(probe: &ProbeSettings, seed: u64) -> ProbeParams {
    probe_inputs(probe).probe(seed)
}

/// Parameters of a train job: every train setting (alpha: the one in effect;
/// `loraplus_ratio` only for `loraplus`), and for a placement that reads a probe, the probe
/// settings, rule and seeds it reads under `probe` ([`placement_probe`]).
pub fn train_params(point: &SweepPoint) -> TrainParams {
    let train = &point.train;
    TrainParams {
        steps: train.steps,
        batch_size: train.batch_size,
        grad_accum: train.grad_accum,
        max_len: train.max_len,
        lr: train.lr,
        schedule: train.schedule,
        warmup_ratio: train.warmup_ratio,
        weight_decay: train.weight_decay,
        max_grad_norm: train.max_grad_norm,
        alpha: train.effective_alpha(),
        rank: train.rank,
        variant: train.variant,
        placement: train.placement.clone(),
        seed: train.seed,
        loraplus_ratio: (train.variant == Variant::LoraPlus).then_some(train.loraplus_ratio),
        checkpoint_every: train.checkpoint_every,
        probe: placement_probe(point),
    }
}

/// Parameters of an eval job: the eval settings, the train job whose adapter it evaluates
/// (`adapter`, null for the base model) and, for a user task, its `metric`.
pub fn eval_params(sweep: &Sweep, task: &TaskRef, adapter: Option<&JobKey>) -> EvalParams {
    EvalParams {
        limit: sweep.eval.limit,
        max_new_tokens: sweep.eval.max_new_tokens,
        batch_size: sweep.eval.batch_size,
        adapter: adapter.cloned(),
        metric: task.metric(),
    }
}

/// JSON with object keys sorted at every level and no whitespace: the same value always
/// gives the same text, whatever order its maps were built in.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The key of a job: `KIND-` and the first 16 hex digits of the sha256 of the canonical JSON
/// of `{kind, model, task, params}`.
pub fn job_key(kind: JobKind, model: &str, task: &str, params: &Value) -> JobKey {
    let identity = json!({
        "kind": kind.name(),
        "model": model,
        "task": task,
        "params": params,
    });
    let digest = Sha256::digest(canonical_json(&identity).as_bytes());
    let hex = hex::encode(digest);
    JobKey(format!("{}-{}", kind.name(), &hex[..KEY_HEX_DIGITS]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let left: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"q":2,"p":3}],"x":"s"}}"#).unwrap();
        let right: Value =
            serde_json::from_str(r#"{"a":{"x":"s","y":[1,{"p":3,"q":2}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&left), canonical_json(&right));
        assert_eq!(
            canonical_json(&left),
            r#"{"a":{"x":"s","y":[1,{"p":3,"q":2}]},"b":1}"#
        );
    }

    #[test]
    fn keys_depend_on_every_part() {
        let params = json!({"rank": 8});
        let base = job_key(JobKind::Train, "m", "t", &params);
        assert_eq!(base, job_key(JobKind::Train, "m", "t", &json!({"rank": 8})));
        assert!(base.0.starts_with("train-"));
        assert_eq!(base.0.len(), "train-".len() + KEY_HEX_DIGITS);
        assert_ne!(base, job_key(JobKind::Eval, "m", "t", &params));
        assert_ne!(base, job_key(JobKind::Train, "m2", "t", &params));
        assert_ne!(base, job_key(JobKind::Train, "m", "t2", &params));
        assert_ne!(
            base,
            job_key(JobKind::Train, "m", "t", &json!({"rank": 16}))
        );
    }
}
