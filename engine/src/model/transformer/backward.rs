//! A hand-written backward pass for training LoRA-style adapters, on CUDA and on the CPU.
//!
//! candle's autograd keeps every intermediate of the forward alive until the step ends, and in
//! backward starts each gradient from a zero tensor it then adds into — for every node,
//! constants included. On a decoder layer that is several extra passes over every activation
//! (the MLP's `rows × intermediate` ones and the attention probabilities above all) and dozens
//! of extra launches. Here the forward runs without a graph and keeps only what the backward
//! needs (a [`Tape`]), and the backward is written out for the architecture: each gradient is
//! computed once, into its own buffer, and dropped as soon as the layer below has used it.
//!
//! It covers what training and both probe estimators run: the fused kernels on, adapters whose
//! forward is the plain low-rank branch (LoRA, rsLoRA, LoRA+, PiSSA, MiLoRA), the probe's
//! capturing adapters among them (their full weight gradient `δᵀx` is formed here, from the
//! projection's input and output gradient). DoRA keeps candle's autograd
//! ([`Transformer::hand_backward`]). Tested against autograd on the same model, loss and every
//! adapter gradient.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

use super::{attention_scale, DecoderLayer, FusedAttention, Projection, Transformer};
use crate::fused;
use crate::model::ModuleKind;
use crate::ops;

/// What one decoder layer's backward needs from its forward.
struct LayerTape {
    /// The layer's input (the residual stream).
    x: Tensor,
    /// Queries `(batch, kv_heads, groups · t, head_dim)` and keys, values
    /// `(batch, kv_heads, t, head_dim)`, after RoPE.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention probabilities.
    probs: Tensor,
    /// The merged attention output (the input of `o_proj`), kept only if `o_proj` is adapted.
    attn: Option<Tensor>,
    /// The residual stream after attention.
    x1: Tensor,
    /// The MLP's gate and up projections.
    gate: Tensor,
    up: Tensor,
}

/// A training forward's saved tensors: the layers from the shallowest adapter up, and the
/// head's inputs.
pub(crate) struct Tape {
    batch: usize,
    seq_len: usize,
    /// Index of the first taped layer.
    first: usize,
    layers: Vec<LayerTape>,
    /// The residual stream after the last layer (input of the final norm).
    last: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl Tape {
    /// The residual stream after the last layer.
    pub(crate) fn last(&self) -> &Tensor {
        &self.last
    }
}

impl Transformer {
    /// Whether [`loss_and_grads`](Self::loss_and_grads) runs the hand-written backward: the
    /// fused kernels are on and every adapter's forward is the plain low-rank branch (no DoRA
    /// magnitude; a probe's capturing adapters are plain here, their weight gradient is formed
    /// in the backward).
    pub fn hand_backward(&self) -> bool {
        self.fused
            && self
                .layers
                .iter()
                .flat_map(|layer| layer.projections.iter())
                .filter_map(|p| p.adapter.as_ref())
                .all(|adapter| adapter.magnitude().is_none())
    }

    /// One pass of [`loss_and_grads`](Self::loss_and_grads) through the hand-written
    /// backward.
    pub(crate) fn hand_loss_and_grads(
        &self,
        input_ids: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        loss_scale: f64,
    ) -> Result<(Tensor, GradStore)> {
        let tape = self.forward_tape(input_ids)?;
        let (loss, grad_last) =
            self.head_loss_and_grad(&tape.last, targets, weights, loss_scale)?;
        let grads = self.backward_tape(tape, grad_last)?;
        Ok((loss, grads))
    }

    /// The forward without a graph, keeping a [`Tape`] of the layers from the shallowest
    /// adapter up.
    pub(crate) fn forward_tape(&self, input_ids: &Tensor) -> Result<Tape> {
        if !self.hand_backward() {
            candle_core::bail!("the hand-written backward needs fused kernels and plain adapters")
        }
        let (batch, seq_len) = input_ids.dims2()?;
        let cos = self.cos.narrow(0, 0, seq_len)?;
        let sin = self.sin.narrow(0, 0, seq_len)?;
        let first = self
            .layers
            .iter()
            .position(|l| l.projections.iter().any(|p| p.adapter.is_some()))
            .unwrap_or(self.layers.len());
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq_len, self.config.hidden_size))?;
        let mut layers = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let (out, tape) = self.layer_forward(layer, &x, &cos, &sin)?;
            if index >= first {
                layers.push(tape);
            }
            x = out;
        }
        Ok(Tape {
            batch,
            seq_len,
            first,
            layers,
            last: x,
            cos,
            sin,
        })
    }

    /// The final norm, LM head and weighted cross-entropy from the last residual stream:
    /// returns the (scaled) loss and its gradient with respect to `last`.
    pub(crate) fn head_loss_and_grad(
        &self,
        last: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        loss_scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let eps = self.config.rms_norm_eps;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let hidden = fused::rms_norm(last, &self.norm, eps)?;
        let logits = ops::frozen_linear(&hidden, head)?;
        let vocab = logits.dim(candle_core::D::Minus1)?;
        let logits = logits.reshape(((), vocab))?;
        let targets = targets.flatten_all()?;
        let parts = fused::cross_entropy_parts(&logits, &targets)?;
        let (rows, lse) = (parts.get(0)?, parts.get(1)?);
        let weights = weights.flatten_all()?.to_dtype(DType::F32)?;
        let total = weights.sum_all()?;
        let loss = ((rows.mul(&weights)?.sum_all()? / &total)? * loss_scale)?;
        let grad_rows = (weights.broadcast_div(&total)? * loss_scale)?;
        let grad_logits = fused::cross_entropy_backward(&logits, &targets, &lse, &grad_rows)?;
        drop(logits);
        let grad_hidden = ops::frozen_linear_backward(head, &grad_logits, last.shape())?;
        drop(grad_logits);
        let grad_last = fused::rms_norm_backward(last, &self.norm, &grad_hidden, eps)?;
        Ok((loss, grad_last))
    }

    /// One decoder layer forward without a graph; returns the output and the layer's tape.
    fn layer_forward(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, LayerTape)> {
        let eps = self.config.rms_norm_eps;
        let h = fused::rms_norm(x, &layer.input_norm, eps)?;
        let q = project(layer.projection(ModuleKind::QProj), &h)?;
        let k = project(layer.projection(ModuleKind::KProj), &h)?;
        let v = project(layer.projection(ModuleKind::VProj), &h)?;
        drop(h);
        let attention = self.fused_attention(&q, &k, &v, cos, sin, None)?;
        drop((q, k, v));
        let o_proj = layer.projection(ModuleKind::OProj);
        let x1 = (x + project(o_proj, &attention.out)?)?;
        let h = fused::rms_norm(&x1, &layer.post_attention_norm, eps)?;
        let gate = project(layer.projection(ModuleKind::GateProj), &h)?;
        let up = project(layer.projection(ModuleKind::UpProj), &h)?;
        let act = fused::swiglu(&gate, &up)?;
        let out = (&x1 + project(layer.projection(ModuleKind::DownProj), &act)?)?;
        let FusedAttention {
            q,
            k,
            v,
            probs,
            out: attn,
        } = attention;
        let tape = LayerTape {
            x: x.clone(),
            q,
            k,
            v,
            probs,
            attn: o_proj.adapter.is_some().then_some(attn),
            x1,
            gate,
            up,
        };
        Ok((out, tape))
    }

    /// The backward through the taped layers, from the gradient of the last residual stream;
    /// returns the gradients of every adapter's `A` and `B` (and adds each capturing adapter's
    /// weight gradient to it).
    pub(crate) fn backward_tape(&self, tape: Tape, grad_last: Tensor) -> Result<GradStore> {
        let mut grads = GradStore::default();
        let Tape {
            batch,
            seq_len: t,
            first,
            mut layers,
            cos,
            sin,
            ..
        } = tape;
        let mut grad = grad_last;
        let mut index = first + layers.len();
        while let Some(saved) = layers.pop() {
            index -= 1;
            let layer = &self.layers[index];
            grad = self.layer_backward(layer, saved, grad, (batch, t), &cos, &sin, &mut grads)?;
        }
        Ok(grads)
    }

    /// One layer's backward: the gradient of its input from that of its output; adapter
    /// gradients go into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        layer: &DecoderLayer,
        saved: LayerTape,
        grad_out: Tensor,
        (batch, t): (usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps;
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        // MLP: out = x1 + down(swiglu(gate(h2), up(h2))), h2 = norm(x1).
        let down = layer.projection(ModuleKind::DownProj);
        let act = match down.adapter {
            Some(_) => Some(fused::swiglu(&saved.gate, &saved.up)?),
            None => None,
        };
        let grad_act = project_backward(down, act.as_ref(), &grad_out, saved.gate.shape(), grads)?;
        drop(act);
        let (grad_gate, grad_up) = fused::swiglu_backward(&saved.gate, &saved.up, &grad_act)?;
        drop(grad_act);
        let (gate_proj, up_proj) = (
            layer.projection(ModuleKind::GateProj),
            layer.projection(ModuleKind::UpProj),
        );
        let h2 = if gate_proj.adapter.is_some() || up_proj.adapter.is_some() {
            Some(fused::rms_norm(&saved.x1, &layer.post_attention_norm, eps)?)
        } else {
            None
        };
        let shape = saved.x1.shape().clone();
        let grad_h2 = (project_backward(gate_proj, h2.as_ref(), &grad_gate, &shape, grads)?
            + project_backward(up_proj, h2.as_ref(), &grad_up, &shape, grads)?)?;
        drop((grad_gate, grad_up, h2));
        let norm2 = fused::rms_norm_backward(&saved.x1, &layer.post_attention_norm, &grad_h2, eps)?;
        let grad_x1 = (grad_out + norm2)?;
        // Attention: x1 = x + o(merge(probs · v)), probs = softmax(q kᵀ), q, k, v from h1.
        let o_proj = layer.projection(ModuleKind::OProj);
        let grad_attn = project_backward(o_proj, saved.attn.as_ref(), &grad_x1, &shape, grads)?;
        let grad_pv = fused::split_heads(&grad_attn, heads, cos, sin, false, saved.q.dims())?;
        drop(grad_attn);
        let grad_probs = grad_pv.matmul(&saved.v.t()?)?;
        let grad_v = saved.probs.t()?.matmul(&grad_pv)?;
        drop(grad_pv);
        let (grad_q, grad_k) = fused::causal_attention_probs_backward(
            &saved.q,
            &saved.k,
            &saved.probs,
            &grad_probs,
            attention_scale(cfg.head_dim),
            t,
            0,
        )?;
        drop((grad_probs, saved.probs));
        let grad_q = fused::split_heads_backward(&grad_q, (batch, heads, t), cos, sin, true)?;
        let grad_k = fused::split_heads_backward(&grad_k, (batch, kv_heads, t), cos, sin, true)?;
        let grad_v = fused::split_heads_backward(&grad_v, (batch, kv_heads, t), cos, sin, false)?;
        let projections = [
            (ModuleKind::QProj, grad_q),
            (ModuleKind::KProj, grad_k),
            (ModuleKind::VProj, grad_v),
        ];
        let h1 = if projections
            .iter()
            .any(|(kind, _)| layer.projection(*kind).adapter.is_some())
        {
            Some(fused::rms_norm(&saved.x, &layer.input_norm, eps)?)
        } else {
            None
        };
        let mut grad_h1: Option<Tensor> = None;
        for (kind, grad) in projections {
            let part = project_backward(layer.projection(kind), h1.as_ref(), &grad, &shape, grads)?;
            grad_h1 = Some(match grad_h1 {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
        let grad_h1 = grad_h1.expect("three projections");
        let norm1 = fused::rms_norm_backward(&saved.x, &layer.input_norm, &grad_h1, eps)?;
        grad_x1 + norm1
    }
}

/// `x·Wᵀ (+ scale·(x·Aᵀ)·Bᵀ) (+ b)` without a graph.
fn project(proj: &Projection, x: &Tensor) -> Result<Tensor> {
    let mut out = ops::frozen_linear(x, &proj.weight)?;
    if let Some(adapter) = &proj.adapter {
        let a = adapter.a().as_tensor().detach();
        let b = adapter.b().as_tensor().detach();
        out = (out + fused::lora_branch(x, &a, &b, adapter.scale())?)?;
    }
    match &proj.bias {
        Some(bias) => fused::add_bias(&out, bias),
        None => Ok(out),
    }
}

/// The gradient of a projection's input from that of its output (`input_shape`); with an
/// adapter, also its `A` and `B` gradients into `grads`, from the projection's `input`.
fn project_backward(
    proj: &Projection,
    input: Option<&Tensor>,
    grad_out: &Tensor,
    input_shape: &candle_core::Shape,
    grads: &mut GradStore,
) -> Result<Tensor> {
    let mut grad_in = ops::frozen_linear_backward(&proj.weight, grad_out, input_shape)?;
    if let Some(adapter) = &proj.adapter {
        let Some(input) = input else {
            candle_core::bail!("hand-written backward: an adapted projection's input was not kept")
        };
        let (a, b) = (adapter.a().as_tensor(), adapter.b().as_tensor());
        adapter.add_weight_grad(input, grad_out)?;
        let (grad_x, grad_a, grad_b) =
            fused::lora_branch_backward(input, a, b, adapter.scale(), grad_out)?;
        grad_in = (grad_in + grad_x)?;
        grads.insert(a, grad_a);
        grads.insert(b, grad_b);
    }
    Ok(grad_in)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::adapter::{AInit, Adapter, AdapterSettings, Variant};
    use crate::bench::{geometry, random_model};
    use crate::model::{ModuleId, ModuleKind, Transformer};

    /// A tiny model with LoRA adapters on `modules`, `B` drawn at random (zero would leave
    /// every `A` gradient zero), the fused kernels on.
    fn model_with(bias: bool, modules: &[ModuleId]) -> Transformer {
        let mut config = geometry("tiny").expect("tiny");
        config.attention_bias = bias;
        let device = Device::Cpu;
        let mut model = random_model(&config, DType::F32, &device, 11).expect("model");
        model.set_fused_kernels(true);
        let settings = AdapterSettings {
            variant: Variant::Lora,
            rank: 4,
            alpha: 8.0,
            a_init: AInit::Kaiming,
            seed: 3,
        };
        for &module in modules {
            let weight = model.projection(module).weight().clone();
            let (adapter, _) = Adapter::init(module, &weight, 4, &settings).expect("adapter");
            let b = adapter.b().as_tensor();
            let random = Tensor::randn(0f32, 0.05, b.shape(), &device).expect("randn");
            adapter.b().set(&random).expect("set B");
            model.projection_mut(module).attach(adapter, None);
        }
        model
    }

    fn batch() -> (Tensor, Tensor, Tensor) {
        let device = Device::Cpu;
        let ids: Vec<u32> = (0..2 * 12).map(|i| (i * 53 % 500) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, 12), &device).expect("ids");
        let input = ids.narrow(1, 0, 11).unwrap().contiguous().unwrap();
        let target = ids.narrow(1, 1, 11).unwrap().contiguous().unwrap();
        let mut w = vec![1f32; 22];
        w[..4].iter_mut().for_each(|v| *v = 0.0); // a prompt that does not count
        let weights = Tensor::from_vec(w, (2, 11), &device).expect("weights");
        (input, target, weights)
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        crate::fused::max_difference(a, b).expect("difference").1 as f32
    }

    /// The hand-written backward gives the loss and every adapter gradient that candle's
    /// autograd gives on the same model: adapters everywhere, in one middle module, in the
    /// last layer only, with and without attention biases, with a loss scale.
    #[test]
    fn hand_backward_matches_autograd() {
        let everywhere: Vec<ModuleId> = (0..2)
            .flat_map(|layer| ModuleKind::ALL.map(|kind| ModuleId { layer, kind }))
            .collect();
        let cases: Vec<(&str, bool, Vec<ModuleId>)> = vec![
            ("everywhere", false, everywhere.clone()),
            ("everywhere, biases", true, everywhere),
            (
                "layer 0 v_proj",
                false,
                vec![ModuleId {
                    layer: 0,
                    kind: ModuleKind::VProj,
                }],
            ),
            (
                "last layer down_proj and q_proj",
                true,
                vec![
                    ModuleId {
                        layer: 1,
                        kind: ModuleKind::DownProj,
                    },
                    ModuleId {
                        layer: 1,
                        kind: ModuleKind::QProj,
                    },
                ],
            ),
        ];
        let (input, target, weights) = batch();
        for (name, bias, modules) in cases {
            let model = model_with(bias, &modules);
            assert!(model.hand_backward(), "{name}");
            let (loss, grads) = model
                .loss_and_grads(&input, &target, &weights, 0.5)
                .expect("hand backward");
            let auto = (model.loss(&input, &target, &weights).unwrap() * 0.5).unwrap();
            let auto_grads = auto.backward().unwrap();
            let (l1, l2) = (
                loss.to_scalar::<f32>().unwrap(),
                auto.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (l1 - l2).abs() / l2.abs() < 1e-5,
                "{name}: loss {l1} vs {l2}"
            );
            let adapters = model.adapters();
            assert_eq!(adapters.len(), modules.len(), "{name}");
            for (module, adapter) in adapters {
                for (which, var) in [("A", adapter.a()), ("B", adapter.b())] {
                    let ours = grads.get(var.as_tensor()).expect("a hand gradient");
                    let theirs = auto_grads
                        .get(var.as_tensor())
                        .expect("an autograd gradient");
                    assert_eq!(ours.dtype(), DType::F32);
                    let scale = theirs.abs().unwrap().max_all().unwrap();
                    assert!(
                        scale.to_scalar::<f32>().unwrap() > 0.0,
                        "{name} {module} {which}"
                    );
                    let r = rel(ours, theirs);
                    assert!(r < 1e-4, "{name}: {module} {which} differs by {r}");
                }
            }
        }
    }

    #[test]
    fn hand_backward_refuses_dora_and_composed_kernels() {
        let module = ModuleId {
            layer: 1,
            kind: ModuleKind::OProj,
        };
        let mut model = model_with(false, &[module]);
        model.set_fused_kernels(false);
        assert!(!model.hand_backward());
        let (input, _, _) = batch();
        let err = model
            .forward_tape(&input)
            .err()
            .expect("no tape without fused kernels");
        assert!(err.to_string().contains("hand-written backward"), "{err}");

        let mut model = model_with(false, &[]);
        let weight = model.projection(module).weight().clone();
        let settings = AdapterSettings {
            variant: Variant::Dora,
            rank: 4,
            alpha: 8.0,
            a_init: AInit::Kaiming,
            seed: 3,
        };
        let (adapter, _) = Adapter::init(module, &weight, 4, &settings).expect("dora");
        model.projection_mut(module).attach(adapter, None);
        assert!(!model.hand_backward(), "DoRA needs autograd");
    }
}
