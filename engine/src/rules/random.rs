//! The `random` rule: the control. Every module gets a seeded uniform draw in (0, 1], so its
//! ranking is a random permutation that the probe seed fixes; no data, no weights.

use rand::SeedableRng;

use crate::model::ModelConfig;

/// One draw per module in `config.all_modules()` order.
pub fn scores(config: &ModelConfig, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x52A4_D0A1_0C0F_FEE5);
    config
        .all_modules()
        .iter()
        .map(|_| 1.0 - rand::Rng::random::<f64>(&mut rng))
        .collect()
}
