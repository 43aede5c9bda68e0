//! `lorasweep bench train|probe`: step time, tokens/s, peak memory and TFLOP/s of the engine on
//! a named geometry with random weights, in the JSON shape of `bench/peft_baseline.py`.
//! `lorasweep bench kernels`: the fused kernels against candle's composed ops.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, ValueEnum};
use lorasweep_engine::bench::{self, BenchOptions};
use lorasweep_engine::loader;
use lorasweep_engine::rules::Rule;

/// What to time.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// A training step: forward, backward, AdamW.
    Train,
    /// A probe batch: PAGE's (adapters everywhere, forward, backward, every ‖∇B‖²) or, with
    /// `--rule`, another placement rule's.
    Probe,
    /// No timing: every fused kernel on the device, in f32 and bf16, forward and backward,
    /// against candle's composed ops on the CPU in f32; fails if one is out of tolerance.
    Kernels,
}

/// Arguments of `lorasweep bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// train or probe.
    #[arg(value_enum)]
    mode: Mode,
    /// smollm2-135m, qwen2.5-0.5b or tiny.
    #[arg(long, default_value = "smollm2-135m")]
    geometry: String,
    /// all, explicit:layers.2.mlp.down_proj, one:2.down_proj, kind:K, random:N.
    #[arg(long, default_value = "all")]
    placement: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Adapter alpha.
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu or cuda (default: cuda when built with it and present).
    #[arg(long)]
    device: Option<String>,
    /// Measure the waste this engine avoids: frozen projections through candle's generic
    /// matmul, whose backward also computes every frozen weight's gradient.
    #[arg(long)]
    generic_matmul: bool,
    /// Write the result object here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure the fused kernels: attention, RMSNorm, RoPE, SwiGLU, the loss and AdamW
    /// through candle's composed primitives and autograd instead (the path before the fused
    /// ops, on CUDA and on the CPU).
    #[arg(long)]
    composed_kernels: bool,
    /// Also time each phase of a step (forward, head + loss, backward, optimizer), with a
    /// device synchronisation between phases.
    #[arg(long)]
    profile: bool,
    /// Probe mode: the placement rule whose probe batch is timed (page, grad, grad-rank, act;
    /// kappa and random time their whole-model computation).
    #[arg(long, default_value_t = Rule::default())]
    rule: Rule,
}

/// `lorasweep bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    let device = match args.device.as_deref() {
        None => loader::default_device(),
        Some("cpu") => candle_core::Device::Cpu,
        Some("cuda") => loader::cuda_device(0)?,
        Some(other) => anyhow::bail!("--device {other:?}: expected cpu or cuda"),
    };
    if let Mode::Kernels = args.mode {
        return kernels(&device, args.json.as_deref());
    }
    let options = BenchOptions {
        geometry: args.geometry.clone(),
        mode: match args.mode {
            Mode::Train => "train".into(),
            Mode::Probe => "probe".into(),
            Mode::Kernels => unreachable!("handled above"),
        },
        placement: args.placement.clone(),
        batch: args.batch,
        seq_len: args.seq_len,
        rank: args.rank,
        alpha: args.alpha,
        steps: args.steps,
        warmup: args.warmup,
        lr: args.lr,
        seed: args.seed,
        profile: args.profile,
        rule: args.rule,
    };
    lorasweep_engine::ops::use_generic_matmul(args.generic_matmul);
    lorasweep_engine::fused::force_composed(args.composed_kernels);
    let sampler = device.is_cuda().then(MemorySampler::start);
    let mut result = bench::run(&options, &device).map_err(anyhow::Error::msg)?;
    if let Some(sampler) = sampler {
        result.peak_mem_gib = sampler.stop();
    }
    let text = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{text}\n"))?;
    }
    let peak = match (
        result.peak_alloc_gib,
        result.peak_mem_gib,
        result.peak_rss_gib,
    ) {
        (Some(live), Some(used), _) => format!("peak {live:.1} GiB live ({used:.1} GiB used)"),
        (Some(live), None, _) => format!("peak {live:.1} GiB live"),
        (None, Some(used), _) => format!("peak {used:.1} GiB used"),
        (None, None, Some(resident)) => format!("peak {resident:.2} GiB resident"),
        (None, None, None) => "peak n/a".to_string(),
    };
    let what = match (args.mode, result.rule) {
        (Mode::Probe, rule) if !rule.is_page() => format!("probe@{rule}"),
        _ => result.mode.clone(),
    };
    let peak = match result.peak_rss_gib {
        Some(rss) => format!("{peak}, {rss:.2} GiB resident"),
        None => peak,
    };
    println!(
        "lorasweep {what} {} {}: {:.1} ms/step (p10 {:.1}, p90 {:.1}), {:.1} k tok/s, {peak}, {:.2} TFLOP/s, {}",
        result.geometry, result.placement, result.step_ms_median, result.step_ms_p10, result.step_ms_p90,
        result.tokens_per_s / 1e3, result.tflops, result.device
    );
    if !result.phases_ms.is_empty() {
        let phases: Vec<String> = result
            .phases_ms
            .iter()
            .map(|(name, ms)| format!("{name} {ms:.1} ms"))
            .collect();
        println!("  phases (median): {}", phases.join(", "));
    }
    Ok(())
}

/// `lorasweep bench kernels`: prints one line per comparison, writes them all as JSON.
fn kernels(device: &candle_core::Device, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
        for a in lorasweep_engine::fused::check(device, dtype)? {
            println!(
                "{:<34} {:<10} {:<5} max |diff| {:.3e}  relative {:.3e}  (tolerance {:.0e}) {}",
                a.op,
                a.tensor,
                format!("{dtype:?}").to_lowercase(),
                a.max_abs_diff,
                a.rel_diff,
                a.tolerance,
                if a.ok() { "ok" } else { "FAILED" }
            );
            all.push((format!("{dtype:?}").to_lowercase(), a));
        }
    }
    if let Some(path) = json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|(dtype, a)| {
                let mut row = serde_json::to_value(a).unwrap_or_default();
                row["dtype"] = dtype.clone().into();
                row["device"] = format!("{device:?}").into();
                row
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")?;
    }
    let failed = all.iter().filter(|(_, a)| !a.ok()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} kernel comparisons are out of tolerance",
        all.len()
    );
    println!(
        "all {} kernel comparisons within tolerance on {device:?}",
        all.len()
    );
    Ok(())
}

/// Samples the GPU's used memory with `nvidia-smi` every 50 ms; the peak minus what was used
/// before the run (the CUDA context) approximates the run's peak allocation. This includes
/// memory the allocator keeps cached, so it never understates.
struct MemorySampler {
    running: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<(f64, f64)>>,
}

impl MemorySampler {
    fn start() -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let handle = std::thread::spawn(move || {
            let read = || -> Option<f64> {
                let out = std::process::Command::new("nvidia-smi")
                    .args([
                        "--query-gpu=memory.used",
                        "--format=csv,noheader,nounits",
                        "-i",
                        "0",
                    ])
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .lines()
                    .next()?
                    .trim()
                    .parse::<f64>()
                    .ok()
            };
            let base = read()?;
            let mut peak = base;
            while flag.load(Ordering::Relaxed) {
                if let Some(used) = read() {
                    peak = peak.max(used);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Some((base, peak))
        });
        Self { running, handle }
    }

    fn stop(self) -> Option<f64> {
        self.running.store(false, Ordering::Relaxed);
        let (base, peak) = self.handle.join().ok()??;
        Some((peak - base) / 1024.0)
    }
}
