//! Llama ([Touvron et al., 2023](https://arxiv.org/abs/2302.13971)) as used by SmolLM2: RMSNorm,
//! grouped-query attention with RoPE, SwiGLU FFN, no biases.
//!
//! GGUF files of this family store the q and k projections with their rows permuted for
//! llama.cpp's interleaved RoPE; [`from_gguf_layout`] undoes that so the weights match the
//! Hugging Face layout (and adapters trained here match PEFT's).

use std::path::Path;

use candle_core::Tensor;

use super::{json_f64, json_usize, Architecture, ModelConfig, ModelError};

/// The configuration from a Hugging Face `config.json` with `model_type: llama`.
pub fn config_from_hf(path: &Path, json: &serde_json::Value) -> Result<ModelConfig, ModelError> {
    let hidden_size = json_usize(path, json, "hidden_size")?;
    let num_heads = json_usize(path, json, "num_attention_heads")?;
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: json_usize(path, json, "vocab_size")?,
        hidden_size,
        intermediate_size: json_usize(path, json, "intermediate_size")?,
        num_layers: json_usize(path, json, "num_hidden_layers")?,
        num_heads,
        num_kv_heads: json_usize(path, json, "num_key_value_heads").unwrap_or(num_heads),
        head_dim: json_usize(path, json, "head_dim").unwrap_or(hidden_size / num_heads.max(1)),
        rope_theta: json_f64(json, "rope_theta").unwrap_or(10_000.0),
        rms_norm_eps: json_f64(json, "rms_norm_eps").unwrap_or(1e-5),
        tie_word_embeddings: json
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        attention_bias: json
            .get("attention_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        max_position_embeddings: json_usize(path, json, "max_position_embeddings").unwrap_or(8192),
    })
}

/// Undoes the GGUF converter's row permutation of `q_proj` / `k_proj`.
///
/// The converter maps each head's rows `[first half | second half]` to interleaved pairs:
/// `reshape(heads, 2, d/2, in) → swap(1, 2)`. The inverse is
/// `reshape(heads, d/2, 2, in) → swap(1, 2) → reshape(out, in)`.
pub fn from_gguf_layout(
    hf_name: &str,
    tensor: Tensor,
    config: &ModelConfig,
) -> Result<Tensor, ModelError> {
    let heads = if hf_name.ends_with("self_attn.q_proj.weight") {
        config.num_heads
    } else if hf_name.ends_with("self_attn.k_proj.weight") {
        config.num_kv_heads
    } else {
        return Ok(tensor);
    };
    let (rows, cols) = tensor.dims2()?;
    let half = rows / heads / 2;
    Ok(tensor
        .reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unpermute_inverts_the_converter_permutation() -> candle_core::Result<()> {
        // The converter's forward permutation, written independently: for head h, output row
        // h*d + 2*i + j comes from input row h*d + j*(d/2) + i.
        let heads = 2;
        let d = 4;
        let cols = 3;
        let hf: Vec<f32> = (0..heads * d * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for i in 0..d / 2 {
                for j in 0..2 {
                    for c in 0..cols {
                        gguf[(h * d + 2 * i + j) * cols + c] =
                            hf[(h * d + j * (d / 2) + i) * cols + c];
                    }
                }
            }
        }
        let config = ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 1,
            hidden_size: cols,
            intermediate_size: 1,
            num_layers: 1,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: d,
            rope_theta: 1e4,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            attention_bias: false,
            max_position_embeddings: 16,
        };
        let tensor = Tensor::from_vec(gguf, (heads * d, cols), &Device::Cpu)?;
        let restored =
            from_gguf_layout("model.layers.0.self_attn.q_proj.weight", tensor, &config).unwrap();
        assert_eq!(restored.flatten_all()?.to_vec1::<f32>()?, hf);
        Ok(())
    }
}
