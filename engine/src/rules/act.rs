//! The `act` rule: forward only, no backward. A module's score on a batch is the mean, over
//! the batch's response tokens (those the fine-tuning loss is measured on), of its input's
//! squared norm `‖x_t‖²`, times its weight's `‖W‖²_F`: a bound on how large the module's
//! output (and so its weight gradient) can be, from data alone.
//!
//! The inputs are read by observing adapters ([`crate::adapter::Adapter::enable_input_norms`])
//! that add nothing to the forward and build no graph, so the pass costs one inference
//! forward without the LM head.

use candle_core::{DType, Tensor};

use super::RuleBatch;
use crate::data::Collated;
use crate::model::Transformer;
use crate::probe::{batch_tensors, ProbeError};

/// `‖W‖²_F` of every candidate module, in `config.all_modules()` order.
pub(super) fn weight_energies(model: &Transformer) -> Result<Vec<f64>, ProbeError> {
    model
        .config()
        .all_modules()
        .into_iter()
        .map(|module| {
            let weight = model.projection(module).weight();
            let value = weight
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(f64::from(value))
        })
        .collect()
}

/// Scores every module on one batch: mean squared input norm over response tokens × ‖W‖²_F.
pub(super) fn score_batch(
    model: &Transformer,
    batch: &Collated,
    weight_energies: &[f64],
) -> Result<RuleBatch, ProbeError> {
    let (ids, _, weights, tokens) = batch_tensors(model, batch)?;
    if tokens == 0 {
        return Err(ProbeError::NoData);
    }
    // The hidden states run every projection; the LM head is not needed.
    drop(model.hidden_states(&ids, 0, None)?);
    let weights = weights.to_dtype(DType::F32)?;
    let mut scores = Vec::with_capacity(weight_energies.len());
    for (module, weight_energy) in model
        .config()
        .all_modules()
        .into_iter()
        .zip(weight_energies)
    {
        let norms: Tensor = model
            .projection(module)
            .adapter()
            .and_then(|adapter| adapter.input_norms())
            .ok_or_else(|| {
                ProbeError::Tensor(candle_core::Error::Msg(format!(
                    "activation probe of {module}: no observed input"
                )))
            })?;
        let weighted = (norms * &weights)?.sum_all()?.to_scalar::<f32>()?;
        scores.push(f64::from(weighted) / tokens as f64 * weight_energy);
    }
    Ok(RuleBatch {
        scores,
        energies: None,
        tokens,
    })
}
