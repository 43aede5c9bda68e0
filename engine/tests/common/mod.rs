//! Helpers shared by the worker's integration tests: the real-model switch, fixtures, and a
//! tiny synthetic transformer built from seeded random tensors.
#![allow(dead_code)]

pub mod files;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lorasweep_engine::adapter::{AInit, Adapter, AdapterSettings, Variant};
use lorasweep_engine::data::Example;
use lorasweep_engine::model::{Architecture, ModelConfig, ModuleId, Transformer};

pub use files::TinySpec;

/// The real model file named by `var`, or `None` (with a skip line) when it is not set.
/// Under CI (`CI` set) a missing model is a failure: the suite must prove real behaviour there.
pub fn real_model(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "{var}={} is not a file", path.display());
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set; CI must fetch the packaged models first (see .ci/run)")
        }
        None => {
            eprintln!("skipped: set {var} to the packaged model file to run this test");
            None
        }
    }
}

/// A tiny Llama directory in the Hugging Face layout (`files::hf_spec("llama", 3)`).
pub fn tiny_hf() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    files::write_hf_dir(dir.path(), &files::hf_spec("llama", 3));
    dir
}

/// Path of a fixture under `engine/tests/fixtures`.
pub fn fixture(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

/// The [`ModelConfig`] a [`TinySpec`] stands for (what loading its config.json must give).
pub fn tiny_config(spec: &TinySpec) -> ModelConfig {
    let architecture = Architecture::parse(spec.arch).expect("llama or qwen2");
    ModelConfig {
        architecture,
        vocab_size: spec.vocab,
        hidden_size: spec.hidden,
        intermediate_size: spec.ffn,
        num_layers: spec.layers,
        num_heads: spec.heads,
        num_kv_heads: spec.kv_heads,
        head_dim: spec.head_dim(),
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: spec.tie,
        attention_bias: architecture == Architecture::Qwen2,
        max_position_embeddings: 256,
    }
}

/// The spec's weights as CPU f32 tensors, Hugging Face–named.
pub fn tiny_tensors(spec: &TinySpec) -> HashMap<String, Tensor> {
    spec.weights()
        .into_iter()
        .map(|(name, shape, values)| {
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
            (name, tensor)
        })
        .collect()
}

/// A tiny f32 CPU transformer from seeded random tensors (no tokenizer).
pub fn tiny_model(spec: &TinySpec) -> Transformer {
    Transformer::new(
        tiny_config(spec),
        tiny_tensors(spec),
        DType::F32,
        &Device::Cpu,
        std::path::Path::new("<tiny>"),
    )
    .unwrap()
}

/// A tiny model and the base tensors it was built from (the same tensors, not copies: on the
/// CPU in f32 the model keeps them as given), to look them up in a gradient store.
pub fn tiny_model_and_tensors(spec: &TinySpec) -> (Transformer, Vec<(String, Tensor)>) {
    let tensors = tiny_tensors(spec);
    let kept: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let model = Transformer::new(
        tiny_config(spec),
        tensors,
        DType::F32,
        &Device::Cpu,
        std::path::Path::new("<tiny>"),
    )
    .unwrap();
    (model, kept)
}

/// Adapter settings for tests.
pub fn adapter_settings(variant: Variant, rank: usize, alpha: f64, seed: u64) -> AdapterSettings {
    AdapterSettings {
        variant,
        rank,
        alpha,
        a_init: AInit::Kaiming,
        seed,
    }
}

/// Attaches adapters to `modules` as `jobs::train` does; returns PiSSA/MiLoRA's initial
/// `(A₀, B₀)` per module (what `peft::save` needs).
pub fn attach(
    model: &mut Transformer,
    modules: &[ModuleId],
    settings: &AdapterSettings,
) -> HashMap<ModuleId, (Tensor, Tensor)> {
    let mut initial = HashMap::new();
    for &module in modules {
        let weight = model.projection(module).weight().clone();
        let (adapter, residual) = Adapter::init(module, &weight, settings.rank, settings).unwrap();
        if residual.is_some() {
            initial.insert(
                module,
                (
                    adapter.a().as_tensor().copy().unwrap(),
                    adapter.b().as_tensor().copy().unwrap(),
                ),
            );
        }
        model.projection_mut(module).attach(adapter, residual);
    }
    initial
}

/// A module by its Hugging Face path.
pub fn module(name: &str) -> ModuleId {
    ModuleId::parse(name).unwrap_or_else(|| panic!("{name} is not a module path"))
}

/// A small memorisable data set over a vocabulary of `vocab` ids (pad id 0 unused): `count`
/// examples of `prompt_len + i % 3` prompt tokens followed by `response_len` response tokens,
/// all seeded.
pub fn synthetic_examples(
    count: usize,
    prompt_len: usize,
    response_len: usize,
    vocab: usize,
    seed: u64,
) -> Vec<Example> {
    let mut rng = files::SplitMix::new(seed);
    (0..count)
        .map(|i| {
            let prompt = prompt_len + i % 3;
            let tokens: Vec<u32> = (0..prompt + response_len)
                .map(|_| 1 + rng.below(vocab - 1) as u32)
                .collect();
            let response = (0..tokens.len()).map(|t| t >= prompt).collect();
            Example { tokens, response }
        })
        .collect()
}

/// Largest absolute difference of two same-shape tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Logits of a fixed token batch, for comparing two models.
pub fn probe_logits(model: &Transformer) -> Tensor {
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % vocab).collect();
    let input = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
    model.forward(&input, 0, None).unwrap()
}
