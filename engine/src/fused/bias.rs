//! Bias: [`add_bias`] (`x + bias`, no gradient for the frozen bias), the CUDA launch of the
//! `add_bias` kernel and the CPU reference. Its backward passes the gradient through.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::{cpu_storage, cpu_values};

#[cfg(feature = "cuda")]
use super::{cuda_storage, gpu, last_dim};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{Map2, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage, WithDType};

/// `x + bias` with `bias` (frozen, no gradient) along the last dimension: one kernel, where
/// candle's broadcast add takes a strided path and, in backward, makes a zero-filled gradient
/// for the bias it then keeps until the step ends.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if bias.dims() != [x.dim(D::Minus1)?] || bias.dtype() != x.dtype() {
        candle_core::bail!("add_bias: bias {:?} for x {:?}", bias, x.shape())
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

/// `(x, bias)` → `x + bias`; the gradient passes to `x` unchanged.
struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = cpu_values(bias, bias_l, self.name())?;
        let mut values = cpu_values(x, x_l, self.name())?;
        for row in values.chunks_mut(bias.len()) {
            row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
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
        bias: &CudaStorage,
        bias_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = Map2::map(self, &x.slice, x_l, &bias.slice, bias_l, x.device())?;
        Ok((cuda_storage(out, x.device()), x_l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_y.clone()), None))
    }
}

#[cfg(feature = "cuda")]
impl Map2 for AddBias {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        x_l: &Layout,
        bias: &CudaSlice<T>,
        bias_l: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let n = x_l.shape().elem_count();
        let cols = last_dim(x_l);
        let x = gpu::view(x, x_l, "add_bias")?;
        let bias = gpu::view(bias, bias_l, "add_bias")?;
        let func = engine_func!(dev, T, "add_bias")?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&bias);
        builder.arg(&dst);
        candle_core::builder_arg!(builder, n, cols as i32);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(gpu::elementwise(n)) }.w()?;
        Ok(dst)
    }
}
