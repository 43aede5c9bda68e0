//! `lorasweep eval`: evaluate a model, with or without an adapter, on a task's eval split and
//! write the report (metrics and every per-sample record) as JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use lorasweep_engine::eval::metrics::EvalReport;
use lorasweep_engine::eval::sandbox::{SandboxConfig, ALLOW_WEAK_ENV};
use lorasweep_engine::evaluate::{self, CodePrompt, EvalJob, EvalOptions};
use lorasweep_engine::loader;
use lorasweep_engine::tasks::Metric;

/// Arguments of `lorasweep eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Packaged model name (smollm2-135m, qwen2.5-coder-0.5b), a GGUF file or an HF directory.
    #[arg(long)]
    model: String,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Fold the adapter into the weights before evaluating (same outputs, faster).
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// A named task (math, code, instruct, chat) or a task JSONL path.
    #[arg(long)]
    task: String,
    /// The metric of a task JSONL: exact, contains or loss (named tasks have their own).
    #[arg(long)]
    metric: Option<String>,
    /// Evaluate the first N items of the eval split (default: all of it).
    #[arg(long)]
    limit: Option<usize>,
    /// Most tokens generated per sample (default: by metric — math 256, code 384 in chat
    /// form or 256 as a completion, instruct 512, exact/contains 256).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Prompts (or conversations, for loss) run at once.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest tokenized conversation scored by loss: assistant tokens past it are not
    /// scored, and a conversation with none before it is skipped (both are counted).
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// How code problems are prompted: chat (the code task's training format, the whole
    /// function in a fenced block) or completion (continue the HumanEval prompt).
    #[arg(long, default_value = "chat", value_parser = ["chat", "completion"])]
    code_prompt: String,
    /// Wall-clock seconds each generated program may run (code).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Programs run at once in the sandbox (default: the number of cores).
    #[arg(long)]
    parallel: Option<usize>,
    /// Accept a code sandbox weaker than Landlock + seccomp + resource limits (by default
    /// code evaluation refuses to run below that level; docs/security.md).
    #[arg(long = "allow-weak-sandbox", env = ALLOW_WEAK_ENV)]
    allow_weak_sandbox: bool,
    /// Where to write the report JSON.
    #[arg(long)]
    out: PathBuf,
    /// Also write every generation as JSONL: batch, prompt text and token ids, settings,
    /// generated ids, text and finish reason (for comparing with another implementation,
    /// e.g. `bench/hf_generate.py`).
    #[arg(long, value_name = "FILE")]
    dump_generations: Option<PathBuf>,
}

/// Runs `lorasweep eval`.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    if args.limit == Some(0) {
        bail!("--limit must be at least 1 (leave it out to evaluate the whole split)");
    }
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let metric = args
        .metric
        .as_deref()
        .map(lorasweep_engine::tasks::user_metric)
        .transpose()?;
    let job = EvalJob {
        model: args.model.clone(),
        adapter: args.adapter.clone(),
        merge: args.merge,
        task: args.task.clone(),
        metric,
        options: EvalOptions {
            limit: args.limit,
            max_new_tokens: args.max_new_tokens,
            batch_size: args.batch_size,
            max_len: args.max_len,
            code_prompt: CodePrompt::parse(&args.code_prompt).expect("clap checked the value"),
            sandbox: SandboxConfig {
                allow_weak: args.allow_weak_sandbox,
                ..evaluate::sandbox_config(Duration::from_secs_f64(args.timeout), args.parallel)
            },
            generation_dump: args.dump_generations.clone(),
            ..EvalOptions::default()
        },
    };
    let device = loader::default_device();
    let report = evaluate::eval_job(&job, &device)?;
    report
        .write_json(&args.out)
        .with_context(|| format!("writing the report to {}", args.out.display()))?;
    let headline = lorasweep_engine::tasks::TASKS
        .iter()
        .find(|spec| spec.name == args.task)
        .map(|spec| spec.metric)
        .or(metric)
        .unwrap_or(Metric::Loss);
    println!("{}", score_line(&report, headline.name()));
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `task: metric = score (n = …)`, then the other metrics and the time taken.
fn score_line(report: &EvalReport, headline: &str) -> String {
    let mut line = format!(
        "{}: {headline} = {:.4}  (n = {})",
        report.task, report.score, report.n
    );
    let extras: Vec<String> = report
        .metrics
        .iter()
        .filter(|(name, _)| name.as_str() != headline)
        .map(|(name, value)| {
            if value.fract() == 0.0 && value.abs() < 1e12 {
                format!("{name} {value:.0}")
            } else {
                format!("{name} {value:.4}")
            }
        })
        .collect();
    if !extras.is_empty() {
        line.push_str(" · ");
        line.push_str(&extras.join(", "));
    }
    line.push_str(&format!(" · {:.1} s", report.wall_s));
    line
}
