//! Causal attention probabilities: [`causal_attention_probs`] (`softmax(scale · q·kᵀ)` with the
//! causal mask applied by index and grouped-query heads handled by shape), its backward
//! ([`causal_attention_probs_backward`]), the row softmax they share ([`RowMask`]), the CUDA
//! launches of the `causal_softmax_*` kernels and the CPU reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values, last_dim};

#[cfg(feature = "cuda")]
use super::{cuda_storage, gpu};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{Map1, Map2, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage, WithDType};

/// Attention probabilities `softmax(scale · q·kᵀ)` over the keys, causal: query row `r` is at
/// position `r mod t_q + offset` and sees keys `0..=position`.
///
/// `q`: `(batch, kv_heads, groups · t_q, head_dim)` — the query heads sharing a key head stacked
/// along the rows; `k`: `(batch, kv_heads, t_k, head_dim)`. Returns
/// `(batch, kv_heads, groups · t_q, t_k)` in `q`'s dtype.
pub fn causal_attention_probs(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
) -> Result<Tensor> {
    let (b, h, m, d) = q.dims4()?;
    let (b2, h2, _, d2) = k.dims4()?;
    if (b, h, d) != (b2, h2, d2) || t_q == 0 || !m.is_multiple_of(t_q) {
        candle_core::bail!(
            "causal_attention_probs: q {:?} and k {:?} do not match (t_q {t_q})",
            q.shape(),
            k.shape()
        )
    }
    q.contiguous()?.apply_op2(
        &k.contiguous()?,
        CausalProbs(RowMask {
            scale: scale as f32,
            t_q,
            offset,
        }),
    )
}

/// `(∂q, ∂k)` of [`causal_attention_probs`] given its probabilities `p` and their gradient.
pub(crate) fn causal_attention_probs_backward(
    q: &Tensor,
    k: &Tensor,
    p: &Tensor,
    grad_p: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
) -> Result<(Tensor, Tensor)> {
    let mask = RowMask {
        scale: scale as f32,
        t_q,
        offset,
    };
    causal_attention_probs_backward_with(mask, q, k, p, grad_p)
}

fn causal_attention_probs_backward_with(
    mask: RowMask,
    q: &Tensor,
    k: &Tensor,
    p: &Tensor,
    grad_p: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let grad_s = p.apply_op2_no_bwd(&grad_p.contiguous()?, &CausalSoftmaxBackward(mask))?;
    let grad_q = grad_s.matmul(k)?;
    let grad_k = grad_s.transpose(2, 3)?.matmul(q)?;
    Ok((grad_q, grad_k))
}

/// Which keys each row of a score matrix may see, and the score scale.
#[derive(Debug, Clone, Copy)]
struct RowMask {
    scale: f32,
    t_q: usize,
    offset: usize,
}

impl RowMask {
    /// Number of visible keys of row `row` (out of `cols`).
    fn limit(&self, row: usize, cols: usize) -> usize {
        cols.min(row % self.t_q + self.offset + 1)
    }

    fn softmax_rows(&self, scores: &[f32], cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; scores.len()];
        for (row, (x, y)) in scores.chunks(cols).zip(out.chunks_mut(cols)).enumerate() {
            let limit = self.limit(row, cols);
            let max = x[..limit]
                .iter()
                .map(|&v| v * self.scale)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (e, &v) in y[..limit].iter_mut().zip(&x[..limit]) {
                *e = (v * self.scale - max).exp();
                sum += *e;
            }
            y[..limit].iter_mut().for_each(|e| *e /= sum);
        }
        out
    }

    fn softmax_backward_rows(&self, p: &[f32], dp: &[f32], cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; p.len()];
        for (row, ((y, dy), dx)) in p
            .chunks(cols)
            .zip(dp.chunks(cols))
            .zip(out.chunks_mut(cols))
            .enumerate()
        {
            let limit = self.limit(row, cols);
            let dot: f32 = y[..limit]
                .iter()
                .zip(&dy[..limit])
                .map(|(a, b)| a * b)
                .sum();
            for j in 0..limit {
                dx[j] = self.scale * y[j] * (dy[j] - dot);
            }
        }
        out
    }

    #[cfg(feature = "cuda")]
    fn launch<T: DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        root: &str,
        inputs: &[&CudaView<'_, T>],
        rows: usize,
        cols: usize,
    ) -> Result<CudaSlice<T>> {
        // Rows of up to 1,024 keys: one warp per row, held in registers (16 or 32 per lane);
        // longer rows: one block per row.
        let per_lane = match cols {
            0..=512 => Some(16),
            513..=1024 => Some(32),
            _ => None,
        };
        let name = match per_lane {
            Some(n) => format!("{root}_w{n}"),
            None => root.to_string(),
        };
        let func = engine_func!(dev, T, &name)?;
        // SAFETY: the kernel writes every element of every row.
        let dst = unsafe { dev.alloc::<T>(rows * cols)? };
        let mut builder = func.builder();
        for input in inputs {
            builder.arg(*input);
        }
        builder.arg(&dst);
        let rows_arg = rows as i32;
        if per_lane.is_some() {
            builder.arg(&rows_arg);
        }
        candle_core::builder_arg!(
            builder,
            cols as i32,
            self.t_q as i32,
            self.offset as i32,
            self.scale
        );
        let config = match per_lane {
            // Four rows (warps) per block.
            Some(_) => gpu::launch(rows.div_ceil(4), 128),
            None => gpu::rows(rows, cols),
        };
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(config) }.w()?;
        Ok(dst)
    }
}

/// Forward: `(q, k)` → probabilities. Backward: `∂s = softmax_bwd(p, ∂p)`, `∂q = ∂s·k`,
/// `∂k = ∂sᵀ·q`.
struct CausalProbs(RowMask);

/// The batched product `q·kᵀ` of [`CausalProbs`]: `(batch, m, n, k)`, the layout of `kᵀ` and
/// the output shape.
type ScoresProblem = ((usize, usize, usize, usize), Layout, Shape);

impl CausalProbs {
    fn problem(q: &Layout, k: &Layout) -> Result<ScoresProblem> {
        let (b, h, m, d) = q.shape().dims4()?;
        let (_, _, n, _) = k.shape().dims4()?;
        Ok((
            (b * h, m, n, d),
            k.transpose(2, 3)?,
            Shape::from((b, h, m, n)),
        ))
    }
}

impl CustomOp2 for CausalProbs {
    fn name(&self) -> &'static str {
        "causal-attention-probs"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bmnk, kt_l, shape) = Self::problem(q_l, k_l)?;
        let scores = q.matmul(k, bmnk, q_l, &kt_l)?;
        let values = cpu_values(&scores, &Layout::contiguous(&shape), self.name())?;
        let probs = self.0.softmax_rows(&values, bmnk.2);
        Ok((cpu_storage(probs, q.dtype(), self.name())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (bmnk, kt_l, shape) = Self::problem(q_l, k_l)?;
        let scores = q.matmul(k, bmnk, q_l, &kt_l)?;
        let probs = Map1::map(
            &SoftmaxRows(self.0),
            &scores.slice,
            q.device(),
            &Layout::contiguous(&shape),
        )?;
        Ok((cuda_storage(probs, q.device()), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        grad_p: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_q, grad_k) = causal_attention_probs_backward_with(self.0, q, k, p, grad_p)?;
        Ok((Some(grad_q), Some(grad_k)))
    }
}

/// `(p, ∂p)` → `∂s` (the scale included).
struct CausalSoftmaxBackward(RowMask);

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        p_l: &Layout,
        dp: &CpuStorage,
        dp_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(p_l);
        let grad = self.0.softmax_backward_rows(
            &cpu_values(p, p_l, self.name())?,
            &cpu_values(dp, dp_l, self.name())?,
            cols,
        );
        Ok((
            cpu_storage(grad, p.dtype(), self.name())?,
            p_l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        p_l: &Layout,
        dp: &CudaStorage,
        dp_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = SoftmaxBackwardRows(self.0).map(&p.slice, p_l, &dp.slice, dp_l, p.device())?;
        Ok((cuda_storage(out, p.device()), p_l.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
struct SoftmaxRows(RowMask);

#[cfg(feature = "cuda")]
impl Map1 for SoftmaxRows {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        src: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
    ) -> Result<CudaSlice<T>> {
        let cols = last_dim(layout);
        let rows = layout.shape().elem_count() / cols;
        let src = gpu::view(src, layout, "causal softmax")?;
        self.0
            .launch(dev, "causal_softmax_fwd", &[&src], rows, cols)
    }
}

#[cfg(feature = "cuda")]
struct SoftmaxBackwardRows(RowMask);

#[cfg(feature = "cuda")]
impl Map2 for SoftmaxBackwardRows {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        p: &CudaSlice<T>,
        p_l: &Layout,
        dp: &CudaSlice<T>,
        dp_l: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let cols = last_dim(p_l);
        let rows = p_l.shape().elem_count() / cols;
        let p = gpu::view(p, p_l, "causal softmax backward")?;
        let dp = gpu::view(dp, dp_l, "causal softmax backward")?;
        self.0
            .launch(dev, "causal_softmax_bwd", &[&p, &dp], rows, cols)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn causal_probs_sum_to_one_and_are_exactly_zero_after_the_query() -> Result<()> {
        let q = Tensor::randn(0f32, 1.0, (1, 1, 2 * 5, 4), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, 7, 4), &Device::Cpu)?;
        let p = causal_attention_probs(&q, &k, 0.5, 5, 2)?;
        let rows: Vec<Vec<f32>> = p.reshape((10, 7))?.to_vec2()?;
        for (r, row) in rows.iter().enumerate() {
            let visible = r % 5 + 2 + 1;
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {r} sums to {sum}");
            assert!(row[..visible].iter().all(|&v| v > 0.0), "row {r}: {row:?}");
            assert!(row[visible..].iter().all(|&v| v == 0.0), "row {r}: {row:?}");
        }
        Ok(())
    }
}
