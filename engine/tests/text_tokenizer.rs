//! Tokenizer tests: a tiny synthetic GGUF vocabulary for the mechanics, a tiny Hugging Face
//! directory for `from_hf_dir`, and the two real models checked against ids produced by
//! Hugging Face transformers (`tests/fixtures/golden/*_text.json`, see `tools/golden`).

mod text_common;

use lorasweep_engine::tokenizer::{Tokenizer, TokenizerError};
use text_common::*;

fn tiny(pre: &str) -> Tokenizer {
    Tokenizer::from_gguf(&tiny_gguf(pre)).expect("tiny tokenizer builds")
}

#[test]
fn merges_apply_and_special_tokens_are_single_ids() {
    let tok = tiny("gpt-2");
    assert_eq!(
        tok.encode("hello world").unwrap(),
        vec![merged_id("hello"), merged_id("Ġworld")]
    );
    assert_eq!(
        tok.encode("<|im_start|>hello<|im_end|>\n").unwrap(),
        vec![IM_START, merged_id("hello"), IM_END, byte_id(b'\n')]
    );
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(IM_END));
    assert_eq!(tok.token_to_id("<tool>"), Some(TOOL));
    assert_eq!(tok.token_to_id("no such token"), None);
}

#[test]
fn user_defined_tokens_are_matched_whole_and_decoded() {
    let tok = tiny("gpt-2");
    let ids = tok.encode("hi<tool>hi").unwrap();
    assert_eq!(ids, vec![merged_id("hi"), TOOL, merged_id("hi")]);
    assert_eq!(tok.decode(&ids).unwrap(), "hi<tool>hi");
}

#[test]
fn no_bos_is_added_and_special_ids_are_reported() {
    let tok = tiny("gpt-2");
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
    assert_eq!(tok.bos_token_id(), Some(IM_START));
    // eos first, then the end-of-turn token the vocabulary has.
    assert_eq!(tok.eos_token_ids(), &[ENDOFTEXT, IM_END]);
    // No padding id in the metadata: padding falls back to eos.
    assert_eq!(tok.pad_token_id(), ENDOFTEXT);
    assert_eq!(tok.vocab_size(), 4 + 256 + MERGES.len());
}

#[test]
fn padding_id_from_metadata_is_used() {
    let mut content = tiny_gguf("gpt-2");
    content.metadata.insert(
        "tokenizer.ggml.padding_token_id".into(),
        candle_core::quantized::gguf_file::Value::U32(IM_END),
    );
    let tok = Tokenizer::from_gguf(&content).unwrap();
    assert_eq!(tok.pad_token_id(), IM_END);
}

#[test]
fn decode_inverts_encode_for_ascii_and_unicode() {
    for pre in ["gpt-2", "smollm", "qwen2"] {
        let tok = tiny(pre);
        for text in [
            "hello world, 12 + 3 = 15\n\ttabs  and  spaces ",
            "Zürich crème brûlée — 東京 😀👍🏽 Привет",
            "<|im_start|>user\nhi<|im_end|>\n",
            "",
        ] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "pre {pre}, text {text:?}");
        }
    }
}

#[test]
fn smollm_splits_digits_where_gpt2_does_not() {
    // GPT-2's split keeps "12" as one word, so the merge "1 2" applies; SmolLM's (and
    // StarCoder's) isolates each digit first.
    let twelve = vec![merged_id("12")];
    let digits = vec![byte_id(b'1'), byte_id(b'2')];
    assert_eq!(tiny("gpt-2").encode("12").unwrap(), twelve);
    assert_eq!(tiny("smollm").encode("12").unwrap(), digits);
    assert_eq!(tiny("starcoder").encode("12").unwrap(), digits);
    assert_eq!(tiny("qwen2").encode("12").unwrap(), digits);
}

#[test]
fn qwen2_contractions_ignore_case() {
    // Qwen2's split matches "'S" as a contraction; GPT-2's only knows lower-case "'s".
    let apostrophe_s = merged_id("'S");
    assert_eq!(tiny("qwen2").encode("'S").unwrap(), vec![apostrophe_s]);
    assert_eq!(
        tiny("gpt-2").encode("'S").unwrap(),
        vec![byte_id(b'\''), byte_id(b'S')]
    );
}

#[test]
fn unknown_pre_tokenizer_is_a_clear_error() {
    let err = Tokenizer::from_gguf(&tiny_gguf("mystery-bpe")).unwrap_err();
    assert!(
        matches!(err, TokenizerError::UnsupportedPreTokenizer(ref name) if name == "mystery-bpe")
    );
    let text = err.to_string();
    assert!(
        text.contains("mystery-bpe") && text.contains("qwen2"),
        "{text}"
    );
}

#[test]
fn non_bpe_model_and_missing_keys_are_errors() {
    let mut content = tiny_gguf("gpt-2");
    content.metadata.insert(
        "tokenizer.ggml.model".into(),
        candle_core::quantized::gguf_file::Value::String("llama".into()),
    );
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(
        err.to_string().contains("`llama` is not supported"),
        "{err}"
    );

    let mut content = tiny_gguf("gpt-2");
    content.metadata.remove("tokenizer.ggml.merges");
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert_eq!(
        err.to_string(),
        "gguf metadata has no `tokenizer.ggml.merges`"
    );

    let mut content = tiny_gguf("gpt-2");
    content.metadata.remove("tokenizer.ggml.eos_token_id");
    assert!(matches!(
        Tokenizer::from_gguf(&content).unwrap_err(),
        TokenizerError::MissingEos
    ));
}

#[test]
fn inconsistent_metadata_is_an_error() {
    use candle_core::quantized::gguf_file::Value;
    let mut content = tiny_gguf("gpt-2");
    content.metadata.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(3)]),
    );
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(
        err.to_string().contains("has 1 entries but there are"),
        "{err}"
    );

    let mut content = tiny_gguf("gpt-2");
    content
        .metadata
        .insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1_000_000));
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(
        matches!(err, TokenizerError::IdOutOfRange { what: "eos", .. }),
        "{err}"
    );

    let mut content = tiny_gguf("gpt-2");
    content.metadata.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(vec![Value::String("nospace".into())]),
    );
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(err.to_string().contains("merge 0 `nospace`"), "{err}");
}

#[test]
fn decoding_an_id_outside_the_vocabulary_is_an_error() {
    let tok = tiny("gpt-2");
    let err = tok.decode(&[5, 99_999]).unwrap_err();
    assert!(err.to_string().contains("99999"), "{err}");
}

#[test]
fn hf_directory_reads_tokenizer_json_and_config() {
    let tok = Tokenizer::from_hf_dir(&fixture("text/hf_tiny")).unwrap();
    assert_eq!(tok.encode("hi hi").unwrap(), vec![5, 7]);
    assert_eq!(
        tok.encode("<|im_start|>hi<|im_end|>").unwrap(),
        vec![1, 5, 2]
    );
    assert_eq!(
        tok.decode(&[1, 5, 7, 2]).unwrap(),
        "<|im_start|>hi hi<|im_end|>"
    );
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.pad_token_id(), 0);
    assert_eq!(tok.vocab_size(), 9);
}

#[test]
fn hf_directory_without_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

/// Checks a real model's tokenizer against the transformers golden fixture.
fn check_against_golden(var: &str, golden_name: &str) {
    let Some(path) = real_model(var) else {
        return;
    };
    let content = read_gguf(&path);
    let tok = Tokenizer::from_gguf(&content).expect("real tokenizer builds");
    let golden = golden_text(golden_name);

    let meta = &golden["tokenizer"];
    assert_eq!(
        tok.bos_token_id(),
        Some(meta["bos_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_token_ids()[0],
        meta["eos_id"].as_u64().unwrap() as u32
    );
    assert_eq!(tok.pad_token_id(), meta["pad_id"].as_u64().unwrap() as u32);
    assert_eq!(
        tok.vocab_size(),
        content.metadata["tokenizer.ggml.tokens"]
            .to_vec()
            .unwrap()
            .len()
    );

    let samples = golden["samples"].as_array().unwrap();
    assert!(samples.len() >= 10, "golden fixture has too few samples");
    for sample in samples {
        let name = sample["name"].as_str().unwrap();
        let text = sample["text"].as_str().unwrap();
        let expected = ids(&sample["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, expected, "{golden_name} sample `{name}`: {text:?}");
        assert_eq!(
            tok.decode(&got).unwrap(),
            text,
            "{golden_name} round trip `{name}`"
        );
    }
    for conversation in golden["conversations"].as_array().unwrap() {
        for key in ["without_generation_prompt", "with_generation_prompt"] {
            let rendered = &conversation[key];
            let text = rendered["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text).unwrap(),
                ids(&rendered["ids"]),
                "{golden_name} conversation `{}` {key}",
                conversation["name"]
            );
        }
    }
}

#[test]
fn smollm2_matches_transformers() {
    check_against_golden("LORASWEEP_SMOLLM2_GGUF", "smollm2");
}

#[test]
fn qwen2_matches_transformers() {
    check_against_golden("LORASWEEP_QWEN_GGUF", "qwen2");
}

#[test]
fn smollm2_special_tokens_and_stops() {
    let Some(path) = real_model("LORASWEEP_SMOLLM2_GGUF") else {
        return;
    };
    let tok = Tokenizer::from_gguf(&read_gguf(&path)).unwrap();
    for (token, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.encode(token).unwrap(), vec![id], "{token}");
    }
    // eos is <|im_end|> itself; <|endoftext|> also stops.
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.vocab_size(), 49_152);
}

#[test]
fn qwen2_special_tokens_and_stops() {
    let Some(path) = real_model("LORASWEEP_QWEN_GGUF") else {
        return;
    };
    let tok = Tokenizer::from_gguf(&read_gguf(&path)).unwrap();
    for (token, id) in [
        ("<|endoftext|>", 151_643),
        ("<|im_start|>", 151_644),
        ("<|im_end|>", 151_645),
        ("<tool_call>", 151_657),
        ("<|fim_middle|>", 151_660),
    ] {
        assert_eq!(tok.encode(token).unwrap(), vec![id], "{token}");
    }
    assert_eq!(tok.eos_token_ids(), &[151_645, 151_643]);
    // The GGUF vocabulary is padded to the embedding size with unused tokens.
    assert_eq!(tok.vocab_size(), 151_936);
}
