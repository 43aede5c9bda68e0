//! Adapters saved in PEFT's layout load back onto a fresh copy of the base model with the
//! trained model's logits, for every variant (PiSSA/MiLoRA converted to rank 2r on the
//! original weights); key names, shapes and the config are exactly PEFT's; merged equals
//! unmerged.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{attach, module, probe_logits, synthetic_examples, tiny_model, TinySpec};
use lorasweep_engine::adapter::Variant;
use lorasweep_engine::model::{ModuleId, ModuleKind, Transformer};
use lorasweep_engine::peft::{self, AdapterRecord};
use lorasweep_engine::train::{self, Schedule, TrainSettings};

const RANK: usize = 4;
const ALPHA: f64 = 8.0;

/// Trains adapters on `modules` for a few steps so that B, A and DoRA's magnitude all move.
fn trained(
    spec: &TinySpec,
    variant: Variant,
    modules: &[ModuleId],
) -> (
    Transformer,
    std::collections::HashMap<ModuleId, (candle_core::Tensor, candle_core::Tensor)>,
) {
    let mut model = tiny_model(spec);
    let initial = attach(
        &mut model,
        modules,
        &common::adapter_settings(variant, RANK, ALPHA, 4),
    );
    let settings = TrainSettings {
        steps: 4,
        batch_size: 4,
        lr: 2e-2,
        schedule: Schedule::Constant,
        warmup_ratio: 0.0,
        max_grad_norm: 0.0,
        b_lr_ratio: if variant == Variant::LoraPlus {
            4.0
        } else {
            1.0
        },
        ..TrainSettings::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let examples = synthetic_examples(4, 3, 5, spec.vocab, 6);
    train::train(
        &model,
        &examples,
        0,
        &settings,
        dir.path(),
        false,
        &mut |_| {},
    )
    .unwrap();
    (model, initial)
}

fn record(variant: Variant, modules: &[ModuleId]) -> AdapterRecord {
    AdapterRecord {
        base_model: "tiny".into(),
        variant,
        placement: "explicit".into(),
        modules: modules.iter().map(|m| (m.name(), RANK)).collect(),
        alpha: ALPHA,
        seed: 4,
        trainable_parameters: 0,
    }
}

/// Which modules a PEFT `LoraConfig` with this `target_modules` / `layers_to_transform`
/// adapts, by PEFT's rules: a string is a full-match regex on the module path, a list
/// matches the last path component, and `layers_to_transform` filters by layer index.
fn peft_targets(config: &serde_json::Value, all: &[ModuleId]) -> BTreeSet<ModuleId> {
    let layers: Option<Vec<u64>> = config["layers_to_transform"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap()).collect());
    all.iter()
        .copied()
        .filter(|m| {
            let path = format!("model.{}", m.name());
            let targeted = match &config["target_modules"] {
                serde_json::Value::String(pattern) => {
                    regex::Regex::new(&format!("^(?:{pattern})$"))
                        .unwrap()
                        .is_match(&path)
                }
                serde_json::Value::Array(names) => names
                    .iter()
                    .any(|n| path.ends_with(&format!(".{}", n.as_str().unwrap()))),
                other => panic!("target_modules is {other}"),
            };
            targeted
                && layers
                    .as_ref()
                    .is_none_or(|l| l.contains(&(m.layer as u64)))
        })
        .collect()
}

fn check_round_trip(arch: &'static str, variant: Variant, modules: &[ModuleId]) {
    let spec = TinySpec::new(arch, 33);
    let (model, initial) = trained(&spec, variant, modules);
    let want = probe_logits(&model);
    let base = probe_logits(&tiny_model(&spec));
    assert!(
        common::max_abs_diff(&want, &base) > 1e-3,
        "{arch}/{variant:?}: training did not move the logits"
    );
    let dir = tempfile::tempdir().unwrap();
    peft::save(dir.path(), &model, &initial, &record(variant, modules)).unwrap();

    // Keys and shapes, exactly.
    let converted = matches!(variant, Variant::Pissa | Variant::Milora);
    let saved_rank = if converted { 2 * RANK } else { RANK };
    let tensors = candle_core::safetensors::load(
        dir.path().join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut want_keys = BTreeMap::new();
    let config = common::tiny_config(&spec);
    for m in modules {
        let (d_in, d_out) = config.module_dims(m.kind);
        let prefix = format!(
            "base_model.model.model.layers.{}.{}.{}",
            m.layer,
            m.kind.block(),
            m.kind.name()
        );
        want_keys.insert(format!("{prefix}.lora_A.weight"), vec![saved_rank, d_in]);
        want_keys.insert(format!("{prefix}.lora_B.weight"), vec![d_out, saved_rank]);
        if variant == Variant::Dora {
            want_keys.insert(format!("{prefix}.lora_magnitude_vector"), vec![d_out]);
        }
    }
    let got_keys: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    assert_eq!(
        got_keys, want_keys,
        "{arch}/{variant:?}: keys or shapes differ from PEFT's"
    );

    // The config, read as PEFT reads it.
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], saved_rank);
    assert_eq!(json["use_dora"], variant == Variant::Dora);
    assert_eq!(json["use_rslora"], variant == Variant::RsLora);
    let trained_scale = model.adapters()[0].1.scale();
    let alpha = json["lora_alpha"].as_f64().unwrap();
    let peft_scale = if variant == Variant::RsLora {
        alpha / (saved_rank as f64).sqrt()
    } else {
        alpha / saved_rank as f64
    };
    assert!(
        (peft_scale - trained_scale).abs() < 1e-12,
        "{arch}/{variant:?}: PEFT's scale {peft_scale} ≠ trained {trained_scale}"
    );
    let targets = peft_targets(&json, &config.all_modules());
    let wanted: BTreeSet<ModuleId> = modules.iter().copied().collect();
    assert_eq!(
        targets, wanted,
        "{arch}/{variant:?}: PEFT would adapt other modules: {json}"
    );
    assert!(dir.path().join("lorasweep_adapter.json").is_file());

    // Loaded onto a fresh copy of the original base model: the trained model's logits.
    let mut fresh = tiny_model(&spec);
    let attached = peft::load(dir.path(), &mut fresh).unwrap();
    assert_eq!(attached.into_iter().collect::<BTreeSet<_>>(), wanted);
    let loaded = probe_logits(&fresh);
    let diff = common::max_abs_diff(&loaded, &want);
    assert!(
        diff < 1e-4,
        "{arch}/{variant:?}: loaded adapter's logits differ by {diff}"
    );

    // Merged into the weights: the same logits, with no adapter left.
    fresh.merge_adapters().unwrap();
    assert!(fresh.adapters().is_empty());
    let merged = probe_logits(&fresh);
    let diff = common::max_abs_diff(&merged, &want);
    assert!(
        diff < 1e-4,
        "{arch}/{variant:?}: merged logits differ by {diff}"
    );
}

#[test]
fn every_variant_round_trips_through_the_peft_layout() {
    // Not a layers × kinds product: saved as a regex of module paths.
    let modules = [
        module("layers.0.self_attn.q_proj"),
        module("layers.1.self_attn.v_proj"),
        module("layers.1.mlp.down_proj"),
    ];
    for variant in Variant::ALL {
        check_round_trip("llama", variant, &modules);
    }
    for variant in [Variant::Lora, Variant::Dora, Variant::Pissa] {
        check_round_trip("qwen2", variant, &modules);
    }
}

#[test]
fn placements_that_are_products_use_target_modules_and_layers_to_transform() {
    // One kind in every layer: target_modules ["down_proj"], no layer filter.
    let every_layer: Vec<ModuleId> = (0..2)
        .map(|layer| ModuleId {
            layer,
            kind: ModuleKind::DownProj,
        })
        .collect();
    check_round_trip("llama", Variant::Lora, &every_layer);
    // Two kinds in one layer of two: layers_to_transform [1].
    let one_layer = [
        module("layers.1.mlp.up_proj"),
        module("layers.1.mlp.down_proj"),
    ];
    check_round_trip("qwen2", Variant::RsLora, &one_layer);
    // A single module (DomLoRA), the most common case.
    check_round_trip(
        "llama",
        Variant::Milora,
        &[module("layers.0.mlp.down_proj")],
    );
}

#[test]
fn merging_the_trained_model_keeps_its_logits() {
    for variant in Variant::ALL {
        let spec = TinySpec::new("qwen2", 8);
        let all = common::tiny_config(&spec).all_modules();
        let (mut model, _) = trained(&spec, variant, &all);
        let unmerged = probe_logits(&model);
        model.merge_adapters().unwrap();
        let diff = common::max_abs_diff(&probe_logits(&model), &unmerged);
        assert!(diff < 1e-4, "{variant:?}: merged logits differ by {diff}");
    }
}

#[test]
fn loading_an_adapter_for_another_model_is_a_clear_error() {
    let spec = TinySpec::new("llama", 33);
    let modules = [module("layers.1.mlp.down_proj")];
    let (model, initial) = trained(&spec, Variant::Lora, &modules);
    let dir = tempfile::tempdir().unwrap();
    peft::save(
        dir.path(),
        &model,
        &initial,
        &record(Variant::Lora, &modules),
    )
    .unwrap();
    // A wider model: the shapes do not fit.
    let mut wide = tiny_model(&TinySpec {
        hidden: 48,
        ..TinySpec::new("llama", 1)
    });
    let err = peft::load(dir.path(), &mut wide).unwrap_err().to_string();
    assert!(
        err.contains("layers.1.mlp.down_proj") && err.contains("do not fit"),
        "{err}"
    );
    // A shallower model: the layer does not exist.
    let mut shallow = tiny_model(&TinySpec {
        layers: 1,
        ..TinySpec::new("llama", 1)
    });
    let err = peft::load(dir.path(), &mut shallow)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the model's 1 layers"), "{err}");
    // No adapter there at all.
    let empty = tempfile::tempdir().unwrap();
    let err = peft::load(empty.path(), &mut tiny_model(&spec))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
}
