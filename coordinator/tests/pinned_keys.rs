//! Content-hash job keys are part of the contract: a sweep resumed by a newer build must find
//! its jobs under the same keys. These keys were computed by the build before the typed job
//! contract (commit 95e9a04); a change to how parameters are written changes them and fails here.

use lorasweep_coordinator::graph::JobGraph;
use lorasweep_coordinator::spec::Sweep;

const SWEEP: &str = r#"
version: 1
name: pinned
models: [smollm2-135m]
tasks: [math, {path: data/user.jsonl, metric: exact}]
probe: {batches: 2, batch_size: 4, max_len: 192, rank: 8, seeds: [0, 1], estimator: expected, a_init: gaussian}
train: {steps: 12, batch_size: 4, max_len: 192, lr: 1.0e-3, rank: 8, alpha: 16, warmup_ratio: 0.1, checkpoint_every: 4}
eval: {limit: 12, max_new_tokens: 64, batch_size: 4}
sweep:
  grid:
    placement: [all, dominant, "explicit:layers.3.mlp.down_proj", "budget_matched:50k"]
    variant: [lora, loraplus]
"#;

const PINNED: [&str; 38] = [
    "probe-479dac74eaca797e",
    "probe-41679d6a5513df4a",
    "probe-a1e9c7823329ebfe",
    "probe-1da0aea1b8b5ab47",
    "train-ab30a31662f79173",
    "train-834fe3f5fce9f22c",
    "train-7f9c0b85e4b98282",
    "train-2ba41d6d053194dd",
    "train-69f10742212c1a4a",
    "train-7c9c96f78d281b44",
    "train-e2dbd6e6ca6abf9f",
    "train-3dfba86a357dcc3e",
    "train-4b8f2eb7e01d619b",
    "train-b950ef89f37b9de0",
    "train-9fa562af0fbac66d",
    "train-04fb8fdc3c59bce0",
    "train-614b4cc44c3d0b95",
    "train-b047964e1b482697",
    "train-1338bbe110212932",
    "train-f3abc719aa7ccd93",
    "eval-4b7473b5a26a8588",
    "eval-6f3127367beac8bc",
    "eval-c4af94bd9d77eeef",
    "eval-edea243c42082a51",
    "eval-4904121485a63dc8",
    "eval-d4ad95c97f7be7ae",
    "eval-6a6aed7d4847292f",
    "eval-1291f402823537b1",
    "eval-5dd898711e9b1bd0",
    "eval-1793444f993be256",
    "eval-397554e309d639ed",
    "eval-5e5ba7f39f9bfee9",
    "eval-54a3be2db46515db",
    "eval-10c3c25dedb4c8ff",
    "eval-9e916201010aa24e",
    "eval-311acd75b802918e",
    "eval-783c1074d85398b5",
    "eval-15a88a9df7a072ec",
];

#[test]
fn job_keys_stay_what_they_were() {
    let sweep = Sweep::from_yaml_str(SWEEP, "pinned.yaml", None).unwrap();
    let graph = JobGraph::plan(&sweep);
    let keys: Vec<String> = graph.jobs().iter().map(|job| job.key.0.clone()).collect();
    let pinned = PINNED;
    assert_eq!(keys.len(), pinned.len());
    for key in pinned {
        assert!(
            keys.contains(&key.to_string()),
            "{key} is no longer planned: {keys:?}"
        );
    }
}
