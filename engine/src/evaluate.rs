//! Evaluating a model, with or without an adapter, on a task's eval split: generation in
//! batches, scoring by the task's metric, and an [`EvalReport`] with every per-sample record.
//!
//! | metric | prompt | generation | verdict |
//! | --- | --- | --- | --- |
//! | `number_match` (`math`) | the question as the user turn, chat template | greedy, until end of turn | the final number equals the gold number ([`eval::math`](crate::eval::math)) |
//! | `pass@1` (`code`) | see [`CodePrompt`] | greedy | the cleaned completion passes the problem's tests in the sandbox |
//! | `instruction_following` (`instruct`) | the IFBench prompt as the user turn | greedy, until end of turn | our verifiers, strict; prompts with an uncovered instruction are counted apart |
//! | `loss` (`chat`, user tasks) | none | none | mean loss of every assistant turn's tokens given its history, token-weighted; perplexity = exp(loss) |
//! | `exact` / `contains` (user tasks) | the messages before the reference, chat template | greedy, until end of turn | the reply equals / contains the reference (surrounding whitespace ignored) |
//!
//! Prompts are sorted by length before batching (less padding) and results are put back in
//! the split's order; greedy outputs do not depend on the batch (see
//! [`generate::complete_batch`]). The first `limit` items of the split are evaluated.
//!
//! One cohesive thing at ~870 lines: the one evaluation path every task family goes through
//! (batching, generation, the metric's scoring, the report), each family a short function here
//! over the scorers of [`crate::eval`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::{self, Collated, Example, Message, Role};
use crate::eval::code::{self, Completion, Problem};
use crate::eval::instruct::{self, IfPrompt};
use crate::eval::math;
use crate::eval::metrics::{EvalRecord, EvalReport, TokenLoss};
use crate::eval::sandbox::{Limits, Sandbox, SandboxConfig};
use crate::generate::{self, Generation, GenerationSettings};
use crate::loader::LoadedModel;
use crate::model::Transformer;
use crate::tasks::{self, ConversationItem, EvalItem, MathItem, Metric, ReferenceItem, Task};

/// How a HumanEval problem is put to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodePrompt {
    /// The chat template around [`tasks::code_train::user_message`], the format the `code`
    /// task trains on: the model answers with the whole function in a fenced block, which
    /// [`code::clean_completion`] takes out. The default, so a trained adapter is asked in
    /// its own format and the base model gets the same prompt.
    Chat,
    /// The problem's prompt as plain text for the model to continue (the original HumanEval
    /// protocol), stopped at [`code::STOP_SEQUENCES`].
    Completion,
}

impl CodePrompt {
    /// Parses `chat` or `completion`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "chat" => Some(Self::Chat),
            "completion" => Some(Self::Completion),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "completion",
        }
    }
}

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Evaluate the first `limit` items of the split (all when `None`; `Some(0)` is an error).
    pub limit: Option<usize>,
    /// Most tokens generated per sample; `None` takes the metric's default
    /// ([`default_max_new_tokens`]).
    pub max_new_tokens: Option<usize>,
    /// Prompts (or conversations, for `loss`) run at once.
    pub batch_size: usize,
    /// Longest tokenized conversation scored by `loss`; longer ones are cut, and the
    /// assistant tokens past the cut are not scored (the report counts the cut ones).
    pub max_len: usize,
    /// How code problems are prompted.
    pub code_prompt: CodePrompt,
    /// Limits of the code sandbox (used by `pass@1` only).
    pub sandbox: SandboxConfig,
    /// The model's name as the user gave it (the report adds the weights' digest); `None`
    /// uses the model's path.
    pub model_label: Option<String>,
    /// The adapter's identity (see [`adapter_identity`]), `None` for the base model.
    pub adapter: Option<String>,
    /// Also write every generation to this JSONL file (one line per prompt, in input order:
    /// the batch it ran in, the prompt's text and token ids, the settings, the generated ids,
    /// text and finish reason), so another implementation can generate from exactly the same
    /// token ids in the same batches and be compared token for token.
    pub generation_dump: Option<std::path::PathBuf>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            max_new_tokens: None,
            batch_size: 8,
            max_len: 2048,
            code_prompt: CodePrompt::Chat,
            sandbox: SandboxConfig::default(),
            model_label: None,
            adapter: None,
            generation_dump: None,
        }
    }
}

/// The default number of new tokens per sample for a metric: room for a worked GSM
/// solution (256), a whole function with its fence (384; 256 as a plain continuation), a
/// long IFBench answer (512), a user task's reply (256).
pub fn default_max_new_tokens(metric: Metric, code_prompt: CodePrompt) -> usize {
    match (metric, code_prompt) {
        (Metric::NumberMatch, _) => 256,
        (Metric::PassAt1, CodePrompt::Chat) => 384,
        (Metric::PassAt1, CodePrompt::Completion) => 256,
        (Metric::InstructionFollowing, _) => 512,
        (Metric::Exact | Metric::Contains, _) => 256,
        (Metric::Loss, _) => 0,
    }
}

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// An option cannot work.
    #[error("{0}")]
    InvalidOption(String),
    /// The task has nothing to evaluate.
    #[error("task `{task}` has an empty eval split")]
    EmptySplit {
        /// The task.
        task: String,
    },
    /// One sample could not be prepared or scored.
    #[error("{id}: {detail}")]
    Item {
        /// The sample's id.
        id: String,
        /// What went wrong.
        detail: String,
    },
    /// No prompt of an instruct evaluation could be verified.
    #[error("none of the {prompts} evaluated prompts has only instructions we can verify; raise --limit")]
    NothingVerifiable {
        /// Prompts evaluated.
        prompts: usize,
    },
    /// Writing an output file failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Loading the task failed.
    #[error(transparent)]
    Task(#[from] tasks::TaskError),
    /// Loading the model or the adapter failed.
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] generate::GenerateError),
    /// The chat template failed.
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    /// Tokenizing failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// The code sandbox could not run.
    #[error(transparent)]
    Sandbox(#[from] crate::eval::sandbox::SandboxError),
    /// Scoring code failed (not a program: the scorer).
    #[error(transparent)]
    Code(#[from] code::CodeError),
    /// Reading an adapter's files failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Loading an adapter failed.
    #[error(transparent)]
    Peft(#[from] crate::peft::PeftError),
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// Evaluates `model` on `task`'s eval split.
pub fn run(
    model: &LoadedModel,
    task: &Task,
    options: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    let started = Instant::now();
    let items = limited_items(task, options)?;
    let mut evaluation = match task.metric() {
        Metric::NumberMatch => evaluate_math(model, items, options)?,
        Metric::PassAt1 => evaluate_code(model, items, options)?,
        Metric::InstructionFollowing => evaluate_instruct(model, items, options)?,
        Metric::Loss => evaluate_loss(model, items, options)?,
        Metric::Exact | Metric::Contains => {
            evaluate_reference(model, items, task.metric(), options)?
        }
    };
    let label = options
        .model_label
        .clone()
        .unwrap_or_else(|| model.source.path().display().to_string());
    evaluation
        .metrics
        .insert(evaluation.headline.to_string(), evaluation.score);
    Ok(EvalReport {
        task: task.name().to_string(),
        split: "eval".to_string(),
        metrics: evaluation.metrics,
        score: evaluation.score,
        n: evaluation.n,
        model: format!("{label}@sha256:{}", model.digest),
        adapter: options.adapter.clone(),
        records: evaluation.records,
        wall_s: started.elapsed().as_secs_f64(),
        sandbox: evaluation.sandbox,
    })
}

/// An adapter's identity for reports: its directory, the sha256 of its weights, and
/// whether it was merged into the base weights.
pub fn adapter_identity(dir: &Path, merged: bool) -> Result<String, EvalError> {
    let digest = crate::loader::file_digest(&[dir.join("adapter_model.safetensors")])?;
    let merged = if merged { " (merged)" } else { "" };
    Ok(format!("{}@sha256:{digest}{merged}", dir.display()))
}

/// Everything one `lorasweep eval` needs.
#[derive(Debug, Clone)]
pub struct EvalJob {
    /// The model (a packaged name, a GGUF file or an HF directory).
    pub model: String,
    /// A PEFT adapter directory to apply.
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the weights before evaluating.
    pub merge: bool,
    /// A named task or a task JSONL path.
    pub task: String,
    /// The metric of a user task (named tasks accept only their own).
    pub metric: Option<Metric>,
    /// How to evaluate (`model_label` and `adapter` are filled in from the job).
    pub options: EvalOptions,
}

/// Loads the task, the model and the adapter, and evaluates. The task is loaded first, so a
/// bad task name fails before the model is read.
pub fn eval_job(job: &EvalJob, device: &Device) -> Result<EvalReport, EvalError> {
    if job.merge && job.adapter.is_none() {
        return Err(EvalError::InvalidOption(
            "--merge needs an adapter (--adapter DIR)".into(),
        ));
    }
    let task = tasks::load(&job.task, job.metric)?;
    limited_items(&task, &job.options)?;
    let mut model = crate::jobs::load_model(&job.model, device)?;
    let mut options = job.options.clone();
    options.model_label = Some(job.model.clone());
    if let Some(dir) = &job.adapter {
        let modules = crate::peft::load(dir, &mut model.transformer)?;
        tracing::info!(modules = modules.len(), adapter = %dir.display(), merged = job.merge, "adapter applied");
        if job.merge {
            model.transformer.merge_adapters()?;
        }
        options.adapter = Some(adapter_identity(dir, job.merge)?);
    }
    run(&model, &task, &options)
}

/// The first `limit` eval items, after checking the options.
fn limited_items<'a>(task: &'a Task, options: &EvalOptions) -> Result<&'a [EvalItem], EvalError> {
    if options.limit == Some(0) {
        return Err(EvalError::InvalidOption(
            "--limit must be at least 1 (leave it out to evaluate the whole split)".into(),
        ));
    }
    if options.batch_size == 0 {
        return Err(EvalError::InvalidOption(
            "--batch-size must be at least 1".into(),
        ));
    }
    if options.max_len < 2 {
        return Err(EvalError::InvalidOption(
            "--max-len must be at least 2".into(),
        ));
    }
    let items = task.eval_items();
    if items.is_empty() {
        return Err(EvalError::EmptySplit {
            task: task.name().to_string(),
        });
    }
    let count = options.limit.unwrap_or(items.len()).min(items.len());
    Ok(&items[..count])
}

/// A metric's result before it becomes a report.
struct Evaluation {
    headline: &'static str,
    score: f64,
    n: usize,
    metrics: BTreeMap<String, f64>,
    records: Vec<EvalRecord>,
    /// The sandbox confinement (code evaluation only).
    sandbox: Option<crate::eval::sandbox::Isolation>,
}

/// One generated sample: the prompt text, the generation and the seconds its batch took.
struct Generated {
    prompt: String,
    generation: Generation,
    batch_s: f64,
}

/// Throughput of a generation run.
#[derive(Debug, Clone, Copy, Default)]
struct Throughput {
    tokens: usize,
    seconds: f64,
}

impl Throughput {
    fn insert_into(self, metrics: &mut BTreeMap<String, f64>) {
        metrics.insert("generated_tokens".into(), self.tokens as f64);
        metrics.insert("generation_s".into(), self.seconds);
        metrics.insert(
            "generated_tokens_per_s".into(),
            self.tokens as f64 / self.seconds.max(1e-9),
        );
    }
}

/// Renders `messages` with the model's chat template, ready for the assistant's answer.
fn chat_prompt(model: &LoadedModel, messages: &[Message]) -> Result<String, EvalError> {
    Ok(model.chat_template.render(messages, true)?)
}

fn user(content: &str) -> Message {
    Message {
        role: Role::User,
        content: content.to_string(),
    }
}

/// Generates for every prompt text, in batches of similar length; results in input order.
fn generate_all(
    model: &LoadedModel,
    prompts: Vec<String>,
    settings: &GenerationSettings,
    options: &EvalOptions,
) -> Result<(Vec<Generated>, Throughput), EvalError> {
    let batch_size = options.batch_size;
    let mut encoded = Vec::with_capacity(prompts.len());
    for prompt in &prompts {
        encoded.push(model.tokenizer.encode(prompt)?);
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&index| std::cmp::Reverse(encoded[index].len()));
    let mut results: Vec<Option<(Generation, f64)>> = (0..prompts.len()).map(|_| None).collect();
    let mut batch_of = vec![0; prompts.len()];
    let started = Instant::now();
    let mut done = 0;
    for (batch_index, chunk) in order.chunks(batch_size).enumerate() {
        for &index in chunk {
            batch_of[index] = batch_index;
        }
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&index| encoded[index].clone()).collect();
        let batch_started = Instant::now();
        let generations =
            generate::complete_batch(&model.transformer, &model.tokenizer, &batch, settings)?;
        let batch_s = batch_started.elapsed().as_secs_f64();
        let prompt_tokens: usize = batch.iter().map(Vec::len).sum();
        for (&index, generation) in chunk.iter().zip(generations) {
            results[index] = Some((generation, batch_s));
        }
        done += chunk.len();
        tracing::info!(
            done,
            of = prompts.len(),
            batch = chunk.len(),
            prompt_tokens,
            batch_s = format!("{batch_s:.1}"),
            "generated"
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &options.generation_dump {
        write_generation_dump(path, &prompts, &encoded, &batch_of, &results, settings)?;
    }
    let mut generated = Vec::with_capacity(prompts.len());
    let mut tokens = 0;
    for (prompt, result) in prompts.into_iter().zip(results) {
        let (generation, batch_s) = result.expect("every prompt was in one batch");
        tokens += generation.tokens.len();
        generated.push(Generated {
            prompt,
            generation,
            batch_s,
        });
    }
    Ok((generated, Throughput { tokens, seconds }))
}

/// Writes [`EvalOptions::generation_dump`]: a temporary file renamed into place, so a reader
/// never sees half a dump.
fn write_generation_dump(
    path: &Path,
    prompts: &[String],
    encoded: &[Vec<u32>],
    batch_of: &[usize],
    results: &[Option<(Generation, f64)>],
    settings: &GenerationSettings,
) -> Result<(), EvalError> {
    use std::io::Write;
    let io = |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let temp = path.with_extension("jsonl.partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&temp).map_err(io)?);
    for (index, prompt) in prompts.iter().enumerate() {
        let Some((generation, _)) = &results[index] else {
            continue;
        };
        let line = serde_json::json!({
            "index": index,
            "batch": batch_of[index],
            "prompt": prompt,
            "prompt_ids": encoded[index],
            "max_new_tokens": settings.max_new_tokens,
            "stop": settings.stop,
            "output_ids": generation.tokens,
            "text": generation.text,
            "finish": generation.finish,
        });
        writeln!(out, "{line}").map_err(io)?;
    }
    out.into_inner()
        .map_err(|error| io(error.into_error()))?
        .sync_all()
        .map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
}

fn greedy(max_new_tokens: usize, stop: Vec<String>) -> GenerationSettings {
    GenerationSettings {
        max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop,
    }
}

fn max_new_tokens(options: &EvalOptions, metric: Metric) -> usize {
    options
        .max_new_tokens
        .unwrap_or_else(|| default_max_new_tokens(metric, options.code_prompt))
}

fn wrong_kind(item: &EvalItem, metric: Metric) -> EvalError {
    EvalError::Item {
        id: item.id().to_string(),
        detail: format!("this kind of item cannot be scored by {metric}"),
    }
}

/// The generation facts of a record: why it ended, its length, the seconds its own
/// decoding took and the seconds its whole batch took (prefill included).
fn generation_json(generated: &Generated) -> serde_json::Value {
    let generation = &generated.generation;
    let decode_s = if generation.tokens.is_empty() {
        0.0
    } else {
        generation.tokens.len() as f64 / generation.tokens_per_s.max(1e-9)
    };
    json!({
        "finish": generation.finish,
        "tokens": generation.tokens.len(),
        "prompt_tokens": generation.prompt_tokens,
        "decode_s": decode_s,
        "batch_wall_s": generated.batch_s,
    })
}

/// Adds the generation facts to a verdict object.
fn with_generation(mut verdict: serde_json::Value, generated: &Generated) -> serde_json::Value {
    if let (Some(object), serde_json::Value::Object(extra)) =
        (verdict.as_object_mut(), generation_json(generated))
    {
        object.extend(extra);
    }
    verdict
}

fn evaluate_math(
    model: &LoadedModel,
    items: &[EvalItem],
    options: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    let mut problems: Vec<&MathItem> = Vec::with_capacity(items.len());
    let mut prompts = Vec::with_capacity(items.len());
    for item in items {
        let EvalItem::Math(problem) = item else {
            return Err(wrong_kind(item, Metric::NumberMatch));
        };
        prompts.push(chat_prompt(model, &[user(&problem.question)])?);
        problems.push(problem);
    }
    let settings = greedy(max_new_tokens(options, Metric::NumberMatch), Vec::new());
    let (generated, throughput) = generate_all(model, prompts, &settings, options)?;
    let mut correct = 0;
    let mut records = Vec::with_capacity(items.len());
    for (problem, generated) in problems.iter().zip(&generated) {
        let verdict =
            math::score_answer(&generated.generation.text, &problem.gold).map_err(|error| {
                EvalError::Item {
                    id: problem.id.clone(),
                    detail: error.to_string(),
                }
            })?;
        correct += usize::from(verdict.correct);
        records.push(EvalRecord {
            id: problem.id.clone(),
            prompt: generated.prompt.clone(),
            output: generated.generation.text.clone(),
            verdict: with_generation(json!(verdict), generated),
        });
    }
    let n = records.len();
    let mut metrics = BTreeMap::from([("correct".to_string(), correct as f64)]);
    throughput.insert_into(&mut metrics);
    Ok(Evaluation {
        headline: Metric::NumberMatch.name(),
        score: correct as f64 / n as f64,
        n,
        metrics,
        records,
        sandbox: None,
    })
}

fn evaluate_code(
    model: &LoadedModel,
    items: &[EvalItem],
    options: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    let mut problems: Vec<Problem> = Vec::with_capacity(items.len());
    let mut prompts = Vec::with_capacity(items.len());
    for item in items {
        let EvalItem::Code(problem) = item else {
            return Err(wrong_kind(item, Metric::PassAt1));
        };
        prompts.push(match options.code_prompt {
            CodePrompt::Chat => chat_prompt(
                model,
                &[user(&tasks::code_train::user_message(&problem.prompt))],
            )?,
            CodePrompt::Completion => problem.prompt.clone(),
        });
        problems.push(problem.clone());
    }
    // A fenced answer ends at the end of the turn; a plain continuation at the first line
    // of top-level code after the function.
    let stop = match options.code_prompt {
        CodePrompt::Chat => Vec::new(),
        CodePrompt::Completion => code::STOP_SEQUENCES.iter().map(|s| s.to_string()).collect(),
    };
    // Set up the sandbox first: a machine that cannot run Python fails before generating.
    let sandbox = Sandbox::new(options.sandbox.clone())?;
    let settings = greedy(max_new_tokens(options, Metric::PassAt1), stop);
    let (generated, throughput) = generate_all(model, prompts, &settings, options)?;
    let completions: Vec<Completion> = problems
        .iter()
        .zip(&generated)
        .map(|(problem, generated)| Completion {
            task_id: problem.task_id.clone(),
            completion: code::clean_completion(&generated.generation.text),
        })
        .collect();
    let sandbox_started = Instant::now();
    let scored = code::score_completions(&sandbox, &problems, &completions)?;
    let sandbox_s = sandbox_started.elapsed().as_secs_f64();
    let isolation = sandbox.isolation();
    tracing::info!(
        passed = scored.passed_samples,
        of = scored.samples,
        isolation = %isolation,
        sandbox_s = format!("{sandbox_s:.1}"),
        "code executed"
    );
    let mut records = Vec::with_capacity(items.len());
    for ((problem, generated), result) in problems.iter().zip(&generated).zip(&scored.results) {
        records.push(EvalRecord {
            id: problem.task_id.clone(),
            prompt: generated.prompt.clone(),
            output: generated.generation.text.clone(),
            verdict: with_generation(
                json!({
                    "passed": result.passed,
                    "completion": result.completion,
                    "outcome": result.outcome,
                    "note": result.note,
                }),
                generated,
            ),
        });
    }
    let mut metrics = BTreeMap::from([
        ("passed".to_string(), scored.passed_samples as f64),
        ("sandbox_s".to_string(), sandbox_s),
        (
            "network_isolated".to_string(),
            f64::from(u8::from(isolation.network)),
        ),
    ]);
    throughput.insert_into(&mut metrics);
    Ok(Evaluation {
        headline: Metric::PassAt1.name(),
        score: scored.pass_at_1,
        n: scored.problems,
        metrics,
        records,
        sandbox: Some(isolation),
    })
}

fn evaluate_instruct(
    model: &LoadedModel,
    items: &[EvalItem],
    options: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    let mut prompts_in: Vec<&IfPrompt> = Vec::with_capacity(items.len());
    let mut prompts = Vec::with_capacity(items.len());
    for item in items {
        let EvalItem::Instruct(prompt) = item else {
            return Err(wrong_kind(item, Metric::InstructionFollowing));
        };
        prompts.push(chat_prompt(model, &[user(&prompt.prompt)])?);
        prompts_in.push(prompt);
    }
    let settings = greedy(
        max_new_tokens(options, Metric::InstructionFollowing),
        Vec::new(),
    );
    let (generated, throughput) = generate_all(model, prompts, &settings, options)?;
    let mut verdicts = Vec::with_capacity(items.len());
    let mut records = Vec::with_capacity(items.len());
    for (prompt, generated) in prompts_in.iter().zip(&generated) {
        let verdict =
            instruct::score_response(prompt, &generated.generation.text).map_err(|error| {
                EvalError::Item {
                    id: prompt.key.clone(),
                    detail: error.to_string(),
                }
            })?;
        records.push(EvalRecord {
            id: prompt.key.clone(),
            prompt: generated.prompt.clone(),
            output: generated.generation.text.clone(),
            verdict: with_generation(json!(verdict), generated),
        });
        verdicts.push(verdict);
    }
    let scored = instruct::aggregate(&verdicts).ok_or(EvalError::NothingVerifiable {
        prompts: verdicts.len(),
    })?;
    let mut metrics = BTreeMap::from([
        (
            "instruction_level_strict".to_string(),
            scored.instruction_level_strict,
        ),
        (
            "prompt_level_strict".to_string(),
            scored.prompt_level_strict,
        ),
        ("verifiable_prompts".to_string(), scored.prompts as f64),
        ("instructions".to_string(), scored.instructions as f64),
        (
            "unverifiable_prompts".to_string(),
            scored.unverifiable_prompts as f64,
        ),
    ]);
    throughput.insert_into(&mut metrics);
    Ok(Evaluation {
        headline: Metric::InstructionFollowing.name(),
        score: scored.prompt_level_strict,
        n: scored.prompts,
        metrics,
        records,
        sandbox: None,
    })
}

fn evaluate_reference(
    model: &LoadedModel,
    items: &[EvalItem],
    metric: Metric,
    options: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    let mut references: Vec<&ReferenceItem> = Vec::with_capacity(items.len());
    let mut prompts = Vec::with_capacity(items.len());
    for item in items {
        let EvalItem::Reference(reference) = item else {
            return Err(wrong_kind(item, metric));
        };
        prompts.push(chat_prompt(model, &reference.prompt)?);
        references.push(reference);
    }
    let settings = greedy(max_new_tokens(options, metric), Vec::new());
    let (generated, throughput) = generate_all(model, prompts, &settings, options)?;
    let mut correct = 0;
    let mut records = Vec::with_capacity(items.len());
    for (reference, generated) in references.iter().zip(&generated) {
        let matched = reference_matches(metric, &generated.generation.text, &reference.reference);
        correct += usize::from(matched);
        records.push(EvalRecord {
            id: reference.id.clone(),
            prompt: generated.prompt.clone(),
            output: generated.generation.text.clone(),
            verdict: with_generation(
                json!({ "correct": matched, "reference": reference.reference }),
                generated,
            ),
        });
    }
    let n = records.len();
    let mut metrics = BTreeMap::from([("correct".to_string(), correct as f64)]);
    throughput.insert_into(&mut metrics);
    Ok(Evaluation {
        headline: metric.name(),
        score: correct as f64 / n as f64,
        n,
        metrics,
        records,
        sandbox: None,
    })
}

/// Whether a reply matches the reference under `exact` (equal after trimming surrounding
/// whitespace) or `contains` (the trimmed reference occurs in the reply).
pub fn reference_matches(metric: Metric, reply: &str, reference: &str) -> bool {
    match metric {
        Metric::Exact => reply.trim() == reference.trim(),
        Metric::Contains => reply.contains(reference.trim()),
        _ => false,
    }
}

fn evaluate_loss(
    model: &LoadedModel,
    items: &[EvalItem],
    options: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    // Encode every conversation; one whose assistant turns all lie past max_len is skipped.
    let mut conversations: Vec<&ConversationItem> = Vec::with_capacity(items.len());
    let mut examples: Vec<Option<Example>> = Vec::with_capacity(items.len());
    let mut truncated = 0;
    for item in items {
        let EvalItem::Conversation(conversation) = item else {
            return Err(wrong_kind(item, Metric::Loss));
        };
        let full_len = match data::encode_conversation(
            &model.tokenizer,
            &model.chat_template,
            &conversation.conversation,
            usize::MAX,
        ) {
            Ok(example) => example.tokens.len(),
            Err(error) => {
                return Err(EvalError::Item {
                    id: conversation.id.clone(),
                    detail: error.to_string(),
                })
            }
        };
        truncated += usize::from(full_len > options.max_len);
        let example = match data::encode_conversation(
            &model.tokenizer,
            &model.chat_template,
            &conversation.conversation,
            options.max_len,
        ) {
            Ok(example) => Some(example),
            Err(data::DataError::NoResponseAfterTruncation { .. }) => None,
            Err(error) => {
                return Err(EvalError::Item {
                    id: conversation.id.clone(),
                    detail: error.to_string(),
                })
            }
        };
        conversations.push(conversation);
        examples.push(example);
    }
    let mut order: Vec<usize> = (0..examples.len())
        .filter(|&index| examples[index].is_some())
        .collect();
    order.sort_by_key(|&index| {
        std::cmp::Reverse(examples[index].as_ref().map_or(0, |e| e.tokens.len()))
    });
    let mut per_item: Vec<Option<(f64, usize, f64)>> = vec![None; examples.len()];
    let mut total = TokenLoss::default();
    for chunk in order.chunks(options.batch_size) {
        let batch: Vec<Example> = chunk
            .iter()
            .filter_map(|&index| examples[index].clone())
            .collect();
        let collated = data::collate(&batch, model.tokenizer.pad_token_id());
        let batch_started = Instant::now();
        let losses = response_nll(&model.transformer, &collated)?;
        let batch_s = batch_started.elapsed().as_secs_f64();
        for (&index, &(nll, tokens)) in chunk.iter().zip(&losses) {
            total.add_sum(nll, tokens);
            per_item[index] = Some((nll, tokens, batch_s));
        }
        tracing::info!(
            done = per_item.iter().flatten().count(),
            of = order.len(),
            batch = chunk.len(),
            tokens = collated.batch * collated.seq_len,
            batch_s = format!("{batch_s:.1}"),
            "scored"
        );
    }
    let (Some(mean), Some(perplexity)) = (total.mean(), total.perplexity()) else {
        return Err(EvalError::InvalidOption(format!(
            "none of the {} conversations has an assistant token within --max-len {}",
            items.len(),
            options.max_len
        )));
    };
    let mut records = Vec::with_capacity(items.len());
    for (conversation, scored) in conversations.iter().zip(&per_item) {
        let verdict = match scored {
            Some((nll, tokens, batch_s)) => json!({
                "loss": nll / (*tokens).max(1) as f64,
                "tokens": tokens,
                "batch_wall_s": batch_s,
            }),
            None => json!({ "skipped": "no assistant token within max_len" }),
        };
        records.push(EvalRecord {
            id: conversation.id.clone(),
            prompt: serde_json::to_string(&conversation.conversation.messages).unwrap_or_default(),
            output: String::new(),
            verdict,
        });
    }
    let scored = order.len();
    let metrics = BTreeMap::from([
        ("perplexity".to_string(), perplexity),
        ("tokens".to_string(), total.tokens as f64),
        (
            "skipped_conversations".to_string(),
            (items.len() - scored) as f64,
        ),
        ("truncated_conversations".to_string(), truncated as f64),
        ("max_len".to_string(), options.max_len as f64),
    ]);
    Ok(Evaluation {
        headline: Metric::Loss.name(),
        score: mean,
        n: scored,
        metrics,
        records,
        sandbox: None,
    })
}

/// The summed negative log-likelihood of each row's response tokens (the targets whose
/// weight is 1) and how many there are: the per-row parts of [`Transformer::loss`].
/// The LM head runs on response positions only, one row at a time, so memory stays at one
/// row's responses × vocabulary.
pub fn response_nll(model: &Transformer, batch: &Collated) -> Result<Vec<(f64, usize)>, EvalError> {
    if batch.batch == 0 || batch.seq_len == 0 {
        return Ok(vec![(0.0, 0); batch.batch]);
    }
    let device = model.device();
    let ids = Tensor::from_vec(batch.ids.clone(), (batch.batch, batch.seq_len), device)?;
    let hidden = model.hidden_states(&ids, 0, None)?;
    let mut out = Vec::with_capacity(batch.batch);
    for row in 0..batch.batch {
        let span = row * batch.seq_len..(row + 1) * batch.seq_len;
        let positions: Vec<u32> = batch.weights[span.clone()]
            .iter()
            .enumerate()
            .filter(|(_, &weight)| weight > 0.0)
            .map(|(position, _)| position as u32)
            .collect();
        if positions.is_empty() {
            out.push((0.0, 0));
            continue;
        }
        let targets: Vec<u32> = positions
            .iter()
            .map(|&position| batch.targets[span.start + position as usize])
            .collect();
        let count = positions.len();
        let positions = Tensor::from_vec(positions, count, device)?;
        let selected = hidden.get(row)?.index_select(&positions, 0)?;
        let logits = model.logits(&selected)?.to_dtype(DType::F32)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::from_vec(targets, (count, 1), device)?;
        let nll = log_probs
            .gather(&targets, 1)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .neg()?
            .to_scalar::<f64>()?;
        out.push((nll, count));
    }
    Ok(out)
}

/// Sandbox settings with a per-program wall-clock timeout (CPU seconds rounded up) and,
/// when given, how many programs run at once.
pub fn sandbox_config(timeout: Duration, parallelism: Option<usize>) -> SandboxConfig {
    let mut config = SandboxConfig {
        limits: Limits {
            wall: timeout,
            cpu_seconds: timeout.as_secs_f64().ceil().max(1.0) as u64,
            ..Limits::default()
        },
        ..SandboxConfig::default()
    };
    if let Some(parallelism) = parallelism {
        config.parallelism = parallelism;
    }
    config
}
