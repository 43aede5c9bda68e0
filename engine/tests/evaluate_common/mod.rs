//! Helpers shared by the evaluation tests (`evaluate_*.rs`): a tiny random Llama over the
//! synthetic tokenizer of the text tests, and the real SmolLM2 when the environment names it.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lorasweep_engine::assets::Cache;
use lorasweep_engine::chat::ChatTemplate;
use lorasweep_engine::loader::{self, LoadedModel};
use lorasweep_engine::model::transformer::NamedTensors;
use lorasweep_engine::model::{Architecture, ModelConfig, ModelSource, ModuleKind, Transformer};
use lorasweep_engine::tasks::{self, FetchPolicy, Task, TaskError};
use lorasweep_engine::tokenizer::Tokenizer;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

#[path = "../text_common/mod.rs"]
pub mod text_common;

/// The tiny model's geometry: 2 layers, grouped-query attention (4 query heads over 2 KV
/// heads), the synthetic tokenizer's 274 tokens, `positions` RoPE positions.
pub fn tiny_config(vocab_size: usize, positions: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        attention_bias: false,
        max_position_embeddings: positions,
    }
}

/// A random tensor with a seeded generator, entries ~ N(0, std²).
fn random(rng: &mut rand::rngs::StdRng, shape: (usize, usize), std: f32) -> Tensor {
    let normal = Normal::new(0.0f32, std).expect("valid normal");
    let values: Vec<f32> = (0..shape.0 * shape.1).map(|_| normal.sample(rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("shape fits")
}

/// A tiny random Llama (seeded, f32, CPU) with the synthetic tokenizer and ChatML template:
/// weights large enough that each next token depends strongly on the whole context, so a
/// masking or position error changes the output. It runs 8192 positions, enough for real
/// task prompts.
pub fn tiny_model(seed: u64) -> LoadedModel {
    tiny_model_with_positions(seed, 8192)
}

/// [`tiny_model`] with a given number of positions.
pub fn tiny_model_with_positions(seed: u64, positions: usize) -> LoadedModel {
    let content = text_common::tiny_gguf("gpt-2");
    let tokenizer = Tokenizer::from_gguf(&content).expect("tiny tokenizer");
    let chat_template = ChatTemplate::from_gguf(&content).expect("tiny template");
    let config = tiny_config(tokenizer.vocab_size(), positions);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = NamedTensors::new();
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu).expect("ones");
    tensors.insert(
        "model.embed_tokens.weight".into(),
        random(&mut rng, (config.vocab_size, config.hidden_size), 1.0),
    );
    for layer in 0..config.num_layers {
        let prefix = format!("model.layers.{layer}");
        tensors.insert(
            format!("{prefix}.input_layernorm.weight"),
            ones(config.hidden_size),
        );
        tensors.insert(
            format!("{prefix}.post_attention_layernorm.weight"),
            ones(config.hidden_size),
        );
        for kind in ModuleKind::ALL {
            let (d_in, d_out) = config.module_dims(kind);
            tensors.insert(
                format!("{prefix}.{}.{}.weight", kind.block(), kind.name()),
                random(&mut rng, (d_out, d_in), 1.2 / (d_in as f32).sqrt()),
            );
        }
    }
    tensors.insert("model.norm.weight".into(), ones(config.hidden_size));
    let origin = PathBuf::from("tiny-random-llama");
    let transformer = Transformer::new(config, tensors, DType::F32, &Device::Cpu, &origin)
        .expect("tiny model builds");
    LoadedModel {
        transformer,
        tokenizer,
        chat_template,
        source: ModelSource::Gguf(origin),
        digest: format!("tiny-random-{seed}"),
    }
}

/// The real SmolLM2-135M from `LORASWEEP_SMOLLM2_GGUF`, or `None` (with a skip line).
pub fn smollm2() -> Option<LoadedModel> {
    let path = text_common::real_model("LORASWEEP_SMOLLM2_GGUF")?;
    let source = ModelSource::Gguf(path);
    Some(loader::load(&source, &Device::Cpu, DType::F32).expect("smollm2 loads"))
}

/// A named task from the cache the environment configures (`LORASWEEP_HOME`), without
/// fetching; `None` (with a skip line) when its assets are not there. Under CI a missing
/// asset is a failure.
pub fn cached_task(name: &str) -> Option<Task> {
    let cache = Cache::from_env().expect("asset cache");
    match tasks::load_in(&cache, name, None, FetchPolicy::CachedOnly) {
        Ok(task) => Some(task),
        Err(TaskError::NotFetched { asset }) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipped: asset {asset} is not cached (set LORASWEEP_HOME, run `lorasweep assets fetch {asset}`)"
            );
            None
        }
        Err(error) => panic!("loading {name}: {error}"),
    }
}
