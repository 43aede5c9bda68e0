//! The LoRA branch: [`lora_branch`] (`scale · (x·Aᵀ)·Bᵀ` as one node) and its backward
//! ([`lora_branch_backward`]). One forward ([`LoraBranch::forward`]) on any backend's
//! storages serves the CPU and CUDA alike: it runs the backend's own matmuls, no kernel of ours.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// The low-rank branch of a LoRA-style adapter, `scale · (x·Aᵀ)·Bᵀ`, in `x`'s dtype: `x`
/// `(…, d_in)`; `A` `(r, d_in)` and `B` `(d_out, r)` trainable, in any float dtype (f32 master
/// weights are cast on the fly). One node instead of nine (casts, reshapes, transposes, two
/// matmuls, the scale), each of which costs candle a zero-filled gradient and an add in
/// backward; the rank-r intermediate is recomputed in backward rather than kept.
pub fn lora_branch(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let (r, d_in) = a.dims2()?;
    let (_, r2) = b.dims2()?;
    if r != r2 || x.dims().last() != Some(&d_in) {
        candle_core::bail!(
            "lora_branch: x {:?}, A {:?}, B {:?}",
            x.shape(),
            a.shape(),
            b.shape()
        )
    }
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, LoraBranch { scale })
}

/// `(∂x, ∂A, ∂B)` of [`lora_branch`] given the gradient of its output; `∂A`, `∂B` in the
/// dtype of `A`, `B`.
pub(crate) fn lora_branch_backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = x.dtype();
    let d_in = x.dim(D::Minus1)?;
    let d_out = b.dim(0)?;
    let x2 = x.contiguous()?.reshape(((), d_in))?;
    let g2 = grad.contiguous()?.reshape(((), d_out))?;
    let a_c = a.to_dtype(dtype)?;
    let b_c = b.to_dtype(dtype)?;
    // ∂(low·scale) = g·B; ∂x = that·A; ∂A = thatᵀ·x; ∂B = gᵀ·(x·Aᵀ·scale).
    let grad_low = (g2.matmul(&b_c)? * scale)?;
    let grad_x = grad_low.matmul(&a_c)?.reshape(x.shape())?;
    let grad_a = grad_low.t()?.matmul(&x2)?.to_dtype(a.dtype())?;
    let low = (x2.matmul(&a_c.t()?)? * scale)?;
    let grad_b = g2.t()?.matmul(&low)?.to_dtype(b.dtype())?;
    Ok((grad_x, grad_a, grad_b))
}

/// `(x, A, B)` → `scale · (x·Aᵀ)·Bᵀ`.
struct LoraBranch {
    scale: f64,
}

impl LoraBranch {
    /// `x` as `(m, d_in)`, the shapes of the two products and the output shape.
    fn problem(x: &Layout, a: &Layout, b: &Layout) -> Result<(usize, usize, usize, usize, Shape)> {
        let Some((&d_in, leading)) = x.dims().split_last() else {
            candle_core::bail!("lora_branch: x has no dimensions")
        };
        let m: usize = leading.iter().product();
        let (r, _) = a.shape().dims2()?;
        let (d_out, _) = b.shape().dims2()?;
        let mut out = leading.to_vec();
        out.push(d_out);
        Ok((m, d_in, r, d_out, Shape::from(out)))
    }

    /// The forward on any backend's storages.
    fn forward<S: BackendStorage>(
        &self,
        x: &S,
        x_l: &Layout,
        a: &S,
        a_l: &Layout,
        b: &S,
        b_l: &Layout,
    ) -> Result<(S, Shape)> {
        let (m, d_in, r, d_out, shape) = Self::problem(x_l, a_l, b_l)?;
        if !x_l.is_contiguous() {
            candle_core::bail!("lora_branch: x must be contiguous")
        }
        let dtype = x.dtype();
        let a = a.to_dtype(a_l, dtype)?;
        let b = b.to_dtype(b_l, dtype)?;
        let x_2d = Layout::contiguous_with_offset((m, d_in), x_l.start_offset());
        let at = Layout::contiguous((r, d_in)).transpose(0, 1)?;
        let low = x.matmul(&a, (1, m, r, d_in), &x_2d, &at)?;
        let low_l = Layout::contiguous((m, r));
        let low = low.affine(&low_l, self.scale, 0.0)?;
        let bt = Layout::contiguous((d_out, r)).transpose(0, 1)?;
        Ok((low.matmul(&b, (1, m, d_out, r), &low_l, &bt)?, shape))
    }
}

impl CustomOp3 for LoraBranch {
    fn name(&self) -> &'static str {
        "lora-branch"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(x, x_l, a, a_l, b, b_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        a: &CudaStorage,
        a_l: &Layout,
        b: &CudaStorage,
        b_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.forward(x, x_l, a, a_l, b, b_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_a, grad_b) = lora_branch_backward(x, a, b, self.scale, grad)?;
        Ok((Some(grad_x), Some(grad_a), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn lora_branch_takes_f32_master_weights_with_bf16_activations() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 16), &dev)?.to_dtype(DType::BF16)?;
        let a = candle_core::Var::randn(0f32, 0.3, (4, 16), &dev)?;
        let b = candle_core::Var::randn(0f32, 0.3, (8, 4), &dev)?;
        let y = lora_branch(&x, a.as_tensor(), b.as_tensor(), 0.5)?;
        assert_eq!(y.dtype(), DType::BF16);
        let want = (x
            .to_dtype(DType::F32)?
            .matmul(&a.as_tensor().t()?)?
            .matmul(&b.as_tensor().t()?)?
            * 0.5)?;
        let diff = (y.to_dtype(DType::F32)? - &want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff / scale < 2e-2, "{diff} of {scale}");
        let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        for var in [&a, &b] {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            assert_eq!(
                g.dtype(),
                DType::F32,
                "gradients come back in the master dtype"
            );
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }
}
