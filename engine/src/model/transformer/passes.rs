//! The loss and adapter gradients of a batch, computed in passes of a few whole rows so that
//! memory depends on the pass, not on the batch.
//!
//! A training forward keeps, per layer, what its backward needs (the attention probabilities,
//! the MLP's `tokens × intermediate` activations) and the head makes `tokens × vocab` logits
//! and their gradient: all of it grows with the tokens run at once. On the CPU a batch of
//! 8 × 512 tokens of SmolLM2 would keep several GB; run as passes of at most
//! [`CPU_TOKENS_PER_PASS`] tokens, each pass's activations are freed before the next starts,
//! and the gradients (a few adapter-sized tensors) are summed.
//!
//! The batch's loss is the weighted mean over all its response tokens, so a pass of rows
//! `r` contributes its own weighted mean times its share of the batch's weight,
//! `Σ_r w / Σ w`: the passes' losses and gradients add up to the batch's (to f32 rounding).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};

use super::Transformer;

/// The most tokens run through the model at once on the CPU (whole rows; a longer row runs
/// alone). At 512 tokens a SmolLM2-135M pass keeps about 1 GB beyond the weights, and larger
/// passes gain nothing on the CPU: its matrix products are as efficient at 512 rows.
pub const CPU_TOKENS_PER_PASS: usize = 512;

/// The default of [`Transformer::set_tokens_per_pass`]: [`CPU_TOKENS_PER_PASS`] on the CPU, the
/// whole batch on a GPU (where a large pass keeps the device busy).
pub(super) fn default_tokens_per_pass(device: &Device) -> Option<usize> {
    (!device.is_cuda()).then_some(CPU_TOKENS_PER_PASS)
}

/// One pass of [`Transformer::loss_and_grads`]: rows `start..start + rows` of the batch, whose
/// loss is scaled by `share`, their part of the batch's total weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowPass {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub rows: usize,
    /// The rows' weight over the batch's weight (1 for a single pass).
    pub share: f64,
}

impl RowPass {
    /// The pass's rows of a `(batch, …)` tensor.
    pub fn rows_of(&self, tensor: &Tensor) -> Result<Tensor> {
        tensor.narrow(0, self.start, self.rows)?.contiguous()
    }
}

impl Transformer {
    /// Sets the most tokens [`loss_and_grads`](Self::loss_and_grads) runs at once (`None`: the
    /// whole batch in one pass). The default is [`CPU_TOKENS_PER_PASS`] on the CPU and the
    /// whole batch on a GPU.
    pub fn set_tokens_per_pass(&mut self, tokens: Option<usize>) {
        self.tokens_per_pass = tokens;
    }

    /// The most tokens [`loss_and_grads`](Self::loss_and_grads) runs at once.
    pub fn tokens_per_pass(&self) -> Option<usize> {
        self.tokens_per_pass
    }

    /// How [`loss_and_grads`](Self::loss_and_grads) splits a batch with these `(batch, seq)`
    /// loss weights: whole rows, at most [`tokens_per_pass`](Self::tokens_per_pass) tokens
    /// (and at least one row) per pass; rows without weight are skipped. A batch without any
    /// weight is one pass of share 1 (its loss is not a number, as unsplit).
    pub fn row_passes(&self, weights: &Tensor) -> Result<Vec<RowPass>> {
        let (batch, seq_len) = weights.dims2()?;
        let per_pass = self
            .tokens_per_pass
            .map_or(batch, |tokens| (tokens / seq_len.max(1)).max(1));
        let whole = vec![RowPass {
            start: 0,
            rows: batch,
            share: 1.0,
        }];
        if per_pass >= batch {
            return Ok(whole);
        }
        let row_weight: Vec<f64> = weights
            .to_dtype(DType::F32)?
            .sum(1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let total: f64 = row_weight.iter().sum();
        if total == 0.0 {
            return Ok(whole);
        }
        Ok((0..batch)
            .step_by(per_pass)
            .map(|start| {
                let rows = per_pass.min(batch - start);
                let weight: f64 = row_weight[start..start + rows].iter().sum();
                RowPass {
                    start,
                    rows,
                    share: weight / total,
                }
            })
            .filter(|pass| pass.share > 0.0)
            .collect())
    }

    /// The weighted mean cross-entropy of [`loss`](Self::loss), times `loss_scale`, and the
    /// gradient of that with respect to every adapter parameter (keyed by its variable), in
    /// the passes of [`row_passes`](Self::row_passes): each by the hand-written backward where
    /// it applies ([`hand_backward`](Self::hand_backward)), by candle's autograd otherwise.
    /// Capturing adapters (the probe's `expected` estimator) end with their weight gradient
    /// over the whole batch ([`crate::adapter::Adapter::weight_grad`]). The loss returned has
    /// no graph.
    pub fn loss_and_grads(
        &self,
        input_ids: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        loss_scale: f64,
    ) -> Result<(Tensor, GradStore)> {
        for (_, adapter) in self.adapters() {
            adapter.clear_weight_grad();
        }
        let mut loss_sum: Option<Tensor> = None;
        let mut grads = GradStore::default();
        for pass in self.row_passes(weights)? {
            let (ids, targets, weights) = if pass.rows == input_ids.dim(0)? {
                (input_ids.clone(), targets.clone(), weights.clone())
            } else {
                (
                    pass.rows_of(input_ids)?,
                    pass.rows_of(targets)?,
                    pass.rows_of(weights)?,
                )
            };
            let scale = loss_scale * pass.share;
            let (loss, pass_grads) = if self.hand_backward() {
                self.hand_loss_and_grads(&ids, &targets, &weights, scale)?
            } else {
                self.autograd_loss_and_grads(&ids, &targets, &weights, scale)?
            };
            let loss = loss.detach();
            loss_sum = Some(match loss_sum {
                Some(sum) => (sum + loss)?,
                None => loss,
            });
            grads.extend(pass_grads)?;
        }
        let loss = match loss_sum {
            Some(loss) => loss,
            None => candle_core::bail!("loss_and_grads: a batch without rows"),
        };
        Ok((loss, grads))
    }

    /// One pass of [`loss_and_grads`](Self::loss_and_grads) through candle's autograd.
    /// Capturing adapters turn their recorded input and output gradient into their weight
    /// gradient; the store returned keeps only the adapters' parameters' gradients (candle's
    /// also holds the zero-started gradients of constants met on the way, such as the
    /// attention mask broadcast over the heads, which would otherwise live as long as it).
    fn autograd_loss_and_grads(
        &self,
        input_ids: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        loss_scale: f64,
    ) -> Result<(Tensor, GradStore)> {
        let loss = (self.loss(input_ids, targets, weights)? * loss_scale)?;
        let mut grads = loss.backward()?;
        for (module, adapter) in self.adapters() {
            let Some(captured) = adapter.take_captured() else {
                continue;
            };
            // Every projection lies on the path to the loss: a missing gradient is a bug.
            let Some(delta) = grads.remove(&captured.output_tap) else {
                candle_core::bail!("no loss gradient reached the output of {module}")
            };
            adapter.add_weight_grad(&captured.input, &delta)?;
        }
        let mut kept = GradStore::default();
        for (_, adapter) in self.adapters() {
            for (_, var) in adapter.parameters() {
                if let Some(grad) = grads.remove(var.as_tensor()) {
                    kept.insert(var.as_tensor(), grad);
                }
            }
        }
        Ok((loss, kept))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::adapter::{AInit, Adapter, AdapterSettings, Variant};
    use crate::bench::{geometry, random_model};
    use crate::model::Transformer;

    /// The tiny geometry with adapters of `variant` on every module, `B` drawn at random (zero
    /// would leave every `A` gradient zero), and capture on where asked.
    fn model(variant: Variant, fused: bool, capture: bool) -> Transformer {
        let config = geometry("tiny").expect("tiny");
        let device = Device::Cpu;
        let mut model = random_model(&config, DType::F32, &device, 5).expect("model");
        model.set_fused_kernels(fused);
        let settings = AdapterSettings {
            variant,
            rank: 4,
            alpha: 8.0,
            a_init: AInit::Kaiming,
            seed: 1,
        };
        for module in config.all_modules() {
            let weight = model.projection(module).weight().clone();
            let (mut adapter, residual) =
                Adapter::init(module, &weight, 4, &settings).expect("adapter");
            let b = adapter.b().as_tensor();
            let random = Tensor::randn(0f32, 0.05, b.shape(), &device).expect("randn");
            adapter.b().set(&random).expect("set B");
            if capture {
                adapter.enable_capture();
            }
            model.projection_mut(module).attach(adapter, residual);
        }
        model
    }

    /// Five rows of nine tokens; row 2 has no response token, row 4 a short one.
    fn batch() -> (Tensor, Tensor, Tensor) {
        let device = Device::Cpu;
        let ids: Vec<u32> = (0..5 * 10).map(|i| (i * 37 % 500) as u32).collect();
        let ids = Tensor::from_vec(ids, (5, 10), &device).expect("ids");
        let input = ids.narrow(1, 0, 9).unwrap().contiguous().unwrap();
        let target = ids.narrow(1, 1, 9).unwrap().contiguous().unwrap();
        let mut w = vec![1f32; 5 * 9];
        w[..3].iter_mut().for_each(|v| *v = 0.0);
        w[18..27].iter_mut().for_each(|v| *v = 0.0);
        w[36..43].iter_mut().for_each(|v| *v = 0.0);
        let weights = Tensor::from_vec(w, (5, 9), &device).expect("weights");
        (input, target, weights)
    }

    fn max_relative(a: &Tensor, b: &Tensor) -> f32 {
        crate::fused::max_difference(a, b).expect("difference").1 as f32
    }

    #[test]
    fn row_passes_split_whole_rows_skip_empty_ones_and_share_the_weight() {
        let mut model = model(Variant::Lora, true, false);
        let (_, _, weights) = batch();
        model.set_tokens_per_pass(None);
        assert_eq!(model.row_passes(&weights).unwrap().len(), 1);
        // 20 tokens of 9-token rows: two rows a pass; rows 2 and 3 share a pass that keeps
        // row 3's weight, row 4 (2 response tokens) is a pass of its own.
        model.set_tokens_per_pass(Some(20));
        let passes = model.row_passes(&weights).unwrap();
        let layout: Vec<(usize, usize)> = passes.iter().map(|p| (p.start, p.rows)).collect();
        assert_eq!(layout, vec![(0, 2), (2, 2), (4, 1)]);
        let total = 6.0 + 9.0 + 9.0 + 2.0;
        let shares: Vec<f64> = passes.iter().map(|p| p.share).collect();
        assert_eq!(shares, vec![15.0 / total, 9.0 / total, 2.0 / total]);
        // A pass smaller than a row runs one row at a time; a row without weight is skipped.
        model.set_tokens_per_pass(Some(4));
        let starts: Vec<usize> = model
            .row_passes(&weights)
            .unwrap()
            .iter()
            .map(|p| p.start)
            .collect();
        assert_eq!(starts, vec![0, 1, 3, 4]);
    }

    /// Split into passes, the loss and every adapter gradient (and, with capture, every weight
    /// gradient) are those of one pass over the batch: through the hand-written backward,
    /// through autograd with composed ops, and for DoRA (autograd over the fused ops).
    #[test]
    fn passes_give_the_loss_and_gradients_of_the_whole_batch() {
        let cases = [
            ("hand-written, capturing", Variant::Lora, true, true),
            ("autograd, capturing", Variant::Lora, false, true),
            ("dora", Variant::Dora, true, false),
        ];
        let (input, target, weights) = batch();
        for (name, variant, fused, capture) in cases {
            let mut model = model(variant, fused, capture);
            assert_eq!(model.hand_backward(), fused && variant != Variant::Dora);
            let mut runs = Vec::new();
            for tokens in [None, Some(20)] {
                model.set_tokens_per_pass(tokens);
                let (loss, grads) = model
                    .loss_and_grads(&input, &target, &weights, 0.5)
                    .expect("loss and gradients");
                let loss = loss.to_scalar::<f32>().unwrap();
                let mut tensors = Vec::new();
                for (_, adapter) in model.adapters() {
                    for (_, var) in adapter.parameters() {
                        tensors.push(grads.get(var.as_tensor()).expect("a gradient").clone());
                    }
                    if capture {
                        tensors.push(adapter.weight_grad().expect("a weight gradient"));
                    }
                }
                runs.push((loss, tensors));
            }
            let ((whole, whole_grads), (split, split_grads)) = (&runs[0], &runs[1]);
            assert!(
                (whole - split).abs() <= 1e-6 * whole.abs(),
                "{name}: loss {whole} vs {split}"
            );
            assert_eq!(whole_grads.len(), split_grads.len());
            for (i, (a, b)) in whole_grads.iter().zip(split_grads).enumerate() {
                let r = max_relative(b, a);
                assert!(r < 1e-5, "{name}: gradient {i} differs by {r}");
            }
        }
    }

    /// The attention mask, RoPE tables and norm gains met by autograd get zero-started
    /// gradients of their own; none of them outlives the pass.
    #[test]
    fn the_autograd_store_keeps_only_adapter_gradients() {
        let model = model(Variant::Lora, false, false);
        let (input, target, weights) = batch();
        let adapter_gradients = 2 * 7 * 2; // an A and a B per module
        let raw = model
            .loss(&input, &target, &weights)
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            raw.get_ids().count() > adapter_gradients,
            "candle's store holds more than the adapters' gradients"
        );
        let (_, grads) = model
            .loss_and_grads(&input, &target, &weights, 1.0)
            .expect("loss and gradients");
        assert_eq!(grads.get_ids().count(), adapter_gradients);
        for (_, adapter) in model.adapters() {
            for (_, var) in adapter.parameters() {
                assert!(grads.get(var.as_tensor()).is_some());
            }
        }
    }
}
