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
    let (_, d_in) = weight.dims2()?;
    let Some(&last) = x.dims().last() else {
        candle_core::bail!("frozen_linear: input must have at least one dimension")
    };
    if last != d_in {
        candle_core::bail!("frozen_linear: input has last dim {last}, weight expects {d_in}")
    }
    // Any number of leading dimensions in one op (no reshape nodes: in backward each graph node
    // costs candle a zero-filled gradient and an add).
    x.contiguous()?.apply_op2(weight, FrozenLinear)
}

/// Forward: `x (… × k) · Wᵀ (k × n)`, the leading dimensions flattened into rows. Backward:
/// `∂x = ∂y · W`, nothing for `W`.
struct FrozenLinear;

/// One frozen projection as a matmul problem.
struct Problem {
    /// `(batch, m, n, k)`.
    bmnk: (usize, usize, usize, usize),
    /// `x` as an `m × k` layout.
    x_2d: Layout,
    /// The transposed weight's layout.
    wt: Layout,
    /// The output shape (`x`'s leading dimensions, then `n`).
    out: Shape,
}

impl FrozenLinear {
    fn problem(x_layout: &Layout, w_layout: &Layout) -> Result<Problem> {
        let Some((&k, leading)) = x_layout.dims().split_last() else {
            candle_core::bail!("frozen_linear: input must have at least one dimension")
        };
        if !x_layout.is_contiguous() {
            candle_core::bail!("frozen_linear: input must be contiguous")
        }
        let m: usize = leading.iter().product();
        let (n, k2) = w_layout.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_linear: inner dimensions differ ({k} vs {k2})")
        }
        let x_2d = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
        let mut out = leading.to_vec();
        out.push(n);
        Ok(Problem {
            bmnk: (1, m, n, k),
            x_2d,
            wt: w_layout.transpose(0, 1)?,
            out: Shape::from(out),
        })
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
        let p = Self::problem(x_layout, w_layout)?;
        Ok((x.matmul(w, p.bmnk, &p.x_2d, &p.wt)?, p.out))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = Self::problem(x_layout, w_layout)?;
        Ok((x.matmul(w, p.bmnk, &p.x_2d, &p.wt)?, p.out))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(frozen_linear_backward(weight, grad_y, x.shape())?),
            None,
        ))
    }
}

/// `∂x = ∂y · W` of [`frozen_linear`], shaped as the input (`input_shape`); for the op's own
/// backward and the model's hand-written one.
pub(crate) fn frozen_linear_backward(
    weight: &Tensor,
    grad_y: &Tensor,
    input_shape: &Shape,
) -> Result<Tensor> {
    let d_out = weight.dim(0)?;
    grad_y
        .contiguous()?
        .reshape(((), d_out))?
        .matmul(weight)?
        .reshape(input_shape)
}

/// Softmax over the last dimension in one pass, in the input's dtype (accumulating in f32),
/// with a backward: `∂x = y ⊙ (∂y − Σ(∂y ⊙ y))`, computed in f32. candle's own fused softmax
/// has no backward, so without this op attention composes max/sub/exp/sum/div, each pass over
/// the `seq × seq` scores kept for backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxLastDim)
}

struct SoftmaxLastDim;

impl SoftmaxLastDim {
    fn rows<T: Copy>(
        src: &[T],
        layout: &Layout,
        to: impl Fn(T) -> f32,
        from: impl Fn(f32) -> T,
    ) -> Result<Vec<T>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax_last_dim: input must be contiguous")
        };
        let src = &src[start..end];
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = Vec::with_capacity(src.len());
        let mut exps = vec![0f32; cols];
        for row in src.chunks(cols) {
            let max = row.iter().map(|&v| to(v)).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (e, &v) in exps.iter_mut().zip(row) {
                *e = (to(v) - max).exp();
                sum += *e;
            }
            out.extend(exps.iter().map(|&e| from(e / sum)));
        }
        Ok(out)
    }
}

impl candle_core::CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim-with-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use half::{bf16, f16};
        let out = match storage {
            CpuStorage::F32(src) => CpuStorage::F32(Self::rows(src, layout, |v| v, |v| v)?),
            CpuStorage::BF16(src) => {
                CpuStorage::BF16(Self::rows(src, layout, bf16::to_f32, bf16::from_f32)?)
            }
            CpuStorage::F16(src) => {
                CpuStorage::F16(Self::rows(src, layout, f16::to_f32, f16::from_f32)?)
            }
            CpuStorage::F64(src) => {
                CpuStorage::F64(Self::rows(src, layout, |v| v as f32, |v| v as f64)?)
            }
            other => candle_core::bail!("softmax_last_dim: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{kernel_name, kernels, Map1, WrapErr};
        use candle_core::{CudaDevice, WithDType};

        // candle-kernels' row softmax (one warp per row), launched as candle-nn launches it.
        struct Rows;
        impl Map1 for Rows {
            fn f<T: DeviceRepr + WithDType>(
                &self,
                src: &CudaSlice<T>,
                dev: &CudaDevice,
                layout: &Layout,
            ) -> Result<CudaSlice<T>> {
                let Some((start, end)) = layout.contiguous_offsets() else {
                    candle_core::bail!("softmax_last_dim: input must be contiguous")
                };
                let src = src.slice(start..end);
                let elements = layout.shape().elem_count();
                let cols = layout.dims().last().copied().unwrap_or(1).max(1);
                let config = LaunchConfig {
                    grid_dim: ((elements / cols) as u32, 1, 1),
                    block_dim: (1, 32, 1),
                    shared_mem_bytes: 0,
                };
                let func = dev.get_or_load_func(&kernel_name::<T>("softmax"), &kernels::REDUCE)?;
                // SAFETY: every element is written by the kernel before it is read.
                let dst = unsafe { dev.alloc::<T>(elements)? };
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                candle_core::builder_arg!(builder, cols as i32);
                // SAFETY: the arguments match the kernel's signature (src, dst, ncols).
                unsafe { builder.launch(config) }.w()?;
                Ok(dst)
            }
        }
        let device = storage.device();
        let out = Rows.map(&storage.slice, device, layout)?;
        Ok((
            candle_core::CudaStorage {
                slice: out,
                device: device.clone(),
            },
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let dtype = y.dtype();
        let y32 = y.to_dtype(candle_core::DType::F32)?;
        let g32 = grad_y.to_dtype(candle_core::DType::F32)?;
        let dot = (&g32 * &y32)?.sum_keepdim(candle_core::D::Minus1)?;
        let grad = (y32 * g32.broadcast_sub(&dot)?)?;
        Ok(Some(grad.to_dtype(dtype)?))
    }
}

/// `‖t‖²` (in f32, widened) of each tensor, `0` for `None`, read back in one transfer: on a GPU
/// each read is a synchronisation, so reading per tensor would stall the queue once per tensor.
pub fn squared_norms(tensors: &[Option<&Tensor>]) -> Result<Vec<f64>> {
    let present: Vec<Tensor> = tensors
        .iter()
        .flatten()
        .map(|t| t.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all())
        .collect::<Result<_>>()?;
    if present.is_empty() {
        return Ok(vec![0.0; tensors.len()]);
    }
    let mut values = Tensor::stack(&present, 0)?.to_vec1::<f32>()?.into_iter();
    Ok(tensors
        .iter()
        .map(|t| match t {
            Some(_) => values.next().map_or(0.0, f64::from),
            None => 0.0,
        })
        .collect())
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

    /// Fresh random scores with a causal mask of -inf above the diagonal, as attention makes
    /// them.
    fn masked_scores(shape: (usize, usize, usize)) -> Result<Tensor> {
        let (_, rows, cols) = shape;
        let device = Device::Cpu;
        let scores = (Tensor::randn(0f32, 1.0, shape, &device)? * 3.0)?;
        let mask: Vec<f32> = (0..rows)
            .flat_map(|i| (0..cols).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (rows, cols), &device)?;
        scores.broadcast_add(&mask)
    }

    fn relative_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        let a = a.to_dtype(candle_core::DType::F64)?;
        let b = b.to_dtype(candle_core::DType::F64)?;
        let norm = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
        let diff = (a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
        Ok((diff / norm.max(1e-30)) as f32)
    }

    #[test]
    fn softmax_last_dim_matches_the_composed_softmax_forward_and_backward() -> Result<()> {
        for (dtype, tolerance) in [
            (candle_core::DType::F32, 1e-6),
            (candle_core::DType::F32, 1e-6),
            (candle_core::DType::BF16, 1e-2),
        ] {
            let x = masked_scores((3, 9, 9))?.to_dtype(dtype)?;
            let x = Var::from_tensor(&x)?;
            let upstream = Tensor::randn(0f32, 1.0, (3, 9, 9), &Device::Cpu)?.to_dtype(dtype)?;
            let fused = softmax_last_dim(x.as_tensor())?;
            // The reference in f64 through candle's composed softmax.
            let x64 = Var::from_tensor(&x.as_tensor().to_dtype(candle_core::DType::F64)?)?;
            let composed = candle_nn::ops::softmax(x64.as_tensor(), candle_core::D::Minus1)?;
            let forward = relative_difference(&fused, &composed)?;
            assert!(
                forward < tolerance,
                "{dtype:?} forward differs by {forward}"
            );
            let rows = fused
                .sum_keepdim(candle_core::D::Minus1)?
                .to_dtype(candle_core::DType::F32)?;
            let worst = (rows - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                worst < 10.0 * tolerance + 1e-6,
                "rows sum to 1 within {worst}"
            );

            let grad = (fused * &upstream)?.sum_all()?.backward()?;
            let grad = grad.get(x.as_tensor()).expect("x has a gradient").clone();
            let upstream64 = upstream.to_dtype(candle_core::DType::F64)?;
            let grad64 = (composed * upstream64)?.sum_all()?.backward()?;
            let reference = grad64.get(x64.as_tensor()).expect("reference gradient");
            let backward = relative_difference(&grad, reference)?;
            assert!(
                backward < 2.0 * tolerance,
                "{dtype:?} backward differs by {backward}"
            );
            // Masked entries get exactly zero probability and zero gradient.
            let fused = softmax_last_dim(x.as_tensor())?.to_dtype(candle_core::DType::F32)?;
            let above = fused.get(0)?.get(0)?.narrow(0, 1, 8)?;
            assert_eq!(above.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn softmax_last_dim_refuses_integer_input() {
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        let error = softmax_last_dim(&ids).unwrap_err().to_string();
        assert!(error.contains("unsupported dtype"), "{error}");
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
