//! The energy of a weight gradient `G = δᵀ·X` (`d_out × d_in`, from the loss gradient `δ` at
//! a module's output and its input `X`, one row per token) and how much of it its top `r`
//! singular values hold, without forming `G` where it is large.
//!
//! - `‖G‖²_F` exactly, in whichever order is cheaper: `G` itself (`N·d_in·d_out`) or the
//!   Gram identity `‖δᵀX‖² = Σ (δδᵀ) ⊙ (XXᵀ)` (`N²·(d_in + d_out)`).
//! - `Σ_{i≤r} σ_i(G)²`: exactly, from the eigenvalues of the smaller Gram matrix `GGᵀ` or
//!   `GᵀG`, when the smaller side is at most [`EXACT_SIDE`]; otherwise by a randomized range
//!   finder (Halko, Martinsson & Tropp, 2011, algorithm 4.4): `Y = G·Ω` for a Gaussian `Ω` of
//!   `r + OVERSAMPLE` columns, [`POWER_ITERATIONS`] rounds of `Y ← G·orth(Gᵀ·orth(Y))`, then
//!   the eigenvalues of `B·Bᵀ` with `B = orth(Y)ᵀ·G`. Every product with `G` is taken through
//!   its factors (`G·Ω = δᵀ(X·Ω)`, `Gᵀ·Y = Xᵀ(δ·Y)`), so the cost is `O(N·(d_in + d_out)·r)`.
//!   The estimate never exceeds the exact value (`B·Bᵀ` is `G` projected on a subspace).

use candle_core::{DType, Device, Result, Tensor};
use nalgebra::DMatrix;
use rand::SeedableRng;

/// The largest smaller side of `G` whose top-r energy is computed exactly.
pub const EXACT_SIDE: usize = 128;

/// Extra columns of the random test matrix beyond `r`.
pub const OVERSAMPLE: usize = 10;

/// Power iterations of the range finder.
pub const POWER_ITERATIONS: usize = 2;

/// The energy of a gradient and of its best rank-r approximation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopEnergy {
    /// `‖G‖²_F`.
    pub total: f64,
    /// `Σ_{i≤r} σ_i(G)²` (at most `total`).
    pub top: f64,
}

impl TopEnergy {
    /// `top / total` (1 when `G` is zero).
    pub fn share(&self) -> f64 {
        if self.total > 0.0 {
            (self.top / self.total).clamp(0.0, 1.0)
        } else {
            1.0
        }
    }
}

/// `‖δᵀ·X‖²_F` for `δ`: `(N, d_out)` and `X`: `(N, d_in)` (any float dtype; computed in f32).
pub fn gradient_energy(delta: &Tensor, x: &Tensor) -> Result<f64> {
    let (delta, x) = (delta.to_dtype(DType::F32)?, x.to_dtype(DType::F32)?);
    let (n, d_out) = delta.dims2()?;
    let d_in = x.dim(1)?;
    let value = if n * n * (d_in + d_out) < n * d_in * d_out {
        let gram_x = x.matmul(&x.t()?)?;
        let gram_d = delta.matmul(&delta.t()?)?;
        (gram_x * gram_d)?.sum_all()?.to_scalar::<f32>()?
    } else {
        delta
            .t()?
            .matmul(&x)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?
    };
    Ok(f64::from(value))
}

/// The energy of `G = δᵀ·X` and of its top `rank` singular values (see the module header);
/// `seed` draws the range finder's test matrix.
pub fn top_energy(delta: &Tensor, x: &Tensor, rank: usize, seed: u64) -> Result<TopEnergy> {
    let total = gradient_energy(delta, x)?;
    let (delta, x) = (delta.to_dtype(DType::F32)?, x.to_dtype(DType::F32)?);
    let (d_out, d_in) = (delta.dim(1)?, x.dim(1)?);
    let g = Gradient::Factors {
        delta: &delta,
        x: &x,
    };
    top_of(g, total, (d_out, d_in), rank, seed, x.device())
}

/// The energy of a formed gradient `G` (`d_out × d_in`, any float dtype) and of its top `rank`
/// singular values: [`top_energy`] when `G` itself is at hand (the probe's passes sum it, so
/// its factors are gone), exact or by the same range finder and seed.
pub fn formed_top_energy(g: &Tensor, rank: usize, seed: u64) -> Result<TopEnergy> {
    let g = g.to_dtype(DType::F32)?;
    let total = f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
    let dims = g.dims2()?;
    top_of(Gradient::Formed(&g), total, dims, rank, seed, g.device())
}

/// The top-`rank` energy of a `d_out × d_in` gradient of energy `total`: all of it when the
/// rank covers the smaller side, exactly from the smaller Gram matrix up to [`EXACT_SIDE`],
/// else by the range finder.
fn top_of(
    g: Gradient<'_>,
    total: f64,
    (d_out, d_in): (usize, usize),
    rank: usize,
    seed: u64,
    device: &Device,
) -> Result<TopEnergy> {
    let smaller = d_out.min(d_in);
    let top = if rank >= smaller {
        total
    } else if smaller <= EXACT_SIDE {
        let g = g.formed()?;
        let gram = if d_out <= d_in {
            g.matmul(&g.t()?)?
        } else {
            g.t()?.matmul(&g)?
        };
        top_eigenvalue_sum(&gram, rank)?
    } else {
        range_finder_top(g, d_out, d_in, rank, seed, device)?
    };
    Ok(TopEnergy {
        total,
        top: top.min(total),
    })
}

/// A gradient as the range finder meets it: through its factors or formed.
#[derive(Clone, Copy)]
enum Gradient<'a> {
    /// `G = δᵀ·X`.
    Factors { delta: &'a Tensor, x: &'a Tensor },
    /// `G` itself.
    Formed(&'a Tensor),
}

impl Gradient<'_> {
    /// `G` itself (formed from the factors where it is small enough to be exact).
    fn formed(self) -> Result<Tensor> {
        match self {
            Gradient::Factors { delta, x } => delta.t()?.matmul(x),
            Gradient::Formed(g) => Ok(g.clone()),
        }
    }

    /// `G·M` (through the factors: `δᵀ(X·M)`, never `G` itself).
    fn times(self, m: &Tensor) -> Result<Tensor> {
        match self {
            Gradient::Factors { delta, x } => delta.t()?.matmul(&x.matmul(m)?),
            Gradient::Formed(g) => g.matmul(m),
        }
    }

    /// `Gᵀ·M` (through the factors: `Xᵀ(δ·M)`).
    fn times_transposed(self, m: &Tensor) -> Result<Tensor> {
        match self {
            Gradient::Factors { delta, x } => x.t()?.matmul(&delta.matmul(m)?),
            Gradient::Formed(g) => g.t()?.matmul(m),
        }
    }

    /// `Qᵀ·G` (through the factors: `(δ·Q)ᵀ·X`).
    fn projected(self, q: &Tensor) -> Result<Tensor> {
        match self {
            Gradient::Factors { delta, x } => delta.matmul(q)?.t()?.matmul(x),
            Gradient::Formed(g) => q.t()?.matmul(g),
        }
    }
}

/// The randomized range finder on a `d_out × d_in` gradient.
fn range_finder_top(
    g: Gradient<'_>,
    d_out: usize,
    d_in: usize,
    rank: usize,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let columns = (rank + OVERSAMPLE).min(d_out.min(d_in));
    let omega = gaussian(d_in, columns, seed, device)?;
    let mut y = g.times(&omega)?;
    for _ in 0..POWER_ITERATIONS {
        let z = orthonormal(&g.times_transposed(&orthonormal(&y)?)?)?;
        y = g.times(&z)?;
    }
    let q = orthonormal(&y)?;
    // B = Qᵀ·G, columns × d_in; its Gram B·Bᵀ is columns × columns.
    let b = g.projected(&q)?;
    top_eigenvalue_sum(&b.matmul(&b.t()?)?, rank)
}

/// A `rows × columns` matrix of seeded standard normal entries, in f32 on `device`.
fn gaussian(rows: usize, columns: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::StandardNormal;
    let values: Vec<f32> = (0..rows * columns)
        .map(|_| rand::Rng::sample::<f32, _>(&mut rng, normal))
        .collect();
    Tensor::from_vec(values, (rows, columns), device)
}

/// An orthonormal basis of the columns of a tall `rows × columns` matrix (thin QR in f64 on
/// the host; the matrix is small: `columns` is `r + OVERSAMPLE`).
fn orthonormal(matrix: &Tensor) -> Result<Tensor> {
    let (rows, columns) = matrix.dims2()?;
    let host = to_host(matrix)?;
    let q = host.qr().q();
    let values: Vec<f32> = (0..rows)
        .flat_map(|row| (0..columns).map(move |column| (row, column)))
        .map(|(row, column)| q[(row, column)] as f32)
        .collect();
    Tensor::from_vec(values, (rows, columns), matrix.device())
}

/// Sum of the `count` largest eigenvalues of a symmetric matrix (negative rounding clamped).
fn top_eigenvalue_sum(symmetric: &Tensor, count: usize) -> Result<f64> {
    let host = to_host(symmetric)?;
    let host = (&host + host.transpose()) * 0.5;
    let mut values: Vec<f64> = host
        .symmetric_eigenvalues()
        .iter()
        .map(|v| v.max(0.0))
        .collect();
    values.sort_by(|a, b| b.total_cmp(a));
    Ok(values.iter().take(count).sum())
}

/// A 2-D tensor as an f64 host matrix.
pub(crate) fn to_host(matrix: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, columns) = matrix.dims2()?;
    let values = matrix
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, columns, &values))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `N × width` with seeded normal entries, column `j` scaled by `decay^j`.
    fn factor(n: usize, width: usize, decay: f32, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..n * width)
            .map(|i| {
                let column = (i % width) as i32;
                rand::Rng::sample::<f32, _>(&mut rng, rand_distr::StandardNormal)
                    * decay.powi(column)
            })
            .collect();
        Tensor::from_vec(values, (n, width), &Device::Cpu).unwrap()
    }

    /// Σ of the top-r squared singular values of the formed `G`, by nalgebra's SVD.
    fn svd_top(delta: &Tensor, x: &Tensor, rank: usize) -> (f64, f64) {
        let g = to_host(&delta.t().unwrap().matmul(x).unwrap()).unwrap();
        let mut values: Vec<f64> = g.singular_values().iter().map(|s| s * s).collect();
        values.sort_by(|a, b| b.total_cmp(a));
        (values.iter().sum(), values.iter().take(rank).sum())
    }

    #[test]
    fn the_energy_matches_the_formed_gradient_both_ways() {
        // Few tokens (the Gram order) and many (the direct order).
        for n in [4, 300] {
            let (delta, x) = (factor(n, 40, 1.0, 1), factor(n, 60, 1.0, 2));
            let (exact, _) = svd_top(&delta, &x, 1);
            let energy = gradient_energy(&delta, &x).unwrap();
            assert!(
                (energy - exact).abs() <= 1e-4 * exact,
                "{energy} vs {exact}"
            );
        }
    }

    #[test]
    fn exact_and_randomized_top_r_agree_with_a_full_svd() {
        // Small sides: the exact path; large ones: the range finder, on gradients whose
        // spectrum decays as real ones do (and a rank above the smaller side: everything).
        for (n, d_out, d_in, rank) in [(50, 30, 40, 4), (400, 200, 260, 8), (400, 300, 150, 16)] {
            let delta = factor(n, d_out, 0.97, 3);
            let x = factor(n, d_in, 0.95, 4);
            let (total, expected) = svd_top(&delta, &x, rank);
            let got = top_energy(&delta, &x, rank, 9).unwrap();
            assert!((got.total - total).abs() <= 1e-4 * total);
            assert!(
                (got.top - expected).abs() <= 2e-3 * expected,
                "{n}×{d_out}×{d_in} r={rank}: {} vs {expected}",
                got.top
            );
            assert!(got.share() > 0.0 && got.share() < 1.0);
        }
        let (delta, x) = (factor(20, 8, 1.0, 5), factor(20, 12, 1.0, 6));
        let all = top_energy(&delta, &x, 8, 0).unwrap();
        assert_eq!(all.top, all.total);
        assert_eq!(all.share(), 1.0);
    }

    #[test]
    fn the_formed_gradient_gives_what_its_factors_give() {
        // Exact (small side ≤ EXACT_SIDE) and range-finder paths, same seed.
        for (n, d_out, d_in, rank) in [(50, 30, 40, 4), (400, 200, 260, 8), (400, 300, 150, 16)] {
            let delta = factor(n, d_out, 0.97, 7);
            let x = factor(n, d_in, 0.95, 8);
            let g = delta.t().unwrap().matmul(&x).unwrap();
            let factors = top_energy(&delta, &x, rank, 11).unwrap();
            let formed = formed_top_energy(&g, rank, 11).unwrap();
            assert!((formed.total - factors.total).abs() <= 1e-4 * factors.total);
            assert!(
                (formed.top - factors.top).abs() <= 1e-3 * factors.top,
                "{n}×{d_out}×{d_in} r={rank}: {} vs {}",
                formed.top,
                factors.top
            );
        }
    }
}
