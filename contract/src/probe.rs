//! The probe's output file (`probe.json`): the settings it ran with and every candidate
//! module's score, rank order and share. One schema for every rule that scores modules
//! ([`Rule`]: PAGE, grad, grad-rank, act, kappa, random), read by the placement, the report and
//! the user. A higher score is better for every rule ([`ProbeResult::ranking`] puts the best
//! first); PAGE files are written exactly as before rules existed (the rule and the rank-r
//! share are left out when they are PAGE's).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::vocab::{AInit, Estimator, ModuleId, ModuleKind, Rule};

/// Probe settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSettings {
    /// Number of probe batches averaged.
    pub batches: usize,
    /// Conversations per batch.
    pub batch_size: usize,
    /// Longest tokenized conversation (longer ones are truncated).
    pub max_len: usize,
    /// Adapter rank `r`.
    pub rank: usize,
    /// Adapter `α` (scale `α/r`).
    pub alpha: f64,
    /// The estimator reported as `score`.
    pub estimator: Estimator,
    /// Init of A (and its variance in the expected estimator).
    pub a_init: AInit,
    /// Seed for A and for which examples form the batches.
    pub seed: u64,
    /// How modules are scored (`page` when absent: files written before rules existed).
    #[serde(default, skip_serializing_if = "Rule::is_page")]
    pub rule: Rule,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            batches: 8,
            batch_size: 8,
            max_len: 256,
            rank: 16,
            alpha: 32.0,
            estimator: Estimator::Sample,
            a_init: AInit::Kaiming,
            seed: 0,
            rule: Rule::Page,
        }
    }
}

/// The score of one candidate module under the probe's rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleScore {
    /// Module path, e.g. `layers.3.mlp.down_proj`.
    pub name: String,
    /// Layer index.
    pub layer: usize,
    /// Projection kind.
    pub kind: ModuleKind,
    /// The rule's score, higher better: mean PAGE over batches (the chosen estimator), mean
    /// ‖∂L/∂W‖²_F (`grad`), mean top-r energy of ∂L/∂W (`grad-rank`), mean ‖x‖² × ‖W‖²_F
    /// (`act`), σ_min/σ_max = 1/κ (`kappa`), a uniform draw (`random`).
    pub score: f64,
    /// `score / Σ score`.
    pub share: f64,
    /// `grad-rank` only: the share of the gradient's energy in its top-r singular values
    /// (energy-weighted over batches), so `score` = mean ‖∂L/∂W‖²_F × this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_r_share: Option<f64>,
}

/// The probe's output file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The model as the user named it.
    pub model: String,
    /// sha256 of the model file(s).
    pub model_digest: String,
    /// The data set (task name or path).
    pub data: String,
    /// sha256 of the conversations probed.
    pub data_digest: String,
    /// Settings used (the estimator and A init among them).
    pub settings: ProbeSettings,
    /// Every candidate module, in layer-major order.
    pub modules: Vec<ModuleScore>,
    /// The argmax module (the dominant adaptation module).
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
    /// Response tokens seen over all batches.
    pub tokens: usize,
    /// Wall time of the probe, seconds.
    pub wall_s: f64,
    /// Peak resident memory of the process while the probe ran (loading included), GiB;
    /// absent where it cannot be measured, and in files written before it was recorded.
    #[serde(default)]
    pub peak_rss_gib: Option<f64>,
}

impl ProbeResult {
    /// Modules sorted by descending score.
    pub fn ranking(&self) -> Vec<ModuleId> {
        let mut scored: Vec<_> = self.modules.iter().collect();
        scored.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.name.cmp(&b.name))
        });
        scored
            .iter()
            .filter_map(|m| ModuleId::parse(&m.name))
            .collect()
    }
}
