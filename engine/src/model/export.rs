//! Writing a model as a Hugging Face directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`), so that PyTorch
//! baselines load exactly the weights, tokenizer and chat template lorasweep computes with
//! (the packaged models are GGUF files, which transformers cannot read without extra packages).
//!
//! The weights are the ones the engine itself loads: a GGUF file is dequantised and its
//! llama q/k rows un-permuted ([`super::weights::gguf_tensors`]), so the directory is the
//! Hugging Face layout. The directory is written beside its final name and renamed into place,
//! so a reader never sees half an export.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::json;

use super::{invalid, weights, Architecture, ModelConfig, ModelError, ModelSource};
use crate::chat::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The directory.
    pub dir: PathBuf,
    /// The model's geometry.
    pub config: ModelConfig,
    /// Number of weight tensors written.
    pub tensors: usize,
    /// Bytes of `model.safetensors`.
    pub weight_bytes: u64,
}

/// Writes `source` (a GGUF file or a Hugging Face directory) to `out` as a Hugging Face
/// directory with weights in `dtype` (f32, bf16 or f16). `out` must not exist yet.
pub fn export_hf(source: &ModelSource, out: &Path, dtype: DType) -> Result<Exported, ModelError> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(invalid(
            out,
            format!("cannot export weights as {dtype:?}: use f32, bf16 or f16"),
        ));
    }
    if out.exists() {
        return Err(invalid(
            out,
            "already exists: give a new directory to export into".into(),
        ));
    }
    let path = source.path();
    let (config, tensors, tokenizer, template) = match source {
        ModelSource::Gguf(path) => {
            let (mut file, content) = weights::read_gguf_header(path)?;
            let config = weights::gguf_config(path, &content)?;
            let tokenizer = Tokenizer::from_gguf(&content)
                .map_err(|e| invalid(path, format!("tokenizer: {e}")))?;
            let template = ChatTemplate::from_gguf(&content)
                .map_err(|e| invalid(path, format!("chat template: {e}")))?;
            let tensors = weights::gguf_tensors(path, &mut file, &content, &config)?;
            (config, tensors, tokenizer, template)
        }
        ModelSource::HfDir(dir) => {
            let config = weights::hf_config(dir)?;
            let tokenizer =
                Tokenizer::from_hf_dir(dir).map_err(|e| invalid(dir, format!("tokenizer: {e}")))?;
            let template = ChatTemplate::from_hf_dir(dir)
                .map_err(|e| invalid(dir, format!("chat template: {e}")))?;
            (config, weights::hf_tensors(dir)?, tokenizer, template)
        }
    };
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| ModelError::Io {
        path: parent.to_path_buf(),
        source,
    })?;
    let name = out
        .file_name()
        .ok_or_else(|| invalid(out, "has no final directory name".into()))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_dir(
        &staging, &config, tensors, &tokenizer, &template, dtype, path,
    );
    let (count, weight_bytes) = match result {
        Ok(written) => written,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
    };
    std::fs::rename(&staging, out).map_err(|source| {
        let _ = std::fs::remove_dir_all(&staging);
        ModelError::Io {
            path: out.to_path_buf(),
            source,
        }
    })?;
    Ok(Exported {
        dir: out.to_path_buf(),
        config,
        tensors: count,
        weight_bytes,
    })
}

fn write_dir(
    dir: &Path,
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    dtype: DType,
    source: &Path,
) -> Result<(usize, u64), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut converted = HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        // A tied head is the embedding: writing it too would make transformers warn.
        if config.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        converted.insert(name, tensor.to_dtype(dtype)?);
    }
    let weights_path = dir.join("model.safetensors");
    candle_core::safetensors::save(&converted, &weights_path)?;
    let weight_bytes = std::fs::metadata(&weights_path)
        .map_err(io(&weights_path))?
        .len();

    let token = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id));
    let eos_ids = tokenizer.eos_token_ids();
    let write_json = |file: &str, value: serde_json::Value| -> Result<(), ModelError> {
        let path = dir.join(file);
        let text = serde_json::to_string_pretty(&value).expect("a JSON value serialises");
        std::fs::write(&path, text + "\n").map_err(io(&path))
    };
    write_json("config.json", hf_config_json(config, tokenizer, dtype))?;
    let tokenizer_json = tokenizer
        .to_json()
        .map_err(|e| invalid(source, format!("tokenizer: {e}")))?;
    let tokenizer_path = dir.join("tokenizer.json");
    std::fs::write(&tokenizer_path, tokenizer_json).map_err(io(&tokenizer_path))?;
    write_json(
        "tokenizer_config.json",
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": template.source(),
            "bos_token": template.bos_token().map(str::to_string).or_else(|| token(tokenizer.bos_token_id())),
            "eos_token": template.eos_token().map(str::to_string).or_else(|| token(eos_ids.first().copied())),
            "pad_token": token(Some(tokenizer.pad_token_id())),
            "add_bos_token": false,
            "add_eos_token": false,
            "model_max_length": config.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        }),
    )?;
    write_json(
        "generation_config.json",
        json!({
            "bos_token_id": tokenizer.bos_token_id(),
            "eos_token_id": eos_ids,
            "pad_token_id": tokenizer.pad_token_id(),
            "do_sample": false,
        }),
    )?;
    Ok((converted.len(), weight_bytes))
}

/// The `config.json` transformers needs to build the same decoder.
fn hf_config_json(config: &ModelConfig, tokenizer: &Tokenizer, dtype: DType) -> serde_json::Value {
    let (architecture, model_type) = match config.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let mut value = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id(),
        "eos_token_id": tokenizer.eos_token_ids().first(),
        "pad_token_id": tokenizer.pad_token_id(),
        "torch_dtype": dtype,
        "use_cache": true,
    });
    let object = value.as_object_mut().expect("a JSON object");
    match config.architecture {
        Architecture::Llama => {
            object.insert("attention_bias".into(), json!(config.attention_bias));
            object.insert("mlp_bias".into(), json!(false));
        }
        Architecture::Qwen2 => {
            object.insert("use_sliding_window".into(), json!(false));
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_an_existing_directory_and_an_odd_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let source = ModelSource::Gguf(dir.path().join("missing.gguf"));
        let error = export_hf(&source, dir.path(), DType::F32).unwrap_err();
        assert!(error.to_string().contains("already exists"), "{error}");
        let error = export_hf(&source, &dir.path().join("new"), DType::U32).unwrap_err();
        assert!(error.to_string().contains("f32, bf16 or f16"), "{error}");
    }
}
