//! The statistics of a report: mean and spread over seeds, a paired bootstrap interval of a
//! difference, Kendall's τ-b between two score vectors, and ranks with ties.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Resamples of the paired bootstrap.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// The bootstrap's fixed seed: the same stored results always give the same interval.
pub const BOOTSTRAP_SEED: u64 = 0x10ca_5eed;

/// The mean of the values; `None` when there are none.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

/// The sample standard deviation (n − 1); `None` with fewer than two values.
pub fn sample_std(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let center = mean(values)?;
    let squares: f64 = values.iter().map(|value| (value - center).powi(2)).sum();
    Some((squares / (values.len() - 1) as f64).sqrt())
}

/// A difference of means with its 95% percentile bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PairedInterval {
    /// Mean of the paired differences.
    pub mean: f64,
    /// 2.5th percentile of the resampled means.
    pub low: f64,
    /// 97.5th percentile of the resampled means.
    pub high: f64,
    /// Pairs the interval rests on.
    pub pairs: usize,
}

impl PairedInterval {
    /// Whether the interval lies wholly on one side of zero.
    pub fn excludes_zero(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }
}

/// The 95% paired bootstrap interval of `mean(differences)`: the differences (one per
/// seed, so the pairing is kept) are resampled with replacement [`BOOTSTRAP_RESAMPLES`]
/// times with a fixed seed, and the 2.5th and 97.5th percentiles of the resampled means are
/// the interval. `None` with fewer than two pairs (one pair has no spread to resample).
pub fn paired_bootstrap(differences: &[f64]) -> Option<PairedInterval> {
    if differences.len() < 2 || differences.iter().any(|value| !value.is_finite()) {
        return None;
    }
    let count = differences.len();
    let mut generator = StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let total: f64 = (0..count)
                .map(|_| differences[generator.random_range(0..count)])
                .sum();
            total / count as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    Some(PairedInterval {
        mean: mean(differences)?,
        low: percentile(&means, 0.025),
        high: percentile(&means, 0.975),
        pairs: count,
    })
}

/// Linear-interpolated percentile of sorted values (`fraction` in 0..=1).
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    debug_assert!(!sorted.is_empty());
    let position = fraction * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    let weight = position - below as f64;
    sorted[below] * (1.0 - weight) + sorted[above] * weight
}

/// Kendall's τ-b of two paired vectors (ties corrected); `None` with fewer than two pairs
/// or when either vector is constant.
pub fn kendall_tau_b(first: &[f64], second: &[f64]) -> Option<f64> {
    debug_assert_eq!(first.len(), second.len());
    let count = first.len().min(second.len());
    if count < 2 {
        return None;
    }
    let (mut concordant, mut discordant) = (0i64, 0i64);
    let (mut tied_first, mut tied_second) = (0i64, 0i64);
    for i in 0..count {
        for j in (i + 1)..count {
            let a = first[i].total_cmp(&first[j]) as i64;
            let b = second[i].total_cmp(&second[j]) as i64;
            match (a, b) {
                (0, 0) => {}
                (0, _) => tied_first += 1,
                (_, 0) => tied_second += 1,
                _ if a == b => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let untied_first = (concordant + discordant + tied_second) as f64;
    let untied_second = (concordant + discordant + tied_first) as f64;
    let denominator = (untied_first * untied_second).sqrt();
    if denominator == 0.0 {
        return None;
    }
    Some((concordant - discordant) as f64 / denominator)
}

/// Ranks of the values, 1 for the best; tied values share the mean of their ranks.
pub fn ranks(values: &[f64], higher_is_better: bool) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        let ordering = values[a].total_cmp(&values[b]);
        if higher_is_better {
            ordering.reverse()
        } else {
            ordering
        }
    });
    let mut result = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end hold ties: ranks start+1 ..= end share their mean.
        let shared = (start + 1 + end) as f64 / 2.0;
        for &index in &order[start..end] {
            result[index] = shared;
        }
        start = end;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean(&[]), None);
        assert_eq!(mean(&[1.0, 2.0, 3.0]), Some(2.0));
        assert_eq!(sample_std(&[1.0]), None);
        // Var of 1, 2, 3 with n-1 is 1.
        assert!((sample_std(&[1.0, 2.0, 3.0]).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_is_deterministic_and_brackets_the_mean() {
        let differences = [0.10, 0.12, 0.08, 0.11, 0.09];
        let first = paired_bootstrap(&differences).unwrap();
        let second = paired_bootstrap(&differences).unwrap();
        assert_eq!(first, second);
        assert!((first.mean - 0.10).abs() < 1e-12);
        assert!(first.low <= first.mean && first.mean <= first.high);
        assert!(first.low >= 0.08 && first.high <= 0.12);
        assert!(first.excludes_zero());
        let mixed = paired_bootstrap(&[-0.2, 0.3, -0.1, 0.25]).unwrap();
        assert!(!mixed.excludes_zero());
        assert_eq!(paired_bootstrap(&[0.5]), None);
    }

    #[test]
    fn kendall_tau_matches_hand_counts() {
        assert_eq!(
            kendall_tau_b(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]),
            Some(1.0)
        );
        assert_eq!(
            kendall_tau_b(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]),
            Some(-1.0)
        );
        // Pairs (1,2): C, (1,3): C, (1,4): C, (2,3): D, (2,4): C, (3,4): C → (5-1)/6.
        let tau = kendall_tau_b(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((tau - 4.0 / 6.0).abs() < 1e-12);
        // One tie in the first vector: n0 = 3, n1 = 1, C = 2, D = 0 → 2 / sqrt(2 · 3).
        let tied = kendall_tau_b(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]).unwrap();
        assert!((tied - 2.0 / 6f64.sqrt()).abs() < 1e-12);
        assert_eq!(kendall_tau_b(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn ranks_share_ties_and_follow_the_direction() {
        assert_eq!(ranks(&[0.5, 0.9, 0.5, 0.1], true), vec![2.5, 1.0, 2.5, 4.0]);
        assert_eq!(ranks(&[2.0, 1.0, 3.0], false), vec![2.0, 1.0, 3.0]);
    }
}
