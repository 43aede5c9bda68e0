//! The `chat` task: multi-turn ShareGPT conversations, scored by the loss of every assistant
//! turn given the history.
//!
//! A conversation is multi-turn when it has at least two user turns. The held-out chats are
//! those whose source id (the record id without its `_N` part suffix) hashes into one bucket
//! of [`HELD_OUT_EVERY`]; every part of a held-out chat is excluded from all ShareGPT train
//! splits (this task's and `instruct`'s), so no train conversation continues an eval one.
//! ShareGPT also repeats some chats under unrelated ids: repeats are kept once, and a train
//! conversation opening with the same user turn as a held-out one is dropped.

use super::sharegpt::{read_converted, ShareGptConversation};
use super::{
    asset_path, stable_hash, ConversationItem, EvalItem, FetchPolicy, Metric, Task, TaskError,
};
use crate::assets::Cache;

/// One source chat in this many is held out.
pub const HELD_OUT_EVERY: u64 = 20;

/// Whether the chat with this source id belongs to the held-out split.
pub fn is_held_out(source_id: &str) -> bool {
    stable_hash("lorasweep.sharegpt.held-out.v1", source_id).is_multiple_of(HELD_OUT_EVERY)
}

/// Whether a conversation has at least two user turns.
pub fn is_multi_turn(conversation: &ShareGptConversation) -> bool {
    conversation.user_turns() >= 2
}

/// The chat split: train and held-out conversations, each in input order, and what was
/// dropped to keep them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSplit {
    /// Multi-turn conversations to train on.
    pub train: Vec<ShareGptConversation>,
    /// Multi-turn conversations of held-out chats.
    pub held_out: Vec<ShareGptConversation>,
    /// Conversations dropped because the same messages came earlier (ShareGPT repeats some
    /// chats under different ids).
    pub duplicates: usize,
    /// Train conversations dropped because their first user turn opens a held-out one.
    pub overlapping: usize,
}

/// The text a conversation opens with, compared to keep train and held-out apart.
fn opening(conversation: &ShareGptConversation) -> &str {
    conversation
        .messages
        .iter()
        .find(|m| m.role == crate::data::Role::User)
        .map(|m| m.content.trim())
        .unwrap_or_default()
}

/// Splits the multi-turn conversations: held-out chats by id hash; exact repeats kept once;
/// a train conversation that opens with the same user turn as a held-out one is dropped, so
/// the held-out loss is not measured on text trained on under another id.
pub fn split(conversations: Vec<ShareGptConversation>) -> ChatSplit {
    let (candidates, held_candidates): (Vec<_>, Vec<_>) = conversations
        .into_iter()
        .filter(is_multi_turn)
        .partition(|conversation| !is_held_out(conversation.source_id()));
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    let mut held_out = Vec::new();
    for conversation in held_candidates {
        if seen.insert(conversation.messages.clone()) {
            held_out.push(conversation);
        } else {
            duplicates += 1;
        }
    }
    let held_openings: std::collections::HashSet<String> =
        held_out.iter().map(|c| opening(c).to_string()).collect();
    let mut overlapping = 0;
    let mut train = Vec::new();
    for conversation in candidates {
        if !seen.insert(conversation.messages.clone()) {
            duplicates += 1;
        } else if held_openings.contains(opening(&conversation)) {
            overlapping += 1;
        } else {
            train.push(conversation);
        }
    }
    ChatSplit {
        train,
        held_out,
        duplicates,
        overlapping,
    }
}

/// Loads the chat task from the `sharegpt` asset.
pub fn load(cache: &Cache, policy: FetchPolicy) -> Result<Task, TaskError> {
    let path = asset_path(cache, "sharegpt", policy)?;
    let conversations = read_converted(&path, is_multi_turn)?;
    let ChatSplit {
        train,
        held_out,
        duplicates,
        overlapping,
    } = split(conversations);
    if train.is_empty() || held_out.is_empty() {
        return Err(TaskError::Invalid {
            path,
            detail: format!(
                "the chat split is empty ({} train, {} held out)",
                train.len(),
                held_out.len()
            ),
        });
    }
    let eval = held_out
        .into_iter()
        .map(|conversation| {
            EvalItem::Conversation(ConversationItem {
                conversation: conversation.to_conversation(),
                id: conversation.id,
            })
        })
        .collect();
    Ok(Task {
        name: "chat".into(),
        description: "multi-turn ShareGPT conversations; held-out chats chosen by id hash".into(),
        metric: Metric::Loss,
        source: format!("ShareGPT V3 ({})", path.display()),
        train: train
            .iter()
            .map(ShareGptConversation::to_conversation)
            .collect(),
        eval,
        notes: vec![format!(
            "{duplicates} repeated conversations kept once; {overlapping} train conversations \
             opening like a held-out one dropped"
        )],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Message, Role};

    fn conversation(id: &str, user_turns: usize) -> ShareGptConversation {
        let mut messages = Vec::new();
        for turn in 0..user_turns {
            messages.push(Message {
                role: Role::User,
                content: format!("{id} q{turn}"),
            });
            messages.push(Message {
                role: Role::Assistant,
                content: format!("{id} a{turn}"),
            });
        }
        ShareGptConversation {
            id: id.to_string(),
            messages,
        }
    }

    #[test]
    fn split_is_deterministic_disjoint_and_keeps_parts_together() {
        let mut all = Vec::new();
        for chat in 0..400 {
            for part in 0..3 {
                all.push(conversation(&format!("chat{chat}_{part}"), 1 + part));
            }
        }
        let held_example = all
            .iter()
            .find(|c| c.user_turns() >= 2 && is_held_out(c.source_id()))
            .unwrap()
            .clone();
        // The same chat again under another id that is not held out, and one that opens
        // the same way but goes on differently.
        let mut repeat = held_example.clone();
        repeat.id = (0..)
            .map(|n| format!("copy{n}_0"))
            .find(|id| !is_held_out(&id[..id.len() - 2]))
            .unwrap();
        let mut variant = repeat.clone();
        variant.messages[1].content = "a different answer".into();
        all.push(repeat);
        all.push(variant);

        let ChatSplit {
            train,
            held_out,
            duplicates,
            overlapping,
        } = split(all.clone());
        assert_eq!(
            split(all),
            ChatSplit {
                train: train.clone(),
                held_out: held_out.clone(),
                duplicates,
                overlapping,
            }
        );
        assert_eq!((duplicates, overlapping), (1, 1));
        // Only parts with two or more user turns are chat conversations.
        assert_eq!(train.len() + held_out.len(), 400 * 2);
        assert!(!held_out.is_empty() && held_out.len() < train.len() / 5);
        let held_sources: std::collections::HashSet<&str> =
            held_out.iter().map(|c| c.source_id()).collect();
        assert!(train.iter().all(|c| !held_sources.contains(c.source_id())));
        assert!(held_out.iter().all(|c| is_held_out(c.source_id())));
        let held_messages: std::collections::HashSet<_> =
            held_out.iter().map(|c| c.messages.clone()).collect();
        assert!(train.iter().all(|c| !held_messages.contains(&c.messages)));
    }
}
