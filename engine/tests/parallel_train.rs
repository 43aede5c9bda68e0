//! Data-parallel training over thread ranks on a tiny random model: the loss curve and the
//! adapters of 2 and 3 ranks equal those of one process with the same global batch; a rank
//! that fails mid-run makes every rank fail promptly; a group resumes from rank 0's
//! checkpoint.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use candle_core::Device;
use lorasweep_engine::adapter::Variant;
use lorasweep_engine::data::Example;
use lorasweep_engine::model::Transformer;
use lorasweep_engine::parallel::{GradReducer, ThreadReducer};
use lorasweep_engine::train::{self, TrainError, TrainMetrics, TrainSettings};

mod parallel_common;
use parallel_common::{adapter_values, examples, parameter_gaps, relative_gap, settings, PAD};

/// Longest a test waits for a rank before calling it hung.
const HANG: Duration = Duration::from_secs(60);

/// The tiny test model on the CPU.
fn model(variant: Variant) -> Transformer {
    parallel_common::model(variant, &Device::Cpu)
}

struct RankRun {
    metrics: Result<TrainMetrics, TrainError>,
    adapters: Vec<f32>,
}

/// What each rank may do differently.
#[derive(Clone)]
struct Plan {
    variant: Variant,
    settings: TrainSettings,
    /// Rank 0's output directory; other ranks get their own empty one.
    out: PathBuf,
    resume: bool,
    /// `(rank, step)`: that rank's thread panics when that step ends.
    crash: Option<(usize, usize)>,
    /// `(rank, settings)`: that rank trains with other settings.
    odd_settings: Option<(usize, TrainSettings)>,
    examples: Vec<Example>,
}

impl Plan {
    fn new(variant: Variant, out: &Path) -> Self {
        Self {
            variant,
            settings: settings(),
            out: out.to_path_buf(),
            resume: false,
            crash: None,
            odd_settings: None,
            examples: examples(),
        }
    }
}

/// Runs one training per rank of `group`, each on its own thread with its own model; returns
/// them in rank order (`None` for a rank whose thread panicked). Fails the test if a rank
/// does not come back within [`HANG`].
fn run_group(group: Vec<ThreadReducer>, plan: &Plan) -> Vec<Option<RankRun>> {
    let world = group.len();
    let examples = Arc::new(plan.examples.clone());
    let (sender, receiver) = mpsc::channel();
    let mut threads = Vec::new();
    for reducer in group {
        let sender = sender.clone();
        let examples = examples.clone();
        let plan = plan.clone();
        threads.push(thread::spawn(move || {
            let rank = reducer.rank();
            let scratch = tempfile::tempdir().unwrap();
            let out = if rank == 0 {
                plan.out.clone()
            } else {
                scratch.path().to_path_buf()
            };
            let settings = match &plan.odd_settings {
                Some((odd, settings)) if *odd == rank => settings.clone(),
                _ => plan.settings.clone(),
            };
            let model = model(plan.variant);
            let mut on_step = |record: &train::StepRecord| {
                if plan.crash == Some((rank, record.step)) {
                    panic!("rank {rank} crashes at step {} (on purpose)", record.step);
                }
            };
            let metrics = train::train_with(
                &model,
                &examples,
                PAD,
                &settings,
                &out,
                plan.resume,
                &mut on_step,
                Some(&reducer as &dyn GradReducer),
            );
            drop(reducer);
            let adapters = adapter_values(&model);
            let _ = sender.send((rank, RankRun { metrics, adapters }));
        }));
    }
    drop(sender);
    let mut runs: Vec<Option<RankRun>> = (0..world).map(|_| None).collect();
    // Ends when every thread has sent its result or died (a panicking rank sends nothing).
    loop {
        match receiver.recv_timeout(HANG) {
            Ok((rank, run)) => runs[rank] = Some(run),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("a rank hung"),
        }
    }
    for thread in threads {
        let _ = thread.join();
    }
    runs
}

fn single_process(variant: Variant) -> (TrainMetrics, Vec<f32>) {
    parallel_common::train_alone(&model(variant))
}

fn assert_matches_single_process(
    runs: &[Option<RankRun>],
    single: &(TrainMetrics, Vec<f32>),
    variant: Variant,
) {
    let (expected, expected_adapters) = single;
    let first = runs[0].as_ref().unwrap();
    for run in runs.iter().map(|r| r.as_ref().unwrap()) {
        let metrics = run.metrics.as_ref().unwrap();
        parallel_common::assert_steps_follow(
            &format!("{variant:?}"),
            metrics,
            expected,
            "single-process",
            1e-5,
            1e-4,
        );
        for (ours, theirs) in metrics.steps.iter().zip(&expected.steps) {
            // A resumed history went through JSON: equal up to the last bit.
            assert!(relative_gap(ours.lr, theirs.lr) < 1e-12);
            assert_eq!(ours.tokens, theirs.tokens);
        }
        // Ranks apply the same step to the same reduced numbers: bit-identical adapters.
        assert_eq!(run.adapters, first.adapters);
        assert_eq!(metrics.trainable_parameters, expected.trainable_parameters);
    }
    // Sums over shards round differently from one sum over the batch (gradients agree to
    // ~1e-7 relative). AdamW divides each component by its own RMS, so a component whose
    // gradient is nearly zero turns that rounding into a visible step: almost every
    // parameter agrees to 1e-5 of the largest, the odd one to 1e-3.
    let (largest, p99) = parameter_gaps(&first.adapters, expected_adapters);
    assert!(
        largest < 1e-3 && p99 < 1e-5,
        "adapters differ from single-process by {largest} (99th percentile {p99})"
    );
    // Training moved the adapters (B starts at zero), so the comparison means something.
    let (moved, _) = parameter_gaps(&adapter_values(&model(variant)), expected_adapters);
    assert!(moved > 1e-2, "{moved}");
}

#[test]
fn two_and_three_ranks_follow_the_single_process_curve() {
    let single = single_process(Variant::Lora);
    for world in [2, 3] {
        let out = tempfile::tempdir().unwrap();
        let runs = run_group(
            ThreadReducer::group(world),
            &Plan::new(Variant::Lora, out.path()),
        );
        assert_matches_single_process(&runs, &single, Variant::Lora);
        // Only rank 0 wrote a checkpoint.
        assert!(out.path().join("checkpoint/state.json").is_file());
    }
}

#[test]
fn a_group_of_one_is_bit_identical_to_train() {
    let (expected, expected_adapters) = single_process(Variant::Lora);
    let out = tempfile::tempdir().unwrap();
    let runs = run_group(
        ThreadReducer::group(1),
        &Plan::new(Variant::Lora, out.path()),
    );
    let run = runs[0].as_ref().unwrap();
    assert_eq!(run.adapters, expected_adapters);
    let losses = |m: &TrainMetrics| m.steps.iter().map(|s| s.loss).collect::<Vec<_>>();
    assert_eq!(losses(run.metrics.as_ref().unwrap()), losses(&expected));
}

#[test]
fn dora_magnitudes_are_reduced_too() {
    let single = single_process(Variant::Dora);
    let out = tempfile::tempdir().unwrap();
    let runs = run_group(
        ThreadReducer::group(2),
        &Plan::new(Variant::Dora, out.path()),
    );
    assert_matches_single_process(&runs, &single, Variant::Dora);
}

#[test]
fn more_ranks_than_rows_still_matches() {
    // A global micro-batch of 2 rows over 3 ranks: rank 2 runs nothing and contributes zeros.
    let narrow = TrainSettings {
        batch_size: 2,
        steps: 4,
        ..settings()
    };
    let out = tempfile::tempdir().unwrap();
    let model_single = model(Variant::Lora);
    let expected = train::train(
        &model_single,
        &examples(),
        PAD,
        &narrow,
        out.path(),
        false,
        &mut |_| {},
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(Variant::Lora, out.path());
    plan.settings = narrow;
    let runs = run_group(ThreadReducer::group(3), &plan);
    assert_matches_single_process(
        &runs,
        &(expected, adapter_values(&model_single)),
        Variant::Lora,
    );
}

#[test]
fn a_rank_crashing_mid_run_fails_every_rank() {
    let out = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(Variant::Lora, out.path());
    plan.crash = Some((1, 3));
    let runs = run_group(ThreadReducer::group(3), &plan);
    assert!(runs[1].is_none(), "rank 1 panicked");
    for rank in [0, 2] {
        let error = runs[rank].as_ref().unwrap().metrics.as_ref().unwrap_err();
        assert!(
            error.to_string().contains("rank 1 left the group"),
            "{error}"
        );
    }
}

#[test]
fn a_failed_checkpoint_on_rank_zero_fails_every_rank() {
    // Rank 0's output directory is a file, so its first checkpoint (step 4) cannot be written.
    let dir = tempfile::tempdir().unwrap();
    let blocked = dir.path().join("not-a-directory");
    std::fs::write(&blocked, "x").unwrap();
    let runs = run_group(ThreadReducer::group(2), &Plan::new(Variant::Lora, &blocked));
    let error = runs[0].as_ref().unwrap().metrics.as_ref().unwrap_err();
    assert!(matches!(error, TrainError::Checkpoint { .. }), "{error}");
    let error = runs[1].as_ref().unwrap().metrics.as_ref().unwrap_err();
    assert!(matches!(error, TrainError::Collective(_)), "{error}");
    assert!(
        error.to_string().contains("rank 0 failed: checkpoint"),
        "{error}"
    );
}

#[test]
fn ranks_with_different_settings_refuse_to_start() {
    let out = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(Variant::Lora, out.path());
    plan.odd_settings = Some((
        1,
        TrainSettings {
            lr: 2e-2,
            ..settings()
        },
    ));
    let runs = run_group(ThreadReducer::group(2), &plan);
    for run in &runs {
        let error = run.as_ref().unwrap().metrics.as_ref().unwrap_err();
        assert!(error.to_string().contains("training settings"), "{error}");
        assert!(run.as_ref().unwrap().adapters == adapter_values(&model(Variant::Lora)));
    }
}

#[test]
fn a_group_resumes_from_rank_zero_checkpoint() {
    let single = single_process(Variant::Lora);
    let out = tempfile::tempdir().unwrap();
    // Rank 1 dies at step 6; rank 0 kept the checkpoint of step 4.
    let mut plan = Plan::new(Variant::Lora, out.path());
    plan.crash = Some((1, 6));
    let runs = run_group(ThreadReducer::group(2), &plan);
    assert!(runs[0].as_ref().unwrap().metrics.is_err());
    // A fresh group: rank 0 reads the checkpoint, rank 1 has none of its own.
    plan.crash = None;
    plan.resume = true;
    let runs = run_group(ThreadReducer::group(2), &plan);
    for run in &runs {
        assert_eq!(
            run.as_ref().unwrap().metrics.as_ref().unwrap().resumed_from,
            Some(4)
        );
    }
    assert_matches_single_process(&runs, &single, Variant::Lora);
}

#[test]
fn a_loss_that_blows_up_stops_every_rank_at_the_same_step() {
    // An absurd learning rate sends the adapters to ~1e30 after one step, so the next loss is
    // not finite: every rank sees it after the reduction, where one process sees it too.
    let blow_up = TrainSettings {
        lr: 1e30,
        warmup_ratio: 0.0,
        max_grad_norm: 0.0,
        steps: 3,
        checkpoint_every: 0,
        ..settings()
    };
    let out = tempfile::tempdir().unwrap();
    let single = train::train(
        &model(Variant::Lora),
        &examples(),
        PAD,
        &blow_up,
        out.path(),
        false,
        &mut |_| {},
    )
    .unwrap_err();
    let TrainError::NonFinite { step, .. } = single else {
        panic!("{single}")
    };
    let mut plan = Plan::new(Variant::Lora, tempfile::tempdir().unwrap().path());
    plan.settings = blow_up;
    for run in run_group(ThreadReducer::group(2), &plan) {
        let error = run.unwrap().metrics.unwrap_err();
        assert!(
            matches!(error, TrainError::NonFinite { step: s, .. } if s == step),
            "{error}"
        );
    }
}
