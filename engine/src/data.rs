//! Chat data: reading conversations, turning them into token sequences with a mask of the
//! tokens the model must learn to produce, and batching those sequences.
//!
//! The pipeline is `read_conversations` (JSONL on disk) → `encode_conversation` (one
//! [`Example`] per conversation) → `collate` (one right-padded batch). Nothing here touches
//! tensors; the trainer turns a [`Collated`] into tensors.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chat::{ChatError, ChatTemplate};
use crate::tokenizer::{Tokenizer, TokenizerError};

pub use crate::chat::{Message, Role};

/// A conversation: the unit of chat training data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conversation {
    /// The turns, in order.
    pub messages: Vec<Message>,
}

/// One conversation as tokens, with the mask of tokens the model must learn to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The token ids of the rendered conversation.
    pub tokens: Vec<u32>,
    /// `response[i]` is true when `tokens[i]` is part of an assistant turn's content or the
    /// end-of-turn token that closes it. Same length as `tokens`.
    pub response: Vec<bool>,
}

/// A batch of examples, right-padded, laid out row-major as `[batch, seq_len]`.
///
/// With `L` the longest example of the batch, `seq_len = L - 1`: row `b` holds the first
/// `seq_len` tokens of example `b` in `ids` and the token after each of them in `targets`
/// (`targets[b * seq_len + t] = tokens[t + 1]`). `weights` is 1.0 where that next token is a
/// response token and 0.0 elsewhere, padding included, so a loss weighted by it trains on
/// exactly the assistant turns. Positions past an example's end hold the pad id.
#[derive(Debug, Clone, PartialEq)]
pub struct Collated {
    /// Number of rows.
    pub batch: usize,
    /// Number of positions per row.
    pub seq_len: usize,
    /// Input ids, `batch * seq_len`.
    pub ids: Vec<u32>,
    /// Next-token ids, `batch * seq_len`.
    pub targets: Vec<u32>,
    /// Loss weight of each target, `batch * seq_len`.
    pub weights: Vec<f32>,
}

/// Errors from reading or encoding chat data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The data file holds no conversation.
    #[error("{path}: no conversations (the file is empty)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A line of the data file is not a valid conversation.
    #[error("{path}:{line}: {reason}")]
    InvalidLine {
        /// The file.
        path: PathBuf,
        /// The line, counting from 1.
        line: usize,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A conversation given to [`encode_conversation`] has no assistant turn to learn.
    #[error("the conversation has no assistant turn")]
    NoAssistantTurn,
    /// The chat template renders a conversation's beginning differently on its own than as
    /// part of the whole, so assistant turns cannot be located.
    #[error(
        "the chat template renders messages before turn {message_index} differently from the \
         start of the whole conversation, so the assistant turn cannot be located"
    )]
    TemplateNotPrefix {
        /// The index of the assistant message being located.
        message_index: usize,
    },
    /// An assistant turn, as rendered, holds no end-of-turn token, so the model could never
    /// learn to stop.
    #[error(
        "assistant turn {message_index} renders without an end-of-turn token (expected one of \
         ids {eos_token_ids:?})"
    )]
    NoEndOfTurn {
        /// The index of the assistant message.
        message_index: usize,
        /// The ids that were looked for.
        eos_token_ids: Vec<u32>,
    },
    /// After truncation to `max_len` tokens no response token is left to learn; callers
    /// usually skip such examples.
    #[error("no response token left after truncating to {max_len} tokens")]
    NoResponseAfterTruncation {
        /// The length the example was truncated to.
        max_len: usize,
    },
    /// Rendering the conversation failed.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// Tokenizing the rendered conversation failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Reads conversations from a JSONL file: one `{"messages": [{"role", "content"}, …]}` per
/// line, blank lines skipped.
///
/// Roles are `system`, `user` and `assistant`; `content` is a string. Other keys are allowed
/// at the top level (an `id`, a source) but not inside a message, where they would be
/// silently lost. Every conversation needs at least one assistant turn.
pub fn read_conversations(path: &Path) -> Result<Vec<Conversation>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut conversations = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let conversation = parse_line(line).map_err(|reason| DataError::InvalidLine {
            path: path.to_path_buf(),
            line: index + 1,
            reason,
        })?;
        conversations.push(conversation);
    }
    if conversations.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(conversations)
}

/// Parses one JSONL line into a conversation, or says what is wrong with it.
fn parse_line(line: &str) -> Result<Conversation, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|error| format!("invalid json: {error}"))?;
    let serde_json::Value::Object(object) = value else {
        return Err("expected a json object with `messages`".to_string());
    };
    let raw_messages = match object.get("messages") {
        None => return Err("missing `messages`".to_string()),
        Some(serde_json::Value::Array(messages)) => messages,
        Some(_) => return Err("`messages` should be a list of messages".to_string()),
    };
    if raw_messages.is_empty() {
        return Err("`messages` is empty".to_string());
    }
    let mut messages = Vec::with_capacity(raw_messages.len());
    for (index, raw) in raw_messages.iter().enumerate() {
        let field = format!("messages[{index}]");
        let serde_json::Value::Object(raw) = raw else {
            return Err(format!(
                "`{field}` should be an object with `role` and `content`"
            ));
        };
        if let Some(unknown) = raw.keys().find(|key| *key != "role" && *key != "content") {
            return Err(format!(
                "`{field}` has unknown field `{unknown}` (expected `role` and `content`)"
            ));
        }
        let role = match raw.get("role") {
            None => return Err(format!("`{field}.role` is missing")),
            Some(serde_json::Value::String(role)) => Role::parse(role).ok_or_else(|| {
                format!(
                    "`{field}.role` is unknown role `{role}` (expected system, user or assistant)"
                )
            })?,
            Some(_) => return Err(format!("`{field}.role` should be a string")),
        };
        let content = match raw.get("content") {
            None => return Err(format!("`{field}.content` is missing")),
            Some(serde_json::Value::String(content)) => content.clone(),
            Some(_) => return Err(format!("`{field}.content` should be a string")),
        };
        messages.push(Message { role, content });
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("the conversation has no assistant turn (`messages` needs a message with role `assistant`)".to_string());
    }
    Ok(Conversation { messages })
}

/// Renders and tokenizes a conversation, marking the tokens of each assistant turn.
///
/// Each assistant turn `i` is located by rendering `messages[..i]` with the generation
/// prompt (the prompt the model sees at inference) and `messages[..=i]` without; both must
/// be prefixes of the full rendering. The text is then tokenized piece by piece at those
/// boundaries, so the prompt tokens are exactly those the model would see before answering.
/// Within a turn, the response runs from the first content token through the last
/// end-of-turn token ([`Tokenizer::eos_token_ids`]); what the template writes after it (a
/// newline) is not a response token. The example is cut to its first `max_len` tokens.
pub fn encode_conversation(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    conversation: &Conversation,
    max_len: usize,
) -> Result<Example, DataError> {
    let messages = &conversation.messages;
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(DataError::NoAssistantTurn);
    }
    let full = template.render(messages, false)?;

    // (start, end, message index) of each assistant turn in `full`, in byte offsets.
    let mut spans = Vec::new();
    let mut cursor = 0;
    for (index, message) in messages.iter().enumerate() {
        if message.role != Role::Assistant {
            continue;
        }
        let prompt = template.render(&messages[..index], true)?;
        let through_turn = template.render(&messages[..=index], false)?;
        let located = full.starts_with(&prompt)
            && full.starts_with(&through_turn)
            && cursor <= prompt.len()
            && prompt.len() <= through_turn.len();
        if !located {
            return Err(DataError::TemplateNotPrefix {
                message_index: index,
            });
        }
        spans.push((prompt.len(), through_turn.len(), index));
        cursor = through_turn.len();
    }

    let mut tokens = Vec::new();
    let mut response = Vec::new();
    let mut cursor = 0;
    for (start, end, message_index) in spans {
        let prompt_ids = tokenizer.encode(&full[cursor..start])?;
        response.extend(std::iter::repeat_n(false, prompt_ids.len()));
        tokens.extend(prompt_ids);

        let turn_ids = tokenizer.encode(&full[start..end])?;
        let eos = tokenizer.eos_token_ids();
        let last_end = turn_ids
            .iter()
            .rposition(|id| eos.contains(id))
            .ok_or_else(|| DataError::NoEndOfTurn {
                message_index,
                eos_token_ids: eos.to_vec(),
            })?;
        response.extend((0..turn_ids.len()).map(|position| position <= last_end));
        tokens.extend(turn_ids);
        cursor = end;
    }
    let tail_ids = tokenizer.encode(&full[cursor..])?;
    response.extend(std::iter::repeat_n(false, tail_ids.len()));
    tokens.extend(tail_ids);
    debug_assert_eq!(tokens.len(), response.len());

    tokens.truncate(max_len);
    response.truncate(max_len);
    // The first token is never a target, so it cannot be learned.
    if !response.iter().skip(1).any(|is_response| *is_response) {
        return Err(DataError::NoResponseAfterTruncation { max_len });
    }
    Ok(Example { tokens, response })
}

/// Batches examples: right-pads with `pad_id` to the longest, shifts targets by one and
/// weights them by the response mask. See [`Collated`] for the layout. An empty slice gives
/// an empty batch; an example of one token contributes a row of padding with weight 0.
pub fn collate(examples: &[Example], pad_id: u32) -> Collated {
    let longest = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let seq_len = longest.saturating_sub(1);
    let batch = examples.len();
    let mut ids = vec![pad_id; batch * seq_len];
    let mut targets = vec![pad_id; batch * seq_len];
    let mut weights = vec![0.0f32; batch * seq_len];
    for (row, example) in examples.iter().enumerate() {
        let offset = row * seq_len;
        for (t, window) in example.tokens.windows(2).enumerate() {
            ids[offset + t] = window[0];
            targets[offset + t] = window[1];
            let next_is_response = example.response.get(t + 1).copied().unwrap_or(false);
            weights[offset + t] = if next_is_response { 1.0 } else { 0.0 };
        }
        if let ([only], true) = (example.tokens.as_slice(), seq_len > 0) {
            ids[offset] = *only;
        }
    }
    Collated {
        batch,
        seq_len,
        ids,
        targets,
        weights,
    }
}

/// A stable identifier of a data set: the sha256, in hex, of the conversations serialized as
/// compact JSON (`[{"messages":[{"role":"user","content":"…"},…]},…]`, fields in that order)
/// after the tag `lorasweep.conversations.v1\n`. Same conversations in the same order give
/// the same digest on every machine.
pub fn digest_conversations(conversations: &[Conversation]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"lorasweep.conversations.v1\n");
    // Plain structs of strings and unit enums always serialize; failing here is a bug.
    let canonical =
        serde_json::to_vec(conversations).expect("conversations always serialize to json");
    hasher.update(&canonical);
    hex::encode(hasher.finalize())
}
