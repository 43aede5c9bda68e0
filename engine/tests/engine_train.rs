//! Training on the tiny synthetic model: the loss falls on a memorisable set, `--resume`
//! continues bit for bit, non-finite values stop the run without spoiling the last checkpoint,
//! gradient accumulation equals the big batch, and LoRA+ scales B's step.

mod common;

use std::panic::AssertUnwindSafe;

use candle_core::{Device, Tensor, Var};
use common::{attach, module, synthetic_examples, tiny_model, TinySpec};
use lorasweep_engine::adapter::{Adapter, Variant};
use lorasweep_engine::data::{collate, Example};
use lorasweep_engine::model::{ModuleId, Transformer};
use lorasweep_engine::train::{self, Schedule, StepRecord, TrainError, TrainSettings};

fn settings(steps: usize) -> TrainSettings {
    TrainSettings {
        steps,
        batch_size: 4,
        grad_accum: 1,
        max_len: 64,
        lr: 1e-2,
        schedule: Schedule::Constant,
        warmup_ratio: 0.0,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        seed: 3,
        checkpoint_every: 0,
        ..TrainSettings::default()
    }
}

fn model_with_adapters(arch: &'static str, variant: Variant, modules: &[ModuleId]) -> Transformer {
    let mut model = tiny_model(&TinySpec::new(arch, 21));
    attach(
        &mut model,
        modules,
        &common::adapter_settings(variant, 4, 8.0, 9),
    );
    model
}

/// Every adapter tensor of a model, by name, as f32 vectors.
fn adapter_values(model: &Transformer) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (m, adapter) in model.adapters() {
        for (group, var) in adapter.parameters() {
            let values = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            out.push((format!("{m} {group:?}"), values));
        }
    }
    out
}

fn run(
    model: &Transformer,
    examples: &[Example],
    settings: &TrainSettings,
    out: &std::path::Path,
    resume: bool,
) -> Result<train::TrainMetrics, TrainError> {
    train::train(model, examples, 0, settings, out, resume, &mut |_| {})
}

#[test]
fn loss_falls_on_a_memorisable_set() {
    for arch in ["llama", "qwen2"] {
        let spec = TinySpec::new(arch, 21);
        let all = spec_modules(&spec);
        let model = model_with_adapters(arch, Variant::Lora, &all);
        let examples = synthetic_examples(4, 4, 6, spec.vocab, 5);
        let out = tempfile::tempdir().unwrap();
        let metrics = run(&model, &examples, &settings(40), out.path(), false).unwrap();
        let first = metrics.steps.first().unwrap().loss;
        let last = metrics.steps.last().unwrap().loss;
        assert_eq!(metrics.steps.len(), 40);
        assert!(
            last < 0.3 * first,
            "{arch}: loss went from {first} to {last}, it should memorise 4 examples"
        );
        assert!(metrics.trainable_parameters > 0);
        assert_eq!(
            metrics.tokens,
            metrics.steps.iter().map(|r| r.tokens).sum::<usize>()
        );
    }
}

fn spec_modules(spec: &TinySpec) -> Vec<ModuleId> {
    common::tiny_config(spec).all_modules()
}

/// Settings that exercise every piece of state a checkpoint must carry: warmup and cosine
/// decay, weight decay, clipping, accumulation, and an epoch boundary in the data order.
fn resume_settings() -> TrainSettings {
    TrainSettings {
        steps: 6,
        batch_size: 3,
        grad_accum: 2,
        lr: 5e-3,
        schedule: Schedule::Cosine,
        warmup_ratio: 0.34,
        weight_decay: 0.1,
        max_grad_norm: 0.5,
        checkpoint_every: 3,
        ..settings(6)
    }
}

#[test]
fn resume_continues_bit_for_bit() {
    let modules = [
        module("layers.0.mlp.down_proj"),
        module("layers.1.self_attn.v_proj"),
    ];
    let examples = synthetic_examples(5, 3, 5, 64, 8);
    let s = resume_settings();

    let straight_dir = tempfile::tempdir().unwrap();
    let straight_model = model_with_adapters("qwen2", Variant::Dora, &modules);
    let straight = run(&straight_model, &examples, &s, straight_dir.path(), false).unwrap();

    // The same run, killed after step 4 (the checkpoint holds step 3), then resumed.
    let dir = tempfile::tempdir().unwrap();
    let crashed_model = model_with_adapters("qwen2", Variant::Dora, &modules);
    let crash = std::panic::catch_unwind(AssertUnwindSafe(|| {
        train::train(
            &crashed_model,
            &examples,
            0,
            &s,
            dir.path(),
            false,
            &mut |r| {
                if r.step == 4 {
                    panic!("simulated crash after step 4");
                }
            },
        )
    }));
    assert!(
        crash.is_err(),
        "the simulated crash must interrupt training"
    );
    let resumed_model = model_with_adapters("qwen2", Variant::Dora, &modules);
    let resumed = run(&resumed_model, &examples, &s, dir.path(), true).unwrap();

    assert_eq!(resumed.resumed_from, Some(3));
    let key = |r: &StepRecord| {
        (
            r.step,
            r.loss.to_bits(),
            r.lr.to_bits(),
            r.grad_norm.to_bits(),
            r.tokens,
        )
    };
    let a: Vec<_> = straight.steps.iter().map(key).collect();
    let b: Vec<_> = resumed.steps.iter().map(key).collect();
    assert_eq!(a, b, "loss history differs after resume");
    let a = adapter_values(&straight_model);
    let b = adapter_values(&resumed_model);
    assert_eq!(a.len(), 6, "two DoRA adapters: A, B and magnitude each");
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name} differs after resume");
    }
    // The learning rate really varied (warmup then decay) and clipping was active.
    assert_eq!(straight.steps[0].lr, 0.0);
    assert!(straight.steps.iter().any(|r| r.grad_norm > s.max_grad_norm));
}

#[test]
fn resume_with_other_settings_is_refused() {
    let modules = [module("layers.0.mlp.down_proj")];
    let examples = synthetic_examples(4, 3, 5, 64, 8);
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_adapters("llama", Variant::Lora, &modules);
    run(&model, &examples, &settings(2), dir.path(), false).unwrap();
    let other = TrainSettings {
        lr: 1e-3,
        ..settings(4)
    };
    let model = model_with_adapters("llama", Variant::Lora, &modules);
    let err = run(&model, &examples, &other, dir.path(), true).unwrap_err();
    assert!(
        err.to_string().contains("different training settings"),
        "{err}"
    );
}

fn checkpoint_step(dir: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("checkpoint/state.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["step"].as_u64()
}

fn checkpoint_is_finite(dir: &std::path::Path) -> bool {
    let tensors =
        candle_core::safetensors::load(dir.join("checkpoint/state.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(!tensors.is_empty());
    tensors.values().all(|t| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    })
}

#[test]
fn poisoned_base_weights_stop_at_step_one() {
    let spec = TinySpec::new("llama", 21);
    let mut tensors = common::tiny_tensors(&spec);
    let name = "model.layers.1.mlp.up_proj.weight";
    let poisoned = tensors[name].clone().affine(1.0, f64::NAN).unwrap();
    tensors.insert(name.to_string(), poisoned);
    let mut model = Transformer::new(
        common::tiny_config(&spec),
        tensors,
        candle_core::DType::F32,
        &Device::Cpu,
        std::path::Path::new("<tiny>"),
    )
    .unwrap();
    attach(
        &mut model,
        &[module("layers.0.mlp.down_proj")],
        &common::adapter_settings(Variant::Lora, 4, 8.0, 1),
    );
    let dir = tempfile::tempdir().unwrap();
    let s = TrainSettings {
        checkpoint_every: 1,
        ..settings(3)
    };
    let err = run(
        &model,
        &synthetic_examples(4, 3, 5, 64, 2),
        &s,
        dir.path(),
        false,
    )
    .unwrap_err();
    match &err {
        TrainError::NonFinite { step, .. } => assert_eq!(*step, 1),
        other => panic!("expected a non-finite error, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("step 1") && message.contains("none yet"),
        "{message}"
    );
    assert_eq!(
        checkpoint_step(dir.path()),
        None,
        "no checkpoint may be written"
    );
}

#[test]
fn a_huge_learning_rate_stops_the_run_and_keeps_the_last_good_checkpoint() {
    // Warmup makes step 1's learning rate 0 (a good checkpoint), then 1e300 overflows the
    // adapter on step 2.
    let modules = [module("layers.0.mlp.down_proj")];
    let model = model_with_adapters("llama", Variant::Lora, &modules);
    let dir = tempfile::tempdir().unwrap();
    let s = TrainSettings {
        lr: 1e300,
        warmup_ratio: 0.5,
        checkpoint_every: 1,
        ..settings(6)
    };
    let err = run(
        &model,
        &synthetic_examples(4, 3, 5, 64, 2),
        &s,
        dir.path(),
        false,
    )
    .unwrap_err();
    let TrainError::NonFinite { step, .. } = &err else {
        panic!("expected a non-finite error, got {err}");
    };
    let step = *step as u64;
    let message = err.to_string();
    assert_eq!(step, 2, "{message}");
    assert!(
        message.contains("parameter layers.0.mlp.down_proj.lora_"),
        "{message}"
    );
    assert!(message.contains(&format!("step {step}")), "{message}");
    assert!(message.contains("checkpoint"), "{message}");
    let kept = checkpoint_step(dir.path()).expect("the step-1 checkpoint is kept");
    assert!(
        kept < step,
        "checkpoint of step {kept} written at or after the failure at {step}"
    );
    assert!(
        checkpoint_is_finite(dir.path()),
        "the kept checkpoint holds non-finite values"
    );
}

#[test]
fn parameters_poisoned_mid_run_never_reach_a_checkpoint() {
    let modules = [module("layers.1.mlp.gate_proj")];
    let model = model_with_adapters("qwen2", Variant::Lora, &modules);
    let a: Var = model.adapters()[0].1.a().clone();
    let dir = tempfile::tempdir().unwrap();
    let s = TrainSettings {
        checkpoint_every: 1,
        ..settings(5)
    };
    let err = train::train(
        &model,
        &synthetic_examples(4, 3, 5, 64, 2),
        0,
        &s,
        dir.path(),
        false,
        &mut |r| {
            if r.step == 3 {
                let nan = a.as_tensor().affine(0.0, f64::NAN).unwrap();
                a.set(&nan).unwrap();
            }
        },
    )
    .unwrap_err();
    let TrainError::NonFinite { step, .. } = &err else {
        panic!("expected a non-finite error, got {err}");
    };
    // The observer of step 3 poisons A. Whether it runs before step 3's checkpoint (the
    // checkpoint must then refuse the NaN) or after it (step 4's loss is then NaN), the run
    // stops at the first step that sees the NaN and the checkpoint kept is clean.
    let step = *step as u64;
    assert!(step == 3 || step == 4, "{err}");
    let kept = checkpoint_step(dir.path()).expect("earlier checkpoints are kept");
    assert!(
        (2..step).contains(&kept),
        "checkpoint of step {kept}, failure at {step}: {err}"
    );
    assert!(checkpoint_is_finite(dir.path()), "{err}");
}

/// One optimizer step; returns the step record and the adapter values after it.
fn one_step(
    batch_size: usize,
    grad_accum: usize,
    examples: &[Example],
) -> (StepRecord, Vec<(String, Vec<f32>)>) {
    let modules = [
        module("layers.0.self_attn.q_proj"),
        module("layers.1.mlp.down_proj"),
    ];
    let model = model_with_adapters("llama", Variant::Lora, &modules);
    // B ≠ 0 so that both A and B have gradients.
    for (_, adapter) in model.adapters() {
        let shape = adapter.b().as_tensor().shape().clone();
        let values = Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap() * 0.05;
        adapter.b().set(&values.unwrap()).unwrap();
    }
    let s = TrainSettings {
        batch_size,
        grad_accum,
        lr: 1e-3,
        ..settings(1)
    };
    let dir = tempfile::tempdir().unwrap();
    let metrics = run(&model, examples, &s, dir.path(), false).unwrap();
    (metrics.steps[0].clone(), adapter_values(&model))
}

fn assert_same_step(
    a: &(StepRecord, Vec<(String, Vec<f32>)>),
    b: &(StepRecord, Vec<(String, Vec<f32>)>),
) {
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-12);
    assert!(
        rel(a.0.loss, b.0.loss) < 1e-5,
        "loss {} vs {}",
        a.0.loss,
        b.0.loss
    );
    assert!(
        rel(a.0.grad_norm, b.0.grad_norm) < 1e-4,
        "grad norm {} vs {}",
        a.0.grad_norm,
        b.0.grad_norm
    );
    assert_eq!(a.0.tokens, b.0.tokens);
    for ((name, x), (_, y)) in a.1.iter().zip(&b.1) {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: parameters differ by {worst}");
    }
}

#[test]
fn accumulation_equals_the_big_batch_with_equal_response_counts() {
    // Same number of response tokens in every example, different prompt lengths (padding).
    let examples = synthetic_examples(4, 3, 5, 64, 13);
    let big = one_step(4, 1, &examples);
    let accumulated = one_step(2, 2, &examples);
    assert_same_step(&big, &accumulated);
    let single = one_step(1, 4, &examples);
    assert_same_step(&big, &single);
}

#[test]
fn accumulation_equals_the_big_batch_with_unequal_response_counts() {
    // Response lengths 2, 3, 7, 9: a mean of per-micro-batch means would weight the short
    // responses' tokens more than the big batch does.
    let mut examples = Vec::new();
    for (i, response_len) in [2, 3, 7, 9].into_iter().enumerate() {
        examples.extend(synthetic_examples(1, 4, response_len, 64, 30 + i as u64));
    }
    let big = one_step(4, 1, &examples);
    let accumulated = one_step(2, 2, &examples);
    assert_same_step(&big, &accumulated);
}

/// `∂L/∂A`, `∂L/∂B` of every adapter on all `examples` as one batch, computed directly.
fn gradients(model: &Transformer, examples: &[Example]) -> Vec<(Tensor, Tensor)> {
    let batch = collate(examples, 0);
    let shape = (batch.batch, batch.seq_len);
    let ids = Tensor::from_slice(&batch.ids, shape, &Device::Cpu).unwrap();
    let targets = Tensor::from_slice(&batch.targets, shape, &Device::Cpu).unwrap();
    let weights = Tensor::from_slice(&batch.weights, shape, &Device::Cpu).unwrap();
    let grads = model
        .loss(&ids, &targets, &weights)
        .unwrap()
        .backward()
        .unwrap();
    model
        .adapters()
        .iter()
        .map(|(_, a)| {
            (
                grads.get(a.a().as_tensor()).unwrap().clone(),
                grads.get(a.b().as_tensor()).unwrap().clone(),
            )
        })
        .collect()
}

/// A model with one LoRA+ adapter whose A and B are both random (so both get gradients).
fn loraplus_model() -> Transformer {
    let mut model = tiny_model(&TinySpec::new("llama", 21));
    let m = module("layers.1.mlp.down_proj");
    let (d_in, d_out) = model.config().module_dims(m.kind);
    let a = Tensor::randn(0f32, 0.2, (4, d_in), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 0.2, (d_out, 4), &Device::Cpu).unwrap();
    let adapter = Adapter::from_parts(Variant::LoraPlus, 2.0, a, b, None).unwrap();
    model.projection_mut(m).attach(adapter, None);
    model
}

#[test]
fn loraplus_gives_b_ratio_times_the_learning_rate() {
    let examples = synthetic_examples(4, 3, 5, 64, 17);
    let model = loraplus_model();
    let before: Vec<(Tensor, Tensor)> = model
        .adapters()
        .iter()
        .map(|(_, a)| {
            (
                a.a().as_tensor().copy().unwrap(),
                a.b().as_tensor().copy().unwrap(),
            )
        })
        .collect();
    let grads = gradients(&model, &examples);
    let (lr, ratio, eps) = (1e-3, 16.0, 1e-8);
    let s = TrainSettings {
        lr,
        b_lr_ratio: ratio,
        eps,
        ..settings(1)
    };
    let dir = tempfile::tempdir().unwrap();
    run(&model, &examples, &s, dir.path(), false).unwrap();
    // AdamW's first step with bias correction: p ← p − lr · g / (|g| + ε).
    let expected_step =
        |g: &Tensor, rate: f64| (g.clone() / (g.abs().unwrap() + eps).unwrap()).unwrap() * (-rate);
    let (_, adapter) = &model.adapters()[0];
    let (a0, b0) = &before[0];
    let (ga, gb) = &grads[0];
    let step_a = (adapter.a().as_tensor() - a0).unwrap();
    let step_b = (adapter.b().as_tensor() - b0).unwrap();
    let want_a = expected_step(ga, lr).unwrap();
    let want_b = expected_step(gb, lr * ratio).unwrap();
    assert!(
        common::max_abs_diff(&step_a, &want_a) < 1e-3 * lr as f32,
        "A's step is not lr·sign(g)"
    );
    assert!(
        common::max_abs_diff(&step_b, &want_b) < 1e-3 * (lr * ratio) as f32,
        "B's step is not ratio·lr·sign(g)"
    );
    // And the steps really are of those sizes (not all gradients near zero).
    let biggest = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!((biggest(&step_a) - lr as f32).abs() < 1e-6 * lr as f32 + 1e-9);
    assert!((biggest(&step_b) - (lr * ratio) as f32).abs() < 1e-5 * (lr * ratio) as f32);
}
