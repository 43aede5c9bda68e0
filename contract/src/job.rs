//! Job kinds and their parameters, and how parameters travel: bare JSON in job keys and the
//! store, a versioned envelope on the wire.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::placement::Placement;
use crate::probe::ProbeSettings;
use crate::vocab::{AInit, Estimator, Metric, Rule, Schedule, Variant};

/// The version of the parameter schema this build writes and reads on the wire.
pub const SCHEMA: u32 = 1;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A probe (PAGE or another placement rule) of one model on one task with one seed.
    Probe,
    /// One adapter training run.
    Train,
    /// An evaluation of a trained adapter, or of the base model.
    Eval,
}

impl JobKind {
    /// The lowercase name (`probe`, `train`, `eval`).
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Probe => "probe",
            JobKind::Train => "train",
            JobKind::Eval => "eval",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A job's identity: `KIND-HEX`, the kind and a short content hash of its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobKey(pub String);

impl fmt::Display for JobKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Parameters of a probe job: the probe settings, its seed and its rule. `alpha` is the one in
/// effect. The rule is left out when it is PAGE, so PAGE probes keep the parameters (and the
/// job keys) they had before rules existed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeParams {
    /// Probe batches averaged.
    pub batches: u32,
    /// Conversations per probe batch.
    pub batch_size: u32,
    /// Tokens per conversation (longer ones are truncated).
    pub max_len: u32,
    /// Adapter rank assumed by the probe.
    pub rank: u32,
    /// Adapter alpha assumed by the probe.
    pub alpha: f64,
    /// The estimator.
    pub estimator: Estimator,
    /// The init of A.
    pub a_init: AInit,
    /// Seed of the probe's A draws and batches.
    pub seed: u64,
    /// How modules are scored.
    #[serde(default, skip_serializing_if = "Rule::is_page")]
    pub rule: Rule,
}

/// The probe settings a train job's placement reads, and the seeds whose probes it averages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeInputs {
    /// Probe batches averaged.
    pub batches: u32,
    /// Conversations per probe batch.
    pub batch_size: u32,
    /// Tokens per conversation.
    pub max_len: u32,
    /// Adapter rank assumed by the probe.
    pub rank: u32,
    /// Adapter alpha assumed by the probe.
    pub alpha: f64,
    /// The estimator.
    pub estimator: Estimator,
    /// The init of A.
    pub a_init: AInit,
    /// The probe seeds (one probe dependency each).
    pub seeds: Vec<u64>,
    /// How the probes score modules (left out when PAGE).
    #[serde(default, skip_serializing_if = "Rule::is_page")]
    pub rule: Rule,
}

impl ProbeInputs {
    /// The parameters of the probe of one of the seeds.
    pub fn probe(&self, seed: u64) -> ProbeParams {
        ProbeParams {
            batches: self.batches,
            batch_size: self.batch_size,
            max_len: self.max_len,
            rank: self.rank,
            alpha: self.alpha,
            estimator: self.estimator,
            a_init: self.a_init,
            seed,
            rule: self.rule,
        }
    }

    /// These inputs with every setting the rule does not read set to its default (see
    /// [`ProbeSettings::default`]), and a single seed 0 for a rule the seed does not change:
    /// probes of one rule that differ only in what it ignores are then one job. PAGE reads
    /// everything and is returned as it is.
    pub fn normalized(mut self) -> ProbeInputs {
        let defaults = ProbeSettings::default();
        let to_u32 = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        if !self.rule.reads_data() {
            self.batches = to_u32(defaults.batches);
            self.batch_size = to_u32(defaults.batch_size);
            self.max_len = to_u32(defaults.max_len);
        }
        if !self.rule.reads_rank() {
            self.rank = to_u32(defaults.rank);
        }
        if !self.rule.reads_adapter() {
            self.alpha = defaults.alpha;
            self.estimator = defaults.estimator;
            self.a_init = defaults.a_init;
        }
        if !self.rule.reads_seed() {
            self.seeds = vec![0];
        }
        self
    }
}

/// Parameters of a train job: every train setting (`alpha`: the one in effect;
/// `loraplus_ratio` only for `loraplus`) and, for a placement that reads PAGE, the probes it
/// reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// Optimizer steps.
    pub steps: u32,
    /// Conversations per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per optimizer step.
    pub grad_accum: u32,
    /// Tokens per conversation (longer ones are truncated).
    pub max_len: u32,
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// Share of the steps spent warming up linearly from zero.
    pub warmup_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// LoRA alpha.
    pub alpha: f64,
    /// LoRA rank.
    pub rank: u32,
    /// The LoRA variant.
    pub variant: Variant,
    /// Which modules get an adapter.
    pub placement: Placement,
    /// Seed of the adapter init, data order and random placements.
    pub seed: u64,
    /// LoRA+ learning-rate ratio of B to A (`loraplus` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loraplus_ratio: Option<f64>,
    /// Steps between checkpoints.
    pub checkpoint_every: u32,
    /// The probes a placement that reads a probe reads (none for the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeInputs>,
}

/// Parameters of an eval job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// Evaluation samples.
    pub limit: u32,
    /// Generation budget per sample.
    pub max_new_tokens: u32,
    /// Samples generated together.
    pub batch_size: u32,
    /// The train job whose adapter is evaluated; `None` (written `null`) for the base model.
    pub adapter: Option<JobKey>,
    /// The metric of a user task (named tasks have their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
}

/// A job's parameters, of the kind of the job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobParams {
    /// A probe.
    Probe(ProbeParams),
    /// A training run.
    Train(TrainParams),
    /// An evaluation.
    Eval(EvalParams),
}

/// Parameters that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not JSON, or not the envelope `{"schema": N, "params": {…}}`.
    #[error("job parameters: {0}")]
    Envelope(String),
    /// Written by a build with another schema.
    #[error("job parameters have schema {found}, this build reads schema {expected}: run the coordinator and the workers from the same version")]
    Schema {
        /// The schema of the parameters.
        found: u32,
        /// The schema this build reads.
        expected: u32,
    },
    /// Parameters that do not fit the job kind (a missing, unknown or mistyped field; the
    /// message names it).
    #[error("{kind} job parameters: {message}")]
    Params {
        /// The job kind.
        kind: JobKind,
        /// serde's message, naming the field.
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<T> {
    schema: u32,
    params: T,
}

impl JobParams {
    /// The kind of job these parameters are for.
    pub fn kind(&self) -> JobKind {
        match self {
            JobParams::Probe(_) => JobKind::Probe,
            JobParams::Train(_) => JobKind::Train,
            JobParams::Eval(_) => JobKind::Eval,
        }
    }

    /// The bare parameters as JSON: what job keys hash and the store keeps.
    pub fn to_value(&self) -> Value {
        let value = match self {
            JobParams::Probe(params) => serde_json::to_value(params),
            JobParams::Train(params) => serde_json::to_value(params),
            JobParams::Eval(params) => serde_json::to_value(params),
        };
        // Plain structs of numbers, strings and lists always serialize.
        value.unwrap_or(Value::Null)
    }

    /// Reads bare parameters of a job of `kind`.
    pub fn from_value(kind: JobKind, value: &Value) -> Result<Self, WireError> {
        let params_error = |error: serde_json::Error| WireError::Params {
            kind,
            message: error.to_string(),
        };
        Ok(match kind {
            JobKind::Probe => {
                JobParams::Probe(ProbeParams::deserialize(value).map_err(params_error)?)
            }
            JobKind::Train => {
                JobParams::Train(TrainParams::deserialize(value).map_err(params_error)?)
            }
            JobKind::Eval => JobParams::Eval(EvalParams::deserialize(value).map_err(params_error)?),
        })
    }

    /// The parameters as they travel on the wire: `{"schema": SCHEMA, "params": {…}}`.
    pub fn to_wire(&self) -> String {
        wire(&self.to_value())
    }

    /// Reads parameters from the wire, checking the schema and every field.
    pub fn from_wire(kind: JobKind, text: &str) -> Result<Self, WireError> {
        Self::from_value(kind, &from_wire(text)?)
    }
}

/// Wraps bare parameters in the versioned wire envelope.
pub fn wire(params: &Value) -> String {
    serde_json::json!({"schema": SCHEMA, "params": params}).to_string()
}

/// Unwraps the versioned wire envelope, checking its schema; the parameters stay bare JSON
/// (read them with [`JobParams::from_value`]).
pub fn from_wire(text: &str) -> Result<Value, WireError> {
    let envelope: Envelope<Value> =
        serde_json::from_str(text).map_err(|e| WireError::Envelope(e.to_string()))?;
    if envelope.schema != SCHEMA {
        return Err(WireError::Schema {
            found: envelope.schema,
            expected: SCHEMA,
        });
    }
    Ok(envelope.params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval() -> JobParams {
        JobParams::Eval(EvalParams {
            limit: 4,
            max_new_tokens: 16,
            batch_size: 2,
            adapter: None,
            metric: None,
        })
    }

    #[test]
    fn the_wire_round_trips_and_carries_the_schema() {
        let wire = eval().to_wire();
        assert_eq!(
            wire,
            r#"{"params":{"adapter":null,"batch_size":2,"limit":4,"max_new_tokens":16},"schema":1}"#
        );
        assert_eq!(JobParams::from_wire(JobKind::Eval, &wire).unwrap(), eval());
    }

    fn inputs(rule: Rule) -> ProbeInputs {
        ProbeInputs {
            batches: 2,
            batch_size: 4,
            max_len: 64,
            rank: 4,
            alpha: 8.0,
            estimator: Estimator::Expected,
            a_init: AInit::Gaussian,
            seeds: vec![3, 5],
            rule,
        }
    }

    #[test]
    fn page_probes_are_written_without_a_rule_and_other_rules_with_theirs() {
        let page = JobParams::Probe(inputs(Rule::Page).probe(3)).to_value();
        assert!(page.get("rule").is_none(), "{page}");
        assert_eq!(
            page,
            serde_json::json!({"a_init": "gaussian", "alpha": 8.0, "batch_size": 4, "batches": 2,
                "estimator": "expected", "max_len": 64, "rank": 4, "seed": 3})
        );
        let grad = JobParams::Probe(inputs(Rule::GradRank).probe(3));
        assert_eq!(grad.to_value()["rule"], "grad-rank");
        assert_eq!(
            JobParams::from_wire(JobKind::Probe, &grad.to_wire()).unwrap(),
            grad
        );
        let bad = r#"{"schema":1,"params":{"a_init":"kaiming","alpha":8.0,"batch_size":4,"batches":2,"estimator":"sample","max_len":64,"rank":4,"seed":3,"rule":"fisher"}}"#;
        let error = JobParams::from_wire(JobKind::Probe, bad)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown placement rule \"fisher\""),
            "{error}"
        );
    }

    #[test]
    fn normalizing_keeps_only_what_the_rule_reads() {
        assert_eq!(inputs(Rule::Page).normalized(), inputs(Rule::Page));
        let grad_rank = inputs(Rule::GradRank).normalized();
        assert_eq!(
            (grad_rank.batches, grad_rank.rank, grad_rank.seeds.clone()),
            (2, 4, vec![3, 5])
        );
        assert_eq!(
            (grad_rank.alpha, grad_rank.estimator, grad_rank.a_init),
            (32.0, Estimator::Sample, AInit::Kaiming)
        );
        assert_eq!(inputs(Rule::Act).normalized().rank, 16);
        let kappa = inputs(Rule::Kappa).normalized();
        assert_eq!(
            (kappa.batches, kappa.batch_size, kappa.max_len, kappa.rank),
            (8, 8, 256, 16)
        );
        assert_eq!(kappa.seeds, vec![0]);
        let random = inputs(Rule::Random).normalized();
        assert_eq!((random.batches, random.seeds), (8, vec![3, 5]));
    }

    #[test]
    fn unknown_fields_another_schema_and_wrong_kinds_are_refused_by_name() {
        let unknown = r#"{"schema":1,"params":{"adapter":null,"batch_size":2,"limit":4,"max_new_tokens":16,"temperature":0.7}}"#;
        let error = JobParams::from_wire(JobKind::Eval, unknown)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("eval job parameters: unknown field `temperature`"),
            "{error}"
        );
        let other = r#"{"schema":2,"params":{}}"#;
        let error = JobParams::from_wire(JobKind::Eval, other)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("schema 2, this build reads schema 1"),
            "{error}"
        );
        let missing = r#"{"schema":1,"params":{"limit":4}}"#;
        let error = JobParams::from_wire(JobKind::Eval, missing)
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing field `max_new_tokens`"), "{error}");
        let error = JobParams::from_wire(JobKind::Probe, &eval().to_wire())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("probe job parameters:"), "{error}");
        let bare = r#"{"limit":4}"#;
        assert!(matches!(
            JobParams::from_wire(JobKind::Eval, bare),
            Err(WireError::Envelope(_))
        ));
    }
}
