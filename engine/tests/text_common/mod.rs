//! Helpers shared by the text tests (`text_*.rs`): a tiny synthetic GGUF tokenizer, the
//! real-model switch, and fixture paths.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

/// ChatML, as SmolLM2 and Qwen write it, without a default system prompt.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Ids of the synthetic vocabulary's special tokens.
pub const ENDOFTEXT: u32 = 0;
pub const IM_START: u32 = 1;
pub const IM_END: u32 = 2;
/// A user-defined (type 4) token: matched whole, but not special.
pub const TOOL: u32 = 3;
/// Id of the first byte token; bytes follow in GPT-2's byte-to-character order.
const FIRST_BYTE: u32 = 4;

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards in byte order.
pub fn byte_chars() -> Vec<char> {
    let keeps =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if keeps(b) {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(next).unwrap();
                next += 1;
                c
            }
        })
        .collect()
}

/// Merges of the synthetic vocabulary, in rank order. `Ġ` is the byte-level space.
pub const MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "' S", "Ġ h",
    "Ġh i", "h i",
];

/// A GGUF `Content` holding only the metadata of a tiny byte-level BPE tokenizer: three
/// control tokens, one user-defined token, the 256 byte tokens and the merges above.
pub fn tiny_gguf(pre: &str) -> Content {
    let chars = byte_chars();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
        "<tool>".into(),
    ];
    let mut types = vec![3i32, 3, 3, 4];
    tokens.extend(chars.iter().map(|c| c.to_string()));
    types.extend(std::iter::repeat_n(1, 256));
    for merge in MERGES {
        tokens.push(merge.replace(' ', ""));
        types.push(1);
    }
    let mut metadata = HashMap::new();
    let string = |s: &str| Value::String(s.to_string());
    metadata.insert("tokenizer.ggml.model".into(), string("gpt2"));
    metadata.insert("tokenizer.ggml.pre".into(), string(pre));
    metadata.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.iter().map(|t| string(t)).collect()),
    );
    metadata.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(MERGES.iter().map(|m| string(m)).collect()),
    );
    metadata.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    metadata.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(IM_START));
    metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(ENDOFTEXT));
    metadata.insert("tokenizer.chat_template".into(), string(CHATML));
    Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

/// Id of a single byte in the synthetic vocabulary.
pub fn byte_id(byte: u8) -> u32 {
    FIRST_BYTE + u32::from(byte)
}

/// Id of a merged token (`"hello"`, `"Ġworld"`) in the synthetic vocabulary.
pub fn merged_id(token: &str) -> u32 {
    let rank = MERGES
        .iter()
        .position(|m| m.replace(' ', "") == token)
        .unwrap_or_else(|| panic!("`{token}` is not a merged token"));
    FIRST_BYTE + 256 + rank as u32
}

/// The real model file named by `var`, or `None` (with a skip line) when it is not set.
/// Under CI (`CI` set) an unset variable fails the test.
pub fn real_model(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "{var}={} is not a file", path.display());
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set; under CI the real model tests must run")
        }
        None => {
            eprintln!("skipped: set {var} to the model's GGUF file to run this test");
            None
        }
    }
}

/// Reads the metadata of a real GGUF file.
pub fn read_gguf(path: &std::path::Path) -> Content {
    let mut file = std::fs::File::open(path).expect("open gguf");
    Content::read(&mut file).expect("read gguf metadata")
}

/// Path of a fixture under `engine/tests/fixtures`.
pub fn fixture(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

/// The golden text fixture of a model (`smollm2`, `qwen2`), made by transformers.
pub fn golden_text(model: &str) -> serde_json::Value {
    let path = fixture(&format!("golden/{model}_text.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden fixture is json")
}

/// A json array of integers as ids.
pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids array")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}
