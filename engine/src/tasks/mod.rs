//! Tasks: named train/eval data sets with their metric, and tasks users bring as JSONL.
//!
//! | task | train split | eval split | metric |
//! | --- | --- | --- | --- |
//! | `math` | gsm_symbolic problems, seed 1 | gsm_symbolic problems, seed 2, no shared question | exact match of the final number |
//! | `code` | documented functions of the local Python standard library, minus any resembling a HumanEval problem | HumanEval | pass@1 |
//! | `instruct` | single-turn ShareGPT conversations outside the held-out chats | IFBench prompts | instruction following (strict) |
//! | `chat` | multi-turn ShareGPT conversations outside the held-out chats | multi-turn held-out ShareGPT conversations | response-token loss |
//! | `path.jsonl` | 90 % of its distinct conversations | the other 10 % (at least one) | `exact`, `contains` or `loss` |
//!
//! Every split is a pure function of the cached assets, so loading twice gives the same
//! splits, and every train split is disjoint from its eval split (the held-out ShareGPT
//! chats are chosen by a hash of the chat's id, so the parts of one long chat never straddle
//! the split). Loading a named task fetches its assets when the cache lacks them.

pub mod chat;
pub mod code_train;
pub mod instruct;
pub mod math;
pub mod sharegpt;
pub mod user;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assets::{AssetError, Cache};
use crate::data::{Conversation, DataError, Message};
use crate::eval::code::Problem;
use crate::eval::instruct::IfPrompt;

pub use lorasweep_contract::Metric;

/// Parses a metric a user task may use (`exact`, `contains`, `loss`).
pub fn user_metric(text: &str) -> Result<Metric, TaskError> {
    Metric::parse_user(text).map_err(|_| TaskError::UnknownMetric {
        metric: text.to_string(),
    })
}

/// A math problem to solve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MathItem {
    /// Stable id (`gsm-eval-00017`).
    pub id: String,
    /// The question, as the user turn.
    pub question: String,
    /// The gold final number, normalised (no thousands separators, no trailing `.0`).
    pub gold: String,
    /// The worked solution ending `#### gold`, for reference.
    pub solution: String,
}

/// A conversation scored by the loss of its assistant turns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationItem {
    /// Stable id.
    pub id: String,
    /// The conversation.
    pub conversation: Conversation,
}

/// A prompt with the reference reply it should produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceItem {
    /// Stable id.
    pub id: String,
    /// The messages before the reply (ending with a user turn).
    pub prompt: Vec<Message>,
    /// The reference reply.
    pub reference: String,
}

/// One item of an eval split.
#[derive(Debug, Clone)]
pub enum EvalItem {
    /// `math`.
    Math(MathItem),
    /// `code`: a HumanEval problem.
    Code(Problem),
    /// `instruct`: an IFBench prompt.
    Instruct(IfPrompt),
    /// `chat`, and user tasks scored by loss.
    Conversation(ConversationItem),
    /// User tasks scored by `exact` or `contains`.
    Reference(ReferenceItem),
}

impl EvalItem {
    /// The item's stable id, for per-sample records.
    pub fn id(&self) -> &str {
        match self {
            EvalItem::Math(item) => &item.id,
            EvalItem::Code(problem) => &problem.task_id,
            EvalItem::Instruct(prompt) => &prompt.key,
            EvalItem::Conversation(item) => &item.id,
            EvalItem::Reference(item) => &item.id,
        }
    }
}

/// A loaded task: its train conversations and eval items.
#[derive(Debug, Clone)]
pub struct Task {
    name: String,
    description: String,
    metric: Metric,
    source: String,
    train: Vec<Conversation>,
    eval: Vec<EvalItem>,
    notes: Vec<String>,
}

impl Task {
    /// The task's name (`math`, or the user file's path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One line on what it is.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// How its eval split is scored.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Where its data comes from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The train split, as chat conversations.
    pub fn train(&self) -> &[Conversation] {
        &self.train
    }

    /// The eval split.
    pub fn eval_items(&self) -> &[EvalItem] {
        &self.eval
    }

    /// What loading counted or dropped (duplicates removed, overlaps with the eval split).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
}

/// Errors from loading a task.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Neither a named task nor a `.jsonl` path.
    #[error("unknown task `{name}` (known: {known}; or the path of a .jsonl file)")]
    UnknownTask {
        /// What was given.
        name: String,
        /// The named tasks, comma-separated.
        known: String,
    },
    /// A metric name a user task cannot use.
    #[error("unknown metric `{metric}` (expected exact, contains or loss)")]
    UnknownMetric {
        /// What was given.
        metric: String,
    },
    /// A named task was given a metric other than its own.
    #[error("task `{task}` is scored by {own}; --metric {given} applies to user tasks (.jsonl)")]
    MetricNotApplicable {
        /// The task.
        task: String,
        /// Its metric.
        own: Metric,
        /// The metric given.
        given: Metric,
    },
    /// A needed asset could not be fetched.
    #[error(transparent)]
    Asset(#[from] AssetError),
    /// A needed asset is not in the cache and fetching was not allowed.
    #[error("asset `{asset}` is not fetched yet (run `lorasweep assets fetch {asset}`)")]
    NotFetched {
        /// The asset.
        asset: String,
    },
    /// A user task's data is malformed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The converted ShareGPT file is malformed.
    #[error(transparent)]
    ShareGpt(#[from] sharegpt::ShareGptError),
    /// A line of a task file is malformed.
    #[error("{path}:{line}: {detail}")]
    InvalidLine {
        /// The file.
        path: PathBuf,
        /// The line, counting from 1.
        line: usize,
        /// What is wrong, naming the field.
        detail: String,
    },
    /// Reading a task file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A task's data breaks an invariant (an empty split, train and eval overlapping).
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Evaluation's reader rejected an eval file (HumanEval problems, IFBench prompts).
    #[error("{path}: {detail}")]
    Eval {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        detail: String,
    },
}

/// Whether loading may download missing assets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchPolicy {
    /// Fetch what the cache lacks.
    IfMissing,
    /// Use only what the cache holds; a missing asset is [`TaskError::NotFetched`].
    CachedOnly,
}

/// Static facts about a named task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// Its name.
    pub name: &'static str,
    /// One line on what it is.
    pub description: &'static str,
    /// Its metric.
    pub metric: Metric,
    /// Where its data comes from.
    pub source: &'static str,
    /// The assets it needs.
    pub assets: &'static [&'static str],
}

/// The named tasks.
pub const TASKS: &[TaskSpec] = &[
    TaskSpec {
        name: "math",
        description: "grade-school math word problems, answer ending `#### N`",
        metric: Metric::NumberMatch,
        source: "reasoning-gym gsm_symbolic (train seed 1, eval seed 2)",
        assets: &["gsm-symbolic"],
    },
    TaskSpec {
        name: "code",
        description: "complete a Python function from its signature and docstring",
        metric: Metric::PassAt1,
        source: "train: local CPython stdlib functions; eval: HumanEval",
        assets: &["stdlib-code", "humaneval"],
    },
    TaskSpec {
        name: "instruct",
        description: "follow verifiable formatting and content instructions",
        metric: Metric::InstructionFollowing,
        source: "train: single-turn ShareGPT; eval: IFBench",
        assets: &["sharegpt", "ifbench"],
    },
    TaskSpec {
        name: "chat",
        description: "multi-turn assistant conversations",
        metric: Metric::Loss,
        source: "ShareGPT multi-turn, held-out chats by id hash",
        assets: &["sharegpt"],
    },
];

/// One row of [`catalog`].
#[derive(Debug, Clone)]
pub struct TaskInfo {
    /// The task's static facts.
    pub spec: &'static TaskSpec,
    /// Train and eval sizes when the task's assets are cached and load.
    pub sizes: Option<(usize, usize)>,
    /// Why sizes are missing, or what loading noted.
    pub notes: Vec<String>,
}

/// Describes every named task, with split sizes for those whose assets are cached (nothing
/// is downloaded).
pub fn catalog() -> Vec<TaskInfo> {
    match Cache::from_env() {
        Ok(cache) => catalog_in(&cache),
        Err(error) => TASKS
            .iter()
            .map(|spec| TaskInfo {
                spec,
                sizes: None,
                notes: vec![error.to_string()],
            })
            .collect(),
    }
}

/// [`catalog`] over a given cache.
pub fn catalog_in(cache: &Cache) -> Vec<TaskInfo> {
    TASKS
        .iter()
        .map(
            |spec| match load_named(cache, spec.name, FetchPolicy::CachedOnly) {
                Ok(task) => TaskInfo {
                    spec,
                    sizes: Some((task.train.len(), task.eval.len())),
                    notes: task.notes,
                },
                Err(error) => TaskInfo {
                    spec,
                    sizes: None,
                    notes: vec![error.to_string()],
                },
            },
        )
        .collect()
}

/// Loads a named task or a user JSONL task from the cache the environment configures,
/// fetching missing assets. `metric` applies to user tasks (default `loss`); a named task
/// accepts only its own.
pub fn load(name_or_path: &str, metric: Option<Metric>) -> Result<Task, TaskError> {
    let cache = Cache::from_env()?;
    load_in(&cache, name_or_path, metric, FetchPolicy::IfMissing)
}

/// [`load`] over a given cache and fetch policy.
pub fn load_in(
    cache: &Cache,
    name_or_path: &str,
    metric: Option<Metric>,
    policy: FetchPolicy,
) -> Result<Task, TaskError> {
    if let Some(spec) = TASKS.iter().find(|spec| spec.name == name_or_path) {
        if let Some(given) = metric.filter(|given| *given != spec.metric) {
            return Err(TaskError::MetricNotApplicable {
                task: spec.name.to_string(),
                own: spec.metric,
                given,
            });
        }
        return load_named(cache, spec.name, policy);
    }
    let path = Path::new(name_or_path);
    if name_or_path.ends_with(".jsonl") || path.is_file() {
        return user::load(path, metric.unwrap_or(Metric::Loss));
    }
    Err(TaskError::UnknownTask {
        name: name_or_path.to_string(),
        known: TASKS
            .iter()
            .map(|spec| spec.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn load_named(cache: &Cache, name: &str, policy: FetchPolicy) -> Result<Task, TaskError> {
    match name {
        "math" => math::load(cache, policy),
        "code" => code_train::load(cache, policy),
        "instruct" => instruct::load(cache, policy),
        "chat" => chat::load(cache, policy),
        _ => unreachable!("load_named is called with the names of TASKS"),
    }
}

/// The main path of an asset, fetched when the policy allows.
fn asset_path(cache: &Cache, asset: &str, policy: FetchPolicy) -> Result<PathBuf, TaskError> {
    match policy {
        FetchPolicy::IfMissing => Ok(cache.fetch(asset)?),
        FetchPolicy::CachedOnly => cache.cached(asset).ok_or_else(|| TaskError::NotFetched {
            asset: asset.to_string(),
        }),
    }
}

/// A stable 64-bit hash of `text` under a domain tag: the first 8 bytes of
/// sha256(`tag` + `\n` + `text`), big-endian. Splits use it so they depend on content only.
pub fn stable_hash(tag: &str, text: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(tag.as_bytes());
    hasher.update(b"\n");
    hasher.update(text.as_bytes());
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// Reads a JSONL file line by line into `T`, naming file and line on error; blank lines are
/// skipped.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(line).map_err(|error| TaskError::InvalidLine {
            path: path.to_path_buf(),
            line: index + 1,
            detail: error.to_string(),
        })?;
        rows.push((index + 1, row));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_metrics_parse_and_others_do_not() {
        assert_eq!(user_metric("exact").unwrap(), Metric::Exact);
        assert_eq!(user_metric("contains").unwrap(), Metric::Contains);
        assert_eq!(user_metric("loss").unwrap(), Metric::Loss);
        assert!(matches!(
            user_metric("pass@1"),
            Err(TaskError::UnknownMetric { .. })
        ));
    }

    #[test]
    fn stable_hash_depends_on_tag_and_text() {
        assert_eq!(stable_hash("a", "x"), stable_hash("a", "x"));
        assert_ne!(stable_hash("a", "x"), stable_hash("b", "x"));
        assert_ne!(stable_hash("a", "x"), stable_hash("a", "y"));
    }

    #[test]
    fn unknown_task_lists_the_known_ones() {
        let cache = Cache::new(std::env::temp_dir().join("lorasweep-no-such-cache"));
        let error = load_in(&cache, "poetry", None, FetchPolicy::CachedOnly).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("unknown task `poetry`"), "{message}");
        for spec in TASKS {
            assert!(message.contains(spec.name), "{message}");
        }
    }

    #[test]
    fn a_named_task_rejects_another_metric() {
        let cache = Cache::new(std::env::temp_dir().join("lorasweep-no-such-cache"));
        let error =
            load_in(&cache, "math", Some(Metric::Exact), FetchPolicy::CachedOnly).unwrap_err();
        assert!(matches!(error, TaskError::MetricNotApplicable { .. }));
    }

    #[test]
    fn cached_only_reports_a_missing_asset() {
        let cache = Cache::new(std::env::temp_dir().join("lorasweep-no-such-cache"));
        let error = load_in(&cache, "math", None, FetchPolicy::CachedOnly).unwrap_err();
        assert!(
            matches!(&error, TaskError::NotFetched { asset } if asset == "gsm-symbolic"),
            "{error}"
        );
    }
}
