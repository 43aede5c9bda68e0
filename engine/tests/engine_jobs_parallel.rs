//! The train job data-parallel (`jobs::train_ranks`, what a worker runs for a job leased
//! several slots) on a tiny Hugging Face directory, its ranks as CPU threads: 2 ranks follow
//! the loss curve of one process with the same global batch, only rank 0 writes files, a run
//! stopped at a checkpoint resumes from it, and a rank that fails fails the job promptly with
//! its own error.

mod common;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use lorasweep_engine::adapter::{AInit, AdapterSettings, Variant};
use lorasweep_engine::jobs::{self, DataSource, JobError, TrainJob};
use lorasweep_engine::probe::ProbeSettings;
use lorasweep_engine::train::{Schedule, TrainError, TrainSettings};

fn job(model: &Path, out: &Path) -> TrainJob {
    TrainJob {
        model: model.to_str().unwrap().to_string(),
        data: DataSource::Jsonl(common::fixture("engine/chat.jsonl")),
        placement: lorasweep_engine::placement::Placement::All,
        probe: None,
        probe_settings: ProbeSettings::default(),
        adapter: AdapterSettings {
            variant: Variant::Lora,
            rank: 4,
            alpha: 8.0,
            a_init: AInit::Kaiming,
            seed: 5,
        },
        loraplus_ratio: 16.0,
        train: TrainSettings {
            steps: 4,
            batch_size: 4,
            max_len: 64,
            lr: 1e-2,
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

fn relative_gap(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn losses(metrics: &lorasweep_engine::train::TrainMetrics) -> Vec<f64> {
    metrics.steps.iter().map(|r| r.loss).collect()
}

fn assert_same_curve(ours: &[f64], theirs: &[f64]) {
    assert_eq!(ours.len(), theirs.len());
    for (step, (a, b)) in ours.iter().zip(theirs).enumerate() {
        // As in the engine's equivalence test: shard sums round differently from one sum.
        assert!(
            relative_gap(*a, *b) < 1e-5,
            "step {}: loss {a} with 2 ranks vs {b} in one process",
            step + 1
        );
    }
}

/// The job trained in one process, into `out/single`: the reference curve.
fn single_process(model: &Path, out: &Path) -> jobs::TrainOutcome {
    jobs::train(&job(model, &out.join("single")), &Device::Cpu, &mut |_| {}).unwrap()
}

fn two_cpu_ranks() -> Vec<jobs::LocalRank> {
    jobs::local_world(vec![Device::Cpu, Device::Cpu]).unwrap()
}

#[test]
fn two_ranks_follow_the_single_process_curve_and_only_rank_zero_writes() {
    let model = common::tiny_hf();
    let out = tempfile::tempdir().unwrap();
    let single = single_process(model.path(), out.path());
    let seen = AtomicUsize::new(0);
    let parallel_out = out.path().join("parallel");
    let parallel = jobs::train_ranks(
        &job(model.path(), &parallel_out),
        2,
        two_cpu_ranks(),
        &|rank, _| {
            seen.fetch_add(1 << (8 * rank), Ordering::SeqCst);
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    // Every rank saw every step.
    assert_eq!(seen.load(Ordering::SeqCst), 4 + (4 << 8));
    assert_same_curve(&losses(&parallel.metrics), &losses(&single.metrics));
    let moved = relative_gap(single.metrics.steps[3].loss, single.metrics.steps[0].loss);
    assert!(moved > 1e-3, "training moved the loss: {moved}");
    assert_eq!(
        parallel.metrics.trainable_parameters,
        single.metrics.trainable_parameters
    );
    assert_eq!(parallel.modules, single.modules);
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
        "checkpoint/state.json",
    ] {
        assert!(parallel_out.join(name).is_file(), "{name} missing");
    }
    // The adapter rank 0 saved is the single-process one, up to the rounding of shard sums.
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
    };
    let (ours, theirs) = (load(&parallel_out), load(&out.path().join("single")));
    assert_eq!(ours.len(), theirs.len());
    for (name, tensor) in &theirs {
        let gap = (ours[name].clone() - tensor)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = tensor
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gap <= 1e-3 * scale.max(1e-6), "{name}: {gap} of {scale}");
    }
}

#[test]
fn a_stopped_parallel_run_resumes_from_rank_zero_s_checkpoint() {
    let model = common::tiny_hf();
    let out = tempfile::tempdir().unwrap();
    let single = single_process(model.path(), out.path());
    let run = out.path().join("run");
    let stopped = jobs::train_ranks(&job(model.path(), &run), 2, two_cpu_ranks(), &|_, r| {
        if r.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(
        matches!(
            stopped,
            Err(JobError::Train(TrainError::Stopped { step: 2 }))
        ),
        "{stopped:?}"
    );
    assert!(run.join("checkpoint/state.json").is_file());
    let mut again = job(model.path(), &run);
    again.resume = true;
    let resumed = jobs::train_ranks(
        &again,
        2,
        two_cpu_ranks(),
        &|_, _| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(resumed.metrics.resumed_from, Some(2));
    assert_same_curve(&losses(&resumed.metrics), &losses(&single.metrics));
}

#[test]
fn a_failing_rank_fails_the_job_promptly_with_its_own_error() {
    let model = common::tiny_hf();
    let out = tempfile::tempdir().unwrap();
    let mut long = job(model.path(), out.path());
    long.train.steps = 10_000;
    long.train.checkpoint_every = 0;
    let started = Instant::now();
    let failed = jobs::train_ranks(&long, 2, two_cpu_ranks(), &|rank, record| {
        if rank == 1 && record.step == 2 {
            panic!("rank 1 fails at step 2 (on purpose)");
        }
        ControlFlow::Continue(())
    });
    let error = failed.expect_err("a rank failed");
    // The cause, not rank 0's "the group failed" echo.
    assert!(
        error
            .to_string()
            .contains("rank 1 panicked: rank 1 fails at step 2"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // Rank 0 stopped at the next collective: no final adapter was written.
    assert!(!out.path().join("adapter_model.safetensors").exists());
}

#[test]
fn ranks_outside_the_world_are_refused() {
    let model = common::tiny_hf();
    let out = tempfile::tempdir().unwrap();
    let error = jobs::train_ranks(
        &job(model.path(), out.path()),
        1,
        two_cpu_ranks(),
        &|_, _| ControlFlow::Continue(()),
    )
    .expect_err("rank 1 of a world of 1");
    assert!(
        error.to_string().contains("outside a world of 1"),
        "{error}"
    );
}
