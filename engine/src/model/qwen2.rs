//! Qwen2 ([Qwen team, 2024](https://arxiv.org/abs/2407.10671)) as used by Qwen2.5: the Llama
//! block with biases on the q, k and v projections and a large RoPE base.
//!
//! Unlike llama, the GGUF converter keeps Qwen2's q/k rows in the Hugging Face order (llama.cpp
//! applies RoPE in the "neox" half-split layout for this family), so weights need no fix-up;
//! the logits parity test against transformers checks this.

use std::path::Path;

use candle_core::Tensor;

use super::{json_f64, json_usize, Architecture, ModelConfig, ModelError};

/// The configuration from a Hugging Face `config.json` with `model_type: qwen2`.
pub fn config_from_hf(path: &Path, json: &serde_json::Value) -> Result<ModelConfig, ModelError> {
    let hidden_size = json_usize(path, json, "hidden_size")?;
    let num_heads = json_usize(path, json, "num_attention_heads")?;
    Ok(ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: json_usize(path, json, "vocab_size")?,
        hidden_size,
        intermediate_size: json_usize(path, json, "intermediate_size")?,
        num_layers: json_usize(path, json, "num_hidden_layers")?,
        num_heads,
        num_kv_heads: json_usize(path, json, "num_key_value_heads").unwrap_or(num_heads),
        head_dim: hidden_size / num_heads.max(1),
        rope_theta: json_f64(json, "rope_theta").unwrap_or(1_000_000.0),
        rms_norm_eps: json_f64(json, "rms_norm_eps").unwrap_or(1e-6),
        tie_word_embeddings: json
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        attention_bias: true,
        max_position_embeddings: json_usize(path, json, "max_position_embeddings")
            .unwrap_or(32_768),
    })
}

/// GGUF tensors of this family are already in the Hugging Face layout.
pub fn from_gguf_layout(
    _hf_name: &str,
    tensor: Tensor,
    _config: &ModelConfig,
) -> Result<Tensor, ModelError> {
    Ok(tensor)
}
