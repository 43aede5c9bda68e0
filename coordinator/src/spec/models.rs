//! Models and tasks a sweep names, and the model geometry the validator checks against.
//!
//! The coordinator never loads weights. It knows the geometry of the packaged models, and
//! reads `config.json` of a local Hugging Face directory; for a GGUF file the geometry is
//! unknown here and the checks that need it are left to the worker.

// Closed sets of names are defined with the job contract's macro, so every name set of a
// sweep file parses, prints and serializes the same way.
use lorasweep_contract::named_enum;
use std::path::{Path, PathBuf};

use super::placement::ModuleKind;
use lorasweep_contract::{Metric, NamedTask};

named_enum! {
    /// A decoder architecture the engine implements.
    Architecture ("architecture") {
        /// Llama (SmolLM2).
        Llama => "llama",
        /// Qwen2 (Qwen2.5).
        Qwen2 => "qwen2",
    }
}

named_enum! {
    /// A model shipped in a package (see `lorasweep assets`).
    PackagedModel ("packaged model") {
        /// SmolLM2-135M-Instruct.
        SmolLm2 => "smollm2-135m",
        /// Qwen2.5-Coder-0.5B-Instruct.
        Qwen25Coder => "qwen2.5-coder-0.5b",
    }
}

/// The sizes that decide which modules exist and how large an adapter on them may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ModelGeometry {
    /// The architecture.
    pub architecture: Architecture,
    /// Decoder layers.
    pub layers: u32,
    /// Hidden size.
    pub hidden: u32,
    /// MLP intermediate size.
    pub ffn: u32,
    /// Output width of q_proj (heads × head dim).
    pub q_dim: u32,
    /// Output width of k_proj and v_proj (KV heads × head dim).
    pub kv_dim: u32,
}

impl ModelGeometry {
    /// `(d_in, d_out)` of a module kind.
    pub fn module_dims(&self, kind: ModuleKind) -> (u32, u32) {
        match kind {
            ModuleKind::QProj => (self.hidden, self.q_dim),
            ModuleKind::KProj | ModuleKind::VProj => (self.hidden, self.kv_dim),
            ModuleKind::OProj => (self.q_dim, self.hidden),
            ModuleKind::GateProj | ModuleKind::UpProj => (self.hidden, self.ffn),
            ModuleKind::DownProj => (self.ffn, self.hidden),
        }
    }

    /// The largest rank an adapter on this kind may have: min(d_in, d_out).
    pub fn max_rank(&self, kind: ModuleKind) -> u32 {
        let (d_in, d_out) = self.module_dims(kind);
        d_in.min(d_out)
    }
}

impl PackagedModel {
    /// The geometry (from the models' config files; see `engine/src/assets`).
    pub fn geometry(self) -> ModelGeometry {
        match self {
            // 9 heads and 3 KV heads of 64.
            PackagedModel::SmolLm2 => ModelGeometry {
                architecture: Architecture::Llama,
                layers: 30,
                hidden: 576,
                ffn: 1536,
                q_dim: 576,
                kv_dim: 192,
            },
            // 14 heads and 2 KV heads of 64.
            PackagedModel::Qwen25Coder => ModelGeometry {
                architecture: Architecture::Qwen2,
                layers: 24,
                hidden: 896,
                ffn: 4864,
                q_dim: 896,
                kv_dim: 128,
            },
        }
    }
}

/// A model a sweep runs on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelRef {
    /// A packaged model, by name.
    Packaged {
        /// Which one.
        model: PackagedModel,
    },
    /// A GGUF file.
    Gguf {
        /// Its path (resolved from the sweep file's folder when that is known).
        path: PathBuf,
    },
    /// A Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    HfDir {
        /// Its path (resolved from the sweep file's folder when that is known).
        path: PathBuf,
        /// Read from its config.json when the directory was there to read.
        geometry: Option<ModelGeometry>,
    },
}

impl ModelRef {
    /// The model's identity in job keys and tables: the packaged name or the path.
    pub fn id(&self) -> String {
        match self {
            ModelRef::Packaged { model } => model.name().to_string(),
            ModelRef::Gguf { path } | ModelRef::HfDir { path, .. } => path.display().to_string(),
        }
    }

    /// The geometry, where the coordinator can know it.
    pub fn geometry(&self) -> Option<ModelGeometry> {
        match self {
            ModelRef::Packaged { model } => Some(model.geometry()),
            ModelRef::Gguf { .. } => None,
            ModelRef::HfDir { geometry, .. } => *geometry,
        }
    }
}

/// Resolves a path written in the sweep file.
pub(crate) fn resolve(path: &str, base_dir: Option<&Path>) -> PathBuf {
    let written = PathBuf::from(path);
    match base_dir {
        // `./model` and `model` name the same folder: drop `.` so job keys and reports agree.
        Some(base) if written.is_relative() => base
            .join(written)
            .components()
            .filter(|part| !matches!(part, std::path::Component::CurDir))
            .collect(),
        _ => written,
    }
}

/// The parts of a Hugging Face `config.json` the geometry needs.
#[derive(serde::Deserialize)]
struct HfConfig {
    model_type: String,
    num_hidden_layers: u32,
    hidden_size: u32,
    intermediate_size: u32,
    num_attention_heads: u32,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
}

/// Reads the geometry from a Hugging Face directory's `config.json`. The error says what
/// was expected and what was found.
pub(crate) fn read_hf_geometry(dir: &Path) -> Result<ModelGeometry, (String, String)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|error| {
        (
            "a Hugging Face model directory with a config.json".to_string(),
            format!("{}: {error}", config_path.display()),
        )
    })?;
    let config: HfConfig = serde_json::from_str(&text).map_err(|error| {
        (
            "a config.json with model_type, num_hidden_layers, hidden_size, intermediate_size \
             and num_attention_heads"
                .to_string(),
            format!("{}: {error}", config_path.display()),
        )
    })?;
    let architecture = Architecture::from_name(&config.model_type).ok_or_else(|| {
        (
            format!(
                "a model of a supported architecture ({})",
                Architecture::names_list()
            ),
            format!(
                "model_type `{}` in {}",
                config.model_type,
                config_path.display()
            ),
        )
    })?;
    if config.num_attention_heads == 0 || config.num_hidden_layers == 0 || config.hidden_size == 0 {
        return Err((
            "a config.json with non-zero layers, hidden size and heads".to_string(),
            format!("zeros in {}", config_path.display()),
        ));
    }
    let head_dim = config
        .head_dim
        .unwrap_or(config.hidden_size / config.num_attention_heads);
    let kv_heads = config
        .num_key_value_heads
        .unwrap_or(config.num_attention_heads);
    Ok(ModelGeometry {
        architecture,
        layers: config.num_hidden_layers,
        hidden: config.hidden_size,
        ffn: config.intermediate_size,
        q_dim: config.num_attention_heads * head_dim,
        kv_dim: kv_heads * head_dim,
    })
}

/// A task a sweep trains and evaluates on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskRef {
    /// A packaged task.
    Named {
        /// Which one.
        task: NamedTask,
    },
    /// A user task: chat-messages JSONL.
    Jsonl {
        /// Its path (resolved from the sweep file's folder when that is known).
        path: PathBuf,
        /// How it is scored.
        metric: Metric,
    },
}

impl TaskRef {
    /// The task's identity in job keys and tables: the name or the path.
    pub fn id(&self) -> String {
        match self {
            TaskRef::Named { task } => task.name().to_string(),
            TaskRef::Jsonl { path, .. } => path.display().to_string(),
        }
    }

    /// The metric of a user task (`None` for named tasks, whose metric is their own).
    pub fn metric(&self) -> Option<Metric> {
        match self {
            TaskRef::Named { .. } => None,
            TaskRef::Jsonl { metric, .. } => Some(*metric),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_geometry_matches_the_assets() {
        let smol = PackagedModel::SmolLm2.geometry();
        assert_eq!(smol.module_dims(ModuleKind::KProj), (576, 192));
        assert_eq!(smol.module_dims(ModuleKind::DownProj), (1536, 576));
        assert_eq!(smol.max_rank(ModuleKind::VProj), 192);
        let qwen = PackagedModel::Qwen25Coder.geometry();
        assert_eq!(qwen.module_dims(ModuleKind::VProj), (896, 128));
        assert_eq!(qwen.module_dims(ModuleKind::UpProj), (896, 4864));
        assert_eq!(qwen.layers, 24);
    }

    #[test]
    fn hf_config_geometry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type":"qwen2","num_hidden_layers":4,"hidden_size":64,
                "intermediate_size":128,"num_attention_heads":4,"num_key_value_heads":2}"#,
        )
        .unwrap();
        let geometry = read_hf_geometry(dir.path()).unwrap();
        assert_eq!(geometry.layers, 4);
        assert_eq!(geometry.kv_dim, 32);
        assert_eq!(geometry.q_dim, 64);
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type":"gpt2","num_hidden_layers":4,"hidden_size":64,
                "intermediate_size":128,"num_attention_heads":4}"#,
        )
        .unwrap();
        let (expected, found) = read_hf_geometry(dir.path()).unwrap_err();
        assert!(expected.contains("supported architecture"), "{expected}");
        assert!(found.contains("gpt2"), "{found}");
    }
}
