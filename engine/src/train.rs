//! Training adapters: AdamW with decoupled weight decay, warmup + cosine/linear decay,
//! gradient accumulation, global-norm clipping, the response-only loss, a seeded data order,
//! and checkpoints from which a run resumes exactly where it stopped.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::adapter::ParamGroup;
use crate::data::{collate, Example};
use crate::fused;
use crate::model::Transformer;
use crate::parallel::{self, GradReducer, ReduceError};
use crate::param::Param;

pub use lorasweep_contract::Schedule;

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Conversations per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (global batch = batch_size × grad_accum).
    pub grad_accum: usize,
    /// Longest tokenized conversation.
    pub max_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// Fraction of steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// LoRA+ learning-rate ratio of `B` over `A` (1 for every other variant).
    pub b_lr_ratio: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Seed of the data order.
    pub seed: u64,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: usize,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 8,
            grad_accum: 1,
            max_len: 512,
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            b_lr_ratio: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            seed: 0,
            checkpoint_every: 0,
        }
    }
}

impl TrainSettings {
    /// Learning-rate multiplier at `step` (0-based), as Hugging Face's schedulers define it:
    /// `step / warmup` during warmup, then the decay over the remaining steps.
    pub fn lr_factor(&self, step: usize) -> f64 {
        let warmup = (self.warmup_ratio * self.steps as f64).ceil() as usize;
        if step < warmup {
            return step as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (self.steps - warmup).max(1) as f64;
        match self.schedule {
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Constant => 1.0,
        }
    }
}

/// One optimizer step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step number, from 1.
    pub step: usize,
    /// Mean loss over the response tokens of all the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (prompt and response, no padding) in the step.
    pub tokens: usize,
    /// Tokens per second of this step.
    pub tokens_per_s: f64,
}

/// The end of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Every step.
    pub steps: Vec<StepRecord>,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Tokens processed.
    pub tokens: usize,
    /// Mean tokens per second over the run.
    pub tokens_per_s: f64,
    /// Wall time of the steps (this process and resumed ones), seconds.
    pub wall_s: f64,
    /// Step the run resumed from, if any.
    pub resumed_from: Option<usize>,
    /// Peak resident memory of the process over the job (loading included), GiB: set by
    /// [`crate::jobs`]; absent where it cannot be measured, and in files written before it
    /// was recorded.
    #[serde(default)]
    pub peak_rss_gib: Option<f64>,
}

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The caller asked training to stop (e.g. the job was cancelled).
    #[error("training was stopped after step {step}")]
    Stopped {
        /// The last step done.
        step: usize,
    },
    /// The loss, the gradient or a parameter became NaN/inf.
    #[error("{what} became {value} at step {step}; training stopped (last good checkpoint: {checkpoint})")]
    NonFinite {
        /// Step at which it happened.
        step: usize,
        /// What became non-finite: `the loss`, `the gradient norm`, or a parameter.
        what: String,
        /// The value.
        value: f64,
        /// The last checkpoint kept.
        checkpoint: String,
    },
    /// No trainable parameter.
    #[error("the model has no adapter to train")]
    NoAdapters,
    /// No example to train on.
    #[error("no training example has a response token within max_len")]
    NoData,
    /// Invalid settings.
    #[error("invalid training settings: {0}")]
    Settings(String),
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
    /// A collective operation between data-parallel ranks failed.
    #[error(transparent)]
    Collective(#[from] ReduceError),
}

/// Position in the seeded data order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
struct Cursor {
    epoch: u64,
    index: usize,
}

fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ epoch);
    order.shuffle(&mut rng);
    order
}

impl Cursor {
    fn take(&mut self, n: usize, count: usize, seed: u64) -> Vec<usize> {
        let mut picked = Vec::with_capacity(count);
        let mut order = epoch_order(n, seed, self.epoch);
        while picked.len() < count {
            if self.index >= n {
                self.epoch += 1;
                self.index = 0;
                order = epoch_order(n, seed, self.epoch);
            }
            picked.push(order[self.index]);
            self.index += 1;
        }
        picked
    }
}

/// The examples each optimizer step of a run of `settings` trains on, as [`train`] draws them:
/// `steps` entries, each `grad_accum` micro-batches of `batch_size` example indices into a set
/// of `examples` examples (the seeded order, reshuffled every epoch). For baselines that must
/// train on the very same batches (`lorasweep tasks batches`).
pub fn step_order(examples: usize, settings: &TrainSettings) -> Vec<Vec<Vec<usize>>> {
    let mut cursor = Cursor::default();
    (0..settings.steps)
        .map(|_| {
            (0..settings.grad_accum)
                .map(|_| cursor.take(examples, settings.batch_size, settings.seed))
                .collect()
        })
        .collect()
}

/// Checkpoint metadata (the tensors live in `state.safetensors` beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    cursor: Cursor,
    history: Vec<StepRecord>,
    wall_s: f64,
    settings: TrainSettings,
}

/// Runs training of the adapters attached to `model` on `examples`.
///
/// Checkpoints go to `out_dir/checkpoint` (written to a temporary directory first, then
/// renamed); with `resume`, the run continues from it. `on_step` sees every step as it ends.
pub fn train(
    model: &Transformer,
    examples: &[Example],
    pad_id: u32,
    settings: &TrainSettings,
    out_dir: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<TrainMetrics, TrainError> {
    train_with(
        model, examples, pad_id, settings, out_dir, resume, on_step, None,
    )
}

/// [`train`] as one rank of a data-parallel group when `reducer` is given (see
/// [`crate::parallel`]): every rank passes the same examples and settings; `batch_size` is
/// the global micro-batch, of which this rank runs the rows `rank, rank + W, …`; gradients and
/// the loss are averaged over ranks once per step, so the run follows the single-process loss
/// curve. Only rank 0 reads (`resume`) and writes checkpoints under `out_dir`; it hands the
/// resume point to the others. Every rank returns the same metrics. If this rank fails, it
/// aborts the group so the other ranks fail too instead of waiting.
#[allow(clippy::too_many_arguments)]
pub fn train_with(
    model: &Transformer,
    examples: &[Example],
    pad_id: u32,
    settings: &TrainSettings,
    out_dir: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&StepRecord),
    reducer: Option<&dyn GradReducer>,
) -> Result<TrainMetrics, TrainError> {
    train_controlled(
        model,
        examples,
        pad_id,
        settings,
        out_dir,
        resume,
        &mut |record| {
            on_step(record);
            ControlFlow::Continue(())
        },
        reducer,
    )
}

/// [`train_with`] whose `on_step` may stop the run: it sees each step after that step's
/// checkpoint (if any) is written, and returning `Break` ends training with
/// [`TrainError::Stopped`] (the checkpoint stays, so the run can resume).
#[allow(clippy::too_many_arguments)]
pub fn train_controlled(
    model: &Transformer,
    examples: &[Example],
    pad_id: u32,
    settings: &TrainSettings,
    out_dir: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&StepRecord) -> ControlFlow<()>,
    reducer: Option<&dyn GradReducer>,
) -> Result<TrainMetrics, TrainError> {
    let result = run_training(
        model, examples, pad_id, settings, out_dir, resume, on_step, reducer,
    );
    if let (Err(error), Some(reducer)) = (&result, reducer) {
        reducer.abort(&error.to_string());
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run_training(
    model: &Transformer,
    examples: &[Example],
    pad_id: u32,
    settings: &TrainSettings,
    out_dir: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&StepRecord) -> ControlFlow<()>,
    reducer: Option<&dyn GradReducer>,
) -> Result<TrainMetrics, TrainError> {
    if settings.steps == 0 || settings.batch_size == 0 || settings.grad_accum == 0 {
        return Err(TrainError::Settings(
            "steps, batch_size and grad_accum must be positive".into(),
        ));
    }
    if !(settings.lr.is_finite() && settings.lr > 0.0) {
        return Err(TrainError::Settings(format!(
            "lr must be a positive number, got {}",
            settings.lr
        )));
    }
    if examples.is_empty() {
        return Err(TrainError::NoData);
    }
    let mut params = collect_params(model)?;
    let trainable_parameters = params.iter().map(|p| p.var.elem_count()).sum();
    let device = model.device().clone();
    let checkpoint_dir = out_dir.join("checkpoint");
    let mut cursor = Cursor::default();
    let mut history = Vec::new();
    let mut wall_s = 0.0;
    let mut resumed_from = None;
    let (rank, world) = reducer.map_or((0, 1), |r| (r.rank(), r.world_size()));
    let mut loaded = None;
    if rank == 0 && resume && checkpoint_dir.join("state.json").is_file() {
        loaded = Some(load_checkpoint(
            &checkpoint_dir,
            &mut params,
            settings,
            &device,
        )?);
    }
    if let Some(reducer) = reducer {
        loaded = agree_on_start(reducer, settings, examples, loaded, &mut params)?;
    }
    if let Some(state) = loaded {
        cursor = state.cursor;
        history = state.history;
        wall_s = state.wall_s;
        resumed_from = Some(state.step);
        tracing::info!(step = state.step, "resuming from checkpoint");
    }
    let first_step = history.len();
    for step in first_step..settings.steps {
        let started = Instant::now();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        // The step's micro-batches are drawn up front so that each one's loss can be weighted
        // by its share of the step's response targets: the accumulated gradient is then that
        // of the token mean over the whole step, as one big batch would give it (a plain mean
        // of micro-batch means would over-weight the tokens of short responses).
        let micro_batches: Vec<Vec<usize>> = (0..settings.grad_accum)
            .map(|_| cursor.take(examples.len(), settings.batch_size, settings.seed))
            .collect();
        let targets_of = |picked: &[usize]| -> usize {
            picked
                .iter()
                .map(|&i| parallel::response_targets(&examples[i]))
                .sum()
        };
        let step_targets: usize = micro_batches.iter().map(|p| targets_of(p)).sum();
        if step_targets == 0 {
            return Err(TrainError::NoData);
        }
        for picked in micro_batches {
            let share =
                settings.grad_accum as f64 * targets_of(&picked) as f64 / step_targets as f64;
            tokens += picked
                .iter()
                .map(|&i| examples[i].tokens.len())
                .sum::<usize>();
            if share == 0.0 {
                continue;
            }
            // With ranks, this rank's rows of the global micro-batch and their loss factor.
            let (rows, scale) = match reducer {
                None => (picked, None),
                Some(_) => {
                    let shard = parallel::shard(examples, &picked, rank, world);
                    if shard.examples.is_empty() || shard.scale == 0.0 {
                        continue;
                    }
                    (shard.examples, Some(shard.scale))
                }
            };
            let batch: Vec<Example> = rows.iter().map(|&i| examples[i].clone()).collect();
            let collated = collate(&batch, pad_id);
            let shape = (collated.batch, collated.seq_len);
            let ids = Tensor::from_slice(&collated.ids, shape, &device)?;
            let targets = Tensor::from_slice(&collated.targets, shape, &device)?;
            let weights = Tensor::from_slice(&collated.weights, shape, &device)?;
            let factor = scale.unwrap_or(1.0) * share;
            let (loss, store) = model.loss_and_grads(&ids, &targets, &weights, factor)?;
            let value = loss.to_scalar::<f32>()? as f64;
            // With ranks, a bad value is caught after the step's reduction, on every rank.
            if !value.is_finite() && reducer.is_none() {
                return Err(non_finite(step + 1, value, &checkpoint_dir));
            }
            loss_sum += value;
            for (slot, param) in grads.iter_mut().zip(&params) {
                if let Some(g) = store.get(param.var.as_tensor()) {
                    let g = g.to_dtype(DType::F32)?;
                    let g = if settings.grad_accum > 1 {
                        (g / settings.grad_accum as f64)?
                    } else {
                        g
                    };
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g,
                    });
                }
            }
        }
        if let Some(reducer) = reducer {
            (grads, loss_sum) = parallel::reduce_step(reducer, &params, grads, loss_sum, &device)?;
            if !loss_sum.is_finite() {
                let loss = loss_sum / settings.grad_accum as f64;
                return Err(non_finite(step + 1, loss, &checkpoint_dir));
            }
        }
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(non_finite_in(
                step + 1,
                "the gradient norm",
                grad_norm,
                &checkpoint_dir,
            ));
        }
        let clip = if settings.max_grad_norm > 0.0 && grad_norm > settings.max_grad_norm {
            settings.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = settings.lr * settings.lr_factor(step);
        adamw_step(&mut params, &grads, step + 1, lr, clip, settings)?;
        let seconds = started.elapsed().as_secs_f64();
        wall_s += seconds;
        let record = StepRecord {
            step: step + 1,
            loss: loss_sum / settings.grad_accum as f64,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
        };
        history.push(record.clone());
        let done = step + 1 == settings.steps;
        if done || (settings.checkpoint_every > 0 && (step + 1) % settings.checkpoint_every == 0) {
            // An update can overflow with finite loss and gradients (a huge learning rate):
            // stop before such parameters replace the last good checkpoint.
            if let Some((what, value)) = first_non_finite(&params)? {
                return Err(non_finite_in(step + 1, &what, value, &checkpoint_dir));
            }
            if rank == 0 {
                let state = CheckpointState {
                    step: step + 1,
                    cursor,
                    history: history.clone(),
                    wall_s,
                    settings: settings.clone(),
                };
                save_checkpoint(&checkpoint_dir, &params, &state)?;
            }
            // No rank goes on (or reports success) unless rank 0's checkpoint was written.
            if let Some(reducer) = reducer {
                reducer.barrier()?;
            }
        }
        if on_step(&record).is_break() {
            return Err(TrainError::Stopped { step: record.step });
        }
    }
    let tokens: usize = history.iter().map(|r| r.tokens).sum();
    Ok(TrainMetrics {
        steps: history,
        trainable_parameters,
        tokens,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        wall_s,
        resumed_from,
        peak_rss_gib: None,
    })
}

/// What rank 0 tells the others before the first step.
#[derive(Debug, Serialize, Deserialize)]
struct StartPoint {
    settings: TrainSettings,
    examples: String,
    resume: Option<CheckpointState>,
}

/// Makes every rank start from rank 0's point: checks that all ranks train with the same
/// settings on the same examples, hands out rank 0's checkpoint state (if it resumes) and
/// copies its parameters and AdamW moments to every rank.
fn agree_on_start(
    reducer: &dyn GradReducer,
    settings: &TrainSettings,
    examples: &[Example],
    loaded: Option<CheckpointState>,
    params: &mut [Param],
) -> Result<Option<CheckpointState>, TrainError> {
    let ours = StartPoint {
        settings: settings.clone(),
        examples: parallel::digest_examples(examples),
        resume: loaded,
    };
    let bytes = if reducer.rank() == 0 {
        serde_json::to_vec(&ours).map_err(|e| ReduceError::Mismatch(e.to_string()))?
    } else {
        Vec::new()
    };
    let bytes = reducer.broadcast_bytes(bytes)?;
    let theirs: StartPoint = serde_json::from_slice(&bytes)
        .map_err(|e| ReduceError::Mismatch(format!("rank 0's start point: {e}")))?;
    let rank = reducer.rank();
    if theirs.settings != *settings {
        return Err(ReduceError::Mismatch(format!(
            "rank {rank} has training settings {settings:?}, rank 0 has {:?}",
            theirs.settings
        ))
        .into());
    }
    if theirs.examples != ours.examples {
        return Err(ReduceError::Mismatch(format!(
            "rank {rank} has other training examples than rank 0 ({} of them, digest {}; rank 0's digest {})",
            examples.len(),
            ours.examples,
            theirs.examples
        ))
        .into());
    }
    parallel::broadcast_params(reducer, params)?;
    Ok(theirs.resume)
}

fn non_finite(step: usize, value: f64, checkpoint_dir: &Path) -> TrainError {
    non_finite_in(step, "the loss", value, checkpoint_dir)
}

fn non_finite_in(step: usize, what: &str, value: f64, checkpoint_dir: &Path) -> TrainError {
    let checkpoint = if checkpoint_dir.join("state.json").is_file() {
        checkpoint_dir.display().to_string()
    } else {
        "none yet".to_string()
    };
    TrainError::NonFinite {
        step,
        what: what.to_string(),
        value,
        checkpoint,
    }
}

/// The first parameter (or AdamW moment) holding a NaN or infinity, with such a value: a
/// checkpoint must never record one.
fn first_non_finite(params: &[Param]) -> Result<Option<(String, f64)>, TrainError> {
    for p in params {
        for (kind, tensor) in [
            ("", p.var.as_tensor()),
            ("AdamW moment of ", &p.m),
            ("AdamW moment of ", &p.v),
        ] {
            // Σ 0·x is 0 when every x is finite and NaN otherwise.
            let probe = (tensor.to_dtype(DType::F32)? * 0.0)?
                .sum_all()?
                .to_scalar::<f32>()?;
            if !probe.is_finite() {
                let values = tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let bad = values
                    .into_iter()
                    .find(|v| !v.is_finite())
                    .unwrap_or(f32::NAN);
                return Ok(Some((format!("{kind}parameter {}", p.name), bad as f64)));
            }
        }
    }
    Ok(None)
}

pub(crate) fn collect_params(model: &Transformer) -> Result<Vec<Param>, TrainError> {
    let mut params = Vec::new();
    for (module, adapter) in model.adapters() {
        for (group, var) in adapter.parameters() {
            let leaf = match group {
                ParamGroup::A => "lora_A",
                ParamGroup::B => "lora_B",
                ParamGroup::Magnitude => "lora_magnitude_vector",
            };
            params.push(Param {
                name: format!("{}.{leaf}", module.name()),
                group,
                var: var.clone(),
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            });
        }
    }
    if params.is_empty() {
        return Err(TrainError::NoAdapters);
    }
    Ok(params)
}

pub(crate) fn global_norm(grads: &[Option<Tensor>]) -> Result<f64, TrainError> {
    let refs: Vec<Option<&Tensor>> = grads.iter().map(Option::as_ref).collect();
    Ok(crate::ops::squared_norms(&refs)?.iter().sum::<f64>().sqrt())
}

/// AdamW as PyTorch defines it: `p ← p·(1 − lr·λ)`, then `p ← p − lr·m̂/(√v̂ + ε)`; one
/// kernel per parameter on CUDA ([`fused::adamw`]), candle's primitives on the CPU.
pub(crate) fn adamw_step(
    params: &mut [Param],
    grads: &[Option<Tensor>],
    t: usize,
    lr: f64,
    clip: f64,
    s: &TrainSettings,
) -> Result<(), TrainError> {
    for (param, grad) in params.iter_mut().zip(grads) {
        let Some(grad) = grad else { continue };
        let hyper = fused::AdamW {
            lr: if param.group == ParamGroup::B {
                lr * s.b_lr_ratio
            } else {
                lr
            },
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            step: t,
            clip,
        };
        let p = param.var.as_tensor();
        let (p, m, v) = if fused::default_on(p.device()) {
            fused::adamw(p, grad, &param.m, &param.v, hyper)?
        } else {
            fused::adamw_composed(p, grad, &param.m, &param.v, hyper)?
        };
        param.var.set(&p)?;
        param.m = m;
        param.v = v;
    }
    Ok(())
}

fn save_checkpoint(
    dir: &Path,
    params: &[Param],
    state: &CheckpointState,
) -> Result<(), TrainError> {
    let fail = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| fail(e.to_string()))?;
    let mut tensors = HashMap::new();
    for p in params {
        tensors.insert(
            format!("param/{}", p.name),
            p.var.as_tensor().to_device(&Device::Cpu)?,
        );
        tensors.insert(format!("m/{}", p.name), p.m.to_device(&Device::Cpu)?);
        tensors.insert(format!("v/{}", p.name), p.v.to_device(&Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, partial.join("state.safetensors"))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| fail(e.to_string()))?;
    std::fs::write(partial.join("state.json"), json).map_err(|e| fail(e.to_string()))?;
    // Swap in the new checkpoint: the old one is removed only once the new one is complete.
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&partial, dir).map_err(|e| fail(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(
    dir: &Path,
    params: &mut [Param],
    settings: &TrainSettings,
    device: &Device,
) -> Result<CheckpointState, TrainError> {
    let fail = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| fail(e.to_string()))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| fail(format!("state.json: {e}")))?;
    if state.settings != *settings {
        return Err(fail("it was written with different training settings; start a new output directory or use the same settings".into()));
    }
    let tensors = candle_core::safetensors::load(dir.join("state.safetensors"), device)?;
    for p in params.iter_mut() {
        let get = |prefix: &str| {
            tensors
                .get(&format!("{prefix}/{}", p.name))
                .cloned()
                .ok_or_else(|| fail(format!("missing {prefix}/{}", p.name)))
        };
        p.var.set(&get("param")?)?;
        p.m = get("m")?;
        p.v = get("v")?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_matches_the_usual_formula() {
        let s = TrainSettings {
            steps: 100,
            warmup_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(s.lr_factor(0), 0.0);
        assert!((s.lr_factor(5) - 0.5).abs() < 1e-12);
        assert!((s.lr_factor(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_factor(55) - 0.5).abs() < 1e-12);
        let linear = TrainSettings {
            schedule: Schedule::Linear,
            ..s.clone()
        };
        assert!((linear.lr_factor(55) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn data_order_is_seeded_and_covers_each_epoch() {
        let mut a = Cursor::default();
        let first = a.take(10, 10, 3);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let mut b = Cursor::default();
        assert_eq!(b.take(10, 4, 3), first[..4].to_vec());
        assert_eq!(b.take(10, 6, 3), first[4..].to_vec());
        let mut c = Cursor::default();
        assert_ne!(c.take(10, 10, 4), first);
    }
}
