//! The client verbs: `submit`, `status`, `watch` and `cancel`, and the status table, JSON
//! and live progress bars they (and `run`) show.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::watch;

use lorasweep_coordinator::client::CoordinatorClient;
use lorasweep_coordinator::domain::{JobState, SweepStatus};
use lorasweep_coordinator::ids::SweepId;
use lorasweep_coordinator::spec::Sweep;

use crate::cli::connect::{connect, ConnectArgs};
use crate::cli::runtime::{runtime, shutdown_signal};

/// `lorasweep submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The sweep file.
    pub file: PathBuf,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Return the existing sweep if this exact file was submitted before from the same folder
    /// (same text, same jobs) and not cancelled.
    #[arg(long)]
    pub resume: bool,
}

/// Output format of `status`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFormat {
    /// Counts and a per-job table.
    Table,
    /// One JSON document: counts per state, whether the sweep ended, every job.
    Json,
}

/// `lorasweep status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The sweep id (as `submit` printed it).
    pub sweep: SweepId,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: StatusFormat,
}

/// `lorasweep watch` and `lorasweep cancel`.
#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The sweep id (as `submit` printed it).
    pub sweep: SweepId,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// The absolute folder of a sweep file: relative paths in it are taken from there, on every
/// machine (so workers need the same paths, e.g. a shared filesystem, for local files).
pub(crate) fn sweep_folder(file: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(file)
        .with_context(|| format!("cannot make {} absolute", file.display()))?;
    Ok(absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/")))
}

/// `lorasweep submit`: prints only the sweep id on stdout.
pub fn submit(args: SubmitArgs) -> Result<()> {
    // Check locally first: local model and data paths are only visible here.
    Sweep::from_file(&args.file)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let runtime = runtime()?;
    let _context = runtime.enter();
    let client = connect(&args.connect)?;
    let submitted = runtime.block_on(client.submit_sweep_from(
        &text,
        &args.file.display().to_string(),
        Some(&sweep_folder(&args.file)?),
        args.resume,
    ))?;
    eprintln!(
        "{} sweep {} with {} jobs",
        if submitted.existing {
            "resuming"
        } else {
            "submitted"
        },
        submitted.sweep,
        submitted.jobs
    );
    println!("{}", submitted.sweep);
    Ok(())
}

/// `lorasweep status`.
pub fn status(args: StatusArgs) -> Result<()> {
    let runtime = runtime()?;
    let _context = runtime.enter();
    let client = connect(&args.connect)?;
    let status = runtime.block_on(client.sweep_status(args.sweep))?;
    match args.format {
        StatusFormat::Json => println!("{}", serde_json::to_string_pretty(&status_json(&status))?),
        StatusFormat::Table => print!("{}", status_table(&status)),
    }
    Ok(())
}

/// The JSON form of a status: what scripts read.
pub fn status_json(status: &SweepStatus) -> Value {
    let counts: serde_json::Map<String, Value> = status
        .counts
        .iter()
        .map(|(state, count)| (state.name().to_string(), json!(count)))
        .collect();
    let jobs: Vec<Value> = status
        .jobs
        .iter()
        .map(|job| {
            json!({
                "id": job.id.0,
                "key": job.key.0,
                "kind": job.kind.name(),
                "model": job.model,
                "task": job.task,
                "state": job.state.name(),
                "attempts": job.attempts,
                "max_attempts": job.max_attempts,
                "step": job.progress.step,
                "total_steps": job.progress.total_steps,
                "loss": job.progress.loss,
                "tokens_per_second": job.progress.tokens_per_second,
                "workers": job.workers.iter().map(|worker| worker.as_str()).collect::<Vec<_>>(),
                "last_error": job.last_error,
                "result": job.result,
            })
        })
        .collect();
    json!({
        "sweep": status.id.0,
        "name": status.name,
        "ended": status.ended,
        "cancelled": status.cancelled.is_some(),
        "counts": counts,
        "jobs": jobs,
    })
}

pub(crate) fn counts_line(status: &SweepStatus) -> String {
    let parts: Vec<String> = status
        .counts
        .iter()
        .map(|(state, count)| format!("{count} {}", state.name()))
        .collect();
    format!(
        "sweep {} ({}): {}{}",
        status.id,
        status.name,
        parts.join(", "),
        if status.cancelled.is_some() {
            " [cancelled]"
        } else if status.ended {
            " [ended]"
        } else {
            ""
        }
    )
}

/// The table form of a status.
pub fn status_table(status: &SweepStatus) -> String {
    let mut out = format!("{}\n", counts_line(status));
    out.push_str(&format!(
        "{:>5}  {:<22}  {:<5}  {:<9}  {:>7}  {:>11}  {:>8}  {}\n",
        "id", "key", "kind", "state", "attempt", "progress", "loss", "worker / error"
    ));
    for job in &status.jobs {
        let progress = if job.progress.total_steps > 0 {
            format!("{}/{}", job.progress.step, job.progress.total_steps)
        } else {
            "-".to_string()
        };
        let loss = job
            .progress
            .loss
            .map_or("-".to_string(), |loss| format!("{loss:.4}"));
        let note = match (job.state, &job.last_error) {
            (JobState::Running, _) => job
                .workers
                .iter()
                .map(|worker| worker.as_str())
                .collect::<Vec<_>>()
                .join(","),
            (_, Some(error)) => error.clone(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:>5}  {:<22}  {:<5}  {:<9}  {:>7}  {:>11}  {:>8}  {}\n",
            job.id.0,
            job.key.0,
            job.kind.name(),
            job.state.name(),
            format!("{}/{}", job.attempts, job.max_attempts),
            progress,
            loss,
            note
        ));
    }
    out
}

/// Shows live progress until the sweep ends; returns the final status.
pub(crate) async fn watch_until_ended(
    client: &CoordinatorClient,
    sweep: SweepId,
    stop: Option<watch::Receiver<bool>>,
) -> Result<Option<SweepStatus>> {
    let bars = MultiProgress::new();
    let overall = bars.add(ProgressBar::new(0));
    overall.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} jobs  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let job_style = ProgressStyle::with_template("  {prefix:<28} [{bar:20}] {pos}/{len}  {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut job_bars: BTreeMap<u64, ProgressBar> = BTreeMap::new();
    let mut failures = 0u32;
    loop {
        if stop.as_ref().is_some_and(|stop| *stop.borrow()) {
            bars.clear().ok();
            return Ok(None);
        }
        let status = match client.sweep_status(sweep).await {
            Ok(status) => {
                failures = 0;
                status
            }
            Err(error) if error.is_retryable() && failures < 30 => {
                failures += 1;
                overall.set_message(format!("coordinator unreachable: {error}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let done = status
            .counts
            .iter()
            .filter(|(state, _)| state.is_final())
            .map(|(_, count)| *count as u64)
            .sum();
        overall.set_prefix(format!("sweep {} ({})", status.id, status.name));
        overall.set_length(status.jobs.len() as u64);
        overall.set_position(done);
        overall.set_message(format!(
            "{} running, {} failed, {} skipped",
            status.counts[&JobState::Running],
            status.counts[&JobState::Failed],
            status.counts[&JobState::Skipped]
        ));
        for job in &status.jobs {
            if job.state == JobState::Running {
                let bar = job_bars.entry(job.id.0).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new(0));
                    bar.set_style(job_style.clone());
                    bar.set_prefix(job.key.0.clone());
                    bar
                });
                bar.set_length(job.progress.total_steps.max(1));
                bar.set_position(job.progress.step);
                let mut message = job.progress.message.clone();
                if let Some(loss) = job.progress.loss {
                    message.push_str(&format!(" loss {loss:.4}"));
                }
                if let Some(speed) = job.progress.tokens_per_second {
                    message.push_str(&format!(" {speed:.0} tok/s"));
                }
                bar.set_message(message);
            } else if let Some(bar) = job_bars.remove(&job.id.0) {
                bar.finish_and_clear();
                bars.remove(&bar);
                if job.state != JobState::Succeeded {
                    let _ = bars.println(format!(
                        "{} {}: {}",
                        job.key,
                        job.state,
                        job.last_error.clone().unwrap_or_default()
                    ));
                }
            }
        }
        if status.ended {
            overall.finish();
            return Ok(Some(status));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `lorasweep watch`: live progress bars until the sweep ends.
pub fn watch(args: SweepArgs) -> Result<()> {
    let runtime = runtime()?;
    let _context = runtime.enter();
    let client = connect(&args.connect)?;
    let status = runtime.block_on(async {
        let stop = shutdown_signal(false);
        watch_until_ended(&client, args.sweep, Some(stop)).await
    })?;
    if let Some(status) = status {
        eprintln!("{}", counts_line(&status));
    }
    Ok(())
}

/// `lorasweep cancel`.
pub fn cancel(args: SweepArgs) -> Result<()> {
    let runtime = runtime()?;
    let _context = runtime.enter();
    let client = connect(&args.connect)?;
    let cancelled = runtime.block_on(client.cancel_sweep(args.sweep))?;
    eprintln!(
        "cancelled {cancelled} jobs of sweep {}; running ones stop at their next heartbeat",
        args.sweep
    );
    Ok(())
}
