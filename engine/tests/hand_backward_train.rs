//! Training through the fused ops and the hand-written backward — the CUDA path, forced on
//! the CPU here — follows candle's composed ops with autograd: the same loss curve and
//! adapters, for the variants the hand-written backward covers, for DoRA (fused ops under
//! autograd), with gradient accumulation, and across two data-parallel thread ranks.

use std::sync::Arc;
use std::thread;

use candle_core::Device;
use lorasweep_engine::adapter::Variant;
use lorasweep_engine::model::Transformer;
use lorasweep_engine::parallel::{GradReducer, ThreadReducer};
use lorasweep_engine::train::{self, TrainMetrics};

mod parallel_common;
use parallel_common::{adapter_values, examples, parameter_gaps, settings, PAD};

fn model(variant: Variant, fused: bool) -> Transformer {
    let mut model = parallel_common::model(variant, &Device::Cpu);
    model.set_fused_kernels(fused);
    model
}

fn train_one(variant: Variant, fused: bool) -> (TrainMetrics, Vec<f32>) {
    let model = model(variant, fused);
    assert_eq!(
        model.hand_backward(),
        fused && variant != Variant::Dora,
        "{variant:?}"
    );
    parallel_common::train_alone(&model)
}

fn assert_follows(
    name: &str,
    ours: &(TrainMetrics, Vec<f32>),
    reference: &(TrainMetrics, Vec<f32>),
) {
    parallel_common::assert_steps_follow(name, &ours.0, &reference.0, "autograd", 1e-4, 1e-3);
    // f32 rounding differs between the fused and the composed ops; AdamW turns a near-zero
    // gradient's rounding into a visible step for the odd component (as across ranks).
    let (largest, p99) = parameter_gaps(&ours.1, &reference.1);
    assert!(
        largest < 1e-2 && p99 < 1e-4,
        "{name}: adapters differ by {largest} (99th percentile {p99})"
    );
}

#[test]
fn fused_training_follows_autograd_for_every_variant() {
    for variant in [
        Variant::Lora,
        Variant::RsLora,
        Variant::Pissa,
        Variant::LoraPlus,
        Variant::Dora,
    ] {
        let reference = train_one(variant, false);
        let fused = train_one(variant, true);
        assert_follows(&format!("{variant:?}"), &fused, &reference);
        // The adapters moved, so the comparison means something.
        let (moved, _) = parameter_gaps(&adapter_values(&model(variant, false)), &reference.1);
        assert!(moved > 1e-2, "{variant:?}: {moved}");
    }
}

#[test]
fn two_ranks_with_the_hand_written_backward_follow_one_autograd_process() {
    let reference = train_one(Variant::Lora, false);
    let examples = Arc::new(examples());
    let handles: Vec<_> = ThreadReducer::group(2)
        .into_iter()
        .map(|reducer| {
            let examples = examples.clone();
            thread::spawn(move || {
                let model = model(Variant::Lora, true);
                assert!(model.hand_backward());
                let out = tempfile::tempdir().unwrap();
                let metrics = train::train_with(
                    &model,
                    &examples,
                    PAD,
                    &settings(),
                    out.path(),
                    false,
                    &mut |_| {},
                    Some(&reducer as &dyn GradReducer),
                )
                .unwrap();
                (metrics, adapter_values(&model))
            })
        })
        .collect();
    for (rank, handle) in handles.into_iter().enumerate() {
        let run = handle.join().expect("the rank finished");
        assert_follows(&format!("rank {rank}"), &run, &reference);
    }
}
