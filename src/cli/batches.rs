//! `tasks batches`: the token batches a train job or a probe steps through, written as JSONL so
//! that a baseline in another framework (bench/sweep_baseline.py) trains and probes on exactly
//! the same tokens, in the same order, with the same loss weights.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use lorasweep_engine::data::Collated;
use lorasweep_engine::jobs;
use lorasweep_engine::probe::ProbeSettings;
use lorasweep_engine::train::TrainSettings;

use super::engine::DataArgs;

/// Arguments of `lorasweep tasks batches`.
#[derive(Args, Debug)]
pub struct BatchesArgs {
    /// A packaged model name, a GGUF file or a Hugging Face directory (its tokenizer and chat
    /// template encode the data).
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// Write the probe's batches (`--batches` of `--batch-size`, seeded by `--seed`) instead of
    /// a train job's.
    #[arg(long)]
    probe: bool,
    /// Optimizer steps (train).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Probe batches (with --probe).
    #[arg(long, default_value_t = 8)]
    batches: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per step (train).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longest tokenized conversation; longer ones are cut.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// The data order's seed (the train job's seed, or the probe seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The JSONL file to write: one line per micro-batch, `{"step", "micro", "ids",
    /// "targets", "mask"}` with one list per row (ids and next-token targets right-padded,
    /// mask 1 where the target is a response token the loss counts).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `lorasweep tasks batches`.
pub fn batches(args: BatchesArgs) -> anyhow::Result<()> {
    for (name, value) in [
        ("--steps", args.steps),
        ("--batches", args.batches),
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--max-len", args.max_len),
    ] {
        anyhow::ensure!(value > 0, "{name} must be at least 1");
    }
    let data = args.data.source()?;
    let model = jobs::load_model(&args.model, &candle_core::Device::Cpu)
        .with_context(|| format!("loading {}", args.model))?;
    let steps: Vec<Vec<Collated>> = if args.probe {
        let settings = ProbeSettings {
            batches: args.batches,
            batch_size: args.batch_size,
            max_len: args.max_len,
            seed: args.seed,
            ..ProbeSettings::default()
        };
        jobs::probe_batches_of(&model, &data, &settings)?
            .into_iter()
            .map(|batch| vec![batch])
            .collect()
    } else {
        let settings = TrainSettings {
            steps: args.steps,
            batch_size: args.batch_size,
            grad_accum: args.grad_accum,
            max_len: args.max_len,
            seed: args.seed,
            ..TrainSettings::default()
        };
        jobs::train_batches(&model, &data, &settings)?
    };
    write(&args.out, &steps).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {} steps to {}", steps.len(), args.out.display());
    Ok(())
}

fn write(path: &std::path::Path, steps: &[Vec<Collated>]) -> std::io::Result<()> {
    let temp = path.with_extension("partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&temp)?);
    for (step, micro_batches) in steps.iter().enumerate() {
        for (micro, batch) in micro_batches.iter().enumerate() {
            let mask: Vec<u8> = batch.weights.iter().map(|&w| u8::from(w > 0.0)).collect();
            let line = serde_json::json!({
                "step": step,
                "micro": micro,
                "ids": rows_of(&batch.ids, batch),
                "targets": rows_of(&batch.targets, batch),
                "mask": rows_of(&mask, batch),
            });
            writeln!(out, "{line}")?;
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(temp, path)
}

/// A collated batch's flat `batch * seq_len` values as one slice per row.
fn rows_of<'a, T>(values: &'a [T], batch: &Collated) -> Vec<&'a [T]> {
    values
        .chunks(batch.seq_len.max(1))
        .take(batch.batch)
        .collect()
}
