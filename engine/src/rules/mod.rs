//! Placement rules besides PAGE: other ways to score every candidate module, each written
//! into the same probe file as PAGE (module, score, share; a higher score is better), so the
//! placements, the heatmaps and the concentration statistics read every rule alike.
//!
//! | rule | reads | score of a module (mean over probe batches where it reads data) | file |
//! | --- | --- | --- | --- |
//! | `page` | data, backward | ‖∇_B L‖² of a probe adapter (see [`crate::probe`]) | `probe.rs` |
//! | `grad` | data, backward | ‖∂L/∂W‖²_F of the frozen weight | [`grad`] |
//! | `grad-rank` | data, backward | Σ_{i≤r} σ_i(∂L/∂W)²: the energy times its top-r share | [`grad`], [`lowrank`] |
//! | `act` | data, forward only | mean ‖x_t‖² over response tokens × ‖W‖²_F | [`act`] |
//! | `kappa` | weights only | σ_min/σ_max = 1/κ (lowest κ first), cached per model | [`kappa`] |
//! | `random` | the seed only | a uniform draw (the control) | [`random`] |
//!
//! This module owns attaching what a rule needs to see and scoring a batch
//! ([`prepare`], [`Prepared::score_batch`]), the data-free rules ([`data_free_scores`]) and
//! the grad-rank shares ([`top_r_shares`]); the probe job that loads the model and the data
//! and writes the file is [`crate::jobs::probe`].

pub mod act;
pub mod grad;
pub mod kappa;
pub mod lowrank;
pub mod random;

use std::path::Path;

use crate::adapter::{Adapter, AdapterSettings, Variant};
use crate::data::Collated;
use crate::model::Transformer;
use crate::probe::{ProbeError, ProbeSettings};

pub use lorasweep_contract::Rule;

/// What a rule measured on one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleBatch {
    /// Every candidate module's score, in `config.all_modules()` order.
    pub scores: Vec<f64>,
    /// `grad-rank`: each module's full gradient energy ‖∂L/∂W‖²_F (its score is the top-r
    /// part of it).
    pub energies: Option<Vec<f64>>,
    /// Response tokens in the batch.
    pub tokens: usize,
}

/// A model made ready for a data rule, and what the rule keeps between batches.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// `grad` (`top_rank: None`) or `grad-rank` (`Some(r)`): capturing adapters everywhere.
    Gradient {
        /// The rank r of `grad-rank`.
        top_rank: Option<usize>,
    },
    /// `act`: observing adapters everywhere.
    Act {
        /// ‖W‖²_F of every module.
        weight_energies: Vec<f64>,
    },
}

/// Attaches what a data rule other than PAGE needs to every candidate module: a rank-1
/// adapter with B = 0 (the forward is unchanged) that captures the module's input and output
/// gradient (`grad`, `grad-rank`) or only observes its input (`act`).
pub fn prepare(model: &mut Transformer, settings: &ProbeSettings) -> Result<Prepared, ProbeError> {
    let prepared = match settings.rule {
        Rule::Grad => Prepared::Gradient { top_rank: None },
        Rule::GradRank => Prepared::Gradient {
            top_rank: Some(settings.rank),
        },
        Rule::Act => Prepared::Act {
            weight_energies: act::weight_energies(model)?,
        },
        rule @ (Rule::Page | Rule::Kappa | Rule::Random) => {
            return Err(ProbeError::Tensor(candle_core::Error::Msg(format!(
                "the {rule} rule is not scored batch by batch here"
            ))))
        }
    };
    if let Prepared::Gradient {
        top_rank: Some(rank),
    } = prepared
    {
        if rank == 0 {
            return Err(ProbeError::Tensor(candle_core::Error::Msg(
                "grad-rank needs a rank of at least 1".to_string(),
            )));
        }
    }
    let adapter_settings = AdapterSettings {
        variant: Variant::Lora,
        rank: 1,
        alpha: 1.0,
        a_init: settings.a_init,
        seed: settings.seed,
    };
    for module in model.config().all_modules() {
        let weight = model.projection(module).weight().clone();
        let (mut adapter, _) = Adapter::init(module, &weight, 1, &adapter_settings)?;
        match prepared {
            Prepared::Gradient { .. } => adapter.enable_capture(),
            Prepared::Act { .. } => adapter.enable_input_norms(),
        }
        model.projection_mut(module).attach(adapter, None);
    }
    Ok(prepared)
}

impl Prepared {
    /// Scores every module on one batch (`index` names it in errors).
    pub fn score_batch(
        &self,
        model: &Transformer,
        batch: &Collated,
        settings: &ProbeSettings,
        index: usize,
    ) -> Result<RuleBatch, ProbeError> {
        match self {
            Prepared::Gradient { top_rank } => {
                grad::score_batch(model, batch, settings, index, *top_rank)
            }
            Prepared::Act { weight_energies } => act::score_batch(model, batch, weight_energies),
        }
    }
}

/// The scores of a rule that reads no data (`kappa`, `random`), in `config.all_modules()`
/// order. `digest` identifies the weights for `kappa`'s cache in `cache_dir`.
pub fn data_free_scores(
    model: &Transformer,
    settings: &ProbeSettings,
    digest: &str,
    cache_dir: Option<&Path>,
) -> Result<Vec<f64>, ProbeError> {
    match settings.rule {
        Rule::Kappa => Ok(kappa::model_extremes(model, digest, cache_dir)?
            .iter()
            .map(kappa::Extremes::inverse_condition)
            .collect()),
        Rule::Random => Ok(random::scores(model.config(), settings.seed)),
        rule => Err(ProbeError::Tensor(candle_core::Error::Msg(format!(
            "the {rule} rule reads data"
        )))),
    }
}

/// `grad-rank`: each module's share of its gradient energy in the top-r singular values,
/// energy-weighted over batches (Σ top / Σ energy), so the mean score is the mean energy
/// times this share. `None` for the other rules.
pub fn top_r_shares(batches: &[RuleBatch]) -> Option<Vec<f64>> {
    let first = batches.first()?.energies.as_ref()?;
    Some(
        (0..first.len())
            .map(|module| {
                let top: f64 = batches.iter().map(|batch| batch.scores[module]).sum();
                let energy: f64 = batches
                    .iter()
                    .filter_map(|batch| batch.energies.as_ref().map(|e| e[module]))
                    .sum();
                if energy > 0.0 {
                    (top / energy).clamp(0.0, 1.0)
                } else {
                    1.0
                }
            })
            .collect(),
    )
}
