//! Fused training kernels: each a candle custom op with one kernel forward and one backward.
//!
//! candle's autograd records every primitive op and, in backward, computes a gradient for every
//! operand (constants such as the causal mask, the RoPE tables or the RMSNorm gain included),
//! starting each from a zero tensor. A transformer layer composed of primitives therefore costs
//! dozens of kernel launches and full-size temporaries per layer in backward, and keeps every
//! intermediate alive until the step ends. The ops here replace the hot compositions:
//!
//! - [`causal_attention_probs`]: `softmax(scale · q·kᵀ)` with the causal mask applied by
//!   index (no mask tensor) and grouped-query heads handled by shape (no repeated keys); the
//!   raw scores are freed at once, only the probabilities are kept for backward;
//! - [`rms_norm`], [`rope`] and [`swiglu`]: one kernel each way, no gradient for the frozen
//!   gain or the position tables;
//! - [`adamw`]: the whole AdamW update of one parameter in one kernel.
//!
//! Every op has a CPU implementation, which is the reference the CUDA kernels
//! (`kernels/engine.cu`) are compared with by [`check`] (run on the GPU machine by
//! `lorasweep bench kernels`), and which CI tests against candle's composed ops, forward and
//! backward.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D,
};
use half::{bf16, f16};

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{CudaStorageSlice, Map1, Map2, Map3, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage, WithDType};

static FORCE_COMPOSED: AtomicBool = AtomicBool::new(false);

/// For measurement (`lorasweep bench --composed-kernels`): models built afterwards use candle's
/// composed primitives even on CUDA.
pub fn force_composed(enabled: bool) {
    FORCE_COMPOSED.store(enabled, Ordering::Relaxed);
}

/// Whether a model on `device` uses these ops by default: on CUDA, unless [`force_composed`]
/// said otherwise. On the CPU candle's composed ops are multi-threaded and the CPU versions here
/// (single-threaded references) would be slower.
pub fn default_on(device: &Device) -> bool {
    device.is_cuda() && !FORCE_COMPOSED.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// The ops.

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

/// `x / sqrt(mean(x²) + eps) · g` over the last dimension; `g` (the frozen gain) gets no
/// gradient.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    if gain.dims() != [cols] {
        candle_core::bail!("rms_norm: gain {:?} for rows of {cols}", gain.shape())
    }
    x.contiguous()?.apply_op2(gain, RmsNorm { eps: eps as f32 })
}

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

/// `x + bias` with `bias` (frozen, no gradient) along the last dimension: one kernel, where
/// candle's broadcast add takes a strided path and, in backward, makes a zero-filled gradient
/// for the bias it then keeps until the step ends.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if bias.dims() != [x.dim(D::Minus1)?] || bias.dtype() != x.dtype() {
        candle_core::bail!("add_bias: bias {:?} for x {:?}", bias, x.shape())
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!("swiglu: gate {:?}, up {:?}", gate.shape(), up.shape())
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// Cross-entropy of each row of `logits` (`rows × vocab`, any float dtype) at `targets`
/// (`rows`, u32): `logsumexp(row) − row[target]`, in f32. The backward writes
/// `∂loss · (softmax(row) − onehot(target))` in the logits' dtype from the logits and each
/// row's log-sum-exp: nothing else is kept (candle's composed `log_softmax` keeps several f32
/// copies of `rows × vocab`, 5 GB each for Qwen2.5 at 16 × 512 tokens).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_parts(logits, targets)?.get(0)
}

/// [`cross_entropy`] with the per-row log-sum-exp: `(2, rows)`, `[loss; lse]` (the backward
/// needs only the logits and the log-sum-exp).
pub(crate) fn cross_entropy_parts(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "cross_entropy: targets {:?} ({:?}) for {rows} rows of logits; expected u32 [{rows}]",
            targets.shape(),
            targets.dtype()
        )
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

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

// ---------------------------------------------------------------------------------------------
// Backward functions, for the ops' own `bwd` and for the model's hand-written backward
// (`model::transformer::backward`), which calls them without building a graph.

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

/// `∂logits` of [`cross_entropy`] given the rows' log-sum-exp (from [`cross_entropy_parts`])
/// and the per-row loss gradient.
pub(crate) fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    grad_loss: &Tensor,
) -> Result<Tensor> {
    let packed = Tensor::stack(
        &[&grad_loss.to_dtype(DType::F32)?, &lse.to_dtype(DType::F32)?],
        0,
    )?;
    logits
        .contiguous()?
        .apply_op3_no_bwd(&targets.contiguous()?, &packed, &CrossEntropyBackward)
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

// ---------------------------------------------------------------------------------------------
// CPU storage helpers.

/// The contiguous values of a float storage, widened to f32.
fn cpu_values(storage: &CpuStorage, layout: &Layout, op: &str) -> Result<Vec<f32>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(match storage {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F64(v) => v[start..end].iter().map(|&x| x as f32).collect(),
        other => candle_core::bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// f32 values stored in `dtype` (rounded to nearest).
fn cpu_storage(values: Vec<f32>, dtype: DType, op: &str) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(values.into_iter().map(f64::from).collect()),
        other => candle_core::bail!("{op}: unsupported dtype {other:?}"),
    })
}

/// Rounds an f32 to `dtype` and back, as a kernel storing an intermediate in `dtype` does.
fn round_to(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::BF16 => |x| bf16::from_f32(x).to_f32(),
        DType::F16 => |x| f16::from_f32(x).to_f32(),
        _ => |x| x,
    }
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1).max(1)
}

// ---------------------------------------------------------------------------------------------
// CUDA helpers.

/// The kernel `root_<dtype of T>` of the engine's module on `dev` (loaded once per device).
/// A macro because candle does not export the function handle's type.
#[cfg(feature = "cuda")]
macro_rules! engine_func {
    ($dev:expr, $t:ty, $root:expr) => {
        $dev.get_or_load_custom_func(
            &candle_core::cuda_backend::kernel_name::<$t>($root),
            gpu::MODULE,
            gpu::PTX,
        )
    };
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig,
    };
    use candle_core::{Layout, Result};

    /// The PTX of `kernels/engine.cu`, compiled by the build script.
    pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/engine.ptx"));

    /// The name the engine's module is cached under in each device.
    pub(super) const MODULE: &str = "lorasweep_engine";

    /// The part of `slice` that `layout` covers, which must be contiguous.
    pub(super) fn view<'a, T: DeviceRepr>(
        slice: &'a CudaSlice<T>,
        layout: &Layout,
        op: &str,
    ) -> Result<CudaView<'a, T>> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(slice.slice(start..end)),
            None => candle_core::bail!("{op}: input must be contiguous"),
        }
    }

    /// Threads per block for a row kernel over `cols` columns.
    pub(super) fn row_block(cols: usize) -> u32 {
        (cols.div_ceil(32) * 32).clamp(32, 256) as u32
    }

    /// `blocks` one-dimensional blocks of `threads` threads, no dynamic shared memory.
    pub(super) fn launch(blocks: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A grid-stride launch over `n` elements.
    pub(super) fn elementwise(n: usize) -> LaunchConfig {
        launch(n.div_ceil(256).clamp(1, 65_535 * 8), 256)
    }

    /// One block of 1,024 threads per row (rows as long as a vocabulary).
    pub(super) fn wide_rows(rows: usize) -> LaunchConfig {
        launch(rows, 1024)
    }

    /// One block per row.
    pub(super) fn rows(rows: usize, cols: usize) -> LaunchConfig {
        launch(rows, row_block(cols))
    }
}

#[cfg(feature = "cuda")]
fn cuda_storage(slice: CudaStorageSlice, device: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: device.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax over attention scores.

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

// ---------------------------------------------------------------------------------------------
// RMSNorm.

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

// ---------------------------------------------------------------------------------------------
// Heads: split, merge and RoPE.

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

// ---------------------------------------------------------------------------------------------
// Bias.

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

// ---------------------------------------------------------------------------------------------
// LoRA branch.

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

// ---------------------------------------------------------------------------------------------
// SwiGLU.

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

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

/// `(logits, targets)` → `[loss; lse]` (`2 × rows`, f32): the per-row loss and log-sum-exp.
struct CrossEntropy;

/// The targets of a cross-entropy as row indices, checked against the vocabulary.
fn cpu_targets(targets: &CpuStorage, layout: &Layout, cols: usize) -> Result<Vec<usize>> {
    let (CpuStorage::U32(values), Some((start, end))) = (targets, layout.contiguous_offsets())
    else {
        candle_core::bail!("cross_entropy: targets must be contiguous u32")
    };
    values[start..end]
        .iter()
        .map(|&t| {
            let t = t as usize;
            if t < cols {
                Ok(t)
            } else {
                candle_core::bail!("cross_entropy: target {t} is outside the {cols} logits")
            }
        })
        .collect()
}

/// `log Σ exp(x)` of a row, computed from its maximum.
fn row_lse(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln() + max
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_l: &Layout,
        targets: &CpuStorage,
        targets_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(logits_l);
        let targets = cpu_targets(targets, targets_l, cols)?;
        let values = cpu_values(logits, logits_l, self.name())?;
        let rows = targets.len();
        let mut out = vec![0f32; 2 * rows];
        for (i, (row, &t)) in values.chunks(cols).zip(&targets).enumerate() {
            let lse = row_lse(row);
            out[i] = lse - row[t];
            out[rows + i] = lse;
        }
        Ok((CpuStorage::F32(out), Shape::from((2, rows))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &CudaStorage,
        logits_l: &Layout,
        targets: &CudaStorage,
        targets_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = logits.device();
        let cols = last_dim(logits_l);
        let rows = logits_l.shape().elem_count() / cols;
        let targets = gpu::view(targets.as_cuda_slice::<u32>()?, targets_l, self.name())?;
        fn launch<T: DeviceRepr + WithDType>(
            dev: &CudaDevice,
            logits: &CudaSlice<T>,
            layout: &Layout,
            targets: &CudaView<'_, u32>,
            rows: usize,
            cols: usize,
        ) -> Result<CudaSlice<f32>> {
            let logits = gpu::view(logits, layout, "cross_entropy")?;
            let func = engine_func!(dev, T, "cross_entropy_fwd")?;
            // SAFETY: each block writes its row's loss and log-sum-exp.
            let out = unsafe { dev.alloc::<f32>(2 * rows)? };
            let mut builder = func.builder();
            builder.arg(&logits);
            builder.arg(targets);
            builder.arg(&out);
            candle_core::builder_arg!(builder, rows as i32, cols as i32);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(gpu::wide_rows(rows)) }.w()?;
            Ok(out)
        }
        let out = match &logits.slice {
            CudaStorageSlice::F32(s) => launch(dev, s, logits_l, &targets, rows, cols)?,
            CudaStorageSlice::BF16(s) => launch(dev, s, logits_l, &targets, rows, cols)?,
            CudaStorageSlice::F16(s) => launch(dev, s, logits_l, &targets, rows, cols)?,
            _ => candle_core::bail!("cross_entropy: unsupported dtype {:?}", logits.dtype()),
        };
        Ok((
            cuda_storage(CudaStorageSlice::F32(out), dev),
            Shape::from((2, rows)),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        parts: &Tensor,
        grad_parts: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the loss row is used downstream; the log-sum-exp row is for this backward.
        let grad = cross_entropy_backward(logits, targets, &parts.get(1)?, &grad_parts.get(0)?)?;
        Ok((Some(grad), None))
    }
}

/// `(logits, targets, [∂loss; lse])` → `∂logits`.
struct CrossEntropyBackward;

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_l: &Layout,
        targets: &CpuStorage,
        targets_l: &Layout,
        packed: &CpuStorage,
        packed_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(logits_l);
        let targets = cpu_targets(targets, targets_l, cols)?;
        let packed = cpu_values(packed, packed_l, self.name())?;
        let rows = targets.len();
        let mut values = cpu_values(logits, logits_l, self.name())?;
        for (i, (row, &t)) in values.chunks_mut(cols).zip(&targets).enumerate() {
            let (g, lse) = (packed[i], packed[rows + i]);
            for (j, v) in row.iter_mut().enumerate() {
                let onehot = if j == t { 1.0 } else { 0.0 };
                *v = g * ((*v - lse).exp() - onehot);
            }
        }
        Ok((
            cpu_storage(values, logits.dtype(), self.name())?,
            logits_l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &CudaStorage,
        logits_l: &Layout,
        targets: &CudaStorage,
        targets_l: &Layout,
        packed: &CudaStorage,
        packed_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = logits.device();
        let cols = last_dim(logits_l);
        let rows = logits_l.shape().elem_count() / cols;
        let targets = gpu::view(targets.as_cuda_slice::<u32>()?, targets_l, self.name())?;
        let packed = gpu::view(packed.as_cuda_slice::<f32>()?, packed_l, self.name())?;
        fn launch<T: DeviceRepr + WithDType>(
            dev: &CudaDevice,
            logits: &CudaSlice<T>,
            layout: &Layout,
            targets: &CudaView<'_, u32>,
            packed: &CudaView<'_, f32>,
            rows: usize,
            cols: usize,
        ) -> Result<CudaSlice<T>> {
            let logits = gpu::view(logits, layout, "cross_entropy backward")?;
            let func = engine_func!(dev, T, "cross_entropy_bwd")?;
            // SAFETY: every element of every row is written.
            let grad = unsafe { dev.alloc::<T>(rows * cols)? };
            let mut builder = func.builder();
            builder.arg(&logits);
            builder.arg(targets);
            builder.arg(packed);
            builder.arg(&grad);
            candle_core::builder_arg!(builder, rows as i32, cols as i32);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(gpu::wide_rows(rows)) }.w()?;
            Ok(grad)
        }
        let out = match &logits.slice {
            CudaStorageSlice::F32(s) => {
                CudaStorageSlice::F32(launch(dev, s, logits_l, &targets, &packed, rows, cols)?)
            }
            CudaStorageSlice::BF16(s) => {
                CudaStorageSlice::BF16(launch(dev, s, logits_l, &targets, &packed, rows, cols)?)
            }
            CudaStorageSlice::F16(s) => {
                CudaStorageSlice::F16(launch(dev, s, logits_l, &targets, &packed, rows, cols)?)
            }
            _ => candle_core::bail!("cross_entropy: unsupported dtype {:?}", logits.dtype()),
        };
        Ok((cuda_storage(out, dev), logits_l.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW.

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

// ---------------------------------------------------------------------------------------------
// Checking the kernels against the composed ops.

/// One comparison made by [`check`]: an output or gradient of a fused op against candle's
/// composed ops on the CPU in f32, from the same inputs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Agreement {
    /// The op and case, e.g. `rms_norm`.
    pub op: String,
    /// Which tensor: `output` or `grad <input>`.
    pub tensor: String,
    /// Largest absolute difference.
    pub max_abs_diff: f64,
    /// `max_abs_diff` over the reference's largest magnitude.
    pub rel_diff: f64,
    /// The largest `rel_diff` accepted for the dtype.
    pub tolerance: f64,
}

impl Agreement {
    /// Whether the difference is within tolerance.
    pub fn ok(&self) -> bool {
        self.rel_diff <= self.tolerance
    }
}

/// Runs every fused op on `device` in `dtype` (AdamW always in f32) on seeded random inputs,
/// forward and backward, and compares outputs and gradients with candle's composed ops on the
/// CPU in f32 from the same (rounded) inputs.
pub fn check(device: &Device, dtype: DType) -> Result<Vec<Agreement>> {
    use rand::SeedableRng;
    let tolerance = match dtype {
        DType::F32 | DType::F64 => 1e-4,
        DType::F16 => 5e-3,
        _ => 3e-2,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED_CAFE);
    let mut randn = |dims: &[usize], mean: f32, std: f32| -> Result<Tensor> {
        use rand_distr::Distribution;
        let normal = rand_distr::Normal::new(mean, std).expect("positive std");
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        // Rounded to the dtype under test, so both sides start from the same values.
        Tensor::from_vec(values, dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)
    };
    let mut found = Vec::new();

    // Attention probabilities: a short case (one warp per row) and a long one (several).
    for (name, (b, kv, groups, t, offset, d)) in [
        ("causal_attention_probs", (2, 2, 2, 12, 3, 16)),
        ("causal_attention_probs long rows", (1, 1, 2, 300, 0, 8)),
        ("causal_attention_probs 700 keys", (1, 1, 1, 700, 0, 8)),
        ("causal_attention_probs 1100 keys", (1, 1, 1, 1100, 0, 8)),
    ] {
        let q = randn(&[b, kv, groups * t, d], 0.0, 1.0)?;
        let k = randn(&[b, kv, t + offset, d], 0.0, 1.0)?;
        let w = randn(&[b, kv, groups * t, t + offset], 0.0, 1.0)?;
        let scale = 1.0 / (d as f64).sqrt();
        let fused = |x: &[Tensor]| causal_attention_probs(&x[0], &x[1], scale, t, offset);
        let composed = |x: &[Tensor]| {
            let rows = groups * t;
            let cols = t + offset;
            let mask: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let (r, j) = (i / cols, i % cols);
                    if j <= r % t + offset {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (rows, cols), x[0].device())?;
            let scores = (x[0].matmul(&x[1].t()?)? * scale)?.broadcast_add(&mask)?;
            candle_nn::ops::softmax(&scores, D::Minus1)
        };
        let inputs = [q, k];
        compare(
            name,
            &["q", "k"],
            &inputs,
            &w,
            (fused, composed),
            device,
            dtype,
            tolerance,
            &mut found,
        )?;
    }

    let x = randn(&[3, 5, 600], 0.5, 2.0)?;
    let gain = randn(&[600], 1.0, 0.2)?;
    let w = randn(&[3, 5, 600], 0.0, 1.0)?;
    compare(
        "rms_norm",
        &["x"],
        &[x, gain],
        &w,
        (
            |x: &[Tensor]| rms_norm(&x[0], &x[1], 1e-5),
            |x: &[Tensor]| crate::ops::rms_norm(&x[0], &x[1], 1e-5),
        ),
        device,
        dtype,
        tolerance,
        &mut found,
    )?;

    let x = randn(&[2, 3, 10, 16], 0.0, 1.0)?;
    let angles = randn(&[10, 8], 0.0, 3.0)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let w = randn(&[2, 3, 10, 16], 0.0, 1.0)?;
    compare(
        "rope",
        &["x"],
        &[x, cos, sin],
        &w,
        (
            |x: &[Tensor]| rope(&x[0], &x[1], &x[2]),
            |x: &[Tensor]| crate::ops::rope(&x[0], &x[1], &x[2]),
        ),
        device,
        dtype,
        tolerance,
        &mut found,
    )?;

    // Heads: a projection's output split into grouped heads (rotated for q and k, not for v),
    // and attention's output merged back.
    let (b, t, heads, d) = (2, 10, 4, 16);
    let angles = randn(&[t, d / 2], 0.0, 3.0)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let x = randn(&[b, t, heads * d], 0.0, 1.0)?;
    let w = randn(&[b, 2, 2 * t, d], 0.0, 1.0)?;
    for rotate in [true, false] {
        let name = if rotate {
            "split_heads + rope"
        } else {
            "split_heads"
        };
        let (c, s) = (cos.clone(), sin.clone());
        let (c2, s2) = (cos.clone(), sin.clone());
        compare(
            name,
            &["x"],
            std::slice::from_ref(&x),
            &w,
            (
                move |x: &[Tensor]| {
                    let (c, s) = (c.to_device(x[0].device())?, s.to_device(x[0].device())?);
                    split_heads(&x[0], heads, &c, &s, rotate, &[b, 2, 2 * t, d])
                },
                move |x: &[Tensor]| {
                    let split = x[0]
                        .reshape((b, t, heads, d))?
                        .transpose(1, 2)?
                        .contiguous()?;
                    let split = if rotate {
                        crate::ops::rope(&split, &c2, &s2)?
                    } else {
                        split
                    };
                    split.reshape((b, 2, 2 * t, d))
                },
            ),
            device,
            dtype,
            tolerance,
            &mut found,
        )?;
    }
    let x = randn(&[b, heads, t, d], 0.0, 1.0)?;
    let w = randn(&[b, t, heads * d], 0.0, 1.0)?;
    compare(
        "merge_heads",
        &["x"],
        &[x],
        &w,
        (
            |x: &[Tensor]| {
                let (c, s) = (cos.to_device(x[0].device())?, sin.to_device(x[0].device())?);
                merge_heads(&x[0], b, heads, t, &c, &s)
            },
            |x: &[Tensor]| x[0].transpose(1, 2)?.reshape((b, t, heads * d)),
        ),
        device,
        dtype,
        tolerance,
        &mut found,
    )?;

    // LoRA branch: f32 master weights, x in the dtype under test (kept in f32 here: the
    // weights' own rounding is not the op's).
    let x = randn(&[2, 5, 24], 0.0, 1.0)?;
    let a = randn(&[4, 24], 0.0, 0.3)?;
    let bw = randn(&[40, 4], 0.0, 0.3)?;
    let w = randn(&[2, 5, 40], 0.0, 1.0)?;
    compare(
        "lora_branch",
        &["x", "A", "B"],
        &[x, a, bw],
        &w,
        (
            |x: &[Tensor]| lora_branch(&x[0], &x[1], &x[2], 2.0),
            |x: &[Tensor]| {
                let low = x[0].broadcast_matmul(&x[1].t()?)?;
                low.broadcast_matmul(&x[2].t()?)? * 2.0
            },
        ),
        device,
        dtype,
        tolerance,
        &mut found,
    )?;

    let x = randn(&[3, 7, 40], 0.0, 1.0)?;
    let bias = randn(&[40], 0.0, 1.0)?;
    let w = randn(&[3, 7, 40], 0.0, 1.0)?;
    compare(
        "add_bias",
        &["x"],
        &[x, bias],
        &w,
        (
            |x: &[Tensor]| add_bias(&x[0], &x[1]),
            |x: &[Tensor]| x[0].broadcast_add(&x[1]),
        ),
        device,
        dtype,
        tolerance,
        &mut found,
    )?;

    // 280 elements go in 16-byte packs; 21 cannot.
    for (name, dims) in [("swiglu", [4, 70]), ("swiglu odd size", [3, 7])] {
        let gate = randn(&dims, 0.0, 3.0)?;
        let up = randn(&dims, 0.0, 1.0)?;
        let w = randn(&dims, 0.0, 1.0)?;
        compare(
            name,
            &["gate", "up"],
            &[gate, up],
            &w,
            (
                |x: &[Tensor]| swiglu(&x[0], &x[1]),
                |x: &[Tensor]| crate::ops::swiglu(&x[0], &x[1]),
            ),
            device,
            dtype,
            tolerance,
            &mut found,
        )?;
    }

    // Cross-entropy over a row longer than a block, targets spread over the vocabulary.
    let (rows, vocab) = (6, 3000);
    let logits = randn(&[rows, vocab], 0.0, 4.0)?;
    let targets: Vec<u32> = (0..rows as u32).map(|r| r * 997 % vocab as u32).collect();
    let targets = Tensor::from_vec(targets, rows, &Device::Cpu)?;
    let w = randn(&[rows], 0.0, 1.0)?;
    let on_device = targets.to_device(device)?;
    compare(
        "cross_entropy",
        &["logits"],
        &[logits],
        &w,
        (
            |x: &[Tensor]| cross_entropy(&x[0], &on_device),
            |x: &[Tensor]| {
                let log_probs = candle_nn::ops::log_softmax(&x[0], D::Minus1)?;
                log_probs
                    .gather(&targets.unsqueeze(1)?, 1)?
                    .squeeze(1)?
                    .neg()
            },
        ),
        device,
        dtype,
        tolerance,
        &mut found,
    )?;

    // AdamW in f32 whatever the dtype: adapters and their moments are kept in f32.
    let p = randn(&[1000], 0.0, 1.0)?;
    let g = randn(&[1000], 0.0, 1.0)?;
    let m = randn(&[1000], 0.0, 0.1)?;
    let v = randn(&[1000], 0.0, 0.1)?.abs()?;
    let hyper = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        clip: 0.5,
    };
    let on_device: Vec<Tensor> = [&p, &g, &m, &v]
        .iter()
        .map(|t| t.to_device(device))
        .collect::<Result<_>>()?;
    let got = adamw(
        &on_device[0],
        &on_device[1],
        &on_device[2],
        &on_device[3],
        hyper,
    )?;
    let want = adamw_composed(&p, &g, &m, &v, hyper)?;
    for (name, a, b) in [
        ("p", &got.0, &want.0),
        ("m", &got.1, &want.1),
        ("v", &got.2, &want.2),
    ] {
        found.push(agreement("adamw", name, a, b, 1e-5)?);
    }
    Ok(found)
}

/// The output of `f` on `inputs` (moved to `device`, cast to `dtype`) and the gradients of
/// `Σ w·output` with respect to the first `grads` inputs, all back on the CPU in f32.
fn forward_backward(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    w: &Tensor,
    grads: usize,
    device: &Device,
    dtype: DType,
) -> Result<Vec<Tensor>> {
    let mut vars = Vec::new();
    let mut moved = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        let x = x.to_device(device)?.to_dtype(dtype)?;
        if i < grads {
            let var = candle_core::Var::from_tensor(&x)?;
            moved.push(var.as_tensor().clone());
            vars.push(var);
        } else {
            moved.push(x);
        }
    }
    let y = f(&moved)?;
    let loss = (y.to_dtype(DType::F32)? * w.to_device(device)?)?.sum_all()?;
    let store = loss.backward()?;
    let mut out = vec![y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?];
    for var in &vars {
        let g = store
            .get(var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached an input".into()))?;
        out.push(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn compare<F, G>(
    op: &str,
    grad_names: &[&str],
    inputs: &[Tensor],
    w: &Tensor,
    (fused, composed): (F, G),
    device: &Device,
    dtype: DType,
    tolerance: f64,
    found: &mut Vec<Agreement>,
) -> Result<()>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
    G: Fn(&[Tensor]) -> Result<Tensor>,
{
    let got = forward_backward(fused, inputs, w, grad_names.len(), device, dtype)?;
    let want = forward_backward(
        composed,
        inputs,
        w,
        grad_names.len(),
        &Device::Cpu,
        DType::F32,
    )?;
    let names =
        std::iter::once("output".to_string()).chain(grad_names.iter().map(|n| format!("grad {n}")));
    for ((name, a), b) in names.zip(&got).zip(&want) {
        found.push(agreement(op, &name, a, b, tolerance)?);
    }
    Ok(())
}

fn agreement(
    op: &str,
    tensor: &str,
    got: &Tensor,
    want: &Tensor,
    tolerance: f64,
) -> Result<Agreement> {
    let (max_abs_diff, rel_diff) = max_difference(got, want)?;
    Ok(Agreement {
        op: op.to_string(),
        tensor: tensor.to_string(),
        max_abs_diff,
        rel_diff,
        tolerance,
    })
}

/// The largest element-wise `|got − want|`, and that over the largest `|want|`: the measure of
/// every comparison here and in the hand-written backward's tests. Computed in f32 on the CPU.
pub(crate) fn max_difference(got: &Tensor, want: &Tensor) -> Result<(f64, f64)> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = want.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let max_abs_diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok((max_abs_diff, max_abs_diff / scale.max(1e-12)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fused_op_matches_the_composed_ops_on_the_cpu_forward_and_backward() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let found = check(&Device::Cpu, dtype)?;
            assert_eq!(found.len(), 39, "{found:?}");
            for a in &found {
                assert!(a.ok(), "{dtype:?}: {a:?}");
                assert!(a.max_abs_diff.is_finite(), "{dtype:?}: {a:?}");
            }
        }
        Ok(())
    }

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

    #[test]
    fn bad_shapes_are_refused_with_the_op_named() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
        let err = rms_norm(&x, &Tensor::ones(5, DType::F32, &dev).unwrap(), 1e-5).unwrap_err();
        assert!(err.to_string().contains("rms_norm"), "{err}");
        let err = swiglu(&x, &Tensor::zeros((2, 5), DType::F32, &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("swiglu"), "{err}");
        let q = Tensor::zeros((1, 1, 6, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 6, 8), DType::F32, &dev).unwrap();
        let err = causal_attention_probs(&q, &k, 1.0, 6, 0).unwrap_err();
        assert!(err.to_string().contains("causal_attention_probs"), "{err}");
        let p = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let half = Tensor::zeros(4, DType::BF16, &dev).unwrap();
        let hyper = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
            clip: 1.0,
        };
        let err = adamw(&p, &half, &p, &p, hyper).unwrap_err();
        assert!(err.to_string().contains("f32"), "{err}");
        let logits = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let outside = Tensor::new(&[1u32, 5], &dev).unwrap();
        let err = cross_entropy(&logits, &outside).unwrap_err();
        assert!(
            err.to_string().contains("target 5 is outside the 5 logits"),
            "{err}"
        );
        let err = cross_entropy(&logits, &Tensor::new(&[1u32], &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("cross_entropy: targets"), "{err}");
    }
}

#[cfg(test)]
mod model_tests {
    use candle_core::{DType, Device, Tensor};

    use crate::bench::{geometry, random_model};
    use crate::model::KvCache;
    use crate::probe::{attach_probe_adapters, ProbeSettings};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// The whole model (grouped-query attention, adapters in every module) computes the same
    /// loss, adapter gradients and cached-decoding logits with the fused ops as with candle's
    /// composed ones.
    #[test]
    fn the_model_with_fused_ops_matches_the_composed_model() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let config = geometry("tiny").expect("tiny geometry");
        assert!(
            config.num_heads > config.num_kv_heads,
            "exercise grouped queries"
        );
        let mut model = random_model(&config, DType::F32, &device, 7)?;
        let settings = ProbeSettings {
            rank: 4,
            ..Default::default()
        };
        attach_probe_adapters(&mut model, &settings).expect("adapters attach");
        let ids: Vec<u32> = (0..2 * 10).map(|i| (i * 37 % 500) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, 10), &device)?;
        let input = ids.narrow(1, 0, 9)?.contiguous()?;
        let target = ids.narrow(1, 1, 9)?.contiguous()?;
        let weights = Tensor::ones((2, 9), DType::F32, &device)?;

        let mut results = Vec::new();
        for fused in [true, false] {
            model.set_fused_kernels(fused);
            let loss = model.loss(&input, &target, &weights)?;
            let store = loss.backward()?;
            let grads: Vec<Tensor> = model
                .adapters()
                .iter()
                .map(|(_, a)| {
                    store
                        .get(a.b().as_tensor())
                        .expect("B has a gradient")
                        .clone()
                })
                .collect();
            // Decoding with a cache: the prompt, then two tokens one at a time.
            let mut cache = KvCache::new();
            let mut logits = vec![model.forward(&input.narrow(1, 0, 6)?, 0, Some(&mut cache))?];
            for pos in 6..8 {
                let next = input.narrow(1, pos, 1)?.contiguous()?;
                logits.push(model.forward(&next, pos, Some(&mut cache))?);
            }
            results.push((loss.to_scalar::<f32>()?, grads, logits));
        }
        let (fused, composed) = (&results[0], &results[1]);
        assert!(
            (fused.0 - composed.0).abs() / composed.0.abs() < 1e-5,
            "loss {} vs {}",
            fused.0,
            composed.0
        );
        assert_eq!(fused.1.len(), config.num_layers * 7);
        for (i, (a, b)) in fused.1.iter().zip(&composed.1).enumerate() {
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(scale > 0.0, "adapter {i}: the gradient is zero");
            assert!(max_rel(a, b) < 1e-4, "adapter {i}: {}", max_rel(a, b));
        }
        for (i, (a, b)) in fused.2.iter().zip(&composed.2).enumerate() {
            assert!(max_rel(a, b) < 1e-4, "decode step {i}: {}", max_rel(a, b));
        }
        Ok(())
    }
}
