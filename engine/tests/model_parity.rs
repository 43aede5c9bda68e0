//! Logits parity with an independent reference on real weights.
//!
//! The golden values in `tests/fixtures/golden/*_logits.json` were produced by Hugging Face
//! transformers (PyTorch, CPU, float32, eager attention) loading the same GGUF files; see
//! `tools/golden/README.md` for versions and the command. Both sides dequantize the same
//! blocks, so the remaining differences are float32 summation order.

mod common;

use candle_core::{DType, Device, Tensor};
use lorasweep_engine::loader;
use lorasweep_engine::model::ModelSource;
use serde_json::Value;

fn check_parity(env_var: &str, fixture: &str, tolerance: f32) {
    let Some(path) = common::real_model(env_var) else {
        return;
    };
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture(fixture)).unwrap()).unwrap();
    let model = loader::load(&ModelSource::Gguf(path), &Device::Cpu, DType::F32).unwrap();
    let probe_ids: Vec<usize> = serde_json::from_value(golden["probe_ids"].clone()).unwrap();
    for prompt in golden["prompts"].as_array().unwrap() {
        let name = prompt["name"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(prompt["input_ids"].clone()).unwrap();
        // Our tokenizer and chat template must give the reference's ids for the same text.
        assert_eq!(
            model
                .tokenizer
                .encode(prompt["text"].as_str().unwrap())
                .unwrap(),
            ids,
            "{name}: token ids differ"
        );
        let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let logits = model
            .transformer
            .forward(&input, 0, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let rows = std::iter::once(&prompt["last"]).chain(prompt["earlier"].as_array().unwrap());
        for row in rows {
            let position = row["position"].as_u64().unwrap() as usize;
            let ours = logits.get(position).unwrap().to_vec1::<f32>().unwrap();
            let top_ids: Vec<usize> = serde_json::from_value(row["top_ids"].clone()).unwrap();
            let top_values: Vec<f32> = serde_json::from_value(row["top_values"].clone()).unwrap();
            let probe_values: Vec<f32> =
                serde_json::from_value(row["probe_values"].clone()).unwrap();
            let mut worst = 0f32;
            for (&id, &value) in top_ids
                .iter()
                .zip(&top_values)
                .chain(probe_ids.iter().zip(&probe_values))
            {
                worst = worst.max((ours[id] - value).abs());
            }
            assert!(
                worst < tolerance,
                "{name} position {position}: logits differ by {worst}"
            );
            let argmax = ours
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > ours[b] { i } else { b });
            assert_eq!(
                argmax, top_ids[0],
                "{name} position {position}: argmax differs"
            );
        }
    }
}

#[test]
fn smollm2_logits_match_transformers() {
    check_parity("LORASWEEP_SMOLLM2_GGUF", "golden/smollm2_logits.json", 2e-3);
}

#[test]
fn qwen2_logits_match_transformers() {
    check_parity("LORASWEEP_QWEN_GGUF", "golden/qwen2_logits.json", 2e-3);
}

#[test]
fn smollm2_says_paris() {
    let Some(path) = common::real_model("LORASWEEP_SMOLLM2_GGUF") else {
        return;
    };
    let model = loader::load(&ModelSource::Gguf(path), &Device::Cpu, DType::F32).unwrap();
    let messages = vec![lorasweep_engine::data::Message {
        role: lorasweep_engine::data::Role::User,
        content: "What is the capital of France?".into(),
    }];
    let settings = lorasweep_engine::generate::GenerationSettings {
        max_new_tokens: 24,
        ..Default::default()
    };
    let reply = lorasweep_engine::generate::chat(
        &model.transformer,
        &model.tokenizer,
        &model.chat_template,
        &messages,
        &settings,
    )
    .unwrap();
    assert!(reply.text.contains("Paris"), "reply: {:?}", reply.text);
}
