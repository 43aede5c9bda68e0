//! `model::export::export_hf`: the exported Hugging Face directory loads back into the same
//! decoder (bit-identical logits in f32), the same tokenizer and the same chat template, from a
//! tiny Hugging Face directory and from the real SmolLM2 GGUF.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use lorasweep_engine::chat::Message;
use lorasweep_engine::loader::{self, LoadedModel};
use lorasweep_engine::model::export::export_hf;
use lorasweep_engine::model::ModelSource;

fn load(path: &Path) -> LoadedModel {
    let source = ModelSource::from_path(path).unwrap();
    loader::load(&source, &Device::Cpu, DType::F32).unwrap()
}

/// Export `source`, reload both, and check they are the same model.
fn round_trip(source: &Path) {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("hf");
    let exported = export_hf(&ModelSource::from_path(source).unwrap(), &dir, DType::F32).unwrap();
    assert_eq!(exported.dir, dir);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "staging directory left behind: {leftovers:?}"
    );

    let original = load(source);
    let copy = load(&dir);
    assert_eq!(original.config(), copy.config());
    let a = common::probe_logits(&original.transformer);
    let b = common::probe_logits(&copy.transformer);
    assert_eq!(
        common::max_abs_diff(&a, &b),
        0.0,
        "logits differ after export"
    );

    let text = "Hello, world! <|im_start|>user\nx = 1 + 2\n";
    let ids = original.tokenizer.encode(text).unwrap();
    assert_eq!(copy.tokenizer.encode(text).unwrap(), ids);
    assert_eq!(
        copy.tokenizer.decode(&ids).unwrap(),
        original.tokenizer.decode(&ids).unwrap()
    );
    assert_eq!(
        copy.tokenizer.eos_token_ids(),
        original.tokenizer.eos_token_ids()
    );
    assert_eq!(
        copy.tokenizer.pad_token_id(),
        original.tokenizer.pad_token_id()
    );
    let messages = [Message {
        role: lorasweep_engine::chat::Role::User,
        content: "2 + 2?".into(),
    }];
    assert_eq!(
        copy.chat_template.render(&messages, true).unwrap(),
        original.chat_template.render(&messages, true).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], original.config().num_layers);
}

#[test]
fn a_hugging_face_directory_exports_to_the_same_model() {
    round_trip(common::tiny_hf().path());
}

#[test]
fn the_real_smollm2_gguf_exports_to_the_same_model() {
    let Some(path) = common::real_model("LORASWEEP_SMOLLM2_GGUF") else {
        return;
    };
    round_trip(&path);
}

#[test]
fn a_missing_model_is_a_clear_error_and_leaves_nothing() {
    let out = tempfile::tempdir().unwrap();
    let error = export_hf(
        &ModelSource::Gguf(out.path().join("absent.gguf")),
        &out.path().join("hf"),
        DType::F32,
    )
    .unwrap_err();
    assert!(error.to_string().contains("absent.gguf"), "{error}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}
