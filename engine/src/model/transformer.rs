//! The decoder shared by Llama and Qwen2: pre-norm blocks of grouped-query attention with RoPE
//! and a SwiGLU FFN, RMSNorm, and an (optionally tied) LM head.
//!
//! Every linear projection is a [`Projection`]: a frozen weight (never given a gradient, see
//! [`crate::ops::frozen_linear`]) that may carry one trainable [`Adapter`].

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use super::{ModelConfig, ModelError, ModuleId, ModuleKind};
use crate::adapter::Adapter;
use crate::ops;

mod backward;
mod passes;

pub use passes::{RowPass, CPU_TOKENS_PER_PASS};

/// A frozen linear projection with an optional bias and an optional adapter.
#[derive(Debug)]
pub struct Projection {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl Projection {
    /// `y = x·Wᵀ + b (+ adapter)`; with `fused`, the adapter's branch as one fused op.
    pub fn forward(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        let base = ops::frozen_linear(x, &self.weight)?;
        let out = match &self.adapter {
            Some(adapter) if fused => adapter.forward_fused(x, &base, &self.weight)?,
            Some(adapter) => adapter.forward(x, &base, &self.weight)?,
            None => base,
        };
        match &self.bias {
            Some(bias) if fused => crate::fused::add_bias(&out, bias),
            Some(bias) => out.broadcast_add(bias),
            None => Ok(out),
        }
    }

    /// The frozen weight, `d_out × d_in` (for PiSSA/MiLoRA: the residual once attached).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The adapter, if one is attached.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// Attaches an adapter, replacing the frozen weight with `residual` when the variant says so.
    pub fn attach(&mut self, adapter: Adapter, residual: Option<Tensor>) {
        if let Some(residual) = residual {
            self.weight = residual;
        }
        self.adapter = Some(adapter);
    }

    /// Folds the adapter into the frozen weight (for fast generation); afterwards the
    /// projection has no adapter.
    pub fn merge(&mut self) -> candle_core::Result<()> {
        if let Some(adapter) = self.adapter.take() {
            self.weight = adapter.merged_weight(&self.weight)?;
        }
        Ok(())
    }
}

/// Cached keys and values of every layer, for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|entry| entry.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows`, in that order (to drop finished sequences).
    pub fn select_rows(&mut self, rows: &[usize]) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let index: Vec<u32> = rows.iter().map(|&row| row as u32).collect();
            let index = Tensor::from_vec(index, rows.len(), k.device())?;
            *k = k.index_select(&index, 0)?;
            *v = v.index_select(&index, 0)?;
        }
        Ok(())
    }

    /// Drops the first `count` cached positions of every row (left padding that no remaining
    /// row needs). Positions given to later calls must then count from the new start.
    pub fn drop_leading(&mut self, count: usize) -> candle_core::Result<()> {
        if count == 0 {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let kept = k.dim(2)?.saturating_sub(count);
            *k = k.narrow(2, count, kept)?.contiguous()?;
            *v = v.narrow(2, count, kept)?.contiguous()?;
        }
        Ok(())
    }

    fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k, v) = match self.layers[layer].take() {
            Some((old_k, old_v)) => (
                Tensor::cat(&[&old_k, &k], 2)?,
                Tensor::cat(&[&old_v, &v], 2)?,
            ),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// Indexed by the position of the kind in [`ModuleKind::ALL`].
    projections: Vec<Projection>,
}

impl DecoderLayer {
    fn projection(&self, kind: ModuleKind) -> &Projection {
        &self.projections[kind_index(kind)]
    }
}

fn kind_index(kind: ModuleKind) -> usize {
    ModuleKind::ALL
        .iter()
        .position(|&k| k == kind)
        .expect("every kind is in ALL")
}

/// A decoder-only transformer ready for training (adapters) and generation.
#[derive(Debug)]
pub struct Transformer {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    device: Device,
    /// Whether the hot ops run as the fused kernels of [`crate::fused`].
    fused: bool,
    /// The most tokens [`loss_and_grads`](Self::loss_and_grads) runs through the model at
    /// once (whole rows of the batch; at least one row); `None`: the whole batch in one pass.
    tokens_per_pass: Option<usize>,
}

/// The weights a transformer is built from, keyed by Hugging Face names
/// (`model.layers.0.self_attn.q_proj.weight`, …).
pub type NamedTensors = HashMap<String, Tensor>;

impl Transformer {
    /// Builds the model from named tensors (already in the Hugging Face layout), casting them
    /// to `dtype` on `device`.
    pub fn new(
        config: ModelConfig,
        mut tensors: NamedTensors,
        dtype: DType,
        device: &Device,
        origin: &std::path::Path,
    ) -> Result<Self, ModelError> {
        let mut take = |name: &str| -> Result<Tensor, ModelError> {
            let tensor = tensors.remove(name).ok_or_else(|| ModelError::Invalid {
                path: origin.to_path_buf(),
                reason: format!("missing tensor {name}"),
            })?;
            Ok(tensor.to_device(device)?.to_dtype(dtype)?)
        };
        let embed_tokens = take("model.embed_tokens.weight")?;
        check_shape(
            origin,
            "model.embed_tokens.weight",
            &embed_tokens,
            &[config.vocab_size, config.hidden_size],
        )?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let prefix = format!("model.layers.{layer}");
            let input_norm = take(&format!("{prefix}.input_layernorm.weight"))?;
            let post_attention_norm = take(&format!("{prefix}.post_attention_layernorm.weight"))?;
            let mut projections = Vec::with_capacity(ModuleKind::ALL.len());
            for kind in ModuleKind::ALL {
                let name = format!("{prefix}.{}.{}", kind.block(), kind.name());
                let weight = take(&format!("{name}.weight"))?;
                let (d_in, d_out) = config.module_dims(kind);
                check_shape(origin, &format!("{name}.weight"), &weight, &[d_out, d_in])?;
                let has_bias = config.attention_bias
                    && matches!(
                        kind,
                        ModuleKind::QProj | ModuleKind::KProj | ModuleKind::VProj
                    );
                let bias = if has_bias {
                    Some(take(&format!("{name}.bias"))?)
                } else {
                    None
                };
                projections.push(Projection {
                    weight,
                    bias,
                    adapter: None,
                });
            }
            layers.push(DecoderLayer {
                input_norm,
                post_attention_norm,
                projections,
            });
        }
        let norm = take("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight")?)
        };
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            dtype,
            device: device.clone(),
            fused: crate::fused::default_on(device),
            tokens_per_pass: passes::default_tokens_per_pass(device),
        })
    }

    /// Chooses whether attention, RMSNorm, RoPE, SwiGLU, the adapters' branch and the loss run
    /// as the fused kernels of [`crate::fused`] (the default on CUDA) or as candle's composed
    /// ops; both compute the same function, to the dtype's rounding.
    pub fn set_fused_kernels(&mut self, on: bool) {
        self.fused = on;
    }

    fn rms_norm(&self, x: &Tensor, gain: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused {
            crate::fused::rms_norm(x, gain, self.config.rms_norm_eps)
        } else {
            ops::rms_norm(x, gain, self.config.rms_norm_eps)
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The compute dtype of the frozen weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the model.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One projection.
    pub fn projection(&self, module: ModuleId) -> &Projection {
        self.layers[module.layer].projection(module.kind)
    }

    /// One projection, mutably (to attach or merge an adapter).
    pub fn projection_mut(&mut self, module: ModuleId) -> &mut Projection {
        &mut self.layers[module.layer].projections[kind_index(module.kind)]
    }

    /// Every module that carries an adapter, in layer order.
    pub fn adapters(&self) -> Vec<(ModuleId, &Adapter)> {
        self.config
            .all_modules()
            .into_iter()
            .filter_map(|module| self.projection(module).adapter().map(|a| (module, a)))
            .collect()
    }

    /// Merges every adapter into its frozen weight.
    pub fn merge_adapters(&mut self) -> candle_core::Result<()> {
        for module in self.config.all_modules() {
            self.projection_mut(module).merge()?;
        }
        Ok(())
    }

    /// The number of positions the RoPE tables cover: the longest sequence the model runs.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Final hidden states (after the last norm), `(batch, seq, hidden)`. `start_pos` is the
    /// position of the first token (non-zero only with a cache).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        self.hidden_states_padded(input_ids, start_pos, cache, None)
    }

    /// [`hidden_states`](Self::hidden_states) for a left-padded batch: row `b` starts with
    /// `left_padding[b]` padding tokens (counted from the first cached position), which no
    /// other token attends to and which do not count as positions, so a row's real tokens get
    /// RoPE positions `0, 1, …` exactly as if the row ran alone. `start_pos` is the index of
    /// the first input column among all columns (cached ones included). Hidden states at
    /// padding columns are meaningless. `None` is the unpadded case.
    pub fn hidden_states_padded(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        mut cache: Option<&mut KvCache>,
        left_padding: Option<&[usize]>,
    ) -> candle_core::Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq_len, self.config.hidden_size))?;
        // Without padding the fused attention masks by position itself: no mask tensor.
        let (cos, sin, mask) = match left_padding {
            None => (
                self.cos.narrow(0, start_pos, seq_len)?,
                self.sin.narrow(0, start_pos, seq_len)?,
                if self.fused {
                    None
                } else {
                    Some(causal_mask(seq_len, start_pos, &self.device)?)
                },
            ),
            Some(padding) => {
                if padding.len() != batch {
                    candle_core::bail!(
                        "left padding given for {} rows, the batch has {batch}",
                        padding.len()
                    )
                }
                let positions: Vec<u32> = padding
                    .iter()
                    .flat_map(|&pad| {
                        (start_pos..start_pos + seq_len)
                            .map(move |column| column.saturating_sub(pad) as u32)
                    })
                    .collect();
                let furthest = positions.iter().copied().max().unwrap_or(0) as usize;
                if furthest >= self.max_positions() {
                    candle_core::bail!(
                        "position {furthest} is beyond the model's {} positions",
                        self.max_positions()
                    )
                }
                let half = self.cos.dim(1)?;
                let positions = Tensor::from_vec(positions, batch * seq_len, &self.device)?;
                (
                    self.cos
                        .index_select(&positions, 0)?
                        .reshape((batch, 1, seq_len, half))?,
                    self.sin
                        .index_select(&positions, 0)?
                        .reshape((batch, 1, seq_len, half))?,
                    Some(padded_causal_mask(
                        padding,
                        seq_len,
                        start_pos,
                        &self.device,
                    )?),
                )
            }
        };
        // The fused softmax adds the mask to scores in the compute dtype: cast it once here,
        // not in every layer. The composed softmax adds it to f32 scores.
        let mask = match mask {
            Some(mask) if self.fused => Some(mask.to_dtype(self.dtype)?),
            other => other,
        };
        for (index, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = self.rms_norm(&x, &layer.input_norm)?;
            let attended = self.attention(
                index,
                layer,
                &h,
                &cos,
                &sin,
                mask.as_ref(),
                cache.as_deref_mut(),
            )?;
            let x1 = (residual + attended)?;
            let h = self.rms_norm(&x1, &layer.post_attention_norm)?;
            let gate = layer
                .projection(ModuleKind::GateProj)
                .forward(&h, self.fused)?;
            let up = layer
                .projection(ModuleKind::UpProj)
                .forward(&h, self.fused)?;
            let act = if self.fused {
                crate::fused::swiglu(&gate, &up)?
            } else {
                ops::swiglu(&gate, &up)?
            };
            let mlp = layer
                .projection(ModuleKind::DownProj)
                .forward(&act, self.fused)?;
            x = (x1 + mlp)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    /// Logits `(batch, seq, vocab)` in f32.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(input_ids, start_pos, cache)?;
        self.logits(&hidden)?.to_dtype(DType::F32)
    }

    /// LM head applied to hidden states.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        ops::frozen_linear(hidden, self.lm_head.as_ref().unwrap_or(&self.embed_tokens))
    }

    /// Mean cross-entropy of `targets` under the logits at each position, weighted by
    /// `weights` (1 on response tokens, 0 elsewhere): the response-only fine-tuning loss.
    /// `input_ids`, `targets`: `(batch, seq)` u32; `weights`: `(batch, seq)` f32.
    pub fn loss(
        &self,
        input_ids: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(input_ids, 0, None)?;
        self.loss_from_hidden(&hidden, targets, weights)
    }

    /// The LM head and the weighted cross-entropy of [`loss`](Self::loss), from final hidden
    /// states `(batch, seq, hidden)`.
    pub fn loss_from_hidden(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if self.fused {
            let logits = self.logits(hidden)?;
            let vocab = logits.dim(D::Minus1)?;
            let rows = crate::fused::cross_entropy(
                &logits.reshape(((), vocab))?,
                &targets.flatten_all()?,
            )?;
            let weights = weights.flatten_all()?.to_dtype(DType::F32)?;
            let total = weights.sum_all()?;
            return rows.mul(&weights)?.sum_all()? / total;
        }
        let logits = self.logits(hidden)?.to_dtype(DType::F32)?;
        let vocab = logits.dim(D::Minus1)?;
        let logits = logits.reshape(((), vocab))?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = targets.flatten_all()?.unsqueeze(1)?;
        let picked = log_probs.gather(&targets, 1)?.squeeze(1)?;
        let weights = weights.flatten_all()?.to_dtype(DType::F32)?;
        let total = weights.sum_all()?;
        picked.mul(&weights)?.sum_all()?.neg()? / total
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        index: usize,
        layer: &DecoderLayer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (batch, seq_len, _) = h.dims3()?;
        let cfg = &self.config;
        let head_dim = cfg.head_dim;
        let q = layer.projection(ModuleKind::QProj).forward(h, self.fused)?;
        let k = layer.projection(ModuleKind::KProj).forward(h, self.fused)?;
        let v = layer.projection(ModuleKind::VProj).forward(h, self.fused)?;
        let groups = cfg.num_heads / cfg.num_kv_heads;
        let scale = attention_scale(head_dim);
        let Some(mask) = mask else {
            let cache = cache.map(|cache| (cache, index));
            let fused = self.fused_attention(&q, &k, &v, cos, sin, cache)?;
            return layer
                .projection(ModuleKind::OProj)
                .forward(&fused.out, self.fused);
        };
        let q = q
            .reshape((batch, seq_len, cfg.num_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .reshape((batch, seq_len, cfg.num_kv_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((batch, seq_len, cfg.num_kv_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = ops::rope(&q, cos, sin)?;
        let k = ops::rope(&k, cos, sin)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(index, k, v)?,
            None => (k, v),
        };
        let k = repeat_kv(&k, groups)?;
        let v = repeat_kv(&v, groups)?;
        let probs = if self.fused {
            // One pass over the scores in the compute dtype, one saved tensor for backward.
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let scores = scores.broadcast_add(mask)?;
            ops::softmax_last_dim(&scores)?
        } else {
            let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
            let scores = scores.broadcast_add(mask)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(self.dtype)?
        };
        let out = probs.matmul(&v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((batch, seq_len, cfg.num_heads * head_dim))?;
        layer
            .projection(ModuleKind::OProj)
            .forward(&out, self.fused)
    }
}

/// What [`Transformer::fused_attention`] computes; the hand-written backward keeps all of it
/// but `out`.
struct FusedAttention {
    /// Queries `(batch, kv_heads, groups · t, head_dim)` after RoPE.
    q: Tensor,
    /// Keys and values `(batch, kv_heads, t_k, head_dim)` (keys after RoPE), cache included.
    k: Tensor,
    v: Tensor,
    /// Attention probabilities `(batch, kv_heads, groups · t, t_k)`.
    probs: Tensor,
    /// The merged output `(batch, t, heads · head_dim)`, the input of `o_proj`.
    out: Tensor,
}

impl Transformer {
    /// Attention on the fused path, from the query, key and value projections'
    /// `(batch, t, heads · head_dim)` outputs: one copy per tensor into heads (RoPE applied on
    /// the way); the query heads sharing a key head stacked along the rows, so keys and values
    /// are never repeated; the causal mask applied by position. With a cache (and the layer's
    /// index), keys and values are appended to it first.
    fn fused_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<FusedAttention> {
        let cfg = &self.config;
        let (batch, t, _) = q.dims3()?;
        let (heads, kv_heads, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let groups = heads / kv_heads;
        let q_shape = [batch, kv_heads, groups * t, d];
        let kv_shape = [batch, kv_heads, t, d];
        let q = crate::fused::split_heads(q, heads, cos, sin, true, &q_shape)?;
        let k = crate::fused::split_heads(k, kv_heads, cos, sin, true, &kv_shape)?;
        let v = crate::fused::split_heads(v, kv_heads, cos, sin, false, &kv_shape)?;
        let (k, v) = match cache {
            Some((cache, index)) => cache.append(index, k, v)?,
            None => (k, v),
        };
        let t_k = k.dim(2)?;
        let probs = crate::fused::causal_attention_probs(&q, &k, attention_scale(d), t, t_k - t)?;
        let out = crate::fused::merge_heads(&probs.matmul(&v)?, batch, heads, t, cos, sin)?;
        Ok(FusedAttention {
            q,
            k,
            v,
            probs,
            out,
        })
    }
}

/// `1/√head_dim`, the attention scores' scale.
fn attention_scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}

/// `(batch, kv_heads, seq, dim)` → `(batch, kv_heads·groups, seq, dim)`.
fn repeat_kv(x: &Tensor, groups: usize) -> candle_core::Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (batch, kv_heads, seq, dim) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((batch, kv_heads, groups, seq, dim))?
        .reshape((batch, kv_heads * groups, seq, dim))
}

/// Additive mask `(seq, start_pos + seq)`: 0 where query `i` may see key `j`, −∞ after it.
fn causal_mask(seq_len: usize, start_pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = start_pos + seq_len;
    let values: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= start_pos + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (seq_len, total), device)
}

/// Additive mask `(batch, 1, seq, start_pos + seq)` for a left-padded batch: query `i` of row
/// `b` may see key `j` when `j` is not after it and not padding (`j >= padding[b]`). A
/// padding query sees itself only, so its softmax stays finite.
fn padded_causal_mask(
    padding: &[usize],
    seq_len: usize,
    start_pos: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = start_pos + seq_len;
    let values: Vec<f32> = padding
        .iter()
        .flat_map(|&pad| {
            (0..seq_len).flat_map(move |i| {
                let query = start_pos + i;
                (0..total).map(move |key| {
                    if key == query || (key <= query && key >= pad) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
        })
        .collect();
    Tensor::from_vec(values, (padding.len(), 1, seq_len, total), device)
}

/// cos/sin tables `(max_positions, head_dim/2)` for RoPE, in f32.
fn rope_tables(config: &ModelConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = config.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            1.0 / config
                .rope_theta
                .powf(2.0 * i as f64 / config.head_dim as f64) as f32
        })
        .collect();
    let positions = config.max_position_embeddings.min(32_768);
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let t = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?;
    let freqs = t.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

fn check_shape(
    origin: &std::path::Path,
    name: &str,
    tensor: &Tensor,
    expected: &[usize],
) -> Result<(), ModelError> {
    if tensor.dims() != expected {
        return Err(ModelError::Invalid {
            path: origin.to_path_buf(),
            reason: format!(
                "tensor {name} has shape {:?}, the config implies {expected:?}",
                tensor.dims()
            ),
        });
    }
    Ok(())
}
