//! Low-rank adapters and their variants, as PEFT defines them.
//!
//! An adapter on a frozen projection `W` (`d_out × d_in`) learns `ΔW = s·B·A` with `A`
//! (`r × d_in`), `B` (`d_out × r`):
//!
//! | variant    | scale `s` | init                                                   | forward |
//! |------------|-----------|--------------------------------------------------------|---------|
//! | `lora`     | `α/r`     | `A` kaiming-uniform(a=√5) = U(±1/√d_in), `B = 0`        | `Wx + s·BAx` |
//! | `rslora`   | `α/√r`    | as lora                                                 | as lora |
//! | `loraplus` | `α/r`     | as lora; the optimizer gives `B` `ratio ×` the lr of `A` | as lora |
//! | `dora`     | `α/r`     | as lora, magnitude `m = ‖W‖` per output row            | `m ⊙ (W + sBA)x / ‖W + sBA‖` with the norm detached |
//! | `pissa`    | `α/r`     | `A = √S_r Vᵀ_r / √s`, `B = U_r √S_r / √s` (top `r` singular triplets); base becomes `W − sBA` | as lora |
//! | `milora`   | `α/r`     | as pissa with the `r` *smallest* singular triplets       | as lora |
//!
//! All adapter parameters are f32 (they are cast to the compute dtype in the forward pass).

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, ModuleId, ModuleKind};

pub use lorasweep_contract::{AInit, Variant};

/// Settings shared by every adapter of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSettings {
    /// Which variant.
    pub variant: Variant,
    /// Rank `r`.
    pub rank: usize,
    /// `α`.
    pub alpha: f64,
    /// Init of `A` for lora-style variants.
    pub a_init: AInit,
    /// Seed of the random init.
    pub seed: u64,
}

impl AdapterSettings {
    /// The scale `s`: `α/√r` for rsLoRA, `α/r` otherwise.
    pub fn scale(&self) -> f64 {
        scale_for(self.variant, self.alpha, self.rank)
    }
}

/// `α/√r` for rsLoRA, `α/r` otherwise.
pub fn scale_for(variant: Variant, alpha: f64, rank: usize) -> f64 {
    match variant {
        Variant::RsLora => alpha / (rank as f64).sqrt(),
        _ => alpha / rank as f64,
    }
}

/// Errors setting up adapters.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A rank that the module cannot hold.
    #[error(
        "rank {rank} is invalid for {module} ({d_out}×{d_in}): it must be between 1 and {max}"
    )]
    BadRank {
        /// The module.
        module: String,
        /// Requested rank.
        rank: usize,
        /// Output width.
        d_out: usize,
        /// Input width.
        d_in: usize,
        /// Largest allowed rank.
        max: usize,
    },
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// Which optimizer group a parameter belongs to (LoRA+ gives `B` its own learning rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamGroup {
    /// `lora_A`.
    A,
    /// `lora_B`.
    B,
    /// DoRA's magnitude vector.
    Magnitude,
}

/// What the PAGE probe needs to see of a forward pass: the module's input, and a tap whose
/// gradient is the loss gradient at the module's output.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Module input `x`, `(batch, seq, d_in)`.
    pub input: Tensor,
    /// A zero `(batch, seq, d_out)` [`Var`] added to the adapter branch. candle's backward pass
    /// drops the gradients of intermediate tensors once used and keeps those of variables, so
    /// the gradient of this tap is how `δ` (the gradient at the branch's output, which for
    /// every variant but DoRA is the module's output) survives the backward pass.
    pub output_tap: Tensor,
}

/// One trainable adapter on one projection.
#[derive(Debug)]
pub struct Adapter {
    variant: Variant,
    rank: usize,
    scale: f64,
    a: Var,
    b: Var,
    magnitude: Option<Var>,
    capture: Option<Capture>,
    /// Observer mode (the `act` rule): the forward adds nothing and records here the squared
    /// norm of its input at every position.
    input_norms: Option<Mutex<Option<Tensor>>>,
    /// For inference only: the forward reads A, B and the magnitude detached, so it builds no
    /// autograd graph (which the KV cache would otherwise keep alive, step after step).
    inference: bool,
}

/// What a capturing adapter keeps for the probe's `expected` estimator.
#[derive(Debug, Default)]
struct Capture {
    /// The last forward under autograd: its input and output tap (the backward's gradient of
    /// the tap is `δ`).
    forward: Mutex<Option<Captured>>,
    /// `G = Σ δᵀx`, the full weight gradient, summed over the passes of one
    /// [`Transformer::loss_and_grads`](crate::model::Transformer::loss_and_grads).
    weight_grad: Mutex<Option<Tensor>>,
}

impl Adapter {
    /// Creates the adapter for `weight` (`d_out × d_in`) and, for PiSSA/MiLoRA, the residual
    /// base weight `W − s·B·A` that must replace it.
    pub fn init(
        module: ModuleId,
        weight: &Tensor,
        rank: usize,
        settings: &AdapterSettings,
    ) -> Result<(Self, Option<Tensor>), AdapterError> {
        let (d_out, d_in) = weight.dims2()?;
        check_rank(module, rank, d_in, d_out)?;
        let device = weight.device();
        let scale = scale_for(settings.variant, settings.alpha, rank);
        let mut residual = None;
        let (a, b) = match settings.variant {
            Variant::Pissa | Variant::Milora => {
                let principal = settings.variant == Variant::Pissa;
                let (a, b, res) = svd_init(weight, rank, scale, principal)?;
                residual = Some(res);
                (a, b)
            }
            _ => {
                let a = sample_a(module, d_in, rank, settings.a_init, settings.seed, device)?;
                (a, Tensor::zeros((d_out, rank), DType::F32, device)?)
            }
        };
        let magnitude = if settings.variant == Variant::Dora {
            Some(Var::from_tensor(&row_norms(
                &weight.to_dtype(DType::F32)?,
            )?)?)
        } else {
            None
        };
        let adapter = Self {
            variant: settings.variant,
            rank,
            scale,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            magnitude,
            capture: None,
            input_norms: None,
            inference: false,
        };
        Ok((adapter, residual))
    }

    /// An adapter from given tensors (e.g. loaded from disk).
    pub fn from_parts(
        variant: Variant,
        scale: f64,
        a: Tensor,
        b: Tensor,
        magnitude: Option<Tensor>,
    ) -> Result<Self, AdapterError> {
        let rank = a.dim(0)?;
        Ok(Self {
            variant,
            rank,
            scale,
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            magnitude: magnitude
                .map(|m| Var::from_tensor(&m.to_dtype(DType::F32)?))
                .transpose()?,
            capture: None,
            input_norms: None,
            inference: false,
        })
    }

    /// The adapter for inference only (generation, evaluation): its forward tracks no
    /// gradient. Without this, every decoded token's activations stay reachable from the KV
    /// cache through the graph of A and B.
    pub fn for_inference(mut self) -> Self {
        self.inference = true;
        self
    }

    /// A, B and the DoRA magnitude as the forward reads them: detached for inference.
    fn factors(&self) -> (Tensor, Tensor, Option<Tensor>) {
        let read = |var: &Var| {
            if self.inference {
                var.as_tensor().detach()
            } else {
                var.as_tensor().clone()
            }
        };
        (
            read(&self.a),
            read(&self.b),
            self.magnitude.as_ref().map(read),
        )
    }

    /// The variant.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `lora_A`, `r × d_in`.
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// `lora_B`, `d_out × r`.
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// DoRA's magnitude, `d_out`.
    pub fn magnitude(&self) -> Option<&Var> {
        self.magnitude.as_ref()
    }

    /// Trainable parameters with their optimizer group. The PAGE probe trains nothing and
    /// only reads `B`'s gradient.
    pub fn parameters(&self) -> Vec<(ParamGroup, &Var)> {
        let mut params = vec![(ParamGroup::A, &self.a), (ParamGroup::B, &self.b)];
        if let Some(m) = &self.magnitude {
            params.push((ParamGroup::Magnitude, m));
        }
        params
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Makes [`Transformer::loss_and_grads`](crate::model::Transformer::loss_and_grads) also
    /// compute this module's full weight gradient `G = Σ δᵀx` (for the probe's `expected`
    /// estimator), read by [`weight_grad`](Self::weight_grad).
    pub fn enable_capture(&mut self) {
        self.capture = Some(Capture::default());
    }

    /// Whether capture is on.
    pub fn capturing(&self) -> bool {
        self.capture.is_some()
    }

    /// What the last forward pass under autograd recorded, if capture is on; taking it leaves
    /// nothing recorded (its tensors hold the pass's activations).
    pub fn take_captured(&self) -> Option<Captured> {
        self.capture
            .as_ref()
            .and_then(|c| c.forward.lock().ok().and_then(|mut slot| slot.take()))
    }

    /// With capture on: the full weight gradient `G` (`d_out × d_in`, f32) of the last
    /// [`Transformer::loss_and_grads`](crate::model::Transformer::loss_and_grads), summed over
    /// its passes.
    pub fn weight_grad(&self) -> Option<Tensor> {
        self.capture
            .as_ref()
            .and_then(|c| c.weight_grad.lock().ok().and_then(|slot| slot.clone()))
    }

    /// Forgets the weight gradient (a new batch starts).
    pub(crate) fn clear_weight_grad(&self) {
        if let Some(capture) = &self.capture {
            if let Ok(mut slot) = capture.weight_grad.lock() {
                *slot = None;
            }
        }
    }

    /// With capture on, adds `δᵀx` of one pass to the weight gradient, from the module's input
    /// `x` (`(…, d_in)`) and the loss gradient `δ` at its output (`(…, d_out)`); does nothing
    /// otherwise.
    pub(crate) fn add_weight_grad(
        &self,
        input: &Tensor,
        delta: &Tensor,
    ) -> candle_core::Result<()> {
        let Some(capture) = &self.capture else {
            return Ok(());
        };
        let d_in = input.dim(D::Minus1)?;
        let d_out = delta.dim(D::Minus1)?;
        let x = input.to_dtype(DType::F32)?.reshape(((), d_in))?;
        let delta = delta.to_dtype(DType::F32)?.reshape(((), d_out))?;
        let part = delta.t()?.matmul(&x)?;
        let mut slot = capture
            .weight_grad
            .lock()
            .map_err(|_| candle_core::Error::Msg("a weight-gradient lock was poisoned".into()))?;
        *slot = Some(match slot.take() {
            Some(sum) => (sum + part)?,
            None => part,
        });
        Ok(())
    }

    /// Makes the adapter an observer: from now on its forward adds nothing to the base (no
    /// branch, so no graph is built through it) and records the squared norm of its input at
    /// every position, detached (for the `act` placement rule, which needs no backward).
    pub fn enable_input_norms(&mut self) {
        self.input_norms = Some(Mutex::new(None));
    }

    /// The squared input norms of the last forward pass, `(batch, seq)` in f32, if observing.
    pub fn input_norms(&self) -> Option<Tensor> {
        self.input_norms
            .as_ref()
            .and_then(|slot| slot.lock().ok().and_then(|guard| guard.clone()))
    }

    /// Whether the forward is the plain low-rank branch added to the base (every variant but
    /// DoRA), and the probe is neither capturing nor observing it.
    pub fn plain_branch(&self) -> bool {
        self.capture.is_none() && self.input_norms.is_none() && self.magnitude.is_none()
    }

    /// [`forward`](Self::forward) with the low-rank branch as one fused op
    /// ([`crate::fused::lora_branch`]) where the variant allows: not for DoRA (its column norm
    /// needs the branch's weights composed) and not while the probe captures the branch.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        base: &Tensor,
        weight: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if !self.plain_branch() {
            return self.forward(x, base, weight);
        }
        let (a, b, _) = self.factors();
        let branch = crate::fused::lora_branch(x, &a, &b, self.scale)?;
        base + branch
    }

    /// Adds the adapter to `base = x·Wᵀ` (no bias). `weight` is the frozen weight (needed by
    /// DoRA's norm).
    pub fn forward(
        &self,
        x: &Tensor,
        base: &Tensor,
        weight: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if let Some(slot) = &self.input_norms {
            let norms = x
                .detach()
                .to_dtype(DType::F32)?
                .sqr()?
                .sum(candle_core::D::Minus1)?;
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(norms);
            }
            return Ok(base.clone());
        }
        let dtype = x.dtype();
        let (a_full, b_full, magnitude) = self.factors();
        let a = a_full.to_dtype(dtype)?;
        let b = b_full.to_dtype(dtype)?;
        // Rows flattened (plain matmuls, no broadcast copies of A and B in backward) and the
        // scale applied to the rank-r intermediate rather than the full-width output.
        let d_in = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / d_in.max(1);
        let low = (x.reshape((rows, d_in))?.matmul(&a.t()?)? * self.scale)?;
        let mut branch = low.matmul(&b.t()?)?.reshape(base.shape())?;
        if let Some(capture) = &self.capture {
            let tap = Var::zeros(branch.shape(), branch.dtype(), branch.device())?;
            branch = (branch + tap.as_tensor())?;
            if let Ok(mut slot) = capture.forward.lock() {
                *slot = Some(Captured {
                    input: x.clone(),
                    output_tap: tap.as_tensor().clone(),
                });
            }
        }
        let summed = (base + &branch)?;
        let Some(magnitude) = magnitude else {
            return Ok(summed);
        };
        // DoRA: the column norm of the adapted weight is treated as a constant (detached), as
        // the paper's section 4.3 and PEFT do, so no gradient flows through it.
        let delta = (b_full.matmul(&a_full)? * self.scale)?;
        let adapted = (weight.to_dtype(DType::F32)? + delta)?;
        let norm = row_norms(&adapted)?.detach();
        let ratio = magnitude.div(&norm)?.to_dtype(dtype)?;
        summed.broadcast_mul(&ratio)
    }

    /// The weight this adapter computes when folded into `weight`.
    pub fn merged_weight(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = weight.dtype();
        let delta = (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?;
        let adapted = (weight.to_dtype(DType::F32)? + delta)?;
        let merged = match &self.magnitude {
            Some(m) => {
                adapted.broadcast_mul(&m.as_tensor().div(&row_norms(&adapted)?)?.unsqueeze(1)?)?
            }
            None => adapted,
        };
        merged.to_dtype(dtype)
    }
}

/// Checks `1 ≤ rank ≤ min(d_in, d_out)`.
pub fn check_rank(
    module: ModuleId,
    rank: usize,
    d_in: usize,
    d_out: usize,
) -> Result<(), AdapterError> {
    let max = d_in.min(d_out);
    if rank == 0 || rank > max {
        return Err(AdapterError::BadRank {
            module: module.name(),
            rank,
            d_out,
            d_in,
            max,
        });
    }
    Ok(())
}

/// Trainable parameters of one adapter of `rank` on `module` for a variant.
pub fn adapter_parameter_count(
    config: &ModelConfig,
    module: ModuleId,
    rank: usize,
    variant: Variant,
) -> usize {
    let (d_in, d_out) = config.module_dims(module.kind);
    rank * (d_in + d_out) + if variant == Variant::Dora { d_out } else { 0 }
}

/// L2 norm of each row of a `d_out × d_in` matrix: a `d_out` vector.
fn row_norms(w: &Tensor) -> candle_core::Result<Tensor> {
    w.sqr()?.sum(D::Minus1)?.sqrt()
}

/// Deterministic per-module RNG: the run seed mixed with the module's identity.
fn module_rng(module: ModuleId, seed: u64) -> rand::rngs::StdRng {
    let kind = ModuleKind::ALL
        .iter()
        .position(|&k| k == module.kind)
        .unwrap_or(0) as u64;
    let mixed = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((module.layer as u64) << 8 | kind)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    rand::rngs::StdRng::seed_from_u64(mixed)
}

/// Draws `A` (`rank × d_in`, f32) from the chosen init, seeded per module.
pub fn sample_a(
    module: ModuleId,
    d_in: usize,
    rank: usize,
    init: AInit,
    seed: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut rng = module_rng(module, seed);
    let values: Vec<f32> = match init {
        AInit::Kaiming => {
            let bound = 1.0 / (d_in as f32).sqrt();
            (0..rank * d_in)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        }
        AInit::Gaussian => {
            let normal = rand_distr::Normal::new(0.0f32, 1.0 / rank as f32).expect("positive std");
            (0..rank * d_in).map(|_| rng.sample(normal)).collect()
        }
    };
    Tensor::from_vec(values, (rank, d_in), device)
}

/// PiSSA / MiLoRA init from the SVD `W = U S Vᵀ`: with the chosen `r` triplets,
/// `A = diag(√(S/s)) Vᵀ`, `B = U diag(√(S/s))`, so that `s·B·A = U S Vᵀ` restricted to them, and
/// the residual `W − s·B·A` becomes the frozen base.
fn svd_init(
    weight: &Tensor,
    rank: usize,
    scale: f64,
    principal: bool,
) -> Result<(Tensor, Tensor, Tensor), AdapterError> {
    let device = weight.device();
    let w32 = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (d_out, d_in) = w32.dims2()?;
    let values = w32.flatten_all()?.to_vec1::<f32>()?;
    let matrix =
        nalgebra::DMatrix::<f64>::from_row_iterator(d_out, d_in, values.iter().map(|&v| v as f64));
    let svd = matrix.svd(true, true);
    let (u, v_t) = (svd.u.expect("u requested"), svd.v_t.expect("v_t requested"));
    // nalgebra does not promise an order: sort singular values descending ourselves.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let chosen: Vec<usize> = if principal {
        order[..rank].to_vec()
    } else {
        order[order.len() - rank..].to_vec()
    };
    let mut a = vec![0f32; rank * d_in];
    let mut b = vec![0f32; d_out * rank];
    for (slot, &index) in chosen.iter().enumerate() {
        let root = (svd.singular_values[index] / scale).sqrt();
        for col in 0..d_in {
            a[slot * d_in + col] = (root * v_t[(index, col)]) as f32;
        }
        for row in 0..d_out {
            b[row * rank + slot] = (root * u[(row, index)]) as f32;
        }
    }
    let a = Tensor::from_vec(a, (rank, d_in), &Device::Cpu)?;
    let b = Tensor::from_vec(b, (d_out, rank), &Device::Cpu)?;
    let residual = (w32 - (b.matmul(&a)? * scale)?)?;
    Ok((
        a.to_device(device)?,
        b.to_device(device)?,
        residual.to_dtype(weight.dtype())?.to_device(device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_for_inference_builds_no_graph_and_computes_the_same() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.1, (6, 5), &device).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &device).unwrap();
        let base = x.broadcast_matmul(&weight.t().unwrap()).unwrap();
        for magnitude in [None, Some(Tensor::ones(6, DType::F32, &device).unwrap())] {
            let a = Tensor::randn(0f32, 0.3, (2, 5), &device).unwrap();
            let b = Tensor::randn(0f32, 0.3, (6, 2), &device).unwrap();
            let variant = if magnitude.is_some() {
                Variant::Dora
            } else {
                Variant::Lora
            };
            let trainable =
                Adapter::from_parts(variant, 2.0, a.clone(), b.clone(), magnitude.clone()).unwrap();
            let inference = Adapter::from_parts(variant, 2.0, a, b, magnitude)
                .unwrap()
                .for_inference();
            let tracked = trainable.forward(&x, &base, &weight).unwrap();
            let grads = tracked.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(trainable.a().as_tensor()).is_some());
            let plain = inference.forward(&x, &base, &weight).unwrap();
            let grads = plain.sum_all().unwrap().backward().unwrap();
            assert!(
                grads.get(inference.a().as_tensor()).is_none()
                    && grads.get(inference.b().as_tensor()).is_none(),
                "{variant}: the inference forward tracked A or B"
            );
            let difference = (tracked - plain).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(difference.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    fn settings(variant: Variant) -> AdapterSettings {
        AdapterSettings {
            variant,
            rank: 4,
            alpha: 8.0,
            a_init: AInit::Kaiming,
            seed: 7,
        }
    }

    fn module() -> ModuleId {
        ModuleId {
            layer: 1,
            kind: ModuleKind::DownProj,
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn setup(variant: Variant) -> (Tensor, Tensor, Adapter, Option<Tensor>) {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (12, 10), &device).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 10), &device).unwrap();
        let (adapter, residual) = Adapter::init(module(), &w, 4, &settings(variant)).unwrap();
        (w, x, adapter, residual)
    }

    #[test]
    fn lora_style_variants_start_as_the_base_model() {
        for variant in [
            Variant::Lora,
            Variant::RsLora,
            Variant::LoraPlus,
            Variant::Dora,
        ] {
            let (w, x, adapter, residual) = setup(variant);
            assert!(residual.is_none());
            let base = crate::ops::frozen_linear(&x, &w).unwrap();
            let out = adapter.forward(&x, &base, &w).unwrap();
            assert!(
                max_abs(&(out - &base).unwrap()) < 1e-5,
                "{variant:?} changes the output at init"
            );
            assert_eq!(
                max_abs(adapter.b().as_tensor()),
                0.0,
                "B must start at zero"
            );
        }
    }

    #[test]
    fn scales_follow_the_variant() {
        assert_eq!(settings(Variant::Lora).scale(), 2.0);
        assert_eq!(settings(Variant::RsLora).scale(), 4.0);
    }

    #[test]
    fn kaiming_a_is_bounded_and_seeded() {
        let a = sample_a(module(), 100, 8, AInit::Kaiming, 3, &Device::Cpu).unwrap();
        assert!(max_abs(&a) <= 0.1);
        let again = sample_a(module(), 100, 8, AInit::Kaiming, 3, &Device::Cpu).unwrap();
        assert_eq!(max_abs(&(a.clone() - again).unwrap()), 0.0);
        let other = sample_a(module(), 100, 8, AInit::Kaiming, 4, &Device::Cpu).unwrap();
        assert!(max_abs(&(a - other).unwrap()) > 0.0);
        let var = sample_a(module(), 300, 64, AInit::Kaiming, 3, &Device::Cpu)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((var - 1.0 / 900.0).abs() < 1e-4, "variance {var}");
        let var = sample_a(module(), 300, 4, AInit::Gaussian, 3, &Device::Cpu)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((var - 1.0 / 16.0).abs() < 5e-3, "variance {var}");
    }

    #[test]
    fn pissa_and_milora_reproduce_the_weight_at_init() {
        for variant in [Variant::Pissa, Variant::Milora] {
            let (w, x, adapter, residual) = setup(variant);
            let residual = residual.expect("svd variants replace the base");
            let rebuilt = (&residual
                + (adapter
                    .b()
                    .as_tensor()
                    .matmul(adapter.a().as_tensor())
                    .unwrap()
                    * adapter.scale())
                .unwrap())
            .unwrap();
            assert!(
                max_abs(&(rebuilt - &w).unwrap()) < 1e-4,
                "{variant:?}: base + s·B·A != W"
            );
            let base = crate::ops::frozen_linear(&x, &residual).unwrap();
            let out = adapter.forward(&x, &base, &residual).unwrap();
            let reference = crate::ops::frozen_linear(&x, &w).unwrap();
            assert!(
                max_abs(&(out - reference).unwrap()) < 1e-3,
                "{variant:?} changes the output at init"
            );
        }
        // PiSSA takes the largest singular directions, MiLoRA the smallest.
        let (_, _, pissa, _) = setup(Variant::Pissa);
        let (_, _, milora, _) = setup(Variant::Milora);
        let energy = |a: &Adapter| {
            a.a()
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(energy(&pissa) > energy(&milora));
    }

    #[test]
    fn dora_magnitude_is_the_row_norm_and_merge_matches_forward() {
        let (w, x, adapter, _) = setup(Variant::Dora);
        let m = adapter.magnitude().unwrap().as_tensor();
        assert!(max_abs(&(m - row_norms(&w).unwrap()).unwrap()) < 1e-5);
        // Move B off zero, then compare the unmerged forward with the merged weight.
        adapter
            .b()
            .set(&Tensor::randn(0f32, 0.1, (12, 4), &Device::Cpu).unwrap())
            .unwrap();
        let base = crate::ops::frozen_linear(&x, &w).unwrap();
        let unmerged = adapter.forward(&x, &base, &w).unwrap();
        let merged = crate::ops::frozen_linear(&x, &adapter.merged_weight(&w).unwrap()).unwrap();
        assert!(max_abs(&(unmerged - merged).unwrap()) < 1e-4);
    }

    #[test]
    fn dora_norm_is_detached() {
        // With B ≠ 0, the gradients of A and B differ between a detached norm and one that
        // carries gradient; compare the autograd ones with closed forms for the detached case.
        let (w, x, adapter, _) = setup(Variant::Dora);
        let device = Device::Cpu;
        adapter
            .b()
            .set(&Tensor::randn(0f32, 0.3, (12, 4), &device).unwrap())
            .unwrap();
        let base = crate::ops::frozen_linear(&x, &w).unwrap();
        let out = adapter.forward(&x, &base, &w).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();

        // L = Σ_rows Σ_j (m_j/n_j)·(x·Wᵀ + s·x·Aᵀ·Bᵀ)_j with n = ‖W + s·B·A‖ per row held
        // constant: ∂L/∂B = s·(m/n) ⊗ Σ_rows x·Aᵀ, ∂L/∂A = s·(Bᵀ·(m/n)) ⊗ Σ_rows x and
        // ∂L/∂m = Σ_rows (x·Wᵀ + s·x·Aᵀ·Bᵀ) / n.
        let s = adapter.scale();
        let (a, b) = (adapter.a().as_tensor(), adapter.b().as_tensor());
        let m = adapter.magnitude().unwrap().as_tensor();
        let adapted = (&w + (b.matmul(a).unwrap() * s).unwrap()).unwrap();
        let n = row_norms(&adapted).unwrap();
        let ratio = m.div(&n).unwrap();
        let rows = x.reshape((6, 10)).unwrap();
        let summed = (base.reshape((6, 12)).unwrap()
            + (rows.matmul(&a.t().unwrap()).unwrap() * s)
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap())
        .unwrap();
        let outer =
            |u: &Tensor, v: &Tensor| u.unsqueeze(1).unwrap().matmul(&v.unsqueeze(0).unwrap());
        let column_sums_xa = rows.matmul(&a.t().unwrap()).unwrap().sum(0).unwrap();
        let expected_b = (outer(&ratio, &column_sums_xa).unwrap() * s).unwrap();
        let bt_ratio = b.t().unwrap().matmul(&ratio.unsqueeze(1).unwrap()).unwrap();
        let expected_a =
            (outer(&bt_ratio.squeeze(1).unwrap(), &rows.sum(0).unwrap()).unwrap() * s).unwrap();
        let expected_m = summed.sum(0).unwrap().div(&n).unwrap();

        // What a norm carrying gradient would add to ∂L/∂B: ∂L/∂n_j = −m_j·Σ_rows summed_j / n_j²
        // times ∂n_j/∂B_jk = s·(adapted_j · A_k) / n_j. It must be large next to the tolerance,
        // or this test could not tell the two apart.
        let through_norm = (summed
            .sum(0)
            .unwrap()
            .mul(m)
            .unwrap()
            .div(&n.powf(3.0).unwrap())
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .broadcast_mul(&adapted.matmul(&a.t().unwrap()).unwrap())
            .unwrap()
            * -s)
            .unwrap();
        let tolerance = 1e-3 * max_abs(&expected_b).max(1.0);
        assert!(
            max_abs(&through_norm) > 20.0 * tolerance,
            "the norm's own gradient ({}) is too small to detect",
            max_abs(&through_norm)
        );

        let gb = grads.get(b).unwrap();
        assert!(
            max_abs(&(gb - &expected_b).unwrap()) < tolerance,
            "∂L/∂B has a gradient through the DoRA norm: it is not detached"
        );
        let ga = grads.get(a).unwrap();
        assert!(
            max_abs(&(ga - &expected_a).unwrap()) < tolerance,
            "∂L/∂A has a gradient through the DoRA norm: it is not detached"
        );
        let gm = grads.get(m).unwrap();
        assert!(max_abs(&(gm - expected_m).unwrap()) < tolerance);
    }

    #[test]
    fn rank_bounds_are_checked() {
        let w = Tensor::zeros((12, 10), DType::F32, &Device::Cpu).unwrap();
        for rank in [0, 11] {
            let err = Adapter::init(module(), &w, rank, &settings(Variant::Lora)).unwrap_err();
            assert!(err.to_string().contains("between 1 and 10"), "{err}");
        }
    }
}
