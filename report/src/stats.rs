//! The statistics of a report: mean and spread over seeds; seed-paired differences to a
//! baseline with a 95% t interval, an exact sign-flip permutation test, Holm's correction
//! across a table and Cohen's d_z, and the rule that labels a difference better or worse;
//! Kendall's τ-b between two score vectors; ranks with ties.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

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

/// Pairs below which a comparison gets no better/worse label, whatever its p-value.
pub const MIN_PAIRS_FOR_LABEL: usize = 5;

/// The family-wise error rate of the labels of one table (Holm-adjusted p below it).
pub const ALPHA: f64 = 0.05;

/// Up to this many pairs the sign-flip test enumerates every one of the 2ⁿ assignments.
pub const EXACT_MAX_PAIRS: usize = 16;

/// Random sign assignments of the Monte-Carlo sign-flip test beyond [`EXACT_MAX_PAIRS`].
pub const PERMUTATION_DRAWS: usize = 100_000;

/// The Monte-Carlo test's fixed seed: the same stored results always give the same p.
pub const PERMUTATION_SEED: u64 = 0x10ca_5eed;

/// Seed-paired differences summarised: the mean with its 95% t interval, the sign-flip
/// permutation p-value (not yet adjusted for the other comparisons) and Cohen's d_z.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PairedEffect {
    /// Mean of the paired differences.
    pub mean: f64,
    /// Low end of the 95% t interval of the mean (two pairs or more).
    pub low: Option<f64>,
    /// High end of the 95% t interval of the mean.
    pub high: Option<f64>,
    /// Two-sided p-value of the sign-flip permutation test of the mean.
    pub p: f64,
    /// Cohen's d_z: mean / sample standard deviation of the differences (two pairs or more
    /// and a standard deviation above 0).
    pub d_z: Option<f64>,
    /// Pairs the numbers rest on.
    pub pairs: usize,
}

/// The summary of paired differences (one per seed, this row minus the baseline); `None`
/// when there are none or one is not finite.
pub fn paired_effect(differences: &[f64]) -> Option<PairedEffect> {
    if differences.iter().any(|value| !value.is_finite()) {
        return None;
    }
    let center = mean(differences)?;
    let count = differences.len();
    // A spread of rounding noise (equal differences computed apart) is no spread: then there is
    // neither an interval (a zero-width one would claim a certainty two equal seeds do not
    // give) nor a d_z.
    let largest = differences.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let sd = sample_std(differences).filter(|sd| *sd > 1e-9 * largest);
    let half_width = sd.map(|sd| t_quantile_975(count - 1) * sd / (count as f64).sqrt());
    Some(PairedEffect {
        mean: center,
        low: half_width.map(|half| center - half),
        high: half_width.map(|half| center + half),
        p: sign_flip_p(differences)?,
        d_z: sd.map(|sd| center / sd),
        pairs: count,
    })
}

/// Two-sided p-value of the sign-flip permutation test of `mean(differences) = 0`: under
/// the null each difference is as likely negative as positive, so every assignment of
/// signs is equally likely; p is the share of assignments whose |mean| is at least the
/// observed one (the observed assignment counts). With up to [`EXACT_MAX_PAIRS`] pairs all
/// 2ⁿ assignments are enumerated (exact); beyond, [`PERMUTATION_DRAWS`] random assignments
/// with a fixed seed, p = (1 + hits) / (1 + draws). `None` with no differences or a
/// non-finite one.
pub fn sign_flip_p(differences: &[f64]) -> Option<f64> {
    if differences.is_empty() || differences.iter().any(|value| !value.is_finite()) {
        return None;
    }
    let observed = differences.iter().sum::<f64>().abs();
    // Sums equal in exact arithmetic may differ in the last bits: count them as ties.
    let tolerance = 1e-9 * differences.iter().map(|value| value.abs()).sum::<f64>();
    let at_least = |sum: f64| sum.abs() >= observed - tolerance;
    let count = differences.len();
    if count <= EXACT_MAX_PAIRS {
        let assignments = 1u32 << count;
        let hits = (0..assignments)
            .filter(|mask| {
                let sum: f64 = differences
                    .iter()
                    .enumerate()
                    .map(|(bit, value)| if mask >> bit & 1 == 1 { -value } else { *value })
                    .sum();
                at_least(sum)
            })
            .count();
        return Some(hits as f64 / assignments as f64);
    }
    let mut generator = StdRng::seed_from_u64(PERMUTATION_SEED);
    let hits = (0..PERMUTATION_DRAWS)
        .filter(|_| {
            let sum: f64 = differences
                .iter()
                .map(|value| {
                    if generator.random::<bool>() {
                        -value
                    } else {
                        *value
                    }
                })
                .sum();
            at_least(sum)
        })
        .count();
    Some((1 + hits) as f64 / (1 + PERMUTATION_DRAWS) as f64)
}

/// Holm–Bonferroni adjusted p-values, in the order given: the i-th smallest p (from 0) is
/// multiplied by m − i, made non-decreasing along the sorted order and capped at 1.
/// Rejecting where the adjusted p is below α keeps the family-wise error rate at α.
pub fn holm(p_values: &[f64]) -> Vec<f64> {
    let count = p_values.len();
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut adjusted = vec![0.0; count];
    let mut running: f64 = 0.0;
    for (position, &index) in order.iter().enumerate() {
        running = running.max(((count - position) as f64 * p_values[index]).min(1.0));
        adjusted[index] = running;
    }
    adjusted
}

/// The label of a comparison: `Some(true)` better, `Some(false)` worse, `None` no label. A
/// label needs at least [`MIN_PAIRS_FOR_LABEL`] pairs and a Holm-adjusted p below
/// [`ALPHA`]; its direction is the sign of the mean difference read in the metric's
/// direction.
pub fn verdict(pairs: usize, holm_p: f64, mean: f64, higher_is_better: bool) -> Option<bool> {
    (pairs >= MIN_PAIRS_FOR_LABEL && holm_p < ALPHA && mean != 0.0)
        .then_some((mean > 0.0) == higher_is_better)
}

/// The 97.5th percentile of Student's t with `df` degrees of freedom (the half-width factor
/// of a 95% interval): a table up to 30, the Cornish–Fisher expansion beyond (error below
/// 1e-5); infinite at 0.
pub fn t_quantile_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
        2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
        2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
        2.048407, 2.045230, 2.042272,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let z: f64 = 1.959_963_984_540_054;
            let v = df as f64;
            let g1 = (z.powi(3) + z) / 4.0;
            let g2 = (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / 96.0;
            let g3 = (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / 384.0;
            z + g1 / v + g2 / v.powi(2) + g3 / v.powi(3)
        }
    }
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

/// Fewest pairs for which [`kendall_tau_p`] gives a p-value: below it, even a perfect
/// ranking cannot reach p < 0.05 two-sided (with 5 pairs the two perfect orders of 120 give
/// p = 1/60, so 5 is the least that can).
pub const TAU_MIN_PAIRS: usize = 5;

/// Seeded shuffles of [`kendall_tau_p`] beyond 8 pairs (each costs a τ-b, O(n²)): p is
/// known to about ±0.005 near 0.05.
pub const TAU_DRAWS: usize = 4_000;

/// Two-sided permutation p-value of Kendall's τ-b = 0: the second vector is shuffled
/// against the first, and p is the share of orders whose |τ-b| is at least the observed one
/// (all n! orders when n ≤ 8, else [`TAU_DRAWS`] seeded shuffles, p = (1 + hits) /
/// (1 + draws)). `None` below [`TAU_MIN_PAIRS`] pairs or when τ-b is undefined.
pub fn kendall_tau_p(first: &[f64], second: &[f64]) -> Option<f64> {
    let count = first.len().min(second.len());
    if count < TAU_MIN_PAIRS {
        return None;
    }
    let observed = kendall_tau_b(&first[..count], &second[..count])?.abs() - 1e-12;
    let mut shuffled = second[..count].to_vec();
    let at_least = |order: &[f64]| {
        kendall_tau_b(&first[..count], order).is_some_and(|tau| tau.abs() >= observed)
    };
    if count <= 8 {
        // Heap's algorithm: every order once.
        let (mut hits, mut total) = (usize::from(at_least(&shuffled)), 1usize);
        let mut counters = vec![0usize; count];
        let mut index = 0;
        while index < count {
            if counters[index] < index {
                let other = if index % 2 == 0 { 0 } else { counters[index] };
                shuffled.swap(other, index);
                hits += usize::from(at_least(&shuffled));
                total += 1;
                counters[index] += 1;
                index = 0;
            } else {
                counters[index] = 0;
                index += 1;
            }
        }
        return Some(hits as f64 / total as f64);
    }
    let mut generator = StdRng::seed_from_u64(PERMUTATION_SEED);
    let hits = (0..TAU_DRAWS)
        .filter(|_| {
            shuffled.shuffle(&mut generator);
            at_least(&shuffled)
        })
        .count();
    Some((1 + hits) as f64 / (1 + TAU_DRAWS) as f64)
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

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn exact_sign_flip_matches_hand_counts() {
        // n=5, all positive: only all-plus and all-minus reach |mean| → 2/32.
        assert!(close(
            sign_flip_p(&[0.1, 0.2, 0.3, 0.4, 0.5]).unwrap(),
            2.0 / 32.0
        ));
        // n=8, all positive and sizeable: 2/256.
        let clear = [0.05, 0.07, 0.06, 0.08, 0.04, 0.06, 0.07, 0.05];
        assert!(close(sign_flip_p(&clear).unwrap(), 2.0 / 256.0));
        // Two equal differences: ++ and -- reach it, +- and -+ give 0 → 2/4.
        assert!(close(sign_flip_p(&[0.08, 0.08]).unwrap(), 0.5));
        // 1, 2, 3: sums ±6 reach 6 → 2/8; the others (±4, ±2, ±0) do not.
        assert!(close(sign_flip_p(&[1.0, 2.0, 3.0]).unwrap(), 0.25));
        // 1, 1, -3: observed |−1|; every assignment reaches 1 → 1.
        assert!(close(sign_flip_p(&[1.0, 1.0, -3.0]).unwrap(), 1.0));
        // 3, 1, 1: |sum| 5 (++ + and its mirror), 3 (+−+, ++− mirror…): sums ±5, ±3, ±3, ±1
        // → |sum| ≥ 5 in 2 of 8.
        assert!(close(sign_flip_p(&[3.0, 1.0, 1.0]).unwrap(), 0.25));
        assert!(close(sign_flip_p(&[0.0, 0.0]).unwrap(), 1.0));
        assert_eq!(sign_flip_p(&[]), None);
        assert_eq!(sign_flip_p(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn monte_carlo_sign_flip_is_deterministic_and_close_to_exact() {
        // 30 positive differences: the exact p is 2/2^30; the Monte-Carlo one is at its floor.
        let positive: Vec<f64> = (0..30).map(|i| 0.1 + 0.01 * i as f64).collect();
        let first = sign_flip_p(&positive).unwrap();
        assert_eq!(first, sign_flip_p(&positive).unwrap());
        assert!(close(first, 1.0 / (1 + PERMUTATION_DRAWS) as f64));
        // Alternating signs of equal size: the observed mean is 0, every draw reaches it.
        let balanced: Vec<f64> = (0..20)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        assert!(close(sign_flip_p(&balanced).unwrap(), 1.0));
        // 17 values where exact is cheap to compare: within Monte-Carlo error of it.
        let mixed: Vec<f64> = (0..17).map(|i| ((i * 7) % 5) as f64 - 1.6).collect();
        let exact = {
            let observed = mixed.iter().sum::<f64>().abs();
            let hits = (0u32..1 << 17)
                .filter(|mask| {
                    let sum: f64 = mixed
                        .iter()
                        .enumerate()
                        .map(|(bit, v)| if mask >> bit & 1 == 1 { -v } else { *v })
                        .sum();
                    sum.abs() >= observed - 1e-9
                })
                .count();
            hits as f64 / (1u32 << 17) as f64
        };
        let estimate = sign_flip_p(&mixed).unwrap();
        assert!((estimate - exact).abs() < 0.01, "{estimate} vs {exact}");
    }

    #[test]
    fn holm_gives_the_textbook_adjusted_values() {
        // m = 4: sorted 0.01, 0.02, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.04, 0.06, 0.06, 0.04,
        // made non-decreasing: 0.04, 0.06, 0.06, 0.06.
        let adjusted = holm(&[0.03, 0.01, 0.04, 0.02]);
        let expected = [0.06, 0.04, 0.06, 0.06];
        for (got, want) in adjusted.iter().zip(expected) {
            assert!(close(*got, want), "{adjusted:?}");
        }
        // Capped at 1; a single p is unchanged.
        let capped = holm(&[0.5, 0.6, 0.01]);
        assert!(close(capped[0], 1.0) && close(capped[1], 1.0) && close(capped[2], 0.03));
        assert_eq!(holm(&[0.2]), vec![0.2]);
        assert!(holm(&[]).is_empty());
    }

    #[test]
    fn t_quantiles_match_the_tables() {
        assert_eq!(t_quantile_975(1), 12.706205);
        assert_eq!(t_quantile_975(7), 2.364624);
        // Beyond the table: 40, 60, 120 degrees of freedom.
        for (df, want) in [
            (31, 2.039513),
            (40, 2.021075),
            (60, 2.000298),
            (120, 1.979930),
        ] {
            assert!((t_quantile_975(df) - want).abs() < 1e-5, "df {df}");
        }
        assert!(t_quantile_975(0).is_infinite());
    }

    #[test]
    fn paired_effect_has_the_t_interval_and_d_z() {
        // Differences 1, 2, 3: mean 2, sd 1, half-width t(2) · 1/√3.
        let effect = paired_effect(&[1.0, 2.0, 3.0]).unwrap();
        assert!(close(effect.mean, 2.0));
        let half = 4.302653 / 3f64.sqrt();
        assert!(close(effect.low.unwrap(), 2.0 - half));
        assert!(close(effect.high.unwrap(), 2.0 + half));
        assert!(close(effect.d_z.unwrap(), 2.0));
        assert!(close(effect.p, 0.25));
        assert_eq!(effect.pairs, 3);
        // Equal differences: no spread, so no d_z; one pair: no interval either.
        let equal = paired_effect(&[0.08, 0.08]).unwrap();
        assert_eq!((equal.low, equal.high, equal.d_z), (None, None, None));
        let single = paired_effect(&[0.5]).unwrap();
        assert_eq!((single.low, single.high, single.d_z), (None, None, None));
        assert_eq!(paired_effect(&[]), None);
    }

    #[test]
    fn labels_need_five_pairs_and_a_holm_p_below_alpha() {
        // Two identical differences: p = 0.5, and n = 2 is too few whatever the p.
        let identical = paired_effect(&[0.0833, 0.0833]).unwrap();
        assert_eq!(verdict(2, identical.p, identical.mean, true), None);
        assert_eq!(verdict(2, 0.0, identical.mean, true), None);
        assert_eq!(verdict(4, 0.0, identical.mean, true), None);
        // n = 5 all positive: p = 0.0625, not below 0.05 → no label.
        let five = paired_effect(&[0.1, 0.2, 0.3, 0.4, 0.5]).unwrap();
        assert_eq!(verdict(5, five.p, five.mean, true), None);
        // n = 8 clear effect: p = 2/256 → a label, in the metric's direction.
        let eight = paired_effect(&[0.05, 0.07, 0.06, 0.08, 0.04, 0.06, 0.07, 0.05]).unwrap();
        assert_eq!(verdict(8, eight.p, eight.mean, true), Some(true));
        assert_eq!(verdict(8, eight.p, eight.mean, false), Some(false));
        // The same with four other comparisons in the table: Holm × 5 = 0.039, still below.
        let adjusted = holm(&[eight.p, 0.5, 0.7, 0.9, 1.0]);
        assert_eq!(verdict(8, adjusted[0], eight.mean, true), Some(true));
        // Seven comparisons: × 7 = 0.055, no label.
        let adjusted = holm(&[eight.p, 0.5, 0.5, 0.7, 0.9, 1.0, 1.0]);
        assert_eq!(verdict(8, adjusted[0], eight.mean, true), None);
    }

    /// Families of null comparisons (differences symmetric around 0) get a label in at most
    /// 5% of families: the family-wise error rate Holm promises, with the exact test.
    #[test]
    fn null_families_keep_their_false_label_rate_at_alpha() {
        let mut generator = StdRng::seed_from_u64(7);
        let (families, comparisons, pairs) = (4000, 5, 8);
        let mut labelled = 0;
        for _ in 0..families {
            let effects: Vec<PairedEffect> = (0..comparisons)
                .map(|_| {
                    let differences: Vec<f64> = (0..pairs)
                        .map(|_| generator.random_range(-1.0..1.0))
                        .collect();
                    paired_effect(&differences).unwrap()
                })
                .collect();
            let p_values: Vec<f64> = effects.iter().map(|effect| effect.p).collect();
            let adjusted = holm(&p_values);
            if effects
                .iter()
                .zip(&adjusted)
                .any(|(effect, p)| verdict(effect.pairs, *p, effect.mean, true).is_some())
            {
                labelled += 1;
            }
        }
        let rate = labelled as f64 / families as f64;
        eprintln!("null families labelled: {rate}");
        assert!(rate <= ALPHA, "false-label rate {rate}");
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
    fn tau_permutation_p_is_exact_for_small_panels() {
        let first = [1.0, 2.0, 3.0, 4.0, 5.0];
        // A perfect order: 2 of the 120 orders (itself and its reverse) reach |τ| = 1.
        assert!(close(kendall_tau_p(&first, &first).unwrap(), 2.0 / 120.0));
        assert!(close(
            kendall_tau_p(&first, &[5.0, 4.0, 3.0, 2.0, 1.0]).unwrap(),
            2.0 / 120.0
        ));
        // τ = 0 is reached or beaten by every order.
        assert!(close(
            kendall_tau_p(&first, &[3.0, 1.0, 5.0, 4.0, 2.0]).unwrap_or(1.0),
            1.0
        ));
        assert_eq!(
            kendall_tau_p(&first[..4], &first[..4]),
            None,
            "too few pairs"
        );
        assert_eq!(kendall_tau_p(&first, &[1.0; 5]), None, "constant");
        // Sampled beyond 8 pairs: a perfect order of 12 is far below 0.05, a reversal too.
        let long: Vec<f64> = (0..12).map(f64::from).collect();
        let p = kendall_tau_p(&long, &long).unwrap();
        assert!(p < 0.001, "{p}");
        let reversed: Vec<f64> = long.iter().rev().copied().collect();
        assert_eq!(kendall_tau_p(&long, &reversed), Some(p));
    }

    #[test]
    fn ranks_share_ties_and_follow_the_direction() {
        assert_eq!(ranks(&[0.5, 0.9, 0.5, 0.1], true), vec![2.5, 1.0, 2.5, 4.0]);
        assert_eq!(ranks(&[2.0, 1.0, 3.0], false), vec![2.0, 1.0, 3.0]);
    }
}
