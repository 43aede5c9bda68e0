//! `generate`, `probe`, `train`: one engine job, locally, without a coordinator.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use lorasweep_engine::adapter::{AInit, AdapterSettings, Variant};
use lorasweep_engine::data::{Message, Role};
use lorasweep_engine::generate::{self, GenerationSettings};
use lorasweep_engine::jobs::{self, DataSource, TrainJob};
use lorasweep_engine::loader;
use lorasweep_engine::probe::{Estimator, ProbeSettings};
use lorasweep_engine::rules::Rule;
use lorasweep_engine::train::{Schedule, TrainSettings};

/// Where the conversations come from: `--data FILE.jsonl` or `--task NAME`.
#[derive(Args, Debug)]
pub struct DataArgs {
    /// Chat-messages JSONL: one {"messages":[{"role":…,"content":…},…]} per line.
    #[arg(long, conflicts_with = "task")]
    data: Option<PathBuf>,
    /// A named task (math, code, instruct, chat) or a task JSONL path; its train split is used.
    #[arg(long)]
    task: Option<String>,
}

impl DataArgs {
    pub(crate) fn source(&self) -> anyhow::Result<DataSource> {
        match (&self.data, &self.task) {
            (Some(path), None) => Ok(DataSource::Jsonl(path.clone())),
            (None, Some(task)) => Ok(DataSource::Task(task.clone())),
            _ => anyhow::bail!("give the training data with --data FILE.jsonl or --task NAME"),
        }
    }
}

/// Probe settings on the command line.
#[derive(Args, Debug)]
pub struct ProbeOptions {
    /// Probe batches averaged.
    #[arg(long, default_value_t = 8)]
    batches: usize,
    /// Conversations per probe batch.
    #[arg(long, default_value_t = 8)]
    probe_batch_size: usize,
    /// Longest tokenized conversation in the probe.
    #[arg(long, default_value_t = 256)]
    probe_max_len: usize,
    /// PAGE estimator: sample (real A draw) or expected (expectation over A).
    #[arg(long, default_value_t = Estimator::default())]
    estimator: Estimator,
    /// Init of A: kaiming (PEFT default) or gaussian.
    #[arg(long = "a-init", default_value_t = AInit::default())]
    a_init: AInit,
    /// How modules are scored: page, grad, grad-rank, act, kappa or random.
    #[arg(long, default_value_t = Rule::default())]
    rule: Rule,
}

impl ProbeOptions {
    fn settings(&self, rank: usize, alpha: f64, seed: u64) -> anyhow::Result<ProbeSettings> {
        anyhow::ensure!(self.batches > 0, "--batches must be at least 1");
        anyhow::ensure!(
            self.probe_batch_size > 0,
            "--probe-batch-size must be at least 1"
        );
        anyhow::ensure!(
            self.probe_max_len >= 2,
            "--probe-max-len must be at least 2"
        );
        anyhow::ensure!(rank > 0, "--rank must be at least 1");
        Ok(ProbeSettings {
            batches: self.batches,
            batch_size: self.probe_batch_size,
            max_len: self.probe_max_len,
            rank,
            alpha,
            estimator: self.estimator,
            a_init: self.a_init,
            seed,
            rule: self.rule,
        })
    }
}

/// Arguments of `lorasweep generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Packaged model name (smollm2-135m, qwen2.5-coder-0.5b), a GGUF file or an HF directory.
    #[arg(long)]
    model: String,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Fold the adapter into the weights before generating.
    #[arg(long)]
    merge: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Arguments of `lorasweep probe`.
#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Packaged model name, a GGUF file or an HF directory.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    probe: ProbeOptions,
    /// Probe adapter rank r.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Probe adapter alpha (scale alpha/r).
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Seed for A and for the choice of batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSON file.
    #[arg(long)]
    out: PathBuf,
}

/// Arguments of `lorasweep train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Packaged model name, a GGUF file or an HF directory.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// all, dominant, dominant:KIND, top_k:N, random:N, kind:KIND, explicit:NAME[,NAME…], budget_matched:PARAMS;
    /// those that read a probe optionally followed by @RULE (page, grad, grad-rank, act, kappa, random).
    #[arg(long, default_value = "all")]
    placement: String,
    /// A probe result for placements that read one, of the placement's rule (otherwise the
    /// probe runs first).
    #[arg(long)]
    probe: Option<PathBuf>,
    #[command(flatten)]
    probe_options: ProbeOptions,
    /// lora, rslora, dora, pissa, loraplus, milora.
    #[arg(long, default_value = "lora")]
    variant: Variant,
    /// Adapter rank r.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Adapter alpha.
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// LoRA+ ratio of B's learning rate to A's.
    #[arg(long, default_value_t = 16.0)]
    loraplus_ratio: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Conversations per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longest tokenized conversation.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// cosine, linear or constant.
    #[arg(long, default_value_t = Schedule::default())]
    schedule: Schedule,
    /// Fraction of steps of linear warmup.
    #[arg(long, default_value_t = 0.03)]
    warmup_ratio: f64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of the adapter init, the data order and random placements.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    resume: bool,
    /// Output directory (PEFT adapter, metrics.json, checkpoint/).
    #[arg(long)]
    out: PathBuf,
    /// Train data-parallel over N ranks: on CUDA devices 0..N-1, all-reducing through NCCL
    /// when built with `nccl` (1 runs the NCCL path with one rank), otherwise as N threads on
    /// the CPU. --batch-size stays the global micro-batch, split over the ranks. Prints every
    /// step's loss.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    data_parallel: Option<u32>,
}

/// `lorasweep generate`.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device = loader::default_device();
    let mut model = jobs::load_model(&args.model, &device)?;
    if let Some(dir) = &args.adapter {
        let modules = lorasweep_engine::peft::load(dir, &mut model.transformer)?;
        tracing::info!(modules = modules.len(), adapter = %dir.display(), "adapter applied");
        if args.merge {
            model.transformer.merge_adapters()?;
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(Message {
            role: Role::System,
            content: system,
        });
    }
    messages.push(Message {
        role: Role::User,
        content: args.prompt,
    });
    let settings = GenerationSettings {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop: Vec::new(),
    };
    let reply = generate::chat(
        &model.transformer,
        &model.tokenizer,
        &model.chat_template,
        &messages,
        &settings,
    )?;
    println!("{}", reply.text);
    tracing::info!(tokens = reply.tokens.len(), tokens_per_s = format!("{:.1}", reply.tokens_per_s), finish = %reply.finish, "generated");
    Ok(())
}

/// `lorasweep probe`.
pub fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let device = loader::default_device();
    let settings = args.probe.settings(args.rank, args.alpha, args.seed)?;
    let source = args.data.source()?;
    let result = jobs::probe(&args.model, &source, &settings, &device)?;
    lorasweep_engine::peft::write_json(&args.out, &result)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if settings.rule.is_page() {
        println!(
            "dominant module: {} ({:.1}% of PAGE, argmax agrees on {:.0}% of batches; estimator {}, A init {})",
            result.dominant,
            100.0 * result.top1_share,
            100.0 * result.argmax_stability,
            args.probe.estimator,
            args.probe.a_init
        );
    } else {
        println!(
            "dominant module by {}: {} ({:.1}% of the scores, argmax agrees on {:.0}% of batches)",
            settings.rule,
            result.dominant,
            100.0 * result.top1_share,
            100.0 * result.argmax_stability,
        );
    }
    for (rank, module) in result.ranking().iter().take(5).enumerate() {
        let score = result
            .modules
            .iter()
            .find(|m| m.name == module.name())
            .expect("ranked modules exist");
        println!(
            "{:>2}. {:<28} {:>6.2}%  {:.4e}",
            rank + 1,
            score.name,
            100.0 * score.share,
            score.score
        );
    }
    if let Some(peak) = result.peak_rss_gib {
        println!("peak resident memory {peak:.2} GiB; {:.1} s", result.wall_s);
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `lorasweep train`.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let device = loader::default_device();
    let schedule = args.schedule;
    let placement = lorasweep_engine::placement::parse(&args.placement)?;
    let rule = placement.rule();
    if !args.probe_options.rule.is_page() && rule != Some(args.probe_options.rule) {
        anyhow::bail!(
            "--rule {} does not apply to --placement {}: a train run reads the rule after `@` \
             in its placement (e.g. dominant@{})",
            args.probe_options.rule,
            args.placement,
            args.probe_options.rule
        );
    }
    let job = TrainJob {
        model: args.model.clone(),
        data: args.data.source()?,
        placement,
        probe: args.probe.clone(),
        probe_settings: args
            .probe_options
            .settings(args.rank, args.alpha, args.seed)?,
        adapter: AdapterSettings {
            variant: args.variant,
            rank: args.rank,
            alpha: args.alpha,
            a_init: args.probe_options.a_init,
            seed: args.seed,
        },
        loraplus_ratio: args.loraplus_ratio,
        train: TrainSettings {
            steps: args.steps,
            batch_size: args.batch_size,
            grad_accum: args.grad_accum,
            max_len: args.max_len,
            lr: args.lr,
            schedule,
            warmup_ratio: args.warmup_ratio,
            weight_decay: args.weight_decay,
            max_grad_norm: args.max_grad_norm,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
            ..TrainSettings::default()
        },
        out: args.out.clone(),
        resume: args.resume,
    };
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")
            .expect("valid template"),
    );
    let hidden = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    if hidden {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    if let Some(world) = args.data_parallel {
        return train_data_parallel(&job, world as usize, &device, &args.out);
    }
    let outcome = jobs::train(&job, &device, &mut |record| {
        bar.set_position(record.step as u64);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            record.loss, record.lr, record.tokens_per_s
        ));
        if hidden {
            tracing::info!(
                step = record.step,
                loss = record.loss,
                lr = record.lr,
                grad_norm = record.grad_norm,
                tokens_per_s = record.tokens_per_s,
                "train step"
            );
        }
    })?;
    bar.finish_and_clear();
    let metrics = &outcome.metrics;
    let first = metrics.steps.first().map_or(f64::NAN, |r| r.loss);
    let last = metrics.steps.last().map_or(f64::NAN, |r| r.loss);
    println!(
        "trained {} module(s), {} trainable parameters; loss {first:.4} → {last:.4}; {:.0} tokens/s; {:.1} s",
        outcome.modules.len(),
        metrics.trainable_parameters,
        metrics.tokens_per_s,
        metrics.wall_s
    );
    if let Some(peak) = metrics.peak_rss_gib {
        println!("peak resident memory {peak:.2} GiB");
    }
    if let Some(dominant) = &outcome.dominant {
        match rule {
            Some(rule) if !rule.is_page() => println!("{rule} dominant module: {dominant}"),
            _ => println!("PAGE dominant module: {dominant}"),
        }
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `lorasweep train --data-parallel N`: N ranks on devices 0..N-1 of the default device's
/// kind; every step's loss, gradient norm and tokens/s on standard output.
fn train_data_parallel(
    job: &TrainJob,
    world: usize,
    device: &candle_core::Device,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let devices = (0..world)
        .map(|index| {
            if device.is_cuda() {
                lorasweep_engine::loader::cuda_device(index)
                    .with_context(|| format!("--data-parallel {world}: cuda device {index}"))
            } else {
                Ok(candle_core::Device::Cpu)
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ranks = jobs::local_world(devices)?;
    let reducer = if device.is_cuda() && cfg!(feature = "nccl") {
        "nccl"
    } else {
        "threads"
    };
    println!(
        "data-parallel: {world} rank(s) on {}, all-reduce through {reducer}, global micro-batch {}",
        if device.is_cuda() { "cuda" } else { "cpu" },
        job.train.batch_size
    );
    let outcome = jobs::train_ranks(job, world, ranks, &|rank, record| {
        if rank == 0 {
            println!(
                "step {:>5}  loss {:.6}  grad_norm {:.6}  lr {:.3e}  {:.0} tok/s",
                record.step, record.loss, record.grad_norm, record.lr, record.tokens_per_s
            );
        }
        std::ops::ControlFlow::Continue(())
    })?;
    let metrics = &outcome.metrics;
    println!(
        "trained {} module(s), {} trainable parameters over {world} rank(s); {:.0} tokens/s; {:.1} s",
        outcome.modules.len(),
        metrics.trainable_parameters,
        metrics.tokens_per_s,
        metrics.wall_s
    );
    if let Some(peak) = metrics.peak_rss_gib {
        println!("peak resident memory {peak:.2} GiB (this process, every rank it ran)");
    }
    println!("wrote {}", out.display());
    Ok(())
}
