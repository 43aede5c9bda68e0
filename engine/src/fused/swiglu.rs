//! SwiGLU: [`swiglu`] (`silu(gate) · up`) and its backward ([`swiglu_backward`], both
//! gradients from one kernel), the CUDA launches of the `swiglu_*` element-wise kernels
//! (`Elementwise`) and the CPU reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

#[cfg(feature = "cuda")]
use super::{cuda_storage, gpu};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{Map2, Map3, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage, WithDType};

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!("swiglu: gate {:?}, up {:?}", gate.shape(), up.shape())
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `(∂gate, ∂up)` of [`swiglu`].
pub(crate) fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    grad_h: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let both = gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &grad_h.contiguous()?,
        &SwiGluBackward,
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Forward: `silu(gate) · up`. Backward: both gradients from one kernel.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_l: &Layout,
        up: &CpuStorage,
        up_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let up = cpu_values(up, up_l, self.name())?;
        let mut values = cpu_values(gate, gate_l, self.name())?;
        for (g, u) in values.iter_mut().zip(&up) {
            *g = *g * sigmoid(*g) * u;
        }
        Ok((
            cpu_storage(values, gate.dtype(), self.name())?,
            gate_l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate: &CudaStorage,
        gate_l: &Layout,
        up: &CudaStorage,
        up_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = Map2::map(
            &Elementwise {
                root: "swiglu_fwd",
                outputs: 1,
            },
            &gate.slice,
            gate_l,
            &up.slice,
            up_l,
            gate.device(),
        )?;
        Ok((cuda_storage(out, gate.device()), gate_l.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _h: &Tensor,
        grad_h: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_gate, grad_up) = swiglu_backward(gate, up, grad_h)?;
        Ok((Some(grad_gate), Some(grad_up)))
    }
}

/// `(gate, up, ∂h)` → `[∂gate; ∂up]`, stacked on a new leading dimension of 2.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_l: &Layout,
        up: &CpuStorage,
        up_l: &Layout,
        dh: &CpuStorage,
        dh_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate_values = cpu_values(gate, gate_l, self.name())?;
        let up = cpu_values(up, up_l, self.name())?;
        let dh = cpu_values(dh, dh_l, self.name())?;
        let n = gate_values.len();
        let mut out = vec![0f32; 2 * n];
        for (i, ((&g, &u), &d)) in gate_values.iter().zip(&up).zip(&dh).enumerate() {
            let s = sigmoid(g);
            out[i] = d * u * s * (1.0 + g * (1.0 - s));
            out[n + i] = d * g * s;
        }
        Ok((
            cpu_storage(out, gate.dtype(), self.name())?,
            stacked_pair(gate_l.shape()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate: &CudaStorage,
        gate_l: &Layout,
        up: &CudaStorage,
        up_l: &Layout,
        dh: &CudaStorage,
        dh_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = Map3::map(
            &Elementwise {
                root: "swiglu_bwd",
                outputs: 2,
            },
            &gate.slice,
            gate_l,
            &up.slice,
            up_l,
            &dh.slice,
            dh_l,
            gate.device(),
        )?;
        Ok((
            cuda_storage(out, gate.device()),
            stacked_pair(gate_l.shape()),
        ))
    }
}

/// `(2, dims…)`.
fn stacked_pair(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    Shape::from(dims)
}

/// An element-wise kernel `root(inputs…, out, n)` writing `outputs · n` elements.
#[cfg(feature = "cuda")]
struct Elementwise {
    root: &'static str,
    outputs: usize,
}

#[cfg(feature = "cuda")]
impl Elementwise {
    fn launch<T: DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        inputs: &[&CudaView<'_, T>],
        n: usize,
    ) -> Result<CudaSlice<T>> {
        let func = engine_func!(dev, T, self.root)?;
        // SAFETY: the kernel writes every element of every output.
        let dst = unsafe { dev.alloc::<T>(self.outputs * n)? };
        let mut builder = func.builder();
        for input in inputs {
            builder.arg(*input);
        }
        builder.arg(&dst);
        candle_core::builder_arg!(builder, n);
        // SAFETY: the arguments match the kernel's signature (size_t n).
        unsafe { builder.launch(gpu::elementwise(n)) }.w()?;
        Ok(dst)
    }
}

#[cfg(feature = "cuda")]
impl Map2 for Elementwise {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        a: &CudaSlice<T>,
        a_l: &Layout,
        b: &CudaSlice<T>,
        b_l: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let a = gpu::view(a, a_l, self.root)?;
        let b = gpu::view(b, b_l, self.root)?;
        self.launch(dev, &[&a, &b], a_l.shape().elem_count())
    }
}

#[cfg(feature = "cuda")]
impl Map3 for Elementwise {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        a: &CudaSlice<T>,
        a_l: &Layout,
        b: &CudaSlice<T>,
        b_l: &Layout,
        c: &CudaSlice<T>,
        c_l: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let a = gpu::view(a, a_l, self.root)?;
        let b = gpu::view(b, b_l, self.root)?;
        let c = gpu::view(c, c_l, self.root)?;
        self.launch(dev, &[&a, &b, &c], a_l.shape().elem_count())
    }
}
