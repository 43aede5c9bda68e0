//! AdamW: the hyper-parameters ([`AdamW`]), the whole update of one f32 parameter in one
//! kernel ([`adamw`]; the CUDA launch of `adamw_f32` and the CPU reference) and the same update
//! composed of candle primitives ([`adamw_composed`]).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cpu_values;

#[cfg(feature = "cuda")]
use super::{cuda_storage, gpu};
#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// AdamW's hyper-parameters for one update (PyTorch's definition).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate of this parameter's group.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// The step number, from 1 (for the bias corrections).
    pub step: usize,
    /// Factor applied to the gradient first (global-norm clipping).
    pub clip: f64,
}

/// One AdamW update of an f32 parameter: returns the new parameter and moments
/// `(p, m, v)`. `p ← p·(1 − lr·λ) − lr·m̂/(√v̂ + ε)`, with `g` scaled by `clip` first.
pub fn adamw(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hyper: AdamW,
) -> Result<(Tensor, Tensor, Tensor)> {
    for (name, t) in [("gradient", g), ("first moment", m), ("second moment", v)] {
        if t.shape() != p.shape() {
            candle_core::bail!(
                "adamw: {name} {:?} for a parameter {:?}",
                t.shape(),
                p.shape()
            )
        }
    }
    for t in [p, g, m, v] {
        if t.dtype() != DType::F32 {
            candle_core::bail!(
                "adamw: parameters and moments must be f32, not {:?}",
                t.dtype()
            )
        }
    }
    let n = p.elem_count();
    let out = p.flatten_all()?.contiguous()?.apply_op3_no_bwd(
        &m.flatten_all()?.contiguous()?,
        &v.flatten_all()?.contiguous()?,
        &AdamWOp {
            grad: g.flatten_all()?.contiguous()?,
            hyper,
        },
    )?;
    let part = |i: usize| out.narrow(0, i * n, n)?.reshape(p.shape());
    Ok((part(0)?, part(1)?, part(2)?))
}

/// `(p, m, v)` with the gradient carried by the op → `[p'; m'; v']` (flat, 3n).
struct AdamWOp {
    grad: Tensor,
    hyper: AdamW,
}

impl AdamWOp {
    /// The f32 constants the kernel takes: lr, β₁, β₂, ε, λ, bias1, bias2, clip.
    fn constants(&self) -> [f32; 8] {
        let h = &self.hyper;
        let bias1 = 1.0 - h.beta1.powi(h.step as i32);
        let bias2 = 1.0 - h.beta2.powi(h.step as i32);
        [
            h.lr,
            h.beta1,
            h.beta2,
            h.eps,
            h.weight_decay,
            bias1,
            bias2,
            h.clip,
        ]
        .map(|v| v as f32)
    }
}

impl CustomOp3 for AdamWOp {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        p_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [lr, beta1, beta2, eps, wd, bias1, bias2, clip] = self.constants();
        let (grad, grad_l) = self.grad.storage_and_layout();
        let candle_core::Storage::Cpu(grad) = &*grad else {
            candle_core::bail!("adamw: the gradient is not on the CPU")
        };
        let g = cpu_values(grad, grad_l, self.name())?;
        let p = cpu_values(p, p_l, self.name())?;
        let m = cpu_values(m, m_l, self.name())?;
        let v = cpu_values(v, v_l, self.name())?;
        let n = p.len();
        let mut out = vec![0f32; 3 * n];
        for i in 0..n {
            let grad = g[i] * clip;
            let m1 = beta1 * m[i] + (1.0 - beta1) * grad;
            let v1 = beta2 * v[i] + (1.0 - beta2) * grad * grad;
            let update = (m1 / bias1) / ((v1 / bias2).sqrt() + eps);
            out[i] = p[i] * (1.0 - lr * wd) - lr * update;
            out[n + i] = m1;
            out[2 * n + i] = v1;
        }
        Ok((CpuStorage::F32(out), Shape::from(3 * n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        p_l: &Layout,
        m: &CudaStorage,
        m_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = p.device();
        let (grad, grad_l) = self.grad.storage_and_layout();
        let candle_core::Storage::Cuda(grad) = &*grad else {
            candle_core::bail!("adamw: the gradient is not on the GPU")
        };
        let g = gpu::view(grad.as_cuda_slice::<f32>()?, grad_l, self.name())?;
        let pv = gpu::view(p.as_cuda_slice::<f32>()?, p_l, self.name())?;
        let mv = gpu::view(m.as_cuda_slice::<f32>()?, m_l, self.name())?;
        let vv = gpu::view(v.as_cuda_slice::<f32>()?, v_l, self.name())?;
        let n = p_l.shape().elem_count();
        let func = dev.get_or_load_custom_func("adamw_f32", gpu::MODULE, gpu::PTX)?;
        // SAFETY: the kernel writes all 3n elements.
        let dst = unsafe { dev.alloc::<f32>(3 * n)? };
        let mut builder = func.builder();
        builder.arg(&pv);
        builder.arg(&g);
        builder.arg(&mv);
        builder.arg(&vv);
        builder.arg(&dst);
        builder.arg(&n);
        let constants = self.constants();
        for c in &constants {
            builder.arg(c);
        }
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(gpu::elementwise(n)) }.w()?;
        Ok((
            cuda_storage(CudaStorageSlice::F32(dst), dev),
            Shape::from(3 * n),
        ))
    }
}

/// AdamW composed of candle primitives (about a dozen launches per parameter): what
/// [`adamw`] computes in one kernel, and what the CPU uses.
pub fn adamw_composed(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hyper: AdamW,
) -> Result<(Tensor, Tensor, Tensor)> {
    let bias1 = 1.0 - hyper.beta1.powi(hyper.step as i32);
    let bias2 = 1.0 - hyper.beta2.powi(hyper.step as i32);
    let g = (g * hyper.clip)?;
    let m = ((m * hyper.beta1)? + (&g * (1.0 - hyper.beta1))?)?;
    let v = ((v * hyper.beta2)? + (g.sqr()? * (1.0 - hyper.beta2))?)?;
    let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + hyper.eps)?)?;
    let decayed = (p * (1.0 - hyper.lr * hyper.weight_decay))?;
    let p = (decayed - (update * hyper.lr)?)?;
    Ok((p, m, v))
}
