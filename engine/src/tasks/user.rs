//! User tasks: a JSONL file of conversations (`{"messages": [...]}` per line, as
//! [`crate::data::read_conversations`] reads them) split into train and eval.
//!
//! Exact duplicate conversations are kept once. The split depends only on content: each
//! distinct conversation is ranked by a hash of its JSON, and the lowest-ranked tenth (at
//! least one) is the eval split, the rest the train split, both in file order. Reordering or
//! appending lines moves few conversations across the split.
//!
//! With `exact` or `contains`, an eval item is every message before the last one as the
//! prompt and the last message, which must be an assistant turn, as the reference. With
//! `loss`, it is the whole conversation.

use std::collections::HashSet;
use std::path::Path;

use super::{stable_hash, ConversationItem, EvalItem, Metric, ReferenceItem, Task, TaskError};
use crate::data::{read_conversations, Conversation, Role};

/// The share of distinct conversations held out for eval, as a fraction `1 / EVAL_EVERY`.
const EVAL_EVERY: usize = 10;

/// Loads a user task from `path`, scored by `metric` (`exact`, `contains` or `loss`).
pub fn load(path: &Path, metric: Metric) -> Result<Task, TaskError> {
    if !matches!(metric, Metric::Exact | Metric::Contains | Metric::Loss) {
        return Err(TaskError::UnknownMetric {
            metric: metric.name().to_string(),
        });
    }
    let conversations = read_conversations(path)?;
    let lines = content_line_numbers(path)?;

    let mut seen = HashSet::new();
    let mut distinct: Vec<(usize, Conversation, String)> = Vec::new();
    for (index, conversation) in conversations.into_iter().enumerate() {
        let json = serde_json::to_string(&conversation).expect("conversations serialize");
        if seen.insert(json.clone()) {
            let line = lines.get(index).copied().unwrap_or(index + 1);
            distinct.push((line, conversation, json));
        }
    }
    let duplicates = lines.len().saturating_sub(distinct.len());
    if distinct.len() < 2 {
        return Err(TaskError::Invalid {
            path: path.to_path_buf(),
            detail: format!(
                "a task needs at least 2 distinct conversations to split into train and eval, \
                 found {}",
                distinct.len()
            ),
        });
    }
    if metric != Metric::Loss {
        for (line, conversation, _) in &distinct {
            let last = conversation.messages.last().map(|m| m.role);
            if last != Some(Role::Assistant) || conversation.messages.len() < 2 {
                return Err(TaskError::InvalidLine {
                    path: path.to_path_buf(),
                    line: *line,
                    detail: format!(
                        "with --metric {metric} the last message of `messages` must be the \
                         assistant's reference reply, after at least one prompt message"
                    ),
                });
            }
        }
    }

    let eval_count = distinct.len().div_ceil(EVAL_EVERY).max(1);
    let mut ranked: Vec<(u64, usize)> = distinct
        .iter()
        .enumerate()
        .map(|(index, (_, _, json))| (stable_hash("lorasweep.user-task.split.v1", json), index))
        .collect();
    ranked.sort_unstable();
    let held_out: HashSet<usize> = ranked[..eval_count]
        .iter()
        .map(|(_, index)| *index)
        .collect();

    let mut train = Vec::new();
    let mut eval = Vec::new();
    for (index, (line, conversation, _)) in distinct.into_iter().enumerate() {
        if !held_out.contains(&index) {
            train.push(conversation);
            continue;
        }
        let id = format!("line-{line}");
        eval.push(match metric {
            Metric::Loss => EvalItem::Conversation(ConversationItem { id, conversation }),
            _ => {
                let mut prompt = conversation.messages;
                let reference = prompt
                    .pop()
                    .expect("checked above: at least two messages")
                    .content;
                EvalItem::Reference(ReferenceItem {
                    id,
                    prompt,
                    reference,
                })
            }
        });
    }
    let mut notes = Vec::new();
    if duplicates > 0 {
        notes.push(format!("{duplicates} duplicate conversations kept once"));
    }
    Ok(Task {
        name: path.display().to_string(),
        description: format!("user task from {}", path.display()),
        metric,
        source: path.display().to_string(),
        train,
        eval,
        notes,
    })
}

/// The 1-based line number of each non-blank line, in order: the lines
/// [`read_conversations`] turns into conversations.
fn content_line_numbers(path: &Path) -> Result<Vec<usize>, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, _)| index + 1)
        .collect())
}
