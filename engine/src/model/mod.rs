//! Causal language models: configuration, loading (GGUF and Hugging Face directories) and the
//! decoder itself.
//!
//! Both supported families, Llama and Qwen2, share one decoder ([`transformer`]); the family
//! files ([`llama`], [`qwen2`]) say how each reads its configuration and weights.

pub mod export;
pub mod llama;
pub mod qwen2;
pub mod transformer;
pub mod weights;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use transformer::{KvCache, Transformer};

/// The model families lorasweep can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama (SmolLM2 and friends): no attention biases.
    Llama,
    /// Qwen2 (Qwen2.5 and friends): biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// Parses the architecture name used by GGUF metadata and `config.json` `model_type`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// The geometry and numerics of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the FFN's inner layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v projections have biases.
    pub attention_bias: bool,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    /// `(d_in, d_out)` of one projection kind.
    pub fn module_dims(&self, kind: ModuleKind) -> (usize, usize) {
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        match kind {
            ModuleKind::QProj => (self.hidden_size, q),
            ModuleKind::KProj | ModuleKind::VProj => (self.hidden_size, kv),
            ModuleKind::OProj => (q, self.hidden_size),
            ModuleKind::GateProj | ModuleKind::UpProj => (self.hidden_size, self.intermediate_size),
            ModuleKind::DownProj => (self.intermediate_size, self.hidden_size),
        }
    }

    /// Every candidate module: 7 kinds × every layer, in layer-major order.
    pub fn all_modules(&self) -> Vec<ModuleId> {
        (0..self.num_layers)
            .flat_map(|layer| ModuleKind::ALL.map(|kind| ModuleId { layer, kind }))
            .collect()
    }

    /// Total parameters of the base model (embedding counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let per_layer: usize = ModuleKind::ALL
            .iter()
            .map(|&kind| {
                let (d_in, d_out) = self.module_dims(kind);
                d_in * d_out
            })
            .sum::<usize>()
            + 2 * self.hidden_size
            + if self.attention_bias {
                self.module_dims(ModuleKind::QProj).1 + 2 * self.module_dims(ModuleKind::KProj).1
            } else {
                0
            };
        let embedding = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        embedding + head + self.hidden_size + self.num_layers * per_layer
    }
}

pub use lorasweep_contract::{ModuleId, ModuleKind};

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// One GGUF file holding weights, tokenizer and chat template.
    Gguf(PathBuf),
    /// A Hugging Face directory: config.json, *.safetensors, tokenizer.json.
    HfDir(PathBuf),
}

impl ModelSource {
    /// A GGUF file or a Hugging Face directory, judged by what is on disk.
    pub fn from_path(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Self::HfDir(path.to_path_buf()));
            }
            return Err(ModelError::Invalid {
                path: path.to_path_buf(),
                reason:
                    "a model directory must contain config.json, *.safetensors and tokenizer.json"
                        .into(),
            });
        }
        if path.is_file() {
            return Ok(Self::Gguf(path.to_path_buf()));
        }
        Err(ModelError::Missing(path.to_path_buf()))
    }

    /// The file or directory path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(path) | Self::HfDir(path) => path,
        }
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The path does not exist.
    #[error("model not found: {0} (give a packaged name, a .gguf file or a Hugging Face model directory)")]
    Missing(PathBuf),
    /// The file exists but is not a usable model.
    #[error("{path}: {reason}")]
    Invalid {
        /// The offending file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// An architecture lorasweep does not implement.
    #[error("{path}: unsupported architecture {found:?} (supported: llama, qwen2)")]
    UnsupportedArchitecture {
        /// The offending file.
        path: PathBuf,
        /// The architecture it declares.
        found: String,
    },
    /// An I/O error reading a model file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tensor operation failed while building the model.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// Reads a required integer field of a `config.json`.
pub(crate) fn json_usize(
    path: &Path,
    json: &serde_json::Value,
    key: &str,
) -> Result<usize, ModelError> {
    json.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| {
            invalid(
                path,
                format!("field {key}: expected a non-negative integer"),
            )
        })
}

/// Reads an optional float field of a `config.json`.
pub(crate) fn json_f64(json: &serde_json::Value, key: &str) -> Option<f64> {
    json.get(key).and_then(|v| v.as_f64())
}

pub(crate) fn invalid(path: &Path, reason: String) -> ModelError {
    ModelError::Invalid {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_round_trip() {
        for kind in ModuleKind::ALL {
            let id = ModuleId { layer: 12, kind };
            assert_eq!(ModuleId::parse(&id.name()), Some(id));
        }
        assert_eq!(
            ModuleId::parse("model.layers.3.mlp.down_proj"),
            Some(ModuleId {
                layer: 3,
                kind: ModuleKind::DownProj
            })
        );
        assert_eq!(ModuleId::parse("layers.3.self_attn.down_proj"), None);
        assert_eq!(ModuleId::parse("layers.x.mlp.down_proj"), None);
        assert_eq!(ModuleId::parse("layers.3.mlp.down_proj.extra"), None);
    }
}
