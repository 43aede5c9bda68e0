//! Chat template tests: rendering semantics on small templates, the sources a template is
//! loaded from, and the two real templates checked against transformers' renderings
//! (`tests/fixtures/golden/*_text.json`).

mod text_common;

use lorasweep_engine::chat::{ChatError, ChatTemplate};
use lorasweep_engine::data::{Message, Role};
use text_common::*;

fn message(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
    }
}

fn dialogue() -> Vec<Message> {
    vec![
        message(Role::System, "Be brief."),
        message(Role::User, "Hi"),
        message(Role::Assistant, "Hello."),
    ]
}

#[test]
fn chatml_renders_with_and_without_generation_prompt() {
    let template = ChatTemplate::new(CHATML, None, None).unwrap();
    let messages = dialogue();
    assert_eq!(
        template.render(&messages, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n"
    );
    assert_eq!(
        template.render(&messages[..2], true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn blocks_are_trimmed_like_transformers_does() {
    // transformers renders with trim_blocks and lstrip_blocks: the newline after a block tag
    // and the indentation before one disappear.
    let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
    let template = ChatTemplate::new(source, None, None).unwrap();
    assert_eq!(template.render(&dialogue(), false).unwrap(), "U:Hi\n");
}

#[test]
fn python_string_methods_work() {
    let source = "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role.startswith('sys') }};{% endfor %}";
    let template = ChatTemplate::new(source, None, None).unwrap();
    let messages = vec![
        message(Role::System, "  padded  "),
        message(Role::User, "x"),
    ];
    assert_eq!(
        template.render(&messages, false).unwrap(),
        "PADDED|True;X|False;"
    );
}

#[test]
fn raise_exception_fails_the_render_with_its_message() {
    let source = "{% if messages[0].role != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}ok";
    let template = ChatTemplate::new(source, None, None).unwrap();
    assert_eq!(template.render(&dialogue(), false).unwrap(), "ok");
    let err = template
        .render(&[message(Role::User, "hi")], false)
        .unwrap_err();
    assert!(matches!(err, ChatError::Render(_)));
    assert!(
        err.to_string().contains("a system message must come first"),
        "{err}"
    );
}

#[test]
fn special_token_variables_are_defined() {
    let source = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}";
    let template =
        ChatTemplate::new(source, Some("<s>".to_string()), Some("</s>".to_string())).unwrap();
    assert_eq!(
        template.render(&dialogue(), false).unwrap(),
        "<s>Be brief.</s>Hi</s>Hello.</s>"
    );
}

#[test]
fn syntax_errors_are_reported() {
    let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
    assert!(matches!(err, ChatError::Syntax(_)), "{err}");
}

#[test]
fn gguf_template_gets_bos_and_eos_from_the_vocabulary() {
    let mut content = tiny_gguf("gpt-2");
    content.metadata.insert(
        "tokenizer.chat_template".into(),
        candle_core::quantized::gguf_file::Value::String("{{ bos_token }}|{{ eos_token }}".into()),
    );
    let template = ChatTemplate::from_gguf(&content).unwrap();
    assert_eq!(
        template.render(&[], false).unwrap(),
        "<|im_start|>|<|endoftext|>"
    );

    content.metadata.remove("tokenizer.chat_template");
    let err = ChatTemplate::from_gguf(&content).unwrap_err();
    assert!(matches!(err, ChatError::Missing { .. }));
    assert!(err.to_string().contains("tokenizer.chat_template"), "{err}");
}

#[test]
fn hf_directory_template_from_tokenizer_config() {
    let template = ChatTemplate::from_hf_dir(&fixture("text/hf_tiny")).unwrap();
    assert_eq!(
        template.render(&dialogue()[1..2], true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn hf_directory_template_from_jinja_file_or_named_list() {
    let dir = tempfile::tempdir().unwrap();
    let err = ChatTemplate::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ChatError::Missing { .. }), "{err}");

    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "J{{ messages|length }}",
    )
    .unwrap();
    let template = ChatTemplate::from_hf_dir(dir.path()).unwrap();
    assert_eq!(template.render(&dialogue(), false).unwrap(), "J3");

    // A list of named templates in tokenizer_config.json wins over the jinja file.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    let template = ChatTemplate::from_hf_dir(dir.path()).unwrap();
    assert_eq!(template.render(&dialogue(), false).unwrap(), "D");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
    let err = ChatTemplate::from_hf_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

/// Renders every golden conversation with a real model's template and compares with
/// transformers' rendering.
fn check_against_golden(var: &str, golden_name: &str) {
    let Some(path) = real_model(var) else {
        return;
    };
    let template = ChatTemplate::from_gguf(&read_gguf(&path)).expect("real template compiles");
    let golden = golden_text(golden_name);
    let conversations = golden["conversations"].as_array().unwrap();
    assert!(!conversations.is_empty());
    for conversation in conversations {
        let messages: Vec<Message> =
            serde_json::from_value(conversation["messages"].clone()).unwrap();
        for (key, add_generation_prompt) in [
            ("without_generation_prompt", false),
            ("with_generation_prompt", true),
        ] {
            assert_eq!(
                template.render(&messages, add_generation_prompt).unwrap(),
                conversation[key]["text"].as_str().unwrap(),
                "{golden_name} `{}` {key}",
                conversation["name"]
            );
        }
    }
}

#[test]
fn smollm2_template_matches_transformers() {
    check_against_golden("LORASWEEP_SMOLLM2_GGUF", "smollm2");
}

#[test]
fn qwen2_template_matches_transformers() {
    check_against_golden("LORASWEEP_QWEN_GGUF", "qwen2");
}

#[test]
fn qwen2_template_adds_its_default_system_prompt() {
    let Some(path) = real_model("LORASWEEP_QWEN_GGUF") else {
        return;
    };
    let template = ChatTemplate::from_gguf(&read_gguf(&path)).unwrap();
    let text = template.render(&[message(Role::User, "hi")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}
