//! The `kappa` rule: data-free, from the weights alone. A module's condition number is
//! `κ = σ_max(W) / σ_min(W)` over the `min(d_in, d_out)` singular values of its weight; the
//! rule prefers the best-conditioned modules (lowest κ, the rule proposed for limiting
//! forgetting), so its score is `1/κ = σ_min/σ_max` (in (0, 1]; higher is better, as for every
//! rule, and `κ = 1/score`).
//!
//! The singular values come from the eigenvalues of the smaller Gram matrix (`W·Wᵀ` or
//! `Wᵀ·W`) in f64 on the host. They depend on the weights only, so they are computed once per
//! model (its digest and compute dtype) and cached as a small JSON file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::Transformer;
use crate::probe::ProbeError;

/// The extreme singular values of one weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Extremes {
    /// The largest singular value.
    pub sigma_max: f64,
    /// The smallest of the `min(d_in, d_out)` singular values.
    pub sigma_min: f64,
}

impl Extremes {
    /// `σ_min/σ_max = 1/κ`, the rule's score (0 for a zero weight).
    pub fn inverse_condition(&self) -> f64 {
        if self.sigma_max > 0.0 {
            self.sigma_min / self.sigma_max
        } else {
            0.0
        }
    }
}

/// What the cache file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheFile {
    /// Module names, in `config.all_modules()` order.
    modules: Vec<String>,
    /// Their extremes.
    extremes: Vec<Extremes>,
}

/// The extreme singular values of a weight `d_out × d_in` (any dtype, any device).
pub fn extremes(weight: &Tensor) -> Result<Extremes, ProbeError> {
    let w = weight.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let (d_out, d_in) = w.dims2()?;
    let gram = if d_out <= d_in {
        w.matmul(&w.t()?)?
    } else {
        w.t()?.matmul(&w)?
    };
    let host = super::lowrank::to_host(&gram)?;
    let host = (&host + host.transpose()) * 0.5;
    let eigenvalues = host.symmetric_eigenvalues();
    let root = |value: f64| value.max(0.0).sqrt();
    let sigma_max = eigenvalues.iter().copied().fold(0.0, f64::max);
    let sigma_min = eigenvalues.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Extremes {
        sigma_max: root(sigma_max),
        sigma_min: if sigma_min.is_finite() {
            root(sigma_min)
        } else {
            0.0
        },
    })
}

/// Every candidate module's extremes, in `config.all_modules()` order: from the cache file
/// for this model in `cache_dir` when there is one, otherwise computed (and written there).
/// A cache that cannot be read or written costs the computation, never the probe.
pub fn model_extremes(
    model: &Transformer,
    digest: &str,
    cache_dir: Option<&Path>,
) -> Result<Vec<Extremes>, ProbeError> {
    let names: Vec<String> = model
        .config()
        .all_modules()
        .iter()
        .map(|module| module.name())
        .collect();
    let path = cache_dir.map(|dir| cache_path(dir, digest, model.dtype()));
    if let Some(path) = &path {
        if let Some(cached) = read_cache(path).filter(|cached| cached.modules == names) {
            tracing::info!(path = %path.display(), "singular values reused from the cache");
            return Ok(cached.extremes);
        }
    }
    let mut all = Vec::with_capacity(names.len());
    for (index, module) in model.config().all_modules().into_iter().enumerate() {
        all.push(extremes(model.projection(module).weight())?);
        if (index + 1) % 7 == 0 {
            tracing::info!(layer = module.layer, "singular values of the layer done");
        }
    }
    if let Some(path) = &path {
        let file = CacheFile {
            modules: names,
            extremes: all.clone(),
        };
        if let Err(error) = write_cache(path, &file) {
            tracing::warn!(path = %path.display(), %error, "cannot cache the singular values");
        }
    }
    Ok(all)
}

/// `DIR/kappa-DIGEST-DTYPE.json`.
fn cache_path(dir: &Path, digest: &str, dtype: DType) -> PathBuf {
    dir.join(format!("kappa-{digest}-{}.json", dtype.as_str()))
}

fn read_cache(path: &Path) -> Option<CacheFile> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Written to a temporary file and renamed, so a reader never sees half a file.
fn write_cache(path: &Path, file: &CacheFile) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temporary, serde_json::to_vec(file)?)?;
    std::fs::rename(&temporary, path)
}
