//! Reading weights into Hugging Face–named f32 tensors, from GGUF (dequantized) or from a
//! directory of safetensors.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

use super::transformer::NamedTensors;
use super::{invalid, llama, qwen2, Architecture, ModelConfig, ModelError};

/// Opens a GGUF file and reads its header (metadata and tensor index, not the data).
pub fn read_gguf_header(path: &Path) -> Result<(File, gguf_file::Content), ModelError> {
    let mut file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|error| ModelError::Invalid {
        path: path.to_path_buf(),
        reason: format!("not a readable GGUF file ({error})"),
    })?;
    Ok((file, content))
}

/// The architecture a GGUF file declares in `general.architecture`.
pub fn gguf_architecture(
    path: &Path,
    content: &gguf_file::Content,
) -> Result<Architecture, ModelError> {
    let name = metadata_string(path, content, "general.architecture")?;
    Architecture::parse(&name).ok_or_else(|| ModelError::UnsupportedArchitecture {
        path: path.to_path_buf(),
        found: name,
    })
}

/// The model configuration from GGUF metadata.
pub fn gguf_config(path: &Path, content: &gguf_file::Content) -> Result<ModelConfig, ModelError> {
    let architecture = gguf_architecture(path, content)?;
    let arch = match architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let int = |key: &str| -> Result<usize, ModelError> {
        let value = metadata(path, content, &format!("{arch}.{key}"))?;
        value
            .to_u32()
            .map(|v| v as usize)
            .or_else(|_| value.to_u64().map(|v| v as usize))
            .map_err(|_| invalid(path, format!("metadata {arch}.{key} is not an integer")))
    };
    let float = |key: &str| -> Result<f64, ModelError> {
        let value = metadata(path, content, &format!("{arch}.{key}"))?;
        value
            .to_f32()
            .map(f64::from)
            .map_err(|_| invalid(path, format!("metadata {arch}.{key} is not a number")))
    };
    let hidden_size = int("embedding_length")?;
    let num_heads = int("attention.head_count")?;
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| invalid(path, "missing tensor token_embd.weight".into()))?;
    let vocab_size = embed.shape.dims()[0];
    let head_dim = match int("attention.key_length") {
        Ok(dim) => dim,
        Err(_) => hidden_size / num_heads,
    };
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: int("feed_forward_length")?,
        num_layers: int("block_count")?,
        num_heads,
        num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
        head_dim,
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        max_position_embeddings: int("context_length").unwrap_or(8192),
    };
    validate_config(path, &config)?;
    Ok(config)
}

/// Dequantizes every tensor of a GGUF file to f32 on the CPU, renamed to Hugging Face names,
/// with the architecture's layout fix-ups applied (llama's Q/K row permutation).
pub fn gguf_tensors(
    path: &Path,
    file: &mut File,
    content: &gguf_file::Content,
    config: &ModelConfig,
) -> Result<NamedTensors, ModelError> {
    let mut tensors = HashMap::new();
    for gguf_name in content.tensor_infos.keys() {
        let Some(hf_name) = hf_name_of_gguf(gguf_name) else {
            continue;
        };
        let qtensor = content
            .tensor(file, gguf_name, &Device::Cpu)
            .map_err(|error| invalid(path, format!("cannot read tensor {gguf_name} ({error})")))?;
        let tensor = qtensor
            .dequantize(&Device::Cpu)
            .map_err(|error| {
                invalid(
                    path,
                    format!("cannot dequantize tensor {gguf_name} ({error})"),
                )
            })?
            .to_dtype(DType::F32)?;
        let tensor = match config.architecture {
            Architecture::Llama => llama::from_gguf_layout(&hf_name, tensor, config)?,
            Architecture::Qwen2 => qwen2::from_gguf_layout(&hf_name, tensor, config)?,
        };
        tensors.insert(hf_name, tensor);
    }
    Ok(tensors)
}

/// Maps `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight` and so on. Tensors
/// the decoder does not use (e.g. precomputed rope frequencies) map to `None`.
pub fn hf_name_of_gguf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

/// The model configuration from a Hugging Face `config.json`.
pub fn hf_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| invalid(&path, format!("invalid JSON ({error})")))?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let config = match Architecture::parse(&model_type) {
        Some(Architecture::Llama) => llama::config_from_hf(&path, &json)?,
        Some(Architecture::Qwen2) => qwen2::config_from_hf(&path, &json)?,
        None => {
            return Err(ModelError::UnsupportedArchitecture {
                path,
                found: model_type,
            })
        }
    };
    validate_config(&path, &config)?;
    Ok(config)
}

/// Reads every `*.safetensors` file of a directory into f32 CPU tensors.
pub fn hf_tensors(dir: &Path) -> Result<NamedTensors, ModelError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid(
            dir,
            "no *.safetensors file in the model directory".into(),
        ));
    }
    let mut tensors = HashMap::new();
    for file in files {
        let loaded = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|error| {
            invalid(&file, format!("not a readable safetensors file ({error})"))
        })?;
        for (name, tensor) in loaded {
            tensors.insert(name, tensor.to_dtype(DType::F32)?);
        }
    }
    Ok(tensors)
}

fn validate_config(path: &Path, config: &ModelConfig) -> Result<(), ModelError> {
    let problems = [
        (config.num_layers == 0, "the model has no layers"),
        (
            config.num_heads == 0 || config.num_kv_heads == 0,
            "head counts must be positive",
        ),
        (
            config.num_kv_heads > 0 && !config.num_heads.is_multiple_of(config.num_kv_heads),
            "query heads must be a multiple of key/value heads",
        ),
        (
            !config.head_dim.is_multiple_of(2),
            "head dimension must be even for RoPE",
        ),
    ];
    match problems.iter().find(|(bad, _)| *bad) {
        Some((_, reason)) => Err(invalid(path, (*reason).into())),
        None => Ok(()),
    }
}

fn metadata<'a>(
    path: &Path,
    content: &'a gguf_file::Content,
    key: &str,
) -> Result<&'a gguf_file::Value, ModelError> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| invalid(path, format!("missing metadata {key}")))
}

fn metadata_string(
    path: &Path,
    content: &gguf_file::Content,
    key: &str,
) -> Result<String, ModelError> {
    metadata(path, content, key)?
        .to_string()
        .cloned()
        .map_err(|_| invalid(path, format!("metadata {key} is not a string")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name_of_gguf("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name_of_gguf("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(
            hf_name_of_gguf("blk.3.ffn_down.weight").as_deref(),
            Some("model.layers.3.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name_of_gguf("blk.3.ffn_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name_of_gguf("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name_of_gguf("rope_freqs.weight"), None);
    }
}
