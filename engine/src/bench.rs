//! Throughput benchmarks of a training step and a probe batch on a named geometry with random
//! weights (throughput does not depend on weight values), reporting the same fields as
//! `bench/peft_baseline.py` so the two can be compared side by side. A probe batch is PAGE's
//! by default, or another placement rule's ([`BenchOptions::rule`]: one batch of `grad`,
//! `grad-rank` or `act`; the whole model for the data-free `kappa` and `random`), with the peak
//! memory of the steps (live device allocations on CUDA, the process's resident set on the
//! CPU).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::{AInit, Adapter, AdapterSettings, Variant};
use crate::data::Collated;
use crate::loader;
use crate::model::{Architecture, ModelConfig, ModuleKind, Transformer};
use crate::placement::Resolve;
use crate::probe::{self, ProbeSettings};
use crate::rules::{self, Rule};
use crate::train::{self, TrainSettings};

/// A named model geometry: `smollm2-135m`, `qwen2.5-0.5b` or `tiny`.
pub fn geometry(name: &str) -> Option<ModelConfig> {
    let llama = |layers, hidden, ffn, heads, kv, vocab| ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        rope_theta: 100_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        attention_bias: false,
        max_position_embeddings: 8192,
    };
    match name {
        "smollm2-135m" => Some(llama(30, 576, 1536, 9, 3, 49_152)),
        "qwen2.5-0.5b" | "qwen2.5-coder-0.5b" => Some(ModelConfig {
            architecture: Architecture::Qwen2,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            attention_bias: true,
            max_position_embeddings: 32_768,
            ..llama(24, 896, 4864, 14, 2, 151_936)
        }),
        "tiny" => Some(llama(2, 64, 128, 4, 2, 512)),
        _ => None,
    }
}

/// A model of `config` with random-normal weights (std 0.02; norm gains 1).
pub fn random_model(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> candle_core::Result<Transformer> {
    // Drawn on the host from a seeded generator, so every device gets the same weights.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 0.02).expect("positive std");
    let mut tensors = HashMap::new();
    let mut randn = |shape: &[usize]| -> candle_core::Result<Tensor> {
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| rand::Rng::sample(&mut rng, normal))
            .collect();
        Tensor::from_vec(values, shape, device)
    };
    tensors.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&[config.vocab_size, config.hidden_size])?,
    );
    tensors.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(config.hidden_size, DType::F32, device)?,
    );
    if !config.tie_word_embeddings {
        tensors.insert(
            "lm_head.weight".to_string(),
            randn(&[config.vocab_size, config.hidden_size])?,
        );
    }
    for layer in 0..config.num_layers {
        let prefix = format!("model.layers.{layer}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(
                format!("{prefix}.{norm}.weight"),
                Tensor::ones(config.hidden_size, DType::F32, device)?,
            );
        }
        for kind in ModuleKind::ALL {
            let (d_in, d_out) = config.module_dims(kind);
            let name = format!("{prefix}.{}.{}", kind.block(), kind.name());
            tensors.insert(format!("{name}.weight"), randn(&[d_out, d_in])?);
            if config.attention_bias
                && matches!(
                    kind,
                    ModuleKind::QProj | ModuleKind::KProj | ModuleKind::VProj
                )
            {
                tensors.insert(format!("{name}.bias"), randn(&[d_out])?);
            }
        }
    }
    Transformer::new(
        config.clone(),
        tensors,
        dtype,
        device,
        std::path::Path::new("<random>"),
    )
    .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// What to benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchOptions {
    /// Geometry name.
    pub geometry: String,
    /// `train` or `probe`.
    pub mode: String,
    /// Placement (`all`, `explicit:layers.2.mlp.down_proj`, …; `one:2.down_proj` accepted).
    pub placement: String,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Adapter rank.
    pub rank: usize,
    /// Adapter α.
    pub alpha: f64,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Also time the phases of a step (forward, head + loss, backward, optimizer), with a
    /// device synchronisation between them (which slows the step a little).
    #[serde(default)]
    pub profile: bool,
    /// Probe mode: the placement rule whose batch is timed (PAGE by default).
    #[serde(default)]
    pub rule: Rule,
}

/// The benchmark's result (field names shared with the PEFT baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// Geometry name.
    pub geometry: String,
    /// `train` or `probe`.
    pub mode: String,
    /// Placement.
    pub placement: String,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Rank.
    pub rank: usize,
    /// α.
    pub alpha: f64,
    /// Compute dtype.
    pub dtype: String,
    /// Median step time.
    pub step_ms_median: f64,
    /// 10th percentile.
    pub step_ms_p10: f64,
    /// 90th percentile.
    pub step_ms_p90: f64,
    /// Tokens per second at the median.
    pub tokens_per_s: f64,
    /// Peak device memory as the device reports it, cached pool blocks and library
    /// workspaces included (filled in by the caller where it can be measured).
    pub peak_mem_gib: Option<f64>,
    /// Peak of live device allocations over warm-up and timed steps, weights included: the
    /// measure of PyTorch's `max_memory_allocated` (CUDA only).
    #[serde(default)]
    pub peak_alloc_gib: Option<f64>,
    /// Peak resident memory of the process over warm-up and timed steps, weights included
    /// (host memory: the whole footprint on the CPU); absent where it cannot be measured.
    #[serde(default)]
    pub peak_rss_gib: Option<f64>,
    /// Model TFLOP/s at the median (formula of `bench/peft_baseline.py`; 0 for the probe
    /// rules other than PAGE, whose work is not the model's forward and backward).
    pub tflops: f64,
    /// Model FLOPs of one step (0 for the probe rules other than PAGE).
    pub flops_per_step: f64,
    /// Probe mode: the rule timed.
    #[serde(default)]
    pub rule: Rule,
    /// Timed steps.
    pub steps: usize,
    /// Warm-up steps.
    pub warmup: usize,
    /// Loss of each step (warm-up included), to compare runs.
    pub losses: Vec<f64>,
    /// Probe mode: ‖∇B‖² of every module at the last step, in layer-major order.
    pub probe_scores: Vec<f64>,
    /// `lorasweep`.
    pub framework: String,
    /// Device description.
    pub device: String,
    /// With `profile`: median milliseconds of each phase of the timed steps.
    #[serde(default)]
    pub phases_ms: BTreeMap<String, f64>,
}

/// Runs the benchmark.
pub fn run(options: &BenchOptions, device: &Device) -> Result<BenchResult, String> {
    let config = geometry(&options.geometry).ok_or_else(|| {
        format!(
            "unknown geometry {:?} (smollm2-135m, qwen2.5-0.5b, tiny)",
            options.geometry
        )
    })?;
    let dtype = crate::loader::default_dtype(device);
    let err = |e: candle_core::Error| e.to_string();
    let mut model = random_model(&config, dtype, device, options.seed).map_err(err)?;
    model.set_fused_kernels(crate::fused::on_for_training());
    let placement_text = match options.placement.strip_prefix("one:") {
        Some(rest) => {
            let (layer, kind) = rest.split_once('.').ok_or("one:LAYER.KIND expected")?;
            let kind = ModuleKind::parse(kind).ok_or("unknown module kind")?;
            let block = kind.block();
            format!("explicit:layers.{layer}.{block}.{kind}")
        }
        None => options.placement.clone(),
    };
    let modules = if options.mode == "probe" {
        config
            .all_modules()
            .into_iter()
            .map(|m| (m, options.rank))
            .collect()
    } else {
        crate::placement::parse(&placement_text)
            .map_err(|e| e.to_string())?
            .resolve(&config, None, options.rank, Variant::Lora, options.seed)
            .map_err(|e| e.to_string())?
    };
    let probe_settings = ProbeSettings {
        rank: options.rank,
        alpha: options.alpha,
        batch_size: options.batch,
        max_len: options.seq_len + 1,
        seed: options.seed,
        rule: options.rule,
        ..Default::default()
    };
    if options.mode == "probe" && options.rule != Rule::Page {
        return rule_probe(options, &config, model, &probe_settings, device);
    }
    if options.mode == "probe" {
        probe::attach_probe_adapters(&mut model, &probe_settings).map_err(|e| e.to_string())?;
    } else {
        let settings = AdapterSettings {
            variant: Variant::Lora,
            rank: options.rank,
            alpha: options.alpha,
            a_init: AInit::Kaiming,
            seed: options.seed,
        };
        for &(module, rank) in &modules {
            let weight = model.projection(module).weight().clone();
            let (adapter, _) =
                Adapter::init(module, &weight, rank, &settings).map_err(|e| e.to_string())?;
            model.projection_mut(module).attach(adapter, None);
        }
    }
    let total = options.warmup + options.steps;
    let shape = (options.batch, options.seq_len);
    // Random token batches made on the device up front, as the baseline does.
    let mut batches = Vec::new();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(options.seed);
    for _ in 0..total.min(4) {
        let ids: Vec<u32> = (0..options.batch * (options.seq_len + 1))
            .map(|_| rand::Rng::random_range(&mut rng, 0..config.vocab_size as u32))
            .collect();
        let all =
            Tensor::from_vec(ids, (options.batch, options.seq_len + 1), device).map_err(err)?;
        let input = all
            .narrow(1, 0, options.seq_len)
            .map_err(err)?
            .contiguous()
            .map_err(err)?;
        let target = all
            .narrow(1, 1, options.seq_len)
            .map_err(err)?
            .contiguous()
            .map_err(err)?;
        batches.push((input, target));
    }
    let weights = Tensor::ones(shape, DType::F32, device).map_err(err)?;
    let mut params = train::collect_params(&model).map_err(|e| e.to_string())?;
    let train_settings = TrainSettings {
        lr: options.lr,
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut probe_scores = Vec::new();
    let mut phase_times: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // The live-allocation peak is an extra measure: a driver that refuses it costs the
    // figure, not the benchmark.
    let peak_alloc_ok = match loader::reset_peak_allocated(device) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reset the device's allocation peak; not reporting it");
            false
        }
    };
    let memory = crate::memory::PeakRss::start();
    for step in 0..total {
        let (input, target) = &batches[step % batches.len()];
        device.synchronize().map_err(err)?;
        let started = Instant::now();
        let mut phase = PhaseClock::new(options.profile, device);
        // The batch in the passes training runs it in (`Transformer::loss_and_grads`), each
        // phase's time summed over them.
        let mut loss = 0.0;
        let mut grads = candle_core::backprop::GradStore::default();
        for pass in model.row_passes(&weights).map_err(err)? {
            let rows = |t: &Tensor| pass.rows_of(t).map_err(err);
            let (input, target, weights) = (rows(input)?, rows(target)?, rows(&weights)?);
            let (pass_loss, pass_grads) = if model.hand_backward() {
                let tape = model.forward_tape(&input).map_err(err)?;
                phase.lap("forward").map_err(err)?;
                let (loss, grad_last) = model
                    .head_loss_and_grad(tape.last(), &target, &weights, pass.share)
                    .map_err(err)?;
                phase.lap("head_loss").map_err(err)?;
                let grads = model.backward_tape(tape, grad_last).map_err(err)?;
                phase.lap("backward").map_err(err)?;
                (loss, grads)
            } else {
                let hidden = model.hidden_states(&input, 0, None).map_err(err)?;
                phase.lap("forward").map_err(err)?;
                let loss = (model
                    .loss_from_hidden(&hidden, &target, &weights)
                    .map_err(err)?
                    * pass.share)
                    .map_err(err)?;
                phase.lap("head_loss").map_err(err)?;
                let grads = loss.backward().map_err(err)?;
                phase.lap("backward").map_err(err)?;
                (loss, grads)
            };
            loss += pass_loss
                .to_dtype(DType::F32)
                .and_then(|l| l.to_scalar::<f32>())
                .map_err(err)? as f64;
            grads.extend(pass_grads).map_err(err)?;
        }
        if options.mode == "probe" {
            // Read every ‖∇B‖², as the probe does.
            let grads_b: Vec<Option<&Tensor>> = model
                .adapters()
                .iter()
                .map(|(_, adapter)| grads.get(adapter.b().as_tensor()))
                .collect();
            probe_scores = crate::ops::squared_norms(&grads_b).map_err(err)?;
        } else {
            let collected: Vec<Option<Tensor>> = params
                .iter()
                .map(|p| {
                    grads
                        .get(p.var.as_tensor())
                        .map(|g| g.to_dtype(DType::F32))
                        .transpose()
                })
                .collect::<Result<_, _>>()
                .map_err(err)?;
            let norm = train::global_norm(&collected).map_err(|e| e.to_string())?;
            let clip = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
            train::adamw_step(
                &mut params,
                &collected,
                step + 1,
                options.lr,
                clip,
                &train_settings,
            )
            .map_err(|e| e.to_string())?;
        }
        phase
            .lap(if options.mode == "probe" {
                "read_scores"
            } else {
                "optimizer"
            })
            .map_err(err)?;
        if step >= options.warmup {
            for (name, ms) in phase.laps {
                phase_times.entry(name).or_default().push(ms);
            }
        }
        losses.push(loss);
        device.synchronize().map_err(err)?;
        if step >= options.warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let peak_alloc_gib = match loader::peak_allocated_bytes(device) {
        Ok(bytes) if peak_alloc_ok => bytes.map(|b| b as f64 / (1u64 << 30) as f64),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the device's allocation peak; not reporting it");
            None
        }
    };
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let median = pick(0.5);
    let flops = flops_per_step(
        &config,
        &modules
            .iter()
            .map(|(m, _)| (m.layer, m.kind))
            .collect::<Vec<_>>(),
        options.batch,
        options.seq_len,
        options.rank,
    );
    Ok(BenchResult {
        geometry: options.geometry.clone(),
        mode: options.mode.clone(),
        placement: options.placement.clone(),
        batch: options.batch,
        seq_len: options.seq_len,
        rank: options.rank,
        alpha: options.alpha,
        dtype: if dtype == DType::BF16 {
            "bf16".into()
        } else {
            "f32".into()
        },
        step_ms_median: median,
        step_ms_p10: pick(0.1),
        step_ms_p90: pick(0.9),
        tokens_per_s: (options.batch * options.seq_len) as f64 / (median / 1e3),
        peak_mem_gib: None,
        peak_alloc_gib,
        peak_rss_gib: memory.peak_gib(),
        tflops: flops / (median / 1e3) / 1e12,
        flops_per_step: flops,
        rule: options.rule,
        steps: options.steps,
        warmup: options.warmup,
        losses,
        probe_scores,
        framework: "lorasweep".into(),
        device: format!("{device:?}"),
        phases_ms: phase_times
            .into_iter()
            .map(|(name, mut times)| {
                times.sort_by(f64::total_cmp);
                (name, times[times.len() / 2])
            })
            .collect(),
    })
}

/// The probe batch of a placement rule other than PAGE: `grad`, `grad-rank` and `act` score
/// one batch of random tokens (every token a response token) per step, `kappa` and `random`
/// score the whole model per step (their cost per model; `kappa` without its cache).
fn rule_probe(
    options: &BenchOptions,
    config: &ModelConfig,
    mut model: Transformer,
    settings: &ProbeSettings,
    device: &Device,
) -> Result<BenchResult, String> {
    let err = |e: candle_core::Error| e.to_string();
    let prepared = if options.rule.reads_data() {
        Some(rules::prepare(&mut model, settings).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(options.seed);
    let batches: Vec<Collated> = (0..(options.warmup + options.steps).min(4))
        .map(|_| {
            let tokens: Vec<u32> = (0..options.batch * (options.seq_len + 1))
                .map(|_| rand::Rng::random_range(&mut rng, 0..config.vocab_size as u32))
                .collect();
            let rows: Vec<&[u32]> = tokens.chunks(options.seq_len + 1).collect();
            Collated {
                batch: options.batch,
                seq_len: options.seq_len,
                ids: rows
                    .iter()
                    .flat_map(|row| &row[..options.seq_len])
                    .copied()
                    .collect(),
                targets: rows.iter().flat_map(|row| &row[1..]).copied().collect(),
                weights: vec![1.0; options.batch * options.seq_len],
            }
        })
        .collect();
    let peak_alloc_ok = loader::reset_peak_allocated(device).is_ok();
    let memory = crate::memory::PeakRss::start();
    let mut times = Vec::new();
    let mut probe_scores = Vec::new();
    for step in 0..options.warmup + options.steps {
        device.synchronize().map_err(err)?;
        let started = Instant::now();
        probe_scores = match &prepared {
            Some(prepared) => {
                let batch = &batches[step % batches.len()];
                prepared
                    .score_batch(&model, batch, settings, step)
                    .map_err(|e| e.to_string())?
                    .scores
            }
            None => rules::data_free_scores(&model, settings, "bench", None)
                .map_err(|e| e.to_string())?,
        };
        device.synchronize().map_err(err)?;
        if step >= options.warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let peak_alloc_gib = match loader::peak_allocated_bytes(device) {
        Ok(bytes) if peak_alloc_ok => bytes.map(|b| b as f64 / (1u64 << 30) as f64),
        _ => None,
    };
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let median = pick(0.5);
    let tokens = if options.rule.reads_data() {
        (options.batch * options.seq_len) as f64
    } else {
        0.0
    };
    Ok(BenchResult {
        geometry: options.geometry.clone(),
        mode: options.mode.clone(),
        placement: options.placement.clone(),
        batch: options.batch,
        seq_len: options.seq_len,
        rank: options.rank,
        alpha: options.alpha,
        dtype: if model.dtype() == DType::BF16 {
            "bf16".into()
        } else {
            "f32".into()
        },
        step_ms_median: median,
        step_ms_p10: pick(0.1),
        step_ms_p90: pick(0.9),
        tokens_per_s: tokens / (median / 1e3),
        peak_mem_gib: None,
        peak_alloc_gib,
        peak_rss_gib: memory.peak_gib(),
        tflops: 0.0,
        flops_per_step: 0.0,
        steps: options.steps,
        warmup: options.warmup,
        losses: Vec::new(),
        probe_scores,
        framework: "lorasweep".into(),
        device: format!("{device:?}"),
        phases_ms: BTreeMap::new(),
        rule: options.rule,
    })
}

/// Times the phases of one step when profiling: each lap synchronises the device first, so
/// the time is the phase's device work, not just its launches. Laps of one name (a phase of
/// each pass of the batch) add up.
struct PhaseClock<'a> {
    device: Option<&'a Device>,
    last: Instant,
    laps: Vec<(String, f64)>,
}

impl<'a> PhaseClock<'a> {
    fn new(enabled: bool, device: &'a Device) -> PhaseClock<'a> {
        PhaseClock {
            device: enabled.then_some(device),
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, name: &str) -> candle_core::Result<()> {
        let Some(device) = self.device else {
            return Ok(());
        };
        device.synchronize()?;
        let now = Instant::now();
        let ms = (now - self.last).as_secs_f64() * 1e3;
        match self.laps.iter_mut().find(|(lap, _)| lap == name) {
            Some((_, total)) => *total += ms,
            None => self.laps.push((name.to_string(), ms)),
        }
        self.last = now;
        Ok(())
    }
}

/// Model FLOPs of one step (see `bench/peft_baseline.py` for the derivation): frozen weights
/// get no weight gradient, so backward counts input gradients from the head down to the
/// shallowest adapted layer.
pub fn flops_per_step(
    config: &ModelConfig,
    placement: &[(usize, ModuleKind)],
    batch: usize,
    seq: usize,
    rank: usize,
) -> f64 {
    let tokens = (batch * seq) as f64;
    let linear: usize = ModuleKind::ALL
        .iter()
        .map(|&k| {
            let (i, o) = config.module_dims(k);
            i * o
        })
        .sum();
    let attn = 2.0 * seq as f64 * (config.num_heads * config.head_dim) as f64;
    let head = 2.0 * (config.hidden_size * config.vocab_size) as f64;
    let lora: f64 = placement
        .iter()
        .map(|&(_, kind)| {
            let (i, o) = config.module_dims(kind);
            2.0 * rank as f64 * (i + o) as f64
        })
        .sum();
    let shallowest = placement.iter().map(|&(l, _)| l).min().unwrap_or(0);
    let layers = config.num_layers as f64;
    let forward = tokens * (layers * (2.0 * linear as f64 + attn) + head) + tokens * lora;
    let backward = tokens
        * ((config.num_layers - shallowest) as f64 * (2.0 * linear as f64 + 2.0 * attn) + head)
        + 2.0 * tokens * lora;
    forward + backward
}
