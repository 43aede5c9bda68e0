//! The `instruct` task: IFBench prompts for evaluation, single-turn ShareGPT conversations for
//! training.
//!
//! IFBench gives each prompt a list of instruction ids (`count:keywords_multiple`, …) and
//! their arguments; [`crate::eval::instruct`] reads them and holds the verifiers. The train split is
//! every ShareGPT conversation with exactly one user turn (a system turn allowed) that is not
//! part of a held-out chat (see [`super::chat::is_held_out`]) and whose prompt is not an
//! IFBench prompt; repeated conversations are kept once.

use std::collections::HashSet;

use super::chat::is_held_out;
use super::sharegpt::{read_converted, ShareGptConversation};
use super::{asset_path, EvalItem, FetchPolicy, Metric, Task, TaskError};
use crate::assets::Cache;
use crate::data::Role;
use crate::eval::instruct::read_prompts;

/// Whether a conversation is one user turn and its answer (after an optional system turn).
pub fn is_single_turn(conversation: &ShareGptConversation) -> bool {
    conversation.user_turns() == 1
        && conversation
            .messages
            .last()
            .is_some_and(|m| m.role == Role::Assistant)
}

/// Loads the instruct task from the `sharegpt` and `ifbench` assets.
pub fn load(cache: &Cache, policy: FetchPolicy) -> Result<Task, TaskError> {
    let ifbench_path = asset_path(cache, "ifbench", policy)?;
    let sharegpt_path = asset_path(cache, "sharegpt", policy)?;
    let items = read_prompts(&ifbench_path).map_err(|error| TaskError::Eval {
        path: ifbench_path.clone(),
        detail: error.to_string(),
    })?;
    if items.is_empty() {
        return Err(TaskError::Invalid {
            path: ifbench_path,
            detail: "no prompts".into(),
        });
    }
    let eval_prompts: HashSet<String> = items
        .iter()
        .map(|item| item.prompt.trim().to_string())
        .collect();
    let mut held_out = 0usize;
    let mut overlapping = 0usize;
    let mut repeated = 0usize;
    let mut seen = HashSet::new();
    let train = read_converted(&sharegpt_path, |conversation| {
        if !is_single_turn(conversation) {
            return false;
        }
        if is_held_out(conversation.source_id()) {
            held_out += 1;
            return false;
        }
        let prompt = conversation
            .messages
            .iter()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.trim())
            .unwrap_or_default();
        if eval_prompts.contains(prompt) {
            overlapping += 1;
            return false;
        }
        if !seen.insert(conversation.messages.clone()) {
            repeated += 1;
            return false;
        }
        true
    })?;
    let mut notes = vec![format!(
        "{held_out} single-turn conversations of held-out chats left out; {repeated} repeats \
         kept once"
    )];
    if overlapping > 0 {
        notes.push(format!(
            "{overlapping} conversations whose prompt is an IFBench prompt dropped"
        ));
    }
    Ok(Task {
        name: "instruct".into(),
        description: "IFBench verifiable instructions; single-turn ShareGPT for training".into(),
        metric: Metric::InstructionFollowing,
        source: format!(
            "train: ShareGPT V3 ({}); eval: IFBench ({})",
            sharegpt_path.display(),
            ifbench_path.display()
        ),
        train: train
            .iter()
            .map(ShareGptConversation::to_conversation)
            .collect(),
        eval: items.into_iter().map(EvalItem::Instruct).collect(),
        notes,
    })
}
