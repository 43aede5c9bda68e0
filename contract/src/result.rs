//! What each job kind reports back to the coordinator (the `result` of a job). Fields are
//! declared in name order, so the JSON reads the same as a sorted map.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::isolation::Isolation;
use crate::vocab::{AInit, Estimator, Rule};

/// The result of a probe job (the full scores are its `probe.json` artifact).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// The init of A the probe assumed.
    pub a_init: AInit,
    /// Fraction of batches whose own argmax is the dominant module.
    pub argmax_stability: f64,
    /// The argmax module, e.g. `layers.3.mlp.down_proj`.
    pub dominant: String,
    /// The estimator.
    pub estimator: Estimator,
    /// How modules were scored (left out when PAGE).
    #[serde(default, skip_serializing_if = "Rule::is_page")]
    pub rule: Rule,
    /// Peak resident memory of the worker process while the probe ran, GiB (the memory of
    /// jobs it ran alongside included); absent where it cannot be measured, and in results
    /// stored before it was recorded.
    #[serde(default)]
    pub peak_rss_gib: Option<f64>,
    /// Share of the score per module kind.
    pub share_by_kind: BTreeMap<String, f64>,
    /// Response tokens probed.
    pub tokens: usize,
    /// Share of the dominant module.
    pub top1_share: f64,
    /// Wall time, seconds.
    pub wall_s: f64,
}

/// One adapted module of a training run and its rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRank {
    /// Module path, e.g. `layers.3.mlp.down_proj`.
    pub name: String,
    /// Its rank.
    pub rank: usize,
}

/// The result of a train job (the adapter and `metrics.json` are its artifacts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// The argmax module of the probe the placement read, if it read one.
    pub dominant: Option<String>,
    /// Loss of the last step.
    pub final_loss: Option<f64>,
    /// Loss of every step.
    pub losses: Vec<f64>,
    /// The adapted modules.
    pub modules: Vec<ModuleRank>,
    /// Peak resident memory of the worker process while the job ran (for a data-parallel job,
    /// the process of rank 0, with every rank it ran; jobs it ran alongside included), GiB;
    /// absent where it cannot be measured, and in results stored before it was recorded.
    #[serde(default)]
    pub peak_rss_gib: Option<f64>,
    /// The step a resumed run started from.
    pub resumed_from: Option<usize>,
    /// Tokens trained on.
    pub tokens: usize,
    /// Training throughput.
    pub tokens_per_s: f64,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Data-parallel ranks.
    pub world_size: usize,
}

/// The result of an eval job (every sample is its `eval.json` artifact).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// The adapter evaluated, if any.
    pub adapter: Option<String>,
    /// Every metric, by name.
    pub metrics: BTreeMap<String, f64>,
    /// Samples evaluated.
    pub n: usize,
    /// The sandbox confinement its programs ran under (code evaluation only; absent in
    /// results written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Isolation>,
    /// The task's headline metric.
    pub score: f64,
    /// The task.
    pub task: String,
    /// Wall time, seconds.
    pub wall_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::Identity;

    #[test]
    fn an_eval_result_records_its_sandbox_and_reads_older_results() {
        let summary = EvalSummary {
            adapter: None,
            metrics: BTreeMap::from([("pass@1".to_string(), 0.5)]),
            n: 2,
            sandbox: Some(Isolation {
                landlock_abi: 7,
                seccomp: true,
                network: false,
                filesystem: false,
                pid: false,
                identity: Identity::Inherited,
            }),
            score: 0.5,
            task: "code".into(),
            wall_s: 1.0,
        };
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["sandbox"]["landlock_abi"], 7);
        assert_eq!(json["sandbox"]["identity"], "inherited");
        let back: EvalSummary = serde_json::from_value(json).unwrap();
        assert_eq!(back, summary);

        let older = serde_json::json!({
            "adapter": null, "metrics": {}, "n": 1, "score": 0.0, "task": "math", "wall_s": 1.0
        });
        let older: EvalSummary = serde_json::from_value(older).unwrap();
        assert_eq!(older.sandbox, None);
    }
}
