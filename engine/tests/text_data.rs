//! Data tests: reading JSONL conversations (and every way a line can be wrong), encoding a
//! conversation with its response mask, truncation, collation and the data set digest.

mod text_common;

use std::path::Path;

use lorasweep_engine::chat::ChatTemplate;
use lorasweep_engine::data::{
    collate, digest_conversations, encode_conversation, read_conversations, Conversation,
    DataError, Example, Message, Role,
};
use lorasweep_engine::tokenizer::Tokenizer;
use text_common::*;

fn message(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
    }
}

fn write_jsonl(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// The tokens marked as response, in order.
fn response_tokens(example: &Example) -> Vec<u32> {
    example
        .tokens
        .iter()
        .zip(&example.response)
        .filter(|(_, is_response)| **is_response)
        .map(|(token, _)| *token)
        .collect()
}

/// What the response mask should select, computed independently of `encode_conversation`:
/// each assistant message's content tokenized alone, followed by the end-of-turn id.
fn expected_response(tok: &Tokenizer, conversation: &Conversation, end_of_turn: u32) -> Vec<u32> {
    let mut expected = Vec::new();
    for m in &conversation.messages {
        if m.role == Role::Assistant {
            expected.extend(tok.encode(&m.content).unwrap());
            expected.push(end_of_turn);
        }
    }
    expected
}

#[test]
fn reads_the_fixture_and_skips_blank_lines() {
    let conversations = read_conversations(&fixture("text/conversations.jsonl")).unwrap();
    assert_eq!(conversations.len(), 3);
    assert_eq!(
        conversations[0].messages,
        vec![
            message(Role::System, "Be brief."),
            message(Role::User, "Hi"),
            message(Role::Assistant, "Hello."),
        ]
    );
    assert_eq!(
        conversations[1].messages[3].content,
        "Hallo, schön!\nHallo."
    );
    assert_eq!(conversations[2].messages.last().unwrap().role, Role::User);
}

#[test]
fn malformed_json_reports_path_and_line() {
    let path = fixture("text/malformed.jsonl");
    let err = read_conversations(&path).unwrap_err();
    let DataError::InvalidLine {
        path: reported,
        line,
        reason,
    } = &err
    else {
        panic!("expected InvalidLine, got {err:?}");
    };
    assert_eq!(reported, &path);
    assert_eq!(*line, 3);
    assert!(reason.starts_with("invalid json"), "{reason}");
    assert!(
        err.to_string().contains("malformed.jsonl:3: invalid json"),
        "{err}"
    );
}

#[test]
fn each_kind_of_bad_line_is_named() {
    let good = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let cases = [
        (r#"{"conversation": []}"#, "missing `messages`"),
        (r#"{"messages": "hi"}"#, "`messages` should be a list"),
        (r#"{"messages": []}"#, "`messages` is empty"),
        (r#"[1, 2]"#, "expected a json object"),
        (
            r#"{"messages": [{"role": "user", "content": "q"}]}"#,
            "no assistant turn",
        ),
        (
            r#"{"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            "`messages[0].role` is unknown role `tool`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}"#,
            "`messages[1].content` is missing",
        ),
        (
            r#"{"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            "`messages[0].role` is missing",
        ),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]}"#,
            "`messages[0].content` should be a string",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a"}]}"#,
            "`messages[0]` has unknown field `name`",
        ),
        (
            r#"{"messages": ["hi"]}"#,
            "`messages[0]` should be an object",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (bad, expected) in cases {
        // Two good lines and a blank one before the bad line: it is line 4.
        let path = write_jsonl(dir.path(), &format!("{good}\n\n{good}\n{bad}\n{good}\n"));
        match read_conversations(&path) {
            Err(DataError::InvalidLine { line, reason, .. }) => {
                assert_eq!(line, 4, "{bad}");
                assert!(reason.contains(expected), "{bad}: got `{reason}`");
            }
            other => panic!("{bad}: expected InvalidLine, got {other:?}"),
        }
    }
}

#[test]
fn empty_and_missing_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), "\n  \n");
    let err = read_conversations(&path).unwrap_err();
    assert!(matches!(err, DataError::Empty { ref path } if path.ends_with("data.jsonl")));
    assert!(err.to_string().contains("data.jsonl"), "{err}");

    let missing = dir.path().join("absent.jsonl");
    let err = read_conversations(&missing).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().contains("absent.jsonl"), "{err}");
}

#[test]
fn response_mask_covers_assistant_content_and_end_token() {
    let tok = Tokenizer::from_gguf(&tiny_gguf("gpt-2")).unwrap();
    let template = ChatTemplate::new(CHATML, None, None).unwrap();
    for conversation in read_conversations(&fixture("text/conversations.jsonl")).unwrap() {
        let example = encode_conversation(&tok, &template, &conversation, 10_000).unwrap();
        assert_eq!(example.tokens.len(), example.response.len());
        let full = template.render(&conversation.messages, false).unwrap();
        assert_eq!(tok.decode(&example.tokens).unwrap(), full);
        assert_eq!(
            response_tokens(&example),
            expected_response(&tok, &conversation, IM_END)
        );
        // The newline the template writes after <|im_end|> is not a response token.
        let last_end = example.tokens.iter().rposition(|t| *t == IM_END).unwrap();
        if last_end + 1 < example.tokens.len() {
            assert!(!example.response[last_end + 1]);
        }
    }
}

#[test]
fn response_mask_is_exact_on_a_hand_checked_example() {
    let tok = Tokenizer::from_gguf(&tiny_gguf("gpt-2")).unwrap();
    let template = ChatTemplate::new(CHATML, None, None).unwrap();
    let conversation = Conversation {
        messages: vec![
            message(Role::User, "hi"),
            message(Role::Assistant, "hello world"),
        ],
    };
    let example = encode_conversation(&tok, &template, &conversation, 100).unwrap();
    let user = tok.encode("user").unwrap();
    let assistant = tok.encode("assistant").unwrap();
    let newline = byte_id(b'\n');
    let mut tokens = vec![IM_START];
    tokens.extend(&user);
    tokens.extend([newline, merged_id("hi"), IM_END, newline, IM_START]);
    tokens.extend(&assistant);
    tokens.extend([
        newline,
        merged_id("hello"),
        merged_id("Ġworld"),
        IM_END,
        newline,
    ]);
    assert_eq!(example.tokens, tokens);
    let prompt_len = tokens.len() - 4;
    let mut response = vec![false; prompt_len];
    response.extend([true, true, true, false]);
    assert_eq!(example.response, response);
}

#[test]
fn truncation_keeps_a_partial_response_or_reports_none_left() {
    let tok = Tokenizer::from_gguf(&tiny_gguf("gpt-2")).unwrap();
    let template = ChatTemplate::new(CHATML, None, None).unwrap();
    let conversation = read_conversations(&fixture("text/conversations.jsonl")).unwrap()[0].clone();
    let whole = encode_conversation(&tok, &template, &conversation, 10_000).unwrap();
    let first_response = whole.response.iter().position(|r| *r).unwrap();

    let cut = encode_conversation(&tok, &template, &conversation, first_response + 1).unwrap();
    assert_eq!(cut.tokens, whole.tokens[..first_response + 1]);
    assert_eq!(cut.response.iter().filter(|r| **r).count(), 1);

    let err = encode_conversation(&tok, &template, &conversation, first_response).unwrap_err();
    assert!(
        matches!(err, DataError::NoResponseAfterTruncation { max_len } if max_len == first_response),
        "{err:?}"
    );
}

#[test]
fn conversations_that_cannot_be_encoded_are_errors() {
    let tok = Tokenizer::from_gguf(&tiny_gguf("gpt-2")).unwrap();
    let chatml = ChatTemplate::new(CHATML, None, None).unwrap();
    let conversation = Conversation {
        messages: vec![message(Role::User, "q"), message(Role::Assistant, "a")],
    };

    let user_only = Conversation {
        messages: vec![message(Role::User, "q")],
    };
    let err = encode_conversation(&tok, &chatml, &user_only, 100).unwrap_err();
    assert!(matches!(err, DataError::NoAssistantTurn), "{err:?}");

    // A template that never closes a turn with an end-of-turn token.
    let no_end = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
        None,
        None,
    )
    .unwrap();
    let err = encode_conversation(&tok, &no_end, &conversation, 100).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::NoEndOfTurn {
                message_index: 1,
                ..
            }
        ),
        "{err:?}"
    );

    // A template whose output for a prefix is not a prefix of the whole.
    let unstable = ChatTemplate::new(
        "{{ messages|length }}{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let err = encode_conversation(&tok, &unstable, &conversation, 100).unwrap_err();
    assert!(
        matches!(err, DataError::TemplateNotPrefix { message_index: 1 }),
        "{err:?}"
    );
}

#[test]
fn collate_shifts_pads_and_weights() {
    let examples = [
        Example {
            tokens: vec![10, 11, 12, 13],
            response: vec![false, false, true, true],
        },
        Example {
            tokens: vec![20, 21],
            response: vec![false, true],
        },
        Example {
            tokens: vec![30],
            response: vec![true],
        },
    ];
    let batch = collate(&examples, 0);
    assert_eq!(batch.batch, 3);
    assert_eq!(batch.seq_len, 3);
    assert_eq!(batch.ids, vec![10, 11, 12, 20, 0, 0, 30, 0, 0]);
    assert_eq!(batch.targets, vec![11, 12, 13, 21, 0, 0, 0, 0, 0]);
    assert_eq!(
        batch.weights,
        vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );

    let empty = collate(&[], 7);
    assert_eq!((empty.batch, empty.seq_len), (0, 0));
    assert!(empty.ids.is_empty() && empty.targets.is_empty() && empty.weights.is_empty());

    let singles = collate(&examples[2..], 7);
    assert_eq!((singles.batch, singles.seq_len), (1, 0));
    assert!(singles.ids.is_empty());
}

#[test]
fn digest_is_pinned_and_sensitive_to_content_and_order() {
    let conversations = read_conversations(&fixture("text/conversations.jsonl")).unwrap();
    // sha256 of b"lorasweep.conversations.v1\n" + the compact JSON of the conversations, as
    // computed by Python's hashlib and json.dumps(separators=(",", ":"), ensure_ascii=False).
    assert_eq!(
        digest_conversations(&conversations),
        "1ff356f90eaf5978e7248a08b24b6412ebc4d2bc0aad45d702efcc9a032fc87c"
    );
    let mut reordered = conversations.clone();
    reordered.swap(0, 1);
    assert_ne!(
        digest_conversations(&reordered),
        digest_conversations(&conversations)
    );
    let mut edited = conversations.clone();
    edited[0].messages[0].role = Role::User;
    assert_ne!(
        digest_conversations(&edited),
        digest_conversations(&conversations)
    );
}

#[test]
fn roles_serialize_lowercase() {
    let json = serde_json::to_string(&message(Role::Assistant, "a")).unwrap();
    assert_eq!(json, r#"{"role":"assistant","content":"a"}"#);
    let parsed: Message = serde_json::from_str(r#"{"role":"system","content":"s"}"#).unwrap();
    assert_eq!(parsed.role, Role::System);
}

/// Encodes the golden multi-turn conversation with a real model: the tokens must equal
/// transformers' ids for the whole rendering, and the mask must select the assistant turn.
fn check_real_model(var: &str, golden_name: &str) {
    let Some(path) = real_model(var) else {
        return;
    };
    let content = read_gguf(&path);
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let template = ChatTemplate::from_gguf(&content).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let golden = golden_text(golden_name);
    let mut checked = 0;
    for entry in golden["conversations"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(entry["messages"].clone()).unwrap();
        let conversation = Conversation { messages };
        if !conversation
            .messages
            .iter()
            .any(|m| m.role == Role::Assistant)
        {
            continue;
        }
        let example = encode_conversation(&tok, &template, &conversation, 4096).unwrap();
        assert_eq!(
            example.tokens,
            ids(&entry["without_generation_prompt"]["ids"]),
            "{golden_name} `{}`",
            entry["name"]
        );
        assert_eq!(
            response_tokens(&example),
            expected_response(&tok, &conversation, im_end)
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "golden fixture has too few conversations with an assistant turn"
    );

    for conversation in read_conversations(&fixture("text/conversations.jsonl")).unwrap() {
        let example = encode_conversation(&tok, &template, &conversation, 4096).unwrap();
        assert_eq!(
            response_tokens(&example),
            expected_response(&tok, &conversation, im_end)
        );
    }
}

#[test]
fn smollm2_conversations_encode_with_exact_masks() {
    check_real_model("LORASWEEP_SMOLLM2_GGUF", "smollm2");
}

#[test]
fn qwen2_conversations_encode_with_exact_masks() {
    check_real_model("LORASWEEP_QWEN_GGUF", "qwen2");
}
