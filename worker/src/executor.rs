//! The engine behind a worker: runs the coordinator's probe, train and eval jobs with
//! `lorasweep-worker`, moving their files through the coordinator (no shared filesystem).
//!
//! - probe: PAGE or another placement rule on the task's train split; `probe.json` is the
//!   artifact; the result is cached by content (model weights, task data — none for the rules
//!   that read none —, probe settings and seed).
//! - train: reads its probe dependencies' `probe.json` (averaged when there are several
//!   seeds), trains, uploads a checkpoint every `checkpoint_every` steps and resumes from the
//!   newest one after a lost attempt; the PEFT adapter files and `metrics.json` are artifacts.
//! - eval: fetches the adapter of its train dependency (none for the base model), evaluates,
//!   and returns the score; `eval.json` with every sample is the artifact.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::agent::{ExecError, JobContext, JobExecutor, JobOutput, OutputFile};
use candle_core::Device;
use lorasweep_contract::{
    EvalParams, EvalSummary, JobKind, JobParams, ModuleRank, ProbeParams, ProbeSummary,
    TrainParams, TrainSummary,
};
use lorasweep_coordinator::domain::{JobAssignment, Progress};
use lorasweep_engine::adapter::{AInit, AdapterSettings};
use lorasweep_engine::error::{Classify, Retry};
use lorasweep_engine::eval::sandbox::SandboxConfig;
use lorasweep_engine::evaluate::{self, EvalJob, EvalOptions};
use lorasweep_engine::jobs::{self, DataSource, LocalRank, TrainJob};
use lorasweep_engine::probe::{ProbeResult, ProbeSettings};
use lorasweep_engine::train::TrainSettings;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Longest conversation a loss-scored eval reads when the job does not say.
const EVAL_MAX_LEN: usize = 512;

/// What the worker's slots are, and so on which device a job leased on slot `i` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotDevices {
    /// One slot (no `--gpus`, no `--cpu-slots`): the default device (CUDA device 0 when built
    /// with CUDA and one is present, else the CPU).
    Default,
    /// `--gpus`: slot `i` is CUDA device `i` on a CUDA build; a CPU-only build computes on the
    /// CPU whatever the slot.
    Gpus,
    /// `--cpu-slots N`: every slot is a rank on the CPU.
    Cpu,
}

/// Runs engine jobs, each on the device of the slot it was leased (a train job leased
/// several slots runs one data-parallel rank per slot).
pub struct EngineExecutor {
    slots: SlotDevices,
    /// CUDA devices already opened, by ordinal (one stream per device, reused by its jobs).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    opened: Mutex<HashMap<u32, Device>>,
    /// How code-evaluation jobs build their sandbox (its limits, the paths it hides, and
    /// whether a level below Landlock + seccomp + rlimits is accepted).
    sandbox: SandboxConfig,
}

impl EngineExecutor {
    /// An executor whose slots are `slots`.
    pub fn new(slots: SlotDevices) -> Self {
        Self {
            slots,
            opened: Mutex::new(HashMap::new()),
            sandbox: SandboxConfig::default(),
        }
    }

    /// The same executor, building code-evaluation sandboxes from `sandbox`.
    pub fn with_sandbox(self, sandbox: SandboxConfig) -> Self {
        Self { sandbox, ..self }
    }

    /// The device of slot `slot`.
    fn device(&self, slot: u32) -> Result<Device, ExecError> {
        match self.slots {
            SlotDevices::Default => Ok(lorasweep_engine::loader::default_device()),
            SlotDevices::Cpu => Ok(Device::Cpu),
            #[cfg(not(feature = "cuda"))]
            SlotDevices::Gpus => {
                tracing::debug!(slot, "a CPU-only build computes on the CPU for every slot");
                Ok(Device::Cpu)
            }
            #[cfg(feature = "cuda")]
            SlotDevices::Gpus => {
                let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(device) = opened.get(&slot) {
                    return Ok(device.clone());
                }
                let device = lorasweep_engine::loader::cuda_device(slot as usize).map_err(|e| {
                    ExecError::Retryable(format!(
                        "cannot open cuda device {slot} (this worker offers it with --gpus): {e}"
                    ))
                })?;
                opened.insert(slot, device.clone());
                Ok(device)
            }
        }
    }

    /// The device of a single-slot job: its first leased slot.
    fn job_device(&self, job: &JobAssignment) -> Result<Device, ExecError> {
        self.device(job.local_ranks.first().map_or(0, |slot| slot.gpu))
    }
}

impl JobExecutor for EngineExecutor {
    fn run(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError> {
        match job_params(job)? {
            JobParams::Probe(params) => self.probe(job, &params, context),
            JobParams::Train(params) => self.train(job, &params, context),
            JobParams::Eval(params) => self.eval(job, &params, context),
        }
    }
}

/// How long a rank of a gang spread over workers waits for rank 0's NCCL id.
#[cfg(feature = "nccl")]
const RENDEZVOUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The job's parameters, read once into the typed contract; parameters that do not fit the
/// job kind fail the job permanently, naming the field.
fn job_params(job: &JobAssignment) -> Result<JobParams, ExecError> {
    JobParams::from_value(job.kind, &job.params)
        .map_err(|e| ExecError::Permanent(format!("job {}: {e}", job.key)))
}

/// The engine's probe settings for a probe job's parameters.
fn probe_settings(params: &ProbeParams) -> ProbeSettings {
    ProbeSettings {
        batches: params.batches as usize,
        batch_size: params.batch_size as usize,
        max_len: params.max_len as usize,
        rank: params.rank as usize,
        alpha: params.alpha,
        estimator: params.estimator,
        a_init: params.a_init,
        seed: params.seed,
        rule: params.rule,
    }
}

/// An engine error as the agent reports it: retryable when the engine says another attempt
/// may succeed (out of memory, a lost rank, a device reset), permanent when the job itself is
/// wrong (bad data, bad settings).
fn engine_error<E: Classify + std::fmt::Display>(error: E) -> ExecError {
    match error.retry() {
        Retry::Retryable => ExecError::Retryable(error.to_string()),
        Retry::Permanent => ExecError::Permanent(error.to_string()),
    }
}

/// An error that would come back on every attempt (a model file that cannot be read, a value
/// that cannot be written as JSON).
fn permanent(error: impl std::fmt::Display) -> ExecError {
    ExecError::Permanent(error.to_string())
}

fn io_error(context: &str, error: impl std::fmt::Display) -> ExecError {
    ExecError::Retryable(format!("{context}: {error}"))
}

impl EngineExecutor {
    fn probe(
        &self,
        job: &JobAssignment,
        params: &ProbeParams,
        context: &JobContext,
    ) -> Result<JobOutput, ExecError> {
        let settings = probe_settings(params);
        let data = DataSource::Task(job.task.clone());
        let key = probe_cache_key(&job.model, &data, &settings)?;
        if let Some(hit) = context.cached(&key)? {
            tracing::info!(job = %job.key, "probe result reused from the cache");
            return Ok(JobOutput {
                result: hit.result,
                artifacts: Vec::new(),
                cache_key: Some(key),
            });
        }
        context.progress(Progress {
            message: "probing".into(),
            ..Default::default()
        });
        let device = self.job_device(job)?;
        let result = jobs::probe(&job.model, &data, &settings, &device).map_err(engine_error)?;
        let path = context.work_dir().join("probe.json");
        lorasweep_engine::peft::write_json(&path, &result)
            .map_err(|e| io_error("writing probe.json", e))?;
        let summary = to_result(&ProbeSummary {
            a_init: settings.a_init,
            argmax_stability: result.argmax_stability,
            dominant: result.dominant.clone(),
            estimator: settings.estimator,
            rule: settings.rule,
            peak_rss_gib: result.peak_rss_gib,
            share_by_kind: result.share_by_kind.clone(),
            tokens: result.tokens,
            top1_share: result.top1_share,
            wall_s: result.wall_s,
        });
        Ok(JobOutput {
            result: summary,
            artifacts: vec![OutputFile {
                name: "probe.json".into(),
                path,
            }],
            cache_key: Some(key),
        })
    }

    fn train(
        &self,
        job: &JobAssignment,
        params: &TrainParams,
        context: &JobContext,
    ) -> Result<JobOutput, ExecError> {
        let out = context.work_dir().join("adapter");
        let seed = params.seed;
        let probe_path = self.merged_probe(job, context)?;
        let mut resume = false;
        if let Some(checkpoint) = &job.resume_from {
            let archive = context.fetch_artifact(checkpoint, context.work_dir())?;
            unpack_checkpoint(&archive, &out.join("checkpoint"))
                .map_err(|e| io_error("unpacking the checkpoint", e))?;
            resume = true;
            tracing::info!(job = %job.key, step = checkpoint.step, "resuming from an uploaded checkpoint");
        }
        let probe_settings = match &params.probe {
            Some(probe) => probe_settings(&probe.probe(seed)),
            None => ProbeSettings::default(),
        };
        let train_job = TrainJob {
            model: job.model.clone(),
            data: DataSource::Task(job.task.clone()),
            placement: params.placement.clone(),
            probe: probe_path,
            probe_settings,
            adapter: AdapterSettings {
                variant: params.variant,
                rank: params.rank as usize,
                alpha: params.alpha,
                a_init: AInit::Kaiming,
                seed,
            },
            loraplus_ratio: params.loraplus_ratio.unwrap_or(16.0),
            train: TrainSettings {
                steps: params.steps as usize,
                batch_size: params.batch_size as usize,
                grad_accum: params.grad_accum as usize,
                max_len: params.max_len as usize,
                lr: params.lr,
                schedule: params.schedule,
                warmup_ratio: params.warmup_ratio,
                weight_decay: params.weight_decay,
                max_grad_norm: params.max_grad_norm,
                seed,
                checkpoint_every: params.checkpoint_every as usize,
                ..TrainSettings::default()
            },
            out: out.clone(),
            resume,
        };
        let total = train_job.train.steps as u64;
        let every = train_job.train.checkpoint_every;
        let world = job.world_size.max(1) as usize;
        let upload_error = Mutex::new(None);
        // Every rank stops when the job is cancelled; rank 0 alone reports progress and
        // uploads its checkpoints.
        let on_step = |rank: usize, record: &lorasweep_engine::train::StepRecord| {
            if rank == 0 {
                context.progress(Progress {
                    step: record.step as u64,
                    total_steps: total,
                    loss: Some(record.loss),
                    tokens_per_second: Some(record.tokens_per_s),
                    message: format!("lr {:.2e}", record.lr),
                });
                if every > 0 && record.step.is_multiple_of(every) && record.step as u64 != total {
                    let archive = context.work_dir().join("checkpoint.tar");
                    let uploaded = pack_checkpoint(&out.join("checkpoint"), &archive)
                        .map_err(|e| io_error("packing the checkpoint", e))
                        .and_then(|()| {
                            context
                                .save_checkpoint(&archive, record.step as u64)
                                .map_err(ExecError::from)
                        });
                    if let Err(error) = uploaded {
                        *upload_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                        return ControlFlow::Break(());
                    }
                }
            }
            if context.is_cancelled() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        };
        let outcome = if world == 1 {
            let device = self.job_device(job)?;
            jobs::train_controlled(&train_job, &device, &mut |record| on_step(0, record))
        } else {
            let ranks = self.local_ranks(job, context)?;
            jobs::train_ranks(&train_job, world, ranks, &on_step)
        };
        if let Some(error) = upload_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(error);
        }
        if context.is_cancelled() {
            return Err(ExecError::Cancelled);
        }
        let outcome = outcome.map_err(engine_error)?;
        let metrics = &outcome.metrics;
        let result = to_result(&TrainSummary {
            dominant: outcome.dominant.clone(),
            final_loss: metrics.steps.last().map(|r| r.loss),
            losses: metrics.steps.iter().map(|r| r.loss).collect(),
            modules: outcome
                .modules
                .iter()
                .map(|(module, rank)| ModuleRank {
                    name: module.name(),
                    rank: *rank,
                })
                .collect(),
            peak_rss_gib: metrics.peak_rss_gib,
            resumed_from: metrics.resumed_from,
            tokens: metrics.tokens,
            tokens_per_s: metrics.tokens_per_s,
            trainable_parameters: metrics.trainable_parameters,
            wall_s: metrics.wall_s,
            world_size: world,
        });
        let artifacts = [
            "adapter_config.json",
            "adapter_model.safetensors",
            "lorasweep_adapter.json",
            "metrics.json",
        ]
        .into_iter()
        .map(|name| OutputFile {
            name: name.into(),
            path: out.join(name),
        })
        .collect();
        Ok(JobOutput {
            result,
            artifacts,
            cache_key: None,
        })
    }

    /// The data-parallel ranks of a train job that are leased here, each on its slot's
    /// device with its reducer: when every rank is here, one group of threads (on CUDA
    /// devices of an NCCL build, an NCCL group whose id is made here; see
    /// [`jobs::local_world`]); when the gang spans workers, NCCL, rank 0's worker making the
    /// id and the coordinator relaying it to the others.
    fn local_ranks(
        &self,
        job: &JobAssignment,
        context: &JobContext,
    ) -> Result<Vec<LocalRank>, ExecError> {
        let world = job.world_size as usize;
        let mut slots = job.local_ranks.clone();
        slots.sort();
        slots.dedup_by_key(|slot| slot.rank);
        if slots.len() != job.local_ranks.len()
            || slots.is_empty()
            || slots.iter().any(|slot| slot.rank as usize >= world)
        {
            return Err(ExecError::Permanent(format!(
                "job {}: the ranks leased here ({:?}) are not distinct ranks of a world of {world}",
                job.key, job.local_ranks
            )));
        }
        let devices = slots
            .iter()
            .map(|slot| Ok((slot.rank as usize, self.device(slot.gpu)?)))
            .collect::<Result<Vec<_>, ExecError>>()?;
        let all_here = devices.len() == world;
        let on_cuda = devices.iter().all(|(_, device)| device.is_cuda());
        tracing::info!(job = %job.key, world, here = devices.len(), on_cuda, "data-parallel train job");
        if all_here {
            // Ranks 0..world in order (checked above), all here.
            let devices = devices.into_iter().map(|(_, device)| device).collect();
            return jobs::local_world(devices)
                .map_err(|e| ExecError::Retryable(format!("setting up the ranks: {e}")));
        }
        self.nccl_ranks(job, context, devices)
    }

    /// NCCL members for the ranks leased here (see [`EngineExecutor::local_ranks`]).
    #[cfg(feature = "nccl")]
    fn nccl_ranks(
        &self,
        job: &JobAssignment,
        context: &JobContext,
        devices: Vec<(usize, Device)>,
    ) -> Result<Vec<LocalRank>, ExecError> {
        use lorasweep_engine::parallel::NcclReducer;
        let world = job.world_size as usize;
        if !devices.iter().all(|(_, device)| device.is_cuda()) {
            return Err(ExecError::Permanent(format!(
                "a train job spread over several workers needs NCCL on CUDA devices; this worker computes on the CPU (job {}: {world} ranks, {} of them here); give the workers --gpus, or keep resources.gpus_per_job within one worker's slots",
                job.key,
                devices.len()
            )));
        }
        let id = if devices.iter().any(|(rank, _)| *rank == 0) {
            let id = NcclReducer::new_unique_id()
                .map_err(|e| ExecError::Retryable(format!("making the nccl id: {e}")))?;
            context.publish_rendezvous(&id)?;
            id
        } else {
            context.wait_rendezvous(RENDEZVOUS_TIMEOUT)?
        };
        Ok(jobs::nccl_ranks(devices, world, &id))
    }

    /// Without NCCL, a gang spread over workers cannot share gradients: a clear, permanent
    /// error on every worker of the gang (never a wait).
    #[cfg(not(feature = "nccl"))]
    fn nccl_ranks(
        &self,
        job: &JobAssignment,
        _context: &JobContext,
        devices: Vec<(usize, Device)>,
    ) -> Result<Vec<LocalRank>, ExecError> {
        let world = job.world_size;
        Err(ExecError::Permanent(format!(
            "a train job spread over several workers needs a CUDA build with NCCL; this worker is {} (job {}: {world} ranks, {} of them here); run it on one worker with {world} slots (--gpus or --cpu-slots {world}), or build the workers with --features cuda,nccl",
            if cfg!(feature = "cuda") {
                "built without NCCL"
            } else {
                "CPU-only"
            },
            job.key,
            devices.len()
        )))
    }

    /// The PAGE result a train job reads: its probe dependencies' `probe.json`, averaged over
    /// seeds when there are several. `None` when the job has no probe dependency.
    fn merged_probe(
        &self,
        job: &JobAssignment,
        context: &JobContext,
    ) -> Result<Option<PathBuf>, ExecError> {
        let mut results: Vec<ProbeResult> = Vec::new();
        for (index, dependency) in job
            .dependencies
            .iter()
            .filter(|d| d.kind == JobKind::Probe)
            .enumerate()
        {
            let artifact = dependency
                .artifacts
                .iter()
                .find(|a| a.name == "probe.json")
                .ok_or_else(|| {
                    ExecError::Retryable(format!("probe {} has no probe.json", dependency.key))
                })?;
            let dir = context.work_dir().join(format!("probe-{index}"));
            std::fs::create_dir_all(&dir).map_err(|e| io_error("creating a probe folder", e))?;
            let path = context.fetch_artifact(artifact, &dir)?;
            results.push(jobs::read_probe(&path).map_err(engine_error)?);
        }
        let Some(mut merged) = results.first().cloned() else {
            return Ok(None);
        };
        if results.len() > 1 {
            let count = results.len() as f64;
            for (i, module) in merged.modules.iter_mut().enumerate() {
                module.score = results.iter().map(|r| r.modules[i].score).sum::<f64>() / count;
            }
            let total: f64 = merged.modules.iter().map(|m| m.score).sum();
            for module in &mut merged.modules {
                module.share = if total > 0.0 {
                    module.score / total
                } else {
                    0.0
                };
            }
            let best = merged
                .ranking()
                .into_iter()
                .next()
                .map(|m| m.name())
                .unwrap_or_default();
            merged.top1_share = merged
                .modules
                .iter()
                .find(|m| m.name == best)
                .map_or(0.0, |m| m.share);
            merged.dominant = best;
        }
        let path = context.work_dir().join("probe-merged.json");
        lorasweep_engine::peft::write_json(&path, &merged)
            .map_err(|e| io_error("writing the merged probe", e))?;
        Ok(Some(path))
    }

    fn eval(
        &self,
        job: &JobAssignment,
        params: &EvalParams,
        context: &JobContext,
    ) -> Result<JobOutput, ExecError> {
        let adapter = match &params.adapter {
            None => None,
            Some(train_key) => {
                let dependency = job
                    .dependencies
                    .iter()
                    .find(|d| d.key == *train_key)
                    .ok_or_else(|| {
                        ExecError::Permanent(format!(
                            "eval of {train_key}: the train job is not a dependency"
                        ))
                    })?;
                let dir = context.work_dir().join("adapter");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| io_error("creating the adapter folder", e))?;
                for artifact in &dependency.artifacts {
                    context.fetch_artifact(artifact, &dir)?;
                }
                Some(dir)
            }
        };
        context.progress(Progress {
            message: "evaluating".into(),
            ..Default::default()
        });
        let eval_job = EvalJob {
            model: job.model.clone(),
            merge: adapter.is_some(),
            adapter,
            task: job.task.clone(),
            metric: params.metric,
            options: EvalOptions {
                limit: Some(params.limit as usize),
                max_new_tokens: Some(params.max_new_tokens as usize),
                batch_size: params.batch_size as usize,
                // Loss-scored conversations are cut here (the report counts the cut ones).
                max_len: EVAL_MAX_LEN,
                sandbox: self.sandbox.clone(),
                ..EvalOptions::default()
            },
        };
        let device = self.job_device(job)?;
        let report = evaluate::eval_job(&eval_job, &device).map_err(engine_error)?;
        let path = context.work_dir().join("eval.json");
        report
            .write_json(&path)
            .map_err(|e| io_error("writing eval.json", e))?;
        let result = to_result(&EvalSummary {
            adapter: report.adapter.clone(),
            metrics: report.metrics.clone(),
            n: report.n,
            score: report.score,
            task: report.task.clone(),
            wall_s: report.wall_s,
            sandbox: report.sandbox,
        });
        Ok(JobOutput {
            result,
            artifacts: vec![OutputFile {
                name: "eval.json".into(),
                path,
            }],
            cache_key: None,
        })
    }
}

/// A typed result as the JSON the coordinator stores.
fn to_result<T: serde::Serialize>(summary: &T) -> Value {
    // Plain structs of numbers, strings, lists and maps with string keys always serialize.
    serde_json::to_value(summary).unwrap_or(Value::Null)
}

/// Content key of a probe: model weights, task data (none for a rule that reads none, so one
/// `kappa` or `random` probe serves every task of a model), settings and seed.
fn probe_cache_key(
    model: &str,
    data: &DataSource,
    settings: &ProbeSettings,
) -> Result<String, ExecError> {
    let source = jobs::resolve_model(model).map_err(engine_error)?;
    let files = match &source {
        lorasweep_engine::model::ModelSource::Gguf(path) => vec![path.clone()],
        lorasweep_engine::model::ModelSource::HfDir(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| io_error("listing the model", e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            files
        }
    };
    let model_digest = lorasweep_engine::loader::file_digest(&files).map_err(permanent)?;
    let data_digest = if settings.rule.reads_data() {
        lorasweep_engine::data::digest_conversations(&data.conversations().map_err(engine_error)?)
    } else {
        lorasweep_engine::jobs::NO_DATA.to_string()
    };
    let mut hasher = Sha256::new();
    hasher.update(b"lorasweep.probe.v1\n");
    hasher.update(model_digest.as_bytes());
    hasher.update(data_digest.as_bytes());
    hasher.update(
        serde_json::to_string(settings)
            .map_err(permanent)?
            .as_bytes(),
    );
    Ok(format!("probe-{}", hex_string(&hasher.finalize())))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Packs a checkpoint folder into one tar file.
fn pack_checkpoint(dir: &Path, archive: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(archive)?;
    let mut builder = tar::Builder::new(file);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()?.sync_all()
}

/// Unpacks a checkpoint tar into `dir` (replacing what is there).
fn unpack_checkpoint(archive: &Path, dir: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    tar::Archive::new(std::fs::File::open(archive)?).unpack(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorasweep_engine::jobs::JobError;

    #[test]
    fn engine_errors_keep_their_retry_class() {
        let oom = JobError::Tensor(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".to_string(),
        ));
        assert!(matches!(engine_error(oom), ExecError::Retryable(_)));
        let lost = JobError::Parallel("rank 1 panicked".to_string());
        assert!(matches!(engine_error(lost), ExecError::Retryable(_)));
        let bad = JobError::Data("no conversation has a response token".to_string());
        assert!(
            matches!(engine_error(bad), ExecError::Permanent(message) if message.contains("no conversation"))
        );
    }
}
