//! ShareGPT: a recovering parser for the (truncated) JSON dump, its conversion to JSONL
//! conversations, and reading that JSONL back.
//!
//! The dump is one JSON array of records `{"id": …, "conversations": [{"from": …, "value":
//! …}, …]}`. The packaged copy stops in the middle of a record, so no JSON parser accepts it
//! whole. [`recover_records`] scans the stream instead: it tracks strings, escapes and
//! nesting depth to find where each top-level element ends, and hands each complete one to the
//! caller. A cut-off last element is counted and dropped; bytes between elements that are not
//! separators are skipped and counted, so one damaged stretch does not lose the rest.
//!
//! [`convert`] maps `from` to roles (`human`/`user` → user; `gpt`/`chatgpt`/`bard`/`bing`/
//! `assistant` → assistant; `system` → system) and keeps only conversations that, after an
//! optional leading system turn, alternate user, assistant, user, … with no empty turn. A
//! trailing user turn, which has no answer, is trimmed. Every dropped conversation is counted
//! by reason.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{Conversation, Message, Role};

/// Errors from the recovering parser and the conversion.
#[derive(Debug, thiserror::Error)]
pub enum ShareGptError {
    /// The stream does not start with a JSON array.
    #[error("expected a json array at byte {offset}, found {found:?}")]
    NotAnArray {
        /// Where the first non-blank byte is.
        offset: u64,
        /// That byte, as a character.
        found: char,
    },
    /// Reading the dump failed.
    #[error("reading the dump: {0}")]
    Read(std::io::Error),
    /// Writing the JSONL failed.
    #[error("writing jsonl: {0}")]
    Write(std::io::Error),
    /// The converted JSONL could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of the converted JSONL is not a conversation.
    #[error("{path}:{line}: {detail}")]
    InvalidLine {
        /// The file.
        path: PathBuf,
        /// The line, counting from 1.
        line: usize,
        /// What is wrong.
        detail: String,
    },
}

/// What the scan of the dump found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanSummary {
    /// Complete top-level elements handed to the caller.
    pub elements: u64,
    /// True when the stream ended inside an element or before the array's closing `]`.
    pub truncated: bool,
    /// Bytes of the element cut off by the end of the stream.
    pub truncated_bytes: u64,
    /// Bytes between elements that were neither blank, `,` nor the start of an object.
    pub skipped_bytes: u64,
}

/// Scans a JSON array, calling `on_element` with the bytes of each complete top-level object
/// (see the module documentation). Only the current element is held in memory.
pub fn recover_records<R: Read>(
    input: R,
    mut on_element: impl FnMut(&[u8]),
) -> Result<ScanSummary, ShareGptError> {
    #[derive(PartialEq)]
    enum State {
        BeforeArray,
        BetweenElements,
        InElement,
        Done,
    }
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut summary = ScanSummary::default();
    let mut state = State::BeforeArray;
    let mut element: Vec<u8> = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut offset = 0u64;
    loop {
        let chunk = reader.fill_buf().map_err(ShareGptError::Read)?;
        if chunk.is_empty() {
            break;
        }
        let length = chunk.len();
        for (index, &byte) in chunk.iter().enumerate() {
            match state {
                State::BeforeArray => {
                    if byte.is_ascii_whitespace() {
                        continue;
                    }
                    if byte != b'[' {
                        return Err(ShareGptError::NotAnArray {
                            offset: offset + index as u64,
                            found: byte as char,
                        });
                    }
                    state = State::BetweenElements;
                }
                State::BetweenElements => match byte {
                    b'{' => {
                        element.clear();
                        element.push(byte);
                        depth = 1;
                        in_string = false;
                        escaped = false;
                        state = State::InElement;
                    }
                    b']' => state = State::Done,
                    b',' => {}
                    byte if byte.is_ascii_whitespace() => {}
                    _ => summary.skipped_bytes += 1,
                },
                State::InElement => {
                    element.push(byte);
                    if in_string {
                        if escaped {
                            escaped = false;
                        } else if byte == b'\\' {
                            escaped = true;
                        } else if byte == b'"' {
                            in_string = false;
                        }
                        continue;
                    }
                    match byte {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                on_element(&element);
                                summary.elements += 1;
                                element.clear();
                                state = State::BetweenElements;
                            }
                        }
                        _ => {}
                    }
                }
                State::Done => {}
            }
        }
        offset += length as u64;
        reader.consume(length);
        if state == State::Done {
            break;
        }
    }
    match state {
        State::Done => {}
        State::InElement => {
            summary.truncated = true;
            summary.truncated_bytes = element.len() as u64;
        }
        State::BeforeArray | State::BetweenElements => summary.truncated = true,
    }
    Ok(summary)
}

/// One record of the dump, as written.
#[derive(Debug, Deserialize)]
struct RawRecord {
    #[serde(default)]
    id: Option<String>,
    conversations: Vec<RawTurn>,
}

#[derive(Debug, Deserialize)]
struct RawTurn {
    from: String,
    value: String,
}

/// One converted conversation, a line of the JSONL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareGptConversation {
    /// The record's id in the dump (`QWJhYvA_0`); long chats were split into records
    /// `X_0`, `X_1`, … sharing the part before the last `_`.
    pub id: String,
    /// The turns, with roles mapped.
    pub messages: Vec<Message>,
}

impl ShareGptConversation {
    /// The id of the original chat this record was split from: the id without a trailing
    /// `_N`.
    pub fn source_id(&self) -> &str {
        match self.id.rsplit_once('_') {
            Some((base, part)) if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) => {
                base
            }
            _ => &self.id,
        }
    }

    /// The number of user turns.
    pub fn user_turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == Role::User)
            .count()
    }

    /// The conversation alone, without the id.
    pub fn to_conversation(&self) -> Conversation {
        Conversation {
            messages: self.messages.clone(),
        }
    }
}

/// What the conversion recovered, kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvertSummary {
    /// Complete records recovered from the dump.
    pub records_recovered: u64,
    /// Turns in those records.
    pub turns_recovered: u64,
    /// Complete elements that were not records (`id`, `conversations` of `from`/`value`).
    pub records_malformed: u64,
    /// Whether the dump was cut off.
    pub truncated: bool,
    /// Bytes of the cut-off record.
    pub truncated_bytes: u64,
    /// Bytes skipped between records.
    pub skipped_bytes: u64,
    /// Records dropped because they have no turn, or a turn with blank text.
    pub dropped_empty: u64,
    /// Records dropped because a `from` is not a known speaker.
    pub dropped_unknown_role: u64,
    /// Records dropped because the turns do not alternate user/assistant from a user turn.
    pub dropped_not_alternating: u64,
    /// Records kept whose unanswered last user turn was trimmed.
    pub trailing_user_turns_trimmed: u64,
    /// Conversations written.
    pub kept_conversations: u64,
    /// Turns written.
    pub kept_turns: u64,
}

/// Why a record was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
    Empty,
    UnknownRole,
    NotAlternating,
}

fn map_role(from: &str) -> Option<Role> {
    match from {
        "human" | "user" => Some(Role::User),
        "gpt" | "chatgpt" | "bard" | "bing" | "assistant" => Some(Role::Assistant),
        "system" => Some(Role::System),
        _ => None,
    }
}

/// Maps and checks one record's turns; `Ok((messages, trimmed))`.
fn normalize(turns: Vec<RawTurn>) -> Result<(Vec<Message>, bool), Rejection> {
    if turns.is_empty() || turns.iter().any(|turn| turn.value.trim().is_empty()) {
        return Err(Rejection::Empty);
    }
    let mut messages = Vec::with_capacity(turns.len());
    for turn in turns {
        let role = map_role(&turn.from).ok_or(Rejection::UnknownRole)?;
        messages.push(Message {
            role,
            content: turn.value,
        });
    }
    let body_start = usize::from(messages[0].role == Role::System);
    let mut trimmed = false;
    if messages.len() > body_start && messages[messages.len() - 1].role == Role::User {
        messages.pop();
        trimmed = true;
    }
    let body = &messages[body_start..];
    if body.is_empty() {
        return Err(Rejection::Empty);
    }
    for (position, message) in body.iter().enumerate() {
        let expected = if position % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if message.role != expected {
            return Err(Rejection::NotAlternating);
        }
    }
    Ok((messages, trimmed))
}

/// Converts the dump to JSONL, one [`ShareGptConversation`] per line, in dump order.
pub fn convert<R: Read, W: Write>(input: R, output: W) -> Result<ConvertSummary, ShareGptError> {
    let mut output = std::io::BufWriter::new(output);
    let mut summary = ConvertSummary::default();
    let mut write_error: Option<std::io::Error> = None;
    let scan = recover_records(input, |bytes| {
        if write_error.is_some() {
            return;
        }
        let record: RawRecord = match serde_json::from_slice(bytes) {
            Ok(record) => record,
            Err(_) => {
                summary.records_malformed += 1;
                return;
            }
        };
        summary.records_recovered += 1;
        summary.turns_recovered += record.conversations.len() as u64;
        let id = record
            .id
            .unwrap_or_else(|| format!("record-{}", summary.records_recovered - 1));
        match normalize(record.conversations) {
            Ok((messages, trimmed)) => {
                summary.trailing_user_turns_trimmed += u64::from(trimmed);
                summary.kept_conversations += 1;
                summary.kept_turns += messages.len() as u64;
                let line = ShareGptConversation { id, messages };
                let result = serde_json::to_writer(&mut output, &line)
                    .map_err(std::io::Error::from)
                    .and_then(|()| output.write_all(b"\n"));
                if let Err(error) = result {
                    write_error = Some(error);
                }
            }
            Err(Rejection::Empty) => summary.dropped_empty += 1,
            Err(Rejection::UnknownRole) => summary.dropped_unknown_role += 1,
            Err(Rejection::NotAlternating) => summary.dropped_not_alternating += 1,
        }
    })?;
    if let Some(error) = write_error {
        return Err(ShareGptError::Write(error));
    }
    output.flush().map_err(ShareGptError::Write)?;
    summary.truncated = scan.truncated;
    summary.truncated_bytes = scan.truncated_bytes;
    summary.skipped_bytes = scan.skipped_bytes;
    Ok(summary)
}

/// Reads the converted JSONL, keeping the conversations `keep` accepts (filtering while
/// reading keeps memory to what is kept).
pub fn read_converted(
    path: &Path,
    mut keep: impl FnMut(&ShareGptConversation) -> bool,
) -> Result<Vec<ShareGptConversation>, ShareGptError> {
    let file = std::fs::File::open(path).map_err(|source| ShareGptError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut kept = Vec::new();
    for (index, line) in BufReader::with_capacity(1 << 20, file).lines().enumerate() {
        let line = line.map_err(|source| ShareGptError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let conversation: ShareGptConversation =
            serde_json::from_str(&line).map_err(|error| ShareGptError::InvalidLine {
                path: path.to_path_buf(),
                line: index + 1,
                detail: error.to_string(),
            })?;
        if keep(&conversation) {
            kept.push(conversation);
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> (Vec<String>, ScanSummary) {
        let mut elements = Vec::new();
        let summary = recover_records(text.as_bytes(), |bytes| {
            elements.push(String::from_utf8(bytes.to_vec()).unwrap())
        })
        .unwrap();
        (elements, summary)
    }

    fn record(id: &str, turns: &[(&str, &str)]) -> String {
        let turns: Vec<serde_json::Value> = turns
            .iter()
            .map(|(from, value)| serde_json::json!({"from": from, "value": value}))
            .collect();
        serde_json::json!({"id": id, "conversations": turns}).to_string()
    }

    #[test]
    fn a_complete_array_gives_every_element() {
        let (elements, summary) = scan(r#" [ {"a": 1}, {"b": [1, {"c": 2}]} ] "#);
        assert_eq!(elements, vec![r#"{"a": 1}"#, r#"{"b": [1, {"c": 2}]}"#]);
        assert!(!summary.truncated);
        assert_eq!(summary.elements, 2);
    }

    #[test]
    fn brackets_and_escaped_quotes_inside_strings_do_not_count() {
        let text = r#"[{"v": "a } ] { [ \" still \\"}, {"w": "\\\""}]"#;
        let (elements, summary) = scan(text);
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[0], r#"{"v": "a } ] { [ \" still \\"}"#);
        for element in &elements {
            serde_json::from_str::<serde_json::Value>(element).unwrap();
        }
        assert!(!summary.truncated);
    }

    #[test]
    fn a_cut_off_last_element_is_counted_and_dropped() {
        let text = r#"[{"a": 1}, {"b": "unfinished str"#;
        let (elements, summary) = scan(text);
        assert_eq!(elements, vec![r#"{"a": 1}"#]);
        assert!(summary.truncated);
        assert_eq!(
            summary.truncated_bytes,
            r#"{"b": "unfinished str"#.len() as u64
        );
    }

    #[test]
    fn a_cut_inside_an_escape_or_between_elements_is_truncation() {
        let (elements, summary) = scan(r#"[{"a": "x\"#);
        assert!(elements.is_empty());
        assert!(summary.truncated);
        let (elements, summary) = scan(r#"[{"a": 1},"#);
        assert_eq!(elements.len(), 1);
        assert!(summary.truncated);
        assert_eq!(summary.truncated_bytes, 0);
    }

    #[test]
    fn garbage_between_elements_is_skipped() {
        let (elements, summary) = scan(r#"[{"a": 1}, xx 7 {"b": 2}]"#);
        assert_eq!(elements.len(), 2);
        assert_eq!(summary.skipped_bytes, 3);
    }

    #[test]
    fn not_an_array_is_an_error() {
        let error = recover_records(&b"  {\"a\": 1}"[..], |_| {}).unwrap_err();
        assert!(matches!(error, ShareGptError::NotAnArray { offset: 2, .. }));
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        // A reader that returns one byte at a time exercises every boundary.
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() || buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let text = r#"[{"v": "a\"}"}, {"w": [1,2]}, {"x": "#;
        let mut elements = Vec::new();
        let summary = recover_records(OneByte(text.as_bytes()), |bytes| {
            elements.push(bytes.to_vec())
        })
        .unwrap();
        assert_eq!(elements.len(), 2);
        assert!(summary.truncated);
    }

    #[test]
    fn convert_maps_roles_and_drops_bad_conversations() {
        let records = [
            record(
                "ok_0",
                &[("human", "hi"), ("gpt", "hello"), ("human", "bye")],
            ),
            record(
                "sys",
                &[("system", "be brief"), ("human", "q"), ("chatgpt", "a")],
            ),
            record("starts_with_gpt", &[("gpt", "a"), ("human", "q")]),
            record(
                "twice_human",
                &[("human", "a"), ("human", "b"), ("gpt", "c")],
            ),
            record("blank", &[("human", "  "), ("gpt", "c")]),
            record("none", &[]),
            record("alien", &[("human", "q"), ("robot", "a")]),
            record("only_user", &[("human", "q")]),
            r#"{"id": "malformed", "conversations": "nope"}"#.to_string(),
        ];
        let mut dump = format!("[\n{}", records.join(",\n"));
        dump.push_str(r#", {"id": "cut", "conversations": [{"from": "human", "va"#);
        let mut out = Vec::new();
        let summary = convert(dump.as_bytes(), &mut out).unwrap();
        assert_eq!(summary.records_recovered, 8);
        assert_eq!(summary.records_malformed, 1);
        // Turns per record, in order; the empty record adds none.
        assert_eq!(summary.turns_recovered, 3 + 3 + 2 + 3 + 2 + 2 + 1);
        assert!(summary.truncated);
        assert_eq!(summary.kept_conversations, 2);
        assert_eq!(summary.kept_turns, 2 + 3);
        assert_eq!(summary.trailing_user_turns_trimmed, 1);
        assert_eq!(summary.dropped_not_alternating, 2);
        assert_eq!(summary.dropped_empty, 3);
        assert_eq!(summary.dropped_unknown_role, 1);

        let text = String::from_utf8(out).unwrap();
        let lines: Vec<ShareGptConversation> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines[0].id, "ok_0");
        assert_eq!(lines[0].source_id(), "ok");
        assert_eq!(
            lines[0].messages,
            vec![
                Message {
                    role: Role::User,
                    content: "hi".into()
                },
                Message {
                    role: Role::Assistant,
                    content: "hello".into()
                },
            ]
        );
        assert_eq!(lines[1].messages[0].role, Role::System);
        assert_eq!(lines[1].messages[2].role, Role::Assistant);
        assert_eq!(lines[1].source_id(), "sys");
    }

    #[test]
    fn source_id_strips_only_a_numeric_suffix() {
        let conversation = |id: &str| ShareGptConversation {
            id: id.to_string(),
            messages: Vec::new(),
        };
        assert_eq!(conversation("abc_12").source_id(), "abc");
        assert_eq!(conversation("a_b_3").source_id(), "a_b");
        assert_eq!(conversation("abc_x").source_id(), "abc_x");
        assert_eq!(conversation("abc_").source_id(), "abc_");
        assert_eq!(conversation("abc").source_id(), "abc");
    }
}
