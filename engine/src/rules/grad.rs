//! The `grad` and `grad-rank` rules: the gradient of the loss with respect to each frozen
//! weight, `G = ∂L/∂W = Σ_t δ_t x_tᵀ`, on one probe batch.
//!
//! - `grad`: `‖G‖²_F`, what full fine-tuning would move most (no adapter involved);
//! - `grad-rank`: `Σ_{i≤r} σ_i(G)²`, the part of that energy a rank-r update can hold (the
//!   energy times its top-r share); see [`super::lowrank`].
//!
//! Frozen projections never get a weight gradient ([`crate::ops::frozen_linear`]), so `G` is
//! formed from what a capturing rank-1 adapter (B = 0: the forward is unchanged) records: the
//! module input `x` and the loss gradient `δ` at the module output, `G = δᵀx` summed over the
//! passes of [`Transformer::loss_and_grads`] (each pass's activations freed before the next).

use super::lowrank::{self, TopEnergy};
use super::RuleBatch;
use crate::data::Collated;
use crate::model::{ModuleId, Transformer};
use crate::probe::{ProbeError, ProbeSettings};

/// Scores every module on one batch: `‖G‖²_F` (`top_rank: None`) or the top-r energy of `G`
/// with its total (`Some(r)`).
pub(super) fn score_batch(
    model: &Transformer,
    batch: &Collated,
    settings: &ProbeSettings,
    index: usize,
    top_rank: Option<usize>,
) -> Result<RuleBatch, ProbeError> {
    // The gradients that matter are the weight gradients the capturing adapters formed.
    let (_, tokens) = crate::probe::loss_and_grads(model, batch, index)?;
    let config = model.config().clone();
    let modules = config.all_modules();
    let mut scores = Vec::with_capacity(modules.len());
    let mut energies = Vec::with_capacity(modules.len());
    for (position, &module) in modules.iter().enumerate() {
        let adapter = model
            .projection(module)
            .adapter()
            .ok_or_else(|| missing(module, "no capturing adapter"))?;
        // Every projection lies on the path to the loss: a missing gradient is a bug, not a zero.
        let g = adapter
            .weight_grad()
            .ok_or_else(|| missing(module, "no weight gradient was formed"))?;
        adapter.clear_weight_grad();
        match top_rank {
            None => scores.push(f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?)),
            Some(rank) => {
                let seed = settings
                    .seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((index * modules.len() + position) as u64);
                let TopEnergy { total, top } = lowrank::formed_top_energy(&g, rank, seed)?;
                scores.push(top);
                energies.push(total);
            }
        }
    }
    Ok(RuleBatch {
        scores,
        energies: top_rank.map(|_| energies),
        tokens,
    })
}

fn missing(module: ModuleId, what: &str) -> ProbeError {
    ProbeError::Tensor(candle_core::Error::Msg(format!(
        "gradient probe of {module}: {what}"
    )))
}
