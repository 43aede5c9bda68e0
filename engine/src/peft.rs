//! Adapters on disk in PEFT's layout, so PEFT and vLLM load what lorasweep trains.
//!
//! `adapter_config.json` holds `peft_type`, `r`, `lora_alpha`, `target_modules`,
//! `layers_to_transform`, `use_rslora`, `use_dora`, …; `adapter_model.safetensors` holds
//! `base_model.model.model.layers.{L}.{block}.{kind}.lora_A.weight` (`r × d_in`),
//! `….lora_B.weight` (`d_out × r`) and, for DoRA, `….lora_magnitude_vector` (`d_out`).
//!
//! PiSSA and MiLoRA train on a residual base `W − s·B₀A₀`, which a user's copy of the base
//! model does not have. They are saved the way PEFT converts them: as plain LoRA of rank `2r`
//! with `A' = [A; A₀]`, `B' = [B, −B₀]`, so `W + s·B'A' = W_res + s·BA` on the original weights.
//! `lorasweep_adapter.json` beside them records what lorasweep trained (variant, placement,
//! ranks, seed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::{scale_for, Adapter, Variant};
use crate::model::{ModuleId, Transformer};

/// What lorasweep records about an adapter beside PEFT's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    /// The model as the user named it.
    pub base_model: String,
    /// Variant trained.
    pub variant: Variant,
    /// Placement as written.
    pub placement: String,
    /// Modules and their (training) ranks.
    pub modules: BTreeMap<String, usize>,
    /// `α`.
    pub alpha: f64,
    /// Training seed.
    pub seed: u64,
    /// Trainable parameters during training.
    pub trainable_parameters: usize,
}

/// Errors reading or writing adapters.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Malformed adapter files.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

fn key(module: ModuleId, leaf: &str) -> String {
    format!("base_model.model.model.{}.{leaf}", module.name())
}

/// The tensors PEFT expects for one module, with PiSSA/MiLoRA converted to plain LoRA.
fn export_module(
    module: ModuleId,
    adapter: &Adapter,
    initial: Option<&(Tensor, Tensor)>,
) -> Result<Vec<(String, Tensor)>, PeftError> {
    let a = adapter
        .a()
        .as_tensor()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    let b = adapter
        .b()
        .as_tensor()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    let (a, b) = match initial {
        Some((a0, b0)) => (
            Tensor::cat(&[&a, a0], 0)?,
            Tensor::cat(&[&b, &b0.neg()?], 1)?,
        ),
        None => (a, b),
    };
    let mut out = vec![
        (key(module, "lora_A.weight"), a),
        (key(module, "lora_B.weight"), b),
    ];
    if let Some(m) = adapter.magnitude() {
        out.push((
            key(module, "lora_magnitude_vector"),
            m.as_tensor()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?,
        ));
    }
    Ok(out)
}

/// Saves every adapter of `model` into `dir` (created) in PEFT's layout. `initial` holds
/// `(A₀, B₀)` on CPU per module for PiSSA/MiLoRA.
pub fn save(
    dir: &Path,
    model: &Transformer,
    initial: &HashMap<ModuleId, (Tensor, Tensor)>,
    record: &AdapterRecord,
) -> Result<(), PeftError> {
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let adapters = model.adapters();
    let Some((_, first)) = adapters.first() else {
        return Err(PeftError::Invalid {
            path: dir.to_path_buf(),
            reason: "the model has no adapter to save".into(),
        });
    };
    let variant = first.variant();
    let converted = matches!(variant, Variant::Pissa | Variant::Milora);
    let mut tensors = HashMap::new();
    let mut ranks = BTreeMap::new();
    for (module, adapter) in &adapters {
        for (name, tensor) in export_module(*module, adapter, initial.get(module))? {
            tensors.insert(name, tensor);
        }
        let saved_rank = if converted {
            2 * adapter.rank()
        } else {
            adapter.rank()
        };
        ranks.insert(*module, saved_rank);
    }
    let kinds: BTreeSet<_> = adapters.iter().map(|(m, _)| m.kind).collect();
    let layers: BTreeSet<_> = adapters.iter().map(|(m, _)| m.layer).collect();
    let is_product = kinds.len() * layers.len() == adapters.len();
    let default_rank = *ranks.values().next().expect("at least one adapter");
    // The scale must survive the rank change of the PiSSA/MiLoRA conversion: α' = s·r' (or s·√r').
    let alpha_for = |saved_rank: usize| -> f64 {
        let scale = first.scale();
        if variant == Variant::RsLora {
            scale * (saved_rank as f64).sqrt()
        } else {
            scale * saved_rank as f64
        }
    };
    let target_modules = if is_product {
        serde_json::json!(kinds.iter().map(|k| k.name()).collect::<Vec<_>>())
    } else {
        let names: Vec<String> = adapters
            .iter()
            .map(|(m, _)| regex_escape(&format!("model.{}", m.name())))
            .collect();
        serde_json::json!(format!("^(?:{})$", names.join("|")))
    };
    let layers_to_transform = if is_product && layers.len() < model.config().num_layers {
        serde_json::json!(layers.iter().collect::<Vec<_>>())
    } else {
        serde_json::Value::Null
    };
    let rank_pattern: BTreeMap<String, usize> = ranks
        .iter()
        .filter(|(_, &r)| r != default_rank)
        .map(|(m, &r)| (format!("model.{}", m.name()), r))
        .collect();
    let alpha_pattern: BTreeMap<String, f64> = rank_pattern
        .iter()
        .map(|(name, &r)| (name.clone(), alpha_for(r)))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": record.base_model,
        "r": default_rank,
        "lora_alpha": alpha_for(default_rank),
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": variant == Variant::RsLora,
        "use_dora": variant == Variant::Dora,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    });
    write_json(&dir.join("adapter_config.json"), &config)?;
    write_json(&dir.join("lorasweep_adapter.json"), record)?;
    let path = dir.join("adapter_model.safetensors");
    let temp = dir.join(".adapter_model.safetensors.partial");
    candle_core::safetensors::save(&tensors, &temp)?;
    std::fs::rename(&temp, &path).map_err(|source| PeftError::Io { path, source })?;
    Ok(())
}

/// Loads a PEFT LoRA/DoRA adapter directory onto `model` for inference (the adapters track no
/// gradient; see [`Adapter::for_inference`]). The model's weights must be the original base
/// weights. Returns the modules it attached.
pub fn load(dir: &Path, model: &mut Transformer) -> Result<Vec<ModuleId>, PeftError> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| PeftError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::Invalid {
            path: config_path.clone(),
            reason: format!("invalid JSON ({e})"),
        })?;
    let invalid = |reason: String| PeftError::Invalid {
        path: config_path.clone(),
        reason,
    };
    if config["peft_type"].as_str() != Some("LORA") {
        return Err(invalid(format!(
            "peft_type is {}, expected \"LORA\"",
            config["peft_type"]
        )));
    }
    let default_rank = config["r"]
        .as_u64()
        .ok_or_else(|| invalid("field r: expected an integer".into()))?
        as usize;
    let default_alpha = config["lora_alpha"]
        .as_f64()
        .ok_or_else(|| invalid("field lora_alpha: expected a number".into()))?;
    let rslora = config["use_rslora"].as_bool().unwrap_or(false);
    let dora = config["use_dora"].as_bool().unwrap_or(false);
    let weights_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
        PeftError::Invalid {
            path: weights_path.clone(),
            reason: format!("not a readable safetensors file ({e})"),
        }
    })?;
    let mut modules: BTreeSet<ModuleId> = BTreeSet::new();
    for name in tensors.keys() {
        let module_path = name
            .strip_prefix("base_model.model.")
            .and_then(|rest| rest.rsplit_once(".lora_").map(|(m, _)| m))
            .and_then(ModuleId::parse)
            .ok_or_else(|| PeftError::Invalid {
                path: weights_path.clone(),
                reason: format!("unexpected tensor {name}"),
            })?;
        if module_path.layer >= model.config().num_layers {
            return Err(PeftError::Invalid {
                path: weights_path.clone(),
                reason: format!(
                    "{name} is outside the model's {} layers",
                    model.config().num_layers
                ),
            });
        }
        modules.insert(module_path);
    }
    let device = model.device().clone();
    for &module in &modules {
        let get = |leaf: &str| tensors.get(&key(module, leaf)).cloned();
        let missing = |leaf: &str| PeftError::Invalid {
            path: weights_path.clone(),
            reason: format!("missing {}", key(module, leaf)),
        };
        let a = get("lora_A.weight").ok_or_else(|| missing("lora_A.weight"))?;
        let b = get("lora_B.weight").ok_or_else(|| missing("lora_B.weight"))?;
        let rank = a.dim(0)?;
        let (d_in, d_out) = model.config().module_dims(module.kind);
        if a.dims() != [rank, d_in] || b.dims() != [d_out, rank] {
            return Err(PeftError::Invalid {
                path: weights_path.clone(),
                reason: format!(
                    "{module}: shapes {:?} and {:?} do not fit a {d_out}×{d_in} projection",
                    a.dims(),
                    b.dims()
                ),
            });
        }
        let pattern_key = format!("model.{}", module.name());
        let alpha = config["alpha_pattern"][&pattern_key]
            .as_f64()
            .unwrap_or(default_alpha);
        let saved_rank = config["rank_pattern"][&pattern_key]
            .as_u64()
            .map(|r| r as usize)
            .unwrap_or(default_rank);
        if saved_rank != rank {
            return Err(PeftError::Invalid {
                path: weights_path.clone(),
                reason: format!("{module}: tensors have rank {rank}, the config says {saved_rank}"),
            });
        }
        let variant = match (dora, rslora) {
            (true, _) => Variant::Dora,
            (false, true) => Variant::RsLora,
            _ => Variant::Lora,
        };
        let magnitude = if dora {
            Some(
                get("lora_magnitude_vector")
                    .ok_or_else(|| missing("lora_magnitude_vector"))?
                    .to_device(&device)?,
            )
        } else {
            None
        };
        let scale = scale_for(variant, alpha, rank);
        let adapter = Adapter::from_parts(
            variant,
            scale,
            a.to_device(&device)?,
            b.to_device(&device)?,
            magnitude,
        )
        .map_err(|e| PeftError::Invalid {
            path: weights_path.clone(),
            reason: e.to_string(),
        })?
        .for_inference();
        model.projection_mut(module).attach(adapter, None);
    }
    Ok(modules.into_iter().collect())
}

fn regex_escape(text: &str) -> String {
    text.replace('.', "\\.")
}

/// Writes JSON atomically (temp file, then rename).
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), PeftError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| PeftError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let temp = path.with_extension("json.partial");
    std::fs::write(&temp, text + "\n").map_err(|source| PeftError::Io {
        path: temp.clone(),
        source,
    })?;
    std::fs::rename(&temp, path).map_err(|source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    })
}
