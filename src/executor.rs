//! The engine behind a worker: runs the coordinator's probe, train and eval jobs with
//! `lorasweep-worker`, moving their files through the coordinator (no shared filesystem).
//!
//! - probe: PAGE on the task's train split; `probe.json` is the artifact; the result is
//!   cached by content (model weights, task data, probe settings and seed).
//! - train: reads its probe dependencies' `probe.json` (averaged when there are several
//!   seeds), trains, uploads a checkpoint every `checkpoint_every` steps and resumes from the
//!   newest one after a lost attempt; the PEFT adapter files and `metrics.json` are artifacts.
//! - eval: fetches the adapter of its train dependency (none for the base model), evaluates,
//!   and returns the score; `eval.json` with every sample is the artifact.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::Device;
use lorasweep_coordinator::agent::{ExecError, JobContext, JobExecutor, JobOutput, OutputFile};
use lorasweep_coordinator::domain::{JobAssignment, Progress};
use lorasweep_coordinator::graph::JobKind;
use lorasweep_worker::adapter::{AInit, AdapterSettings, Variant};
use lorasweep_worker::evaluate::{self, EvalJob, EvalOptions};
use lorasweep_worker::jobs::{self, DataSource, TrainJob};
use lorasweep_worker::probe::{Estimator, ProbeResult, ProbeSettings};
use lorasweep_worker::train::{Schedule, TrainSettings};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Longest conversation a loss-scored eval reads when the job does not say.
const EVAL_MAX_LEN: usize = 512;

/// Runs engine jobs on one device.
pub struct EngineExecutor {
    device: Device,
}

impl EngineExecutor {
    /// An executor on the default device (CUDA when built with it and present).
    pub fn new() -> Self {
        Self {
            device: lorasweep_worker::loader::default_device(),
        }
    }
}

impl JobExecutor for EngineExecutor {
    fn run(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError> {
        match job.kind {
            JobKind::Probe => self.probe(job, context),
            JobKind::Train => self.train(job, context),
            JobKind::Eval => self.eval(job, context),
        }
    }
}

/// Reads a field of the job's parameters.
fn field<T: serde::de::DeserializeOwned>(params: &Value, name: &str) -> Result<T, ExecError> {
    let value = params
        .get(name)
        .cloned()
        .ok_or_else(|| ExecError::Permanent(format!("job parameter {name} is missing")))?;
    serde_json::from_value(value)
        .map_err(|e| ExecError::Permanent(format!("job parameter {name}: {e}")))
}

fn probe_settings(params: &Value, seed: u64) -> Result<ProbeSettings, ExecError> {
    let estimator: String = field(params, "estimator")?;
    let a_init: String = field(params, "a_init")?;
    Ok(ProbeSettings {
        batches: field(params, "batches")?,
        batch_size: field(params, "batch_size")?,
        max_len: field(params, "max_len")?,
        rank: field(params, "rank")?,
        alpha: field(params, "alpha")?,
        estimator: Estimator::parse(&estimator)
            .ok_or_else(|| ExecError::Permanent(format!("unknown estimator {estimator}")))?,
        a_init: AInit::parse(&a_init).map_err(|e| ExecError::Permanent(e.to_string()))?,
        seed,
    })
}

/// Errors of the engine: a bad model, data or setting will fail again; anything else may not.
fn engine_error(error: impl std::fmt::Display) -> ExecError {
    ExecError::Permanent(error.to_string())
}

fn io_error(context: &str, error: impl std::fmt::Display) -> ExecError {
    ExecError::Retryable(format!("{context}: {error}"))
}

impl EngineExecutor {
    fn probe(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError> {
        let seed: u64 = field(&job.params, "seed")?;
        let settings = probe_settings(&job.params, seed)?;
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
        let result =
            jobs::probe(&job.model, &data, &settings, &self.device).map_err(engine_error)?;
        let path = context.work_dir().join("probe.json");
        lorasweep_worker::peft::write_json(&path, &result)
            .map_err(|e| io_error("writing probe.json", e))?;
        let summary = json!({
            "dominant": result.dominant,
            "top1_share": result.top1_share,
            "argmax_stability": result.argmax_stability,
            "share_by_kind": result.share_by_kind,
            "tokens": result.tokens,
            "wall_s": result.wall_s,
            "estimator": settings.estimator,
            "a_init": settings.a_init,
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

    fn train(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError> {
        let params = &job.params;
        let out = context.work_dir().join("adapter");
        let variant: String = field(params, "variant")?;
        let schedule: String = field(params, "schedule")?;
        let seed: u64 = field(params, "seed")?;
        let rank: usize = field(params, "rank")?;
        let alpha: f64 = field(params, "alpha")?;
        let probe_path = self.merged_probe(job, context)?;
        let mut resume = false;
        if let Some(checkpoint) = &job.resume_from {
            let archive = context.fetch_artifact(checkpoint, context.work_dir())?;
            unpack_checkpoint(&archive, &out.join("checkpoint"))
                .map_err(|e| io_error("unpacking the checkpoint", e))?;
            resume = true;
            tracing::info!(job = %job.key, step = checkpoint.step, "resuming from an uploaded checkpoint");
        }
        let probe_params = params.get("probe").cloned().unwrap_or(Value::Null);
        let probe_settings = if probe_params.is_null() {
            ProbeSettings::default()
        } else {
            probe_settings(&probe_params, seed)?
        };
        let train_job = TrainJob {
            model: job.model.clone(),
            data: DataSource::Task(job.task.clone()),
            placement: field(params, "placement")?,
            probe: probe_path,
            probe_settings,
            adapter: AdapterSettings {
                variant: Variant::parse(&variant).map_err(engine_error)?,
                rank,
                alpha,
                a_init: AInit::Kaiming,
                seed,
            },
            loraplus_ratio: params
                .get("loraplus_ratio")
                .and_then(Value::as_f64)
                .unwrap_or(16.0),
            train: TrainSettings {
                steps: field(params, "steps")?,
                batch_size: field(params, "batch_size")?,
                grad_accum: field(params, "grad_accum")?,
                max_len: field(params, "max_len")?,
                lr: field(params, "lr")?,
                schedule: Schedule::parse(&schedule)
                    .ok_or_else(|| ExecError::Permanent(format!("unknown schedule {schedule}")))?,
                warmup_ratio: field(params, "warmup_ratio")?,
                weight_decay: field(params, "weight_decay")?,
                max_grad_norm: field(params, "max_grad_norm")?,
                seed,
                checkpoint_every: field(params, "checkpoint_every")?,
                ..TrainSettings::default()
            },
            out: out.clone(),
            resume,
        };
        let total = train_job.train.steps as u64;
        let every = train_job.train.checkpoint_every;
        let mut upload_error = None;
        let outcome = jobs::train_controlled(&train_job, &self.device, &mut |record| {
            context.progress(Progress {
                step: record.step as u64,
                total_steps: total,
                loss: Some(record.loss),
                tokens_per_second: Some(record.tokens_per_s),
                message: format!("lr {:.2e}", record.lr),
            });
            if every > 0 && record.step % every == 0 && record.step as u64 != total {
                let archive = context.work_dir().join("checkpoint.tar");
                let uploaded = pack_checkpoint(&out.join("checkpoint"), &archive)
                    .map_err(|e| io_error("packing the checkpoint", e))
                    .and_then(|()| {
                        context
                            .save_checkpoint(&archive, record.step as u64)
                            .map_err(ExecError::from)
                    });
                if let Err(error) = uploaded {
                    upload_error = Some(error);
                    return ControlFlow::Break(());
                }
            }
            if context.is_cancelled() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        if let Some(error) = upload_error {
            return Err(error);
        }
        if context.is_cancelled() {
            return Err(ExecError::Cancelled);
        }
        let outcome = outcome.map_err(engine_error)?;
        let metrics = &outcome.metrics;
        let result = json!({
            "modules": outcome.modules.iter().map(|(m, r)| json!({"name": m.name(), "rank": r})).collect::<Vec<_>>(),
            "trainable_parameters": metrics.trainable_parameters,
            "final_loss": metrics.steps.last().map(|r| r.loss),
            "losses": metrics.steps.iter().map(|r| r.loss).collect::<Vec<_>>(),
            "tokens": metrics.tokens,
            "tokens_per_s": metrics.tokens_per_s,
            "wall_s": metrics.wall_s,
            "resumed_from": metrics.resumed_from,
            "dominant": outcome.dominant,
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
        lorasweep_worker::peft::write_json(&path, &merged)
            .map_err(|e| io_error("writing the merged probe", e))?;
        Ok(Some(path))
    }

    fn eval(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError> {
        let params = &job.params;
        let adapter = match params.get("adapter").and_then(Value::as_str) {
            None => None,
            Some(train_key) => {
                let dependency = job
                    .dependencies
                    .iter()
                    .find(|d| d.key.0 == train_key)
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
        let metric = match params.get("metric").and_then(Value::as_str) {
            Some(name) => Some(
                name.parse::<lorasweep_worker::tasks::Metric>()
                    .map_err(engine_error)?,
            ),
            None => None,
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
            metric,
            options: EvalOptions {
                limit: params
                    .get("limit")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize),
                max_new_tokens: params
                    .get("max_new_tokens")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize),
                batch_size: params
                    .get("batch_size")
                    .and_then(Value::as_u64)
                    .map_or(8, |n| n as usize),
                // Loss-scored conversations are cut here (the report counts the cut ones).
                max_len: params
                    .get("max_len")
                    .and_then(Value::as_u64)
                    .map_or(EVAL_MAX_LEN, |n| n as usize),
                ..EvalOptions::default()
            },
        };
        let report = evaluate::eval_job(&eval_job, &self.device).map_err(engine_error)?;
        let path = context.work_dir().join("eval.json");
        report
            .write_json(&path)
            .map_err(|e| io_error("writing eval.json", e))?;
        let result = json!({
            "task": report.task,
            "score": report.score,
            "metrics": report.metrics,
            "n": report.n,
            "wall_s": report.wall_s,
            "adapter": report.adapter,
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

/// Content key of a probe: model weights, task data, settings and seed.
fn probe_cache_key(
    model: &str,
    data: &DataSource,
    settings: &ProbeSettings,
) -> Result<String, ExecError> {
    let source = jobs::resolve_model(model).map_err(engine_error)?;
    let files = match &source {
        lorasweep_worker::model::ModelSource::Gguf(path) => vec![path.clone()],
        lorasweep_worker::model::ModelSource::HfDir(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| io_error("listing the model", e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            files
        }
    };
    let model_digest = lorasweep_worker::loader::file_digest(&files).map_err(engine_error)?;
    let data_digest =
        lorasweep_worker::data::digest_conversations(&data.conversations().map_err(engine_error)?);
    let mut hasher = Sha256::new();
    hasher.update(b"lorasweep.probe.v1\n");
    hasher.update(model_digest.as_bytes());
    hasher.update(data_digest.as_bytes());
    hasher.update(
        serde_json::to_string(settings)
            .map_err(engine_error)?
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
