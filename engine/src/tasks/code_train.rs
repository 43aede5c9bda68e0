//! The `code` task: HumanEval for evaluation; documented functions of the local Python
//! standard library for training.
//!
//! The `stdlib-code` asset lists module-level functions with a docstring
//! (`engine/assets/stdlib_functions.py`): `prompt` is the `def` line through the docstring,
//! `body` the rest. A function is dropped when its normalised name is a HumanEval entry
//! point, or its normalised prompt text equals, contains or is contained in a HumanEval
//! prompt's; repeats within the standard library are kept once. Both counts are in the task's
//! notes.
//!
//! Train conversations use [`user_message`] and [`assistant_message`]: the user shows the
//! signature and docstring, the assistant answers with the whole function in a fenced
//! Python block. Evaluation that prompts the model with [`user_message`] asks in the trained
//! format.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use super::{asset_path, read_jsonl, EvalItem, FetchPolicy, Metric, Task, TaskError};
use crate::assets::Cache;
use crate::data::{Conversation, Message, Role};
use crate::eval::code::{read_problems, Problem};

/// A line of the `stdlib-code` asset.
#[derive(Debug, Clone, Deserialize)]
pub struct FunctionRecord {
    /// The dotted module (`json.decoder`).
    pub module: String,
    /// The function's name.
    pub name: String,
    /// The `def` line through the docstring.
    pub prompt: String,
    /// The rest of the function, indented as in the source.
    pub body: String,
}

/// The user turn asking to complete the function that `prompt` (a signature and docstring)
/// starts.
pub fn user_message(prompt: &str) -> String {
    format!(
        "Complete the following Python function. Reply with the whole function in a \
         ```python code block.\n\n```python\n{}\n```",
        prompt.trim_end()
    )
}

/// The assistant turn: the whole function in a fenced Python block.
pub fn assistant_message(prompt: &str, body: &str) -> String {
    format!("```python\n{prompt}{}\n```", body.trim_end())
}

/// A function name compared across sources: lowercase, without underscores.
fn normalized_name(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Prompt text compared across sources: lowercase letters and digits only.
fn normalized_text(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// What [`deduplicate`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupCounts {
    /// Functions resembling a HumanEval problem (by name or prompt text).
    pub matching_humaneval: usize,
    /// Repeats of an earlier function's prompt.
    pub repeated: usize,
}

/// Drops functions that resemble a HumanEval problem or repeat an earlier prompt.
pub fn deduplicate(
    functions: Vec<FunctionRecord>,
    problems: &[Problem],
) -> (Vec<FunctionRecord>, DedupCounts) {
    let names: HashSet<String> = problems
        .iter()
        .map(|problem| normalized_name(&problem.entry_point))
        .collect();
    let prompts: Vec<String> = problems
        .iter()
        .map(|problem| normalized_text(&problem.prompt))
        .collect();
    let mut counts = DedupCounts::default();
    let mut seen = HashSet::new();
    let mut kept = Vec::with_capacity(functions.len());
    for function in functions {
        let text = normalized_text(&function.prompt);
        let resembles = names.contains(&normalized_name(&function.name))
            || prompts
                .iter()
                .any(|prompt| prompt.contains(&text) || text.contains(prompt.as_str()));
        if resembles {
            counts.matching_humaneval += 1;
        } else if !seen.insert(text) {
            counts.repeated += 1;
        } else {
            kept.push(function);
        }
    }
    (kept, counts)
}

/// Reads the `stdlib-code` asset.
pub fn read_functions(path: &Path) -> Result<Vec<FunctionRecord>, TaskError> {
    let rows = read_jsonl::<FunctionRecord>(path)?;
    let mut functions = Vec::with_capacity(rows.len());
    for (line, function) in rows {
        if function.prompt.trim().is_empty() || function.body.trim().is_empty() {
            return Err(TaskError::InvalidLine {
                path: path.to_path_buf(),
                line,
                detail: "`prompt` and `body` must not be empty".into(),
            });
        }
        functions.push(function);
    }
    Ok(functions)
}

/// The train conversation of one function.
pub fn to_conversation(function: &FunctionRecord) -> Conversation {
    Conversation {
        messages: vec![
            Message {
                role: Role::User,
                content: user_message(&function.prompt),
            },
            Message {
                role: Role::Assistant,
                content: assistant_message(&function.prompt, &function.body),
            },
        ],
    }
}

/// Loads the code task from the `stdlib-code` and `humaneval` assets.
pub fn load(cache: &Cache, policy: FetchPolicy) -> Result<Task, TaskError> {
    let humaneval_path = asset_path(cache, "humaneval", policy)?;
    let functions_path = asset_path(cache, "stdlib-code", policy)?;
    let problems = read_problems(&humaneval_path).map_err(|error| TaskError::Eval {
        path: humaneval_path.clone(),
        detail: error.to_string(),
    })?;
    let functions = read_functions(&functions_path)?;
    let total = functions.len();
    let (kept, counts) = deduplicate(functions, &problems);
    if kept.is_empty() {
        return Err(TaskError::Invalid {
            path: functions_path,
            detail: "no training function left after deduplication".into(),
        });
    }
    let notes = vec![format!(
        "{total} standard library functions: {} dropped as resembling HumanEval, {} repeats \
         dropped, {} kept",
        counts.matching_humaneval,
        counts.repeated,
        kept.len()
    )];
    Ok(Task {
        name: "code".into(),
        description: "complete a Python function from its signature and docstring".into(),
        metric: Metric::PassAt1,
        source: format!(
            "train: Python standard library ({}); eval: HumanEval ({})",
            functions_path.display(),
            humaneval_path.display()
        ),
        train: kept.iter().map(to_conversation).collect(),
        eval: problems.into_iter().map(EvalItem::Code).collect(),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, prompt: &str) -> FunctionRecord {
        FunctionRecord {
            module: "m".into(),
            name: name.into(),
            prompt: prompt.into(),
            body: "    return 1\n".into(),
        }
    }

    fn problem(entry_point: &str, prompt: &str) -> Problem {
        Problem {
            task_id: format!("HumanEval/{entry_point}"),
            prompt: prompt.into(),
            canonical_solution: "    return 1\n".into(),
            test: "def check(candidate):\n    pass\n".into(),
            entry_point: entry_point.into(),
        }
    }

    #[test]
    fn functions_like_humaneval_or_repeated_are_dropped() {
        let problems = vec![problem(
            "has_close_elements",
            "from typing import List\n\n\ndef has_close_elements(numbers: List[float]) -> bool:\n    \"\"\" Check closeness.\n    \"\"\"\n",
        )];
        let functions = vec![
            function("Has_Close_Elements", "def Has_Close_Elements(x):\n    \"\"\"Other.\"\"\"\n"),
            function(
                "close",
                "def has_close_elements(numbers: List[float]) -> bool:\n  \"\"\" Check   closeness.\n \"\"\"\n",
            ),
            function("keep", "def keep(x):\n    \"\"\"Keep me.\"\"\"\n"),
            function("keep2", "def keep(x):\n        \"\"\"Keep   me.\"\"\"\n"),
        ];
        let (kept, counts) = deduplicate(functions, &problems);
        assert_eq!(counts.matching_humaneval, 2);
        assert_eq!(counts.repeated, 1);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].name, "keep");
    }

    #[test]
    fn the_conversation_shows_the_prompt_and_answers_the_whole_function() {
        let conversation = to_conversation(&function("f", "def f(x):\n    \"\"\"Doc.\"\"\"\n"));
        assert!(conversation.messages[0]
            .content
            .contains("```python\ndef f(x):\n    \"\"\"Doc.\"\"\"\n```"));
        assert_eq!(
            conversation.messages[1].content,
            "```python\ndef f(x):\n    \"\"\"Doc.\"\"\"\n    return 1\n```"
        );
    }
}
