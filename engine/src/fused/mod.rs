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
//! - [`rms_norm`](fn@rms_norm), [`rope`] and [`swiglu`](fn@swiglu): one kernel each way, no
//!   gradient for the frozen gain or the position tables;
//! - [`adamw`](fn@adamw): the whole AdamW update of one parameter in one kernel.
//!
//! Every op has a CPU implementation, which is the reference the CUDA kernels
//! (`kernels/engine.cu`) are compared with by [`check`] (run on the GPU machine by
//! `lorasweep bench kernels`), and which CI tests against candle's composed ops, forward and
//! backward.
//!
//! One file per kernel family, each with its op forward and backward, the CUDA launch and the
//! CPU reference (and that family's unit tests): `attention.rs` (the causal softmax),
//! `heads.rs` (split, merge and RoPE), `rms_norm.rs`, `swiglu.rs`, `cross_entropy.rs`,
//! `bias.rs`, `lora.rs` and `adamw.rs`. This file re-exports their entry points and holds what
//! they share: the CPU storage helpers, the CUDA module and launch configurations, and the
//! [`check`] of every op against candle's composed ops.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, D};
use half::{bf16, f16};

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::CudaStorageSlice;
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage};

// Defined before the family modules so that their CUDA code can use it; `gpu` resolves where
// the macro is used (each family file imports `super::gpu`).

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

mod adamw;
mod attention;
mod bias;
mod cross_entropy;
mod heads;
mod lora;
mod rms_norm;
mod swiglu;

pub use adamw::{adamw, adamw_composed, AdamW};
pub use attention::causal_attention_probs;
pub use bias::add_bias;
pub use cross_entropy::cross_entropy;
pub use heads::{merge_heads, rope, split_heads};
pub use lora::lora_branch;
pub use rms_norm::rms_norm;
pub use swiglu::swiglu;

// Backward functions, for the ops' own `bwd` and for the model's hand-written backward
// (`model::transformer::backward`), which calls them without building a graph.
pub(crate) use attention::causal_attention_probs_backward;
pub(crate) use cross_entropy::{cross_entropy_backward, cross_entropy_parts};
pub(crate) use heads::split_heads_backward;
pub(crate) use lora::lora_branch_backward;
pub(crate) use rms_norm::rms_norm_backward;
pub(crate) use swiglu::swiglu_backward;

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

/// Whether training and the probe use these ops: on every device, unless [`force_composed`]
/// said otherwise. Their point on the CPU is the hand-written backward they enable
/// (`model::transformer::backward`): it keeps a few tensors per layer where candle's autograd
/// keeps every intermediate of the composed ops (and zero-started gradients of their
/// constants), so a step needs a fraction of the memory and, single-threaded element-wise
/// ops and all, less time (SmolLM2-135M, one 512-token row, 2 cores: 4.3 GB and 20 s composed,
/// 1.3 GB and 8.7 s fused).
pub fn on_for_training() -> bool {
    !FORCE_COMPOSED.load(Ordering::Relaxed)
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
