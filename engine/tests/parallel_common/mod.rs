//! The tiny model, data and settings shared by the data-parallel tests, and ways to compare
//! runs.
#![allow(dead_code)]

use candle_core::{DType, Device};
use lorasweep_engine::adapter::{AInit, Adapter, AdapterSettings, Variant};
use lorasweep_engine::bench;
use lorasweep_engine::data::Example;
use lorasweep_engine::model::Transformer;
use lorasweep_engine::train::{self, TrainMetrics, TrainSettings};
use rand::{Rng, SeedableRng};

/// The pad id of the synthetic data.
pub const PAD: u32 = 0;

/// The tiny geometry with random weights and an adapter on every projection.
pub fn model(variant: Variant, device: &Device) -> Transformer {
    let config = bench::geometry("tiny").unwrap();
    let mut model = bench::random_model(&config, DType::F32, device, 11).unwrap();
    let settings = AdapterSettings {
        variant,
        rank: 4,
        alpha: 8.0,
        a_init: AInit::Kaiming,
        seed: 5,
    };
    for module in config.all_modules() {
        let weight = model.projection(module).weight().clone();
        let (adapter, residual) = Adapter::init(module, &weight, 4, &settings).unwrap();
        model.projection_mut(module).attach(adapter, residual);
    }
    model
}

/// Conversations of 6–24 random tokens, each with a prompt then a response.
pub fn examples() -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    (0..23)
        .map(|_| {
            let len = rng.random_range(6..25);
            let prompt = rng.random_range(2..len - 1);
            Example {
                tokens: (0..len).map(|_| rng.random_range(1..512)).collect(),
                response: (0..len).map(|i| i >= prompt).collect(),
            }
        })
        .collect()
}

/// Ten steps of two accumulated micro-batches of five rows, checkpoints every four.
pub fn settings() -> TrainSettings {
    TrainSettings {
        steps: 10,
        // Divisible by neither 2 nor 3: shards differ in size and in response tokens.
        batch_size: 5,
        grad_accum: 2,
        max_len: 32,
        lr: 1e-2,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        seed: 9,
        checkpoint_every: 4,
        ..Default::default()
    }
}

/// `model` trained alone (no reducer) on [`examples`] with [`settings`], in a scratch folder:
/// its metrics and its adapters afterwards ([`adapter_values`]).
pub fn train_alone(model: &Transformer) -> (TrainMetrics, Vec<f32>) {
    let out = tempfile::tempdir().unwrap();
    let metrics = train::train(
        model,
        &examples(),
        PAD,
        &settings(),
        out.path(),
        false,
        &mut |_| {},
    )
    .unwrap();
    (metrics, adapter_values(model))
}

/// Every adapter parameter, flattened, in layer order.
pub fn adapter_values(model: &Transformer) -> Vec<f32> {
    let mut values = Vec::new();
    for (_, adapter) in model.adapters() {
        for (_, var) in adapter.parameters() {
            values.extend(
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
    }
    values
}

/// `|a − b| / |b|`.
pub fn relative_gap(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Asserts that `ours` took as many steps as `reference` and followed it step by step: loss
/// within `loss_tolerance` and gradient norm within `grad_tolerance` of the reference's,
/// relatively. `name` and `against` (the reference's name) go into the failure message.
pub fn assert_steps_follow(
    name: &str,
    ours: &TrainMetrics,
    reference: &TrainMetrics,
    against: &str,
    loss_tolerance: f64,
    grad_tolerance: f64,
) {
    assert_eq!(ours.steps.len(), reference.steps.len(), "{name}");
    for (a, b) in ours.steps.iter().zip(&reference.steps) {
        assert!(
            relative_gap(a.loss, b.loss) < loss_tolerance,
            "{name}, step {}: loss {} vs {against} {}",
            a.step,
            a.loss,
            b.loss
        );
        assert!(
            relative_gap(a.grad_norm, b.grad_norm) < grad_tolerance,
            "{name}, step {}: gradient norm {} vs {against} {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
    }
}

/// Element-wise gaps between two parameter vectors, relative to the largest magnitude in
/// `b`: (the largest gap, the 99th percentile).
pub fn parameter_gaps(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut gaps: Vec<f32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .collect();
    gaps.sort_by(f32::total_cmp);
    (gaps[gaps.len() - 1], gaps[gaps.len() * 99 / 100])
}
