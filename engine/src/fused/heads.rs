//! Heads: [`split_heads`], [`merge_heads`] and [`rope`], one op ([`Heads`]) that moves a
//! tensor between the token-major and heads-major layouts and rotates it by RoPE on the way,
//! its backward ([`split_heads_backward`]), the CUDA launch of the `heads` kernel and the CPU
//! reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

#[cfg(feature = "cuda")]
use super::{cuda_storage, gpu};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{Map1, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage, WithDType};

/// Rotary position embedding ("rotate half" layout). `x`: `(batch, heads, t, head_dim)`;
/// `cos`, `sin`: `(t, head_dim / 2)`. Neither table gets a gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (batch, heads, t, d) = x.dims4()?;
    Heads::new(batch, heads, t, d, true, false, false, x.shape().clone()).apply(x, cos, sin)
}

/// A projection's output `(batch, t, heads · head_dim)` split into heads, `(batch, heads, t,
/// head_dim)` in memory, returned with the shape `out` (e.g. `(batch, kv_heads, groups · t,
/// head_dim)`, the same memory), rotated by RoPE on the way when `rotate`. One copy, instead
/// of reshape, transpose, copy and the rotation's half-dozen ops.
pub fn split_heads(
    x: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    rotate: bool,
    out: &[usize],
) -> Result<Tensor> {
    let (batch, t, width) = x.dims3()?;
    if heads == 0 || !width.is_multiple_of(heads) || out.iter().product::<usize>() != x.elem_count()
    {
        candle_core::bail!("split_heads: {:?} into {heads} heads as {out:?}", x.shape())
    }
    Heads::new(
        batch,
        heads,
        t,
        width / heads,
        rotate,
        true,
        false,
        Shape::from(out),
    )
    .apply(x, cos, sin)
}

/// The inverse of [`split_heads`] without rotation: `x` holds `(batch, heads, t, head_dim)` in
/// memory (any shape over it); returns `(batch, t, heads · head_dim)`.
pub fn merge_heads(
    x: &Tensor,
    batch: usize,
    heads: usize,
    t: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let d = x.elem_count() / (batch * heads * t).max(1);
    if batch * heads * t * d != x.elem_count() {
        candle_core::bail!(
            "merge_heads: {:?} is not {batch} × {heads} heads × {t} tokens",
            x.shape()
        )
    }
    let out = Shape::from((batch, t, heads * d));
    Heads::new(batch, heads, t, d, false, false, true, out).apply(x, cos, sin)
}

/// The transpose of [`split_heads`]: `(batch, heads, t, d)` in memory (any shape over it) back
/// to `(batch, t, heads · d)`, rotated backwards when the split rotated.
pub(crate) fn split_heads_backward(
    grad: &Tensor,
    (batch, heads, t): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
    rotated: bool,
) -> Result<Tensor> {
    let d = grad.elem_count() / (batch * heads * t).max(1);
    let out = Shape::from((batch, t, heads * d));
    let op = Heads {
        sign: -1.0,
        ..Heads::new(batch, heads, t, d, rotated, false, true, out)
    };
    op.apply(grad, cos, sin)
}

/// A `(batch, heads, t, d)` tensor moved between the token-major (`(batch, t, heads, d)`)
/// and heads-major (`(batch, heads, t, d)`) layouts, rotated by `sign · θ(position, i)` on
/// each `(x[i], x[i + d/2])` pair when `rotate`. Its transpose (the backward) swaps the two
/// layouts and rotates by `−sign · θ`.
#[derive(Debug, Clone)]
struct Heads {
    batch: usize,
    heads: usize,
    t: usize,
    d: usize,
    sign: f32,
    rotate: bool,
    src_tokens_major: bool,
    dst_tokens_major: bool,
    out: Shape,
}

impl Heads {
    #[allow(clippy::too_many_arguments)]
    fn new(
        batch: usize,
        heads: usize,
        t: usize,
        d: usize,
        rotate: bool,
        src_tokens_major: bool,
        dst_tokens_major: bool,
        out: Shape,
    ) -> Self {
        Self {
            batch,
            heads,
            t,
            d,
            sign: 1.0,
            rotate,
            src_tokens_major,
            dst_tokens_major,
            out,
        }
    }

    fn apply(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = self.d / 2;
        if !self.d.is_multiple_of(2) || cos.dims() != [self.t, half] || sin.dims() != [self.t, half]
        {
            candle_core::bail!(
                "rope: head dim {} over {} positions with tables {:?} / {:?}",
                self.d,
                self.t,
                cos.shape(),
                sin.shape()
            )
        }
        let cos = cos.to_dtype(DType::F32)?.contiguous()?;
        let sin = sin.to_dtype(DType::F32)?.contiguous()?;
        x.contiguous()?.apply_op3(&cos, &sin, self)
    }

    /// Offset of element `(b, h, pos, 0)` in the token-major or heads-major layout.
    fn base(&self, tokens_major: bool, b: usize, h: usize, pos: usize) -> usize {
        if tokens_major {
            ((b * self.t + pos) * self.heads + h) * self.d
        } else {
            ((b * self.heads + h) * self.t + pos) * self.d
        }
    }
}

impl CustomOp3 for Heads {
    fn name(&self) -> &'static str {
        "heads"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        cos: &CpuStorage,
        cos_l: &Layout,
        sin: &CpuStorage,
        sin_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let half = self.d / 2;
        let cos = cpu_values(cos, cos_l, self.name())?;
        let sin = cpu_values(sin, sin_l, self.name())?;
        let src = cpu_values(x, x_l, self.name())?;
        if src.len() != self.batch * self.heads * self.t * self.d {
            candle_core::bail!("heads: {} elements for {:?}", src.len(), self.out)
        }
        let mut dst = vec![0f32; src.len()];
        for b in 0..self.batch {
            for h in 0..self.heads {
                for pos in 0..self.t {
                    let from = self.base(self.src_tokens_major, b, h, pos);
                    let to = self.base(self.dst_tokens_major, b, h, pos);
                    for col in 0..half {
                        let (x1, x2) = (src[from + col], src[from + col + half]);
                        let (y1, y2) = if self.rotate {
                            let c = cos[pos * half + col];
                            let s = self.sign * sin[pos * half + col];
                            (x1 * c - x2 * s, x2 * c + x1 * s)
                        } else {
                            (x1, x2)
                        };
                        dst[to + col] = y1;
                        dst[to + col + half] = y2;
                    }
                }
            }
        }
        Ok((cpu_storage(dst, x.dtype(), self.name())?, self.out.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        cos: &CudaStorage,
        cos_l: &Layout,
        sin: &CudaStorage,
        sin_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let cos = gpu::view(cos.as_cuda_slice::<f32>()?, cos_l, self.name())?;
        let sin = gpu::view(sin.as_cuda_slice::<f32>()?, sin_l, self.name())?;
        let out = Map1::map(
            &HeadsKernel { op: self, cos, sin },
            &x.slice,
            x.device(),
            x_l,
        )?;
        Ok((cuda_storage(out, x.device()), self.out.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Heads {
            sign: -self.sign,
            src_tokens_major: self.dst_tokens_major,
            dst_tokens_major: self.src_tokens_major,
            out: x.shape().clone(),
            ..self.clone()
        };
        let grad_x = grad_y.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(grad_x), None, None))
    }
}

#[cfg(feature = "cuda")]
struct HeadsKernel<'a> {
    op: &'a Heads,
    cos: CudaView<'a, f32>,
    sin: CudaView<'a, f32>,
}

#[cfg(feature = "cuda")]
impl Map1 for HeadsKernel<'_> {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        src: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
    ) -> Result<CudaSlice<T>> {
        let op = self.op;
        let elements = op.batch * op.heads * op.t * op.d;
        if layout.shape().elem_count() != elements {
            candle_core::bail!("heads: {:?} for {:?}", layout.shape(), op.out)
        }
        let src = gpu::view(src, layout, "heads")?;
        let func = engine_func!(dev, T, "heads")?;
        // SAFETY: the kernel writes both halves of every row.
        let dst = unsafe { dev.alloc::<T>(elements)? };
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&self.cos);
        builder.arg(&self.sin);
        builder.arg(&dst);
        candle_core::builder_arg!(
            builder,
            op.batch as i32,
            op.heads as i32,
            op.t as i32,
            op.d as i32,
            op.sign,
            op.rotate as i32,
            op.src_tokens_major as i32,
            op.dst_tokens_major as i32
        );
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(gpu::elementwise(elements / 2)) }.w()?;
        Ok(dst)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn rope_backward_is_the_inverse_rotation() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &Device::Cpu)?;
        let angles = Tensor::randn(0f32, 2.0, (3, 4), &Device::Cpu)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let y = rope(&x, &cos, &sin)?;
        let inverse = Heads {
            sign: -1.0,
            ..Heads::new(1, 2, 3, 8, true, false, false, x.shape().clone())
        };
        let back = y.apply_op3_no_bwd(&cos, &sin, &inverse)?;
        let diff = (back - &x)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "rotating back differs by {diff}");
        Ok(())
    }
}
