//! Cross-entropy: [`cross_entropy`] and [`cross_entropy_parts`] (per-row loss and
//! log-sum-exp) and the backward ([`cross_entropy_backward`]) that needs only the logits and the
//! log-sum-exp, the CUDA launches of the `cross_entropy_*` kernels and the CPU reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values, last_dim};

#[cfg(feature = "cuda")]
use super::{cuda_storage, gpu};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, CudaStorage, WithDType};

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
