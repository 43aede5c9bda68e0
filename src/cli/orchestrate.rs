//! The orchestration verbs: `coordinator`, `worker`, `submit`, `status`, `watch`, `cancel`
//! and `run` (a coordinator and N workers of this same binary on loopback).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::watch;

use lorasweep_coordinator::client::{
    ClientOptions, CoordinatorClient, WorkerIdentity, COORDINATOR_ENV,
};
use lorasweep_coordinator::domain::{JobState, SweepStatus};
use lorasweep_coordinator::ids::{SweepId, WorkerId};
use lorasweep_coordinator::scheduler::SchedulerConfig;
use lorasweep_coordinator::service::auth::{generate_token, token_from};
use lorasweep_coordinator::service::{start, CoordinatorOptions, TlsIdentity};
use lorasweep_coordinator::spec::Sweep;
use lorasweep_coordinator::store::{SqliteStore, Store};
use lorasweep_worker::agent::{run_agent, AgentOptions, JobExecutor};

/// `lorasweep coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on (a non-loopback address needs a token).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The state database (SQLite; created if missing).
    #[arg(long)]
    pub db: PathBuf,
    /// Where uploaded artifacts are kept [default: `artifacts` beside the database].
    #[arg(long)]
    pub artifacts: Option<PathBuf>,
    /// File holding the bearer token [default: $LORASWEEP_TOKEN].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain, to serve TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Address to serve /metrics (Prometheus) and /healthz on.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds a lease lives without a heartbeat.
    #[arg(long, default_value_t = 30)]
    pub lease_ttl_secs: u64,
    /// Seconds between worker heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_secs: u64,
    /// Seconds a multi-GPU job waits, with smaller jobs running past it, before it holds
    /// free GPUs for itself.
    #[arg(long, default_value_t = 60)]
    pub gang_patience_secs: u64,
    /// Write the bound gRPC address to this file once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Shut down when standard input closes (used by `lorasweep run`).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

/// How to reach the coordinator (shared by the client verbs and the worker).
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The coordinator's URL.
    #[arg(long, env = COORDINATOR_ENV, default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// File holding the bearer token [default: $LORASWEEP_TOKEN].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an https coordinator.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name the coordinator's certificate carries, if not the URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
}

/// `lorasweep worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// GPU indices this worker offers, comma-separated: one slot per GPU, each job computing
    /// on the CUDA device of its slot (none, and no --cpu-slots: one slot on the default
    /// device).
    #[arg(long, value_delimiter = ',', conflicts_with = "cpu_slots")]
    pub gpus: Vec<u32>,
    /// Offer N slots that compute on the CPU instead of GPUs. A slot is one rank: a train job
    /// of a sweep with `resources: {gpus_per_job: N}` takes N slots and runs its N
    /// data-parallel ranks as threads here (the sweep field keeps its name).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub cpu_slots: Option<u32>,
    /// Folder for job scratch files.
    #[arg(long, default_value = "lorasweep-work")]
    pub work_dir: PathBuf,
    /// The worker's id [default: HOST-PID].
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Seconds to keep trying to reach the coordinator at start.
    #[arg(long, default_value_t = 60)]
    pub connect_secs: u64,
    /// Shut down when standard input closes (used by `lorasweep run`).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

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

/// `lorasweep run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The sweep file.
    pub file: PathBuf,
    /// Worker processes to start.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Folder for the database, artifacts, logs and scratch files; running again with the
    /// same folder resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// GPU indices to hand out to the workers round-robin, comma-separated (at least one
    /// per worker; none: each worker gets one slot on the default device).
    #[arg(long, value_delimiter = ',')]
    pub gpus: Vec<u32>,
}

/// The engine executor the worker runs jobs with: each job on the device of its slot.
pub fn make_executor(args: &WorkerArgs) -> Result<Arc<dyn JobExecutor>> {
    use lorasweep_worker::executor::{EngineExecutor, SlotDevices};
    let slots = if args.cpu_slots.is_some() {
        SlotDevices::Cpu
    } else if args.gpus.is_empty() {
        SlotDevices::Default
    } else {
        SlotDevices::Gpus
    };
    Ok(Arc::new(EngineExecutor::new(slots)))
}

/// The slots a worker offers the coordinator: its GPU indices, or `0..N` for `--cpu-slots N`
/// (empty: one slot).
fn offered_slots(args: &WorkerArgs) -> Vec<u32> {
    let mut slots = match args.cpu_slots {
        Some(n) => (0..n).collect(),
        None => args.gpus.clone(),
    };
    slots.sort_unstable();
    slots.dedup();
    slots
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A receiver that turns true on Ctrl-C, SIGTERM, or (optionally) standard input closing.
fn shutdown_signal(on_stdin_eof: bool) -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    let signals = sender.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match terminate.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested");
        let _ = signals.send(true);
    });
    if on_stdin_eof {
        std::thread::spawn(move || {
            // Returns at end of input: the parent closed the pipe or exited.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = sender.send(true);
        });
    }
    receiver
}

/// `lorasweep coordinator`: serves until Ctrl-C or SIGTERM.
pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let token = token_from(args.token_file.as_deref())?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsIdentity {
            cert_pem: std::fs::read(cert)
                .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("cannot read --tls-key {}", key.display()))?,
        }),
        _ => None,
    };
    if let Some(parent) = args
        .db
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let artifacts = args.artifacts.clone().unwrap_or_else(|| {
        args.db
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("artifacts")
    });
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&args.db)
            .with_context(|| format!("cannot open database {}", args.db.display()))?,
    );
    let mut options = CoordinatorOptions::new(args.listen, artifacts);
    options.token = token;
    options.tls = tls;
    options.metrics_listen = args.metrics_listen;
    options.heartbeat_interval = Duration::from_secs(args.heartbeat_secs.max(1));
    options.scheduler = SchedulerConfig {
        lease_ttl: Duration::from_secs(args.lease_ttl_secs.max(2)),
        worker_timeout: Duration::from_secs(args.lease_ttl_secs.max(2)),
        gang_patience: Duration::from_secs(args.gang_patience_secs),
    };
    runtime()?.block_on(async move {
        let running = start(store, options).await?;
        if let Some(path) = &args.addr_file {
            write_atomically(path, running.address.to_string().as_bytes())?;
        }
        let mut stop = shutdown_signal(args.exit_on_stdin_eof);
        let handle = running.shutdown_handle();
        tokio::spawn(async move {
            let _ = stop.wait_for(|stop| *stop).await;
            let _ = handle.send(true);
        });
        running.wait().await?;
        tracing::info!("coordinator stopped");
        Ok(())
    })
}

fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let temporary = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&temporary, content)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub(crate) fn connect(args: &ConnectArgs) -> Result<CoordinatorClient> {
    let mut options = ClientOptions::new(args.coordinator.clone());
    options.token = token_from(args.token_file.as_deref())?;
    if let Some(ca) = &args.ca {
        options.ca_pem =
            Some(std::fs::read(ca).with_context(|| format!("cannot read --ca {}", ca.display()))?);
    }
    options.tls_domain = args.tls_domain.clone();
    Ok(CoordinatorClient::connect(&options)?)
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".to_string());
    let host: String = host
        .trim()
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || "._-".contains(character) {
                character
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    format!(
        "{}-{}",
        if host.is_empty() { "worker" } else { &host },
        std::process::id()
    )
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// `lorasweep worker`: pulls and runs jobs until Ctrl-C or SIGTERM.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let executor = make_executor(&args)?;
    let runtime = runtime()?;
    let _context = runtime.enter();
    let client = connect(&args.connect)?;
    let id = WorkerId::new(args.worker_id.clone().unwrap_or_else(default_worker_id))?;
    let identity = WorkerIdentity {
        id,
        host: host_name(),
        gpus: offered_slots(&args),
    };
    let mut options = AgentOptions::new(identity, args.work_dir.clone());
    options.connect_patience = Duration::from_secs(args.connect_secs);
    runtime.block_on(async move {
        let shutdown = shutdown_signal(args.exit_on_stdin_eof);
        let summary = run_agent(client, options, executor, shutdown).await?;
        tracing::info!(
            succeeded = summary.succeeded,
            failed = summary.failed,
            stopped = summary.stopped,
            interrupted = summary.interrupted,
            "worker stopped"
        );
        Ok(())
    })
}

/// The absolute folder of a sweep file: relative paths in it are taken from there, on every
/// machine (so workers need the same paths, e.g. a shared filesystem, for local files).
fn sweep_folder(file: &Path) -> Result<PathBuf> {
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

fn counts_line(status: &SweepStatus) -> String {
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
async fn watch_until_ended(
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

/// A child process that is shut down gracefully (its standard input closed) when dropped,
/// and killed if it does not exit in time.
struct Managed {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Managed {
    fn spawn(name: &str, mut command: Process, log: &Path) -> Result<Managed> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        command
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        #[cfg(unix)]
        {
            // Own process group: a Ctrl-C in the terminal reaches `run` only, which then
            // stops the workers first and the coordinator last.
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Managed {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended and the last line of its log, for a message; `None` while it
    /// runs.
    fn exit_summary(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = text
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("(empty log)");
        Some(format!(
            "{} {status} (log {}: {last})",
            self.name,
            self.log.display()
        ))
    }

    fn stop(&mut self, patience: Duration) {
        drop(self.child.stdin.take());
        let started = Instant::now();
        while started.elapsed() < patience {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::warn!(
            process = self.name.as_str(),
            "did not stop in time; killing it"
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop(Duration::from_secs(30));
        }
    }
}

/// Resolves once no worker is left running, with how each ended. A worker that exits while
/// others run is reported at once; the coordinator requeues its jobs when their leases expire.
async fn every_worker_gone(workers: &mut [Managed]) -> Vec<String> {
    let mut reported = vec![false; workers.len()];
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ended: Vec<(usize, String)> = workers
            .iter_mut()
            .enumerate()
            .filter_map(|(index, worker)| Some((index, worker.exit_summary()?)))
            .collect();
        if ended.len() == workers.len() {
            return ended.into_iter().map(|(_, summary)| summary).collect();
        }
        for (index, summary) in ended {
            if !std::mem::replace(&mut reported[index], true) {
                tracing::warn!("{summary}; the other workers carry on");
            }
        }
    }
}

/// `lorasweep run`: a coordinator and `--workers` workers on loopback, the sweep submitted
/// (or resumed), progress shown, the report written to `OUT/report` and its summary printed at the end.
pub fn run(args: RunArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let mut gpus = args.gpus.clone();
    gpus.sort_unstable();
    gpus.dedup();
    if !gpus.is_empty() && (args.workers as usize) > gpus.len() {
        bail!(
            "--workers {} with --gpus {}: every worker needs a GPU of its own (a worker without one would compute on GPU 0 beside another); start at most {} workers",
            args.workers,
            gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            gpus.len()
        );
    }
    let sweep_spec = Sweep::from_file(&args.file)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let out = &args.out;
    for folder in [out.clone(), out.join("logs"), out.join("work")] {
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
    }
    let token_path = out.join("token");
    if !token_path.exists() {
        write_atomically(&token_path, generate_token().as_bytes())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    let address_path = out.join("coordinator.addr");
    let _ = std::fs::remove_file(&address_path);
    let binary = std::env::current_exe().context("cannot find this program's path")?;

    let mut coordinator_command = Process::new(&binary);
    coordinator_command
        .arg("coordinator")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(out.join("state.db"))
        .arg("--artifacts")
        .arg(out.join("artifacts"))
        .arg("--token-file")
        .arg(&token_path)
        .arg("--addr-file")
        .arg(&address_path)
        .arg("--exit-on-stdin-eof")
        .env_remove("LORASWEEP_TOKEN");
    let mut coordinator = Managed::spawn(
        "coordinator",
        coordinator_command,
        &out.join("logs/coordinator.log"),
    )?;
    let started = Instant::now();
    let address = loop {
        if let Ok(text) = std::fs::read_to_string(&address_path) {
            break text.trim().to_string();
        }
        if !coordinator.is_running() {
            bail!(
                "the coordinator exited at start; see {}",
                out.join("logs/coordinator.log").display()
            );
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the coordinator did not start within 30 s; see {}",
                out.join("logs/coordinator.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let url = format!("http://{address}");
    eprintln!(
        "coordinator at {url} (logs in {})",
        out.join("logs").display()
    );

    let mut workers = Vec::new();
    for index in 0..args.workers {
        let gpus: Vec<String> = gpus
            .iter()
            .enumerate()
            .filter(|(position, _)| *position as u32 % args.workers == index)
            .map(|(_, gpu)| gpu.to_string())
            .collect();
        let mut command = Process::new(&binary);
        command
            .arg("worker")
            .arg("--coordinator")
            .arg(&url)
            .arg("--token-file")
            .arg(&token_path)
            .arg("--work-dir")
            .arg(out.join("work").join(format!("worker-{index}")))
            .arg("--worker-id")
            .arg(format!("run-worker-{index}"))
            .arg("--exit-on-stdin-eof")
            .env_remove("LORASWEEP_TOKEN")
            .env_remove(COORDINATOR_ENV);
        if !gpus.is_empty() {
            command.arg("--gpus").arg(gpus.join(","));
        }
        let log = out.join("logs").join(format!("worker-{index}.log"));
        workers.push(Managed::spawn(&format!("worker {index}"), command, &log)?);
    }

    let mut options = ClientOptions::new(url);
    options.token = Some(std::fs::read_to_string(&token_path)?.trim().to_string());
    let runtime = runtime()?;
    let _context = runtime.enter();
    let client = CoordinatorClient::connect(&options)?;
    let outcome = runtime.block_on(async {
        let stop = shutdown_signal(false);
        let submitted = client
            .submit_sweep_from(
                &text,
                &args.file.display().to_string(),
                Some(&sweep_folder(&args.file)?),
                true,
            )
            .await?;
        eprintln!(
            "{} sweep {} ({}) with {} jobs on {} workers",
            if submitted.existing {
                "resuming"
            } else {
                "running"
            },
            submitted.sweep,
            sweep_spec.name,
            submitted.jobs,
            args.workers
        );
        let status = tokio::select! {
            status = watch_until_ended(&client, submitted.sweep, Some(stop)) => status?,
            gone = every_worker_gone(&mut workers) => bail!(
                "every worker exited before the sweep ended; its state is kept, so run the same command again to resume once the cause is fixed:\n  {}",
                gone.join("\n  ")
            ),
        };
        let results = match &status {
            Some(_) => Some(
                crate::cli::report::fetch(&client, submitted.sweep, &out.join("report/data"))
                    .await?,
            ),
            None => None,
        };
        anyhow::Ok((status, results))
    });
    for worker in &mut workers {
        drop(worker.child.stdin.take());
    }
    for worker in &mut workers {
        worker.stop(Duration::from_secs(60));
    }
    coordinator.stop(Duration::from_secs(30));
    let (status, results) = outcome?;
    let (Some(status), Some(results)) = (status, results) else {
        eprintln!("interrupted; run the same command again to resume");
        // The shell's convention for a run stopped by Ctrl-C: not a success.
        std::process::exit(130);
    };
    crate::cli::report::write_after_run(&results, &out.join("report"))?;
    eprintln!("{}", counts_line(&status));
    let unsuccessful = status.counts[&JobState::Failed] + status.counts[&JobState::Skipped];
    if unsuccessful > 0 {
        bail!("{unsuccessful} jobs failed or were skipped; see `status` details above and the logs in {}", out.join("logs").display());
    }
    std::io::stdout().flush()?;
    Ok(())
}
