//! RMSNorm: [`rms_norm`] (`x / sqrt(mean(x²) + eps) · g`, no gradient for the frozen gain) and
//! its backward ([`rms_norm_backward`]), the CUDA launches of the `rms_norm_*` row kernels
//! (`RowKernel`) and the CPU reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::{cpu_storage, cpu_values, round_to};

#[cfg(feature = "cuda")]
use super::{cuda_storage, gpu, last_dim};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{Map2, Map3, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage, WithDType};

/// `x / sqrt(mean(x²) + eps) · g` over the last dimension; `g` (the frozen gain) gets no
/// gradient.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    if gain.dims() != [cols] {
        candle_core::bail!("rms_norm: gain {:?} for rows of {cols}", gain.shape())
    }
    x.contiguous()?.apply_op2(gain, RmsNorm { eps: eps as f32 })
}

/// `∂x` of [`rms_norm`].
pub(crate) fn rms_norm_backward(
    x: &Tensor,
    gain: &Tensor,
    grad_y: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        gain,
        &grad_y.contiguous()?,
        &RmsNormBackward { eps: eps as f32 },
    )
}

/// Forward: `(x, g)` → `g · round(x·r)`. Backward: `∂x` only (the gain is frozen).
struct RmsNorm {
    eps: f32,
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let round = round_to(x.dtype());
        let gain = cpu_values(g, g_l, self.name())?;
        let mut values = cpu_values(x, x_l, self.name())?;
        for row in values.chunks_mut(gain.len()) {
            let r = inv_rms(row, self.eps);
            for (v, g) in row.iter_mut().zip(&gain) {
                *v = round(*v * r) * g;
            }
        }
        Ok((
            cpu_storage(values, x.dtype(), self.name())?,
            x_l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        g: &CudaStorage,
        g_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = Map2::map(
            &RowKernel {
                root: "rms_norm_fwd",
                eps: self.eps,
            },
            &x.slice,
            x_l,
            &g.slice,
            g_l,
            x.device(),
        )?;
        Ok((cuda_storage(out, x.device()), x_l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(rms_norm_backward(x, g, grad_y, self.eps as f64)?),
            None,
        ))
    }
}

/// `(x, g, ∂y)` → `∂x = r·g·∂y − x·r³·mean(g·∂y·x)`.
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
        dy: &CpuStorage,
        dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gain = cpu_values(g, g_l, self.name())?;
        let x_values = cpu_values(x, x_l, self.name())?;
        let mut grad = cpu_values(dy, dy_l, self.name())?;
        let cols = gain.len();
        for (xr, dr) in x_values.chunks(cols).zip(grad.chunks_mut(cols)) {
            let r = inv_rms(xr, self.eps);
            let dot: f32 = xr
                .iter()
                .zip(dr.iter())
                .zip(&gain)
                .map(|((x, d), g)| x * d * g)
                .sum();
            let k = r * r * r * dot / cols as f32;
            for ((d, x), g) in dr.iter_mut().zip(xr).zip(&gain) {
                *d = r * g * *d - x * k;
            }
        }
        Ok((
            cpu_storage(grad, x.dtype(), self.name())?,
            x_l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        g: &CudaStorage,
        g_l: &Layout,
        dy: &CudaStorage,
        dy_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = Map3::map(
            &RowKernel {
                root: "rms_norm_bwd",
                eps: self.eps,
            },
            &x.slice,
            x_l,
            &g.slice,
            g_l,
            &dy.slice,
            dy_l,
            x.device(),
        )?;
        Ok((cuda_storage(out, x.device()), x_l.shape().clone()))
    }
}

/// A row kernel `root(inputs…, out, cols, eps)` over the rows of the first input.
#[cfg(feature = "cuda")]
struct RowKernel {
    root: &'static str,
    eps: f32,
}

#[cfg(feature = "cuda")]
impl RowKernel {
    fn launch<T: DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        inputs: &[&CudaView<'_, T>],
        elements: usize,
        cols: usize,
    ) -> Result<CudaSlice<T>> {
        let func = engine_func!(dev, T, self.root)?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(elements)? };
        let mut builder = func.builder();
        for input in inputs {
            builder.arg(*input);
        }
        builder.arg(&dst);
        candle_core::builder_arg!(builder, cols as i32, self.eps);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(gpu::rows(elements / cols, cols)) }.w()?;
        Ok(dst)
    }
}

#[cfg(feature = "cuda")]
impl Map2 for RowKernel {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        x_l: &Layout,
        g: &CudaSlice<T>,
        g_l: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let cols = last_dim(x_l);
        let x = gpu::view(x, x_l, self.root)?;
        let g = gpu::view(g, g_l, self.root)?;
        self.launch(dev, &[&x, &g], x_l.shape().elem_count(), cols)
    }
}

#[cfg(feature = "cuda")]
impl Map3 for RowKernel {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        x_l: &Layout,
        g: &CudaSlice<T>,
        g_l: &Layout,
        dy: &CudaSlice<T>,
        dy_l: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let cols = last_dim(x_l);
        let x = gpu::view(x, x_l, self.root)?;
        let g = gpu::view(g, g_l, self.root)?;
        let dy = gpu::view(dy, dy_l, self.root)?;
        self.launch(dev, &[&x, &g, &dy], x_l.shape().elem_count(), cols)
    }
}
