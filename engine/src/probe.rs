//! The PAGE probe (Projected Adapter Gradient Energy).
//!
//! At the standard adapter init (`B = 0`, `A` random) the only non-zero adapter gradient is
//! `∇_B L = s·G·Aᵀ` with `G = ∇_W L = Σ_t δ_t x_tᵀ`. PAGE of a module is `‖∇_B L‖²_F` averaged
//! over probe batches. Two estimators:
//! - `sample`: attach real adapters (A drawn from its init, seeded) and read `‖∇_B L‖²`;
//! - `expected`: its expectation over A, `s²·r·σ_A²·‖G‖²_F`, with `G` formed in the backward
//!   from each module's input `x` and output gradient `δ`, summed over the batch's passes
//!   ([`Transformer::loss_and_grads`] runs a batch in passes of a few rows to bound memory).
//!
//! One forward/backward per batch with a rank-`r` adapter on every candidate module gives both;
//! no optimizer is held. The `expected` estimator holds every module's `G` (f32) until the
//! batch ends: the model's projection weights once more (0.4 GB for SmolLM2-135M).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use crate::adapter::{Adapter, AdapterSettings, Variant};
use crate::data::Collated;
use crate::model::{ModelConfig, ModuleId, Transformer};

pub use lorasweep_contract::Estimator;

pub use lorasweep_contract::{ModuleScore, ProbeResult, ProbeSettings};

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No batch to probe.
    #[error("the probe got no batch with response tokens")]
    NoData,
    /// Loss or gradient not finite.
    #[error("probe batch {batch}: the loss is {loss} (not finite)")]
    NotFinite {
        /// Batch index.
        batch: usize,
        /// The loss value.
        loss: f32,
    },
    /// Adapter set-up failed.
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// Per-batch PAGE of every candidate module, in `config.all_modules()` order.
pub struct BatchScores {
    /// The `sample` estimator.
    pub sample: Vec<f64>,
    /// The `expected` estimator (when requested).
    pub expected: Option<Vec<f64>>,
    /// Response tokens in the batch.
    pub tokens: usize,
}

/// Attaches a probe adapter (B = 0, A from `settings.a_init`) to every candidate module.
pub fn attach_probe_adapters(
    model: &mut Transformer,
    settings: &ProbeSettings,
) -> Result<(), ProbeError> {
    let adapter_settings = AdapterSettings {
        variant: Variant::Lora,
        rank: settings.rank,
        alpha: settings.alpha,
        a_init: settings.a_init,
        seed: settings.seed,
    };
    let capture = settings.estimator == Estimator::Expected;
    for module in model.config().all_modules() {
        let weight = model.projection(module).weight().clone();
        let (mut adapter, _) = Adapter::init(module, &weight, settings.rank, &adapter_settings)?;
        if capture {
            adapter.enable_capture();
        }
        model.projection_mut(module).attach(adapter, None);
    }
    Ok(())
}

/// A batch's ids, targets and loss weights on the model's device, and its response tokens.
pub(crate) fn batch_tensors(
    model: &Transformer,
    batch: &Collated,
) -> Result<(Tensor, Tensor, Tensor, usize), ProbeError> {
    let device = model.device();
    let shape = (batch.batch, batch.seq_len);
    let ids = Tensor::from_slice(&batch.ids, shape, device)?;
    let targets = Tensor::from_slice(&batch.targets, shape, device)?;
    let weights = Tensor::from_slice(&batch.weights, shape, device)?;
    let tokens = batch.weights.iter().filter(|&&w| w > 0.0).count();
    Ok((ids, targets, weights, tokens))
}

/// The forward and backward of probe batch `index` ([`Transformer::loss_and_grads`]): the
/// gradients and the batch's response tokens, or [`ProbeError::NotFinite`] for a loss that is
/// not finite.
pub(crate) fn loss_and_grads(
    model: &Transformer,
    batch: &Collated,
    index: usize,
) -> Result<(GradStore, usize), ProbeError> {
    let (ids, targets, weights, tokens) = batch_tensors(model, batch)?;
    let (loss, grads) = model.loss_and_grads(&ids, &targets, &weights, 1.0)?;
    let loss_value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if !loss_value.is_finite() {
        return Err(ProbeError::NotFinite {
            batch: index,
            loss: loss_value,
        });
    }
    Ok((grads, tokens))
}

/// One probe batch: forward, backward, and the PAGE of every module.
pub fn score_batch(
    model: &Transformer,
    batch: &Collated,
    settings: &ProbeSettings,
    index: usize,
) -> Result<BatchScores, ProbeError> {
    let (grads, tokens) = loss_and_grads(model, batch, index)?;
    let config = model.config().clone();
    let mut sample = Vec::new();
    let mut expected = (settings.estimator == Estimator::Expected).then(Vec::new);
    let modules = config.all_modules();
    let adapters: Vec<&Adapter> = modules
        .iter()
        .map(|&module| {
            model
                .projection(module)
                .adapter()
                .expect("probe adapters are attached everywhere")
        })
        .collect();
    let grads_b: Vec<Option<&Tensor>> = adapters
        .iter()
        .map(|adapter| grads.get(adapter.b().as_tensor()))
        .collect();
    sample.extend(crate::ops::squared_norms(&grads_b)?);
    for (&module, adapter) in modules.iter().zip(&adapters) {
        if let Some(expected) = expected.as_mut() {
            expected.push(expected_energy(&config, module, adapter, settings)?);
        }
        adapter.clear_weight_grad();
    }
    Ok(BatchScores {
        sample,
        expected,
        tokens,
    })
}

/// Scores `batches` in turn (see [`score_batch`]): the chosen estimator's per-module scores of
/// each batch, and the response tokens of all. `on_batch(index)` runs after each batch, once
/// its tensors are freed (for progress and memory readings).
pub fn score_batches(
    model: &Transformer,
    batches: &[Collated],
    settings: &ProbeSettings,
    on_batch: &mut dyn FnMut(usize),
) -> Result<(Vec<Vec<f64>>, usize), ProbeError> {
    let mut per_batch = Vec::with_capacity(batches.len());
    let mut tokens = 0;
    for (index, batch) in batches.iter().enumerate() {
        let scores = score_batch(model, batch, settings, index)?;
        tokens += scores.tokens;
        per_batch.push(match (settings.estimator, scores.expected) {
            (Estimator::Expected, Some(expected)) => expected,
            _ => scores.sample,
        });
        on_batch(index);
    }
    Ok((per_batch, tokens))
}

/// `s²·r·σ_A²·‖G‖²_F` for one module, with `G = Σ δᵀx` the module's full weight gradient,
/// which [`Transformer::loss_and_grads`] formed for the capturing adapter.
fn expected_energy(
    config: &ModelConfig,
    module: ModuleId,
    adapter: &Adapter,
    settings: &ProbeSettings,
) -> Result<f64, ProbeError> {
    // Every projection lies on the path to the loss: a missing gradient is a bug, not a zero.
    let Some(g) = adapter.weight_grad() else {
        return Err(ProbeError::Tensor(candle_core::Error::Msg(format!(
            "no weight gradient was formed for {module} (is capture on?)"
        ))));
    };
    let g_norm_sq = g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let (d_in, _) = config.module_dims(module.kind);
    let s = adapter.scale();
    let variance = settings.a_init.variance(d_in, settings.rank);
    Ok(s * s * settings.rank as f64 * variance * g_norm_sq)
}

/// What [`summarise`] returns: the statistics part of a [`ProbeResult`], by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Every candidate module with its mean score and share, in layer-major order.
    pub modules: Vec<ModuleScore>,
    /// The argmax module.
    pub dominant: String,
    /// Share of the dominant module.
    pub top1_share: f64,
    /// Share per module kind.
    pub share_by_kind: BTreeMap<String, f64>,
    /// Share per layer.
    pub share_by_layer: Vec<f64>,
    /// Argmax of each batch on its own.
    pub batch_argmax: Vec<String>,
    /// Fraction of batches whose own argmax is the overall dominant module.
    pub argmax_stability: f64,
}

/// Summarises per-batch scores into the probe's result (shares, ranking, stability).
pub fn summarise(config: &ModelConfig, per_batch: &[Vec<f64>]) -> Summary {
    let modules = config.all_modules();
    let batches = per_batch.len().max(1) as f64;
    let means: Vec<f64> = (0..modules.len())
        .map(|i| per_batch.iter().map(|b| b[i]).sum::<f64>() / batches)
        .collect();
    let total: f64 = means.iter().sum();
    let share = |v: f64| if total > 0.0 { v / total } else { 0.0 };
    let scores: Vec<ModuleScore> = modules
        .iter()
        .zip(&means)
        .map(|(m, &score)| ModuleScore {
            name: m.name(),
            layer: m.layer,
            kind: m.kind,
            score,
            share: share(score),
            top_r_share: None,
        })
        .collect();
    let argmax = |values: &[f64]| -> usize {
        values
            .iter()
            .enumerate()
            .fold(0, |best, (i, &v)| if v > values[best] { i } else { best })
    };
    let top = argmax(&means);
    let mut by_kind = BTreeMap::new();
    let mut by_layer = vec![0.0; config.num_layers];
    for s in &scores {
        *by_kind.entry(s.kind.name().to_string()).or_insert(0.0) += s.share;
        by_layer[s.layer] += s.share;
    }
    let batch_argmax: Vec<String> = per_batch
        .iter()
        .map(|b| modules[argmax(b)].name())
        .collect();
    let agree = batch_argmax
        .iter()
        .filter(|name| **name == modules[top].name())
        .count();
    Summary {
        top1_share: scores[top].share,
        modules: scores,
        dominant: modules[top].name(),
        share_by_kind: by_kind,
        share_by_layer: by_layer,
        batch_argmax,
        argmax_stability: agree as f64 / batches,
    }
}

/// Spearman rank correlation of two score vectors (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut ranks = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            let rank = (i + j) as f64 / 2.0;
            for &k in &order[i..=j] {
                ranks[k] = rank;
            }
            i = j + 1;
        }
        ranks
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let cov: f64 = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| (x - mean) * (y - mean))
        .sum();
    let var_a: f64 = ra.iter().map(|x| (x - mean).powi(2)).sum();
    let var_b: f64 = rb.iter().map(|y| (y - mean).powi(2)).sum();
    cov / (var_a * var_b).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_monotone_and_reversed() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }
}
