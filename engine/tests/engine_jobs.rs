//! The probe and train jobs end to end on a tiny Hugging Face directory: a PAGE placement
//! runs the probe first, the outputs are PEFT's files plus metrics.json, LoRA+ scales B's
//! step by its ratio, and a finished run resumes to the same result.

mod common;

use std::path::Path;

use candle_core::Device;
use common::files::hf_spec;
use lorasweep_engine::adapter::{AInit, AdapterSettings, Variant};
use lorasweep_engine::jobs::{self, DataSource, TrainJob};
use lorasweep_engine::probe::{Estimator, ProbeSettings};
use lorasweep_engine::rules::Rule;
use lorasweep_engine::train::{Schedule, TrainSettings};

fn job(model: &Path, out: &Path, placement: &str, variant: Variant, steps: usize) -> TrainJob {
    TrainJob {
        model: model.to_str().unwrap().to_string(),
        data: DataSource::Jsonl(common::fixture("engine/chat.jsonl")),
        placement: lorasweep_engine::placement::parse(placement).unwrap(),
        probe: None,
        probe_settings: ProbeSettings {
            batches: 2,
            batch_size: 2,
            max_len: 64,
            rank: 4,
            alpha: 8.0,
            estimator: Estimator::Expected,
            a_init: AInit::Kaiming,
            seed: 0,
            rule: Rule::Page,
        },
        adapter: AdapterSettings {
            variant,
            rank: 4,
            alpha: 8.0,
            a_init: AInit::Kaiming,
            seed: 5,
        },
        loraplus_ratio: 16.0,
        train: TrainSettings {
            steps,
            batch_size: 2,
            max_len: 64,
            lr: 1e-3,
            schedule: Schedule::Constant,
            warmup_ratio: 0.0,
            max_grad_norm: 0.0,
            checkpoint_every: 2,
            ..TrainSettings::default()
        },
        out: out.to_path_buf(),
        resume: false,
    }
}

fn tensors(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn a_page_placement_runs_the_probe_and_writes_peft_files_and_metrics() {
    let model = common::tiny_hf();
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let dora = job(model.path(), &run, "dominant", Variant::Dora, 3);
    let outcome = jobs::train(&dora, &Device::Cpu, &mut |_| {}).unwrap();
    let dominant = outcome.dominant.clone().expect("the probe ran first");
    assert_eq!(outcome.modules.len(), 1);
    assert_eq!(outcome.modules[0].0.name(), dominant);
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorasweep_adapter.json",
        "metrics.json",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let keys: Vec<String> = tensors(&run).into_keys().collect();
    assert_eq!(keys.len(), 3, "A, B and DoRA's magnitude: {keys:?}");
    assert!(
        keys.iter()
            .all(|k| k.starts_with(&format!("base_model.model.model.{dominant}."))),
        "{keys:?}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["steps"].as_array().unwrap().len(), 3);
    for field in ["trainable_parameters", "tokens", "tokens_per_s", "wall_s"] {
        assert!(
            metrics[field].as_f64().unwrap() > 0.0,
            "metrics.json {field}: {metrics}"
        );
    }
    for step in metrics["steps"].as_array().unwrap() {
        assert!(step["loss"].as_f64().unwrap().is_finite());
    }
    // down_proj of this model is 32 × 48: r·(d_in + d_out) + d_out for DoRA.
    let (d_in, d_out) =
        common::tiny_config(&hf_spec("llama", 3)).module_dims(outcome.modules[0].0.kind);
    assert_eq!(
        outcome.metrics.trainable_parameters,
        4 * (d_in + d_out) + d_out
    );

    // The probe written by the probe job gives the same placement.
    let probe_file = out.path().join("page.json");
    let result = jobs::probe(&dora.model, &dora.data, &dora.probe_settings, &Device::Cpu).unwrap();
    lorasweep_engine::peft::write_json(&probe_file, &result).unwrap();
    assert_eq!(result.dominant, dominant);
    let mut with_probe = job(
        model.path(),
        &out.path().join("budget"),
        "budget_matched:300",
        Variant::Lora,
        1,
    );
    with_probe.probe = Some(probe_file);
    let outcome = jobs::train(&with_probe, &Device::Cpu, &mut |_| {}).unwrap();
    let (module, rank) = outcome.modules[0];
    assert_eq!(module.name(), dominant);
    let (d_in, d_out) = common::tiny_config(&hf_spec("llama", 3)).module_dims(module.kind);
    assert_eq!(rank, (300.0 / (d_in + d_out) as f64).round() as usize);
}

#[test]
fn loraplus_moves_b_ratio_times_further_than_lora() {
    // At init B = 0, so A has no gradient and B's first AdamW step is −lr·sign(g): with the
    // same seed, LoRA+'s B after one step is exactly ratio × LoRA's.
    let model = common::tiny_hf();
    let out = tempfile::tempdir().unwrap();
    let placement = "explicit:layers.0.mlp.down_proj,layers.1.self_attn.q_proj";
    let lora = out.path().join("lora");
    let plus = out.path().join("plus");
    jobs::train(
        &job(model.path(), &lora, placement, Variant::Lora, 1),
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    jobs::train(
        &job(model.path(), &plus, placement, Variant::LoraPlus, 1),
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    let (lora, plus) = (tensors(&lora), tensors(&plus));
    assert_eq!(lora.len(), 4);
    for (name, t) in &lora {
        let other = &plus[name];
        if name.ends_with("lora_A.weight") {
            assert_eq!(common::max_abs_diff(t, other), 0.0, "{name}: A moved");
        } else {
            let scaled = (t * 16.0).unwrap();
            assert!(
                common::max_abs_diff(&scaled, other) < 1e-7,
                "{name}: B is not 16 × LoRA's"
            );
            let biggest = other
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                (biggest - 16e-3).abs() < 1e-6,
                "{name}: B's largest step {biggest}"
            );
        }
    }
}

#[test]
fn a_finished_run_resumes_to_the_same_result() {
    let model = common::tiny_hf();
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let first = jobs::train(
        &job(model.path(), &run, "kind:v_proj", Variant::RsLora, 4),
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    let saved = tensors(&run);
    let mut again = job(model.path(), &run, "kind:v_proj", Variant::RsLora, 4);
    again.resume = true;
    let mut steps_run = 0;
    let second = jobs::train(&again, &Device::Cpu, &mut |_| steps_run += 1).unwrap();
    assert_eq!(steps_run, 0, "a finished run has no step left");
    assert_eq!(second.metrics.resumed_from, Some(4));
    assert_eq!(second.metrics.steps, first.metrics.steps);
    for (name, t) in tensors(&run) {
        assert_eq!(common::max_abs_diff(&t, &saved[&name]), 0.0, "{name}");
    }
}
