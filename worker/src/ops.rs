//! Tensor operations the engine needs beyond candle's own.
//!
//! The one that matters most is [`frozen_linear`]: `y = x · Wᵀ` for a weight that is never
//! trained. candle's generic matmul backward computes the gradient of *both* operands, so every
//! frozen projection on the path between the loss and the shallowest adapter would cost a
//! full weight-sized gradient (`d_out × d_in`) per step, computed and then thrown away. This op
//! has the same forward and a backward that only returns `∂L/∂x = ∂L/∂y · W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

static GENERIC_MATMUL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For measurement only (`lorasweep bench --generic-matmul`): route frozen projections through
/// candle's generic matmul, whose backward also computes the (unused) weight gradient.
pub fn use_generic_matmul(enabled: bool) {
    GENERIC_MATMUL.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// `y = x · Wᵀ` where `W` (`d_out × d_in`) gets no gradient. `x` may have any number of leading
/// dimensions; its last one is `d_in`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if GENERIC_MATMUL.load(std::sync::atomic::Ordering::Relaxed) {
        return x.broadcast_matmul(&weight.t()?);
    }
    let (d_out, d_in) = weight.dims2()?;
    let dims = x.dims();
    let Some((&last, leading)) = dims.split_last() else {
        candle_core::bail!("frozen_linear: input must have at least one dimension")
    };
    if last != d_in {
        candle_core::bail!("frozen_linear: input has last dim {last}, weight expects {d_in}")
    }
    let rows: usize = leading.iter().product();
    let flat = x.reshape((rows, d_in))?;
    let y = flat.apply_op2(weight, FrozenLinear)?;
    let mut out_dims = leading.to_vec();
    out_dims.push(d_out);
    y.reshape(out_dims)
}

/// Forward: `x (m × k) · Wᵀ (k × n)`. Backward: `∂x = ∂y · W`, nothing for `W`.
struct FrozenLinear;

impl FrozenLinear {
    /// The matmul problem `(batch, m, n, k)` and the transposed-weight layout.
    fn problem(
        x_layout: &Layout,
        w_layout: &Layout,
    ) -> Result<((usize, usize, usize, usize), Layout)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k2) = w_layout.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_linear: inner dimensions differ ({k} vs {k2})")
        }
        Ok(((1, m, n, k), w_layout.transpose(0, 1)?))
    }
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bmnk, wt_layout) = Self::problem(x_layout, w_layout)?;
        let out = x.matmul(w, bmnk, x_layout, &wt_layout)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, wt_layout) = Self::problem(x_layout, w_layout)?;
        let out = x.matmul(w, bmnk, x_layout, &wt_layout)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_y.matmul(weight)?), None))
    }
}

/// Row-wise RMS normalisation `x / sqrt(mean(x²) + eps) · g`, computed in f32, differentiable.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(candle_core::DType::F32)?;
    let mean_sq = x32.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let normed = x32.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(gain)
}

/// SiLU(gate) · up, differentiable.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)?.mul(up)
}

/// Rotary position embedding in the Hugging Face ("rotate half") layout, differentiable.
/// `x`: `(batch, heads, seq, head_dim)`; `cos`, `sin`: `(seq, head_dim / 2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let head_dim = x.dim(candle_core::D::Minus1)?;
    let half = head_dim / 2;
    let cos = Tensor::cat(&[cos, cos], candle_core::D::Minus1)?.to_dtype(x.dtype())?;
    let sin = Tensor::cat(&[sin, sin], candle_core::D::Minus1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(candle_core::D::Minus1, 0, half)?;
    let x2 = x.narrow(candle_core::D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], candle_core::D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_matches_matmul_and_gives_no_weight_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5), &device)?;
        let w = Tensor::randn(0f32, 1.0, (4, 5), &device)?;
        let y = frozen_linear(x.as_tensor(), &w)?;
        let reference = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");

        let grads = y.sqr()?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        let gx_ref = (reference * 2.0)?.broadcast_matmul(&w)?;
        let diff = (gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "input gradient differs by {diff}");
        assert!(
            grads.get(&w).is_none(),
            "a frozen weight must get no gradient"
        );
        Ok(())
    }

    #[test]
    fn rms_norm_matches_candle_fast_kernel() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 7, 16), &device)?;
        let g = Tensor::randn(0f32, 1.0, 16, &device)?;
        let ours = rms_norm(&x, &g, 1e-5)?;
        let theirs = candle_nn::ops::rms_norm(&x, &g, 1e-5)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "rms_norm differs by {diff}");
        Ok(())
    }

    #[test]
    fn rope_matches_candle_fast_kernel() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 8), &device)?;
        let cos = Tensor::randn(0f32, 1.0, (6, 4), &device)?;
        let sin = Tensor::randn(0f32, 1.0, (6, 4), &device)?;
        let ours = rope(&x, &cos, &sin)?;
        let theirs = candle_nn::rotary_emb::rope(&x, &cos, &sin)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "rope differs by {diff}");
        Ok(())
    }
}
