//! `lorasweep run`: a coordinator and N workers of this same binary on loopback as child
//! processes, the sweep submitted (or resumed) and watched, and the report written at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use lorasweep_coordinator::client::{ClientOptions, CoordinatorClient, COORDINATOR_ENV};
use lorasweep_coordinator::domain::JobState;
use lorasweep_coordinator::service::auth::generate_token;
use lorasweep_coordinator::spec::Sweep;

use crate::cli::client_verbs::{counts_line, sweep_folder, watch_until_ended};
use crate::cli::runtime::{runtime, shutdown_signal};
use crate::cli::serve::write_secret;

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
    /// Worker processes that may share one GPU (with `--gpus`): with `--workers` above the
    /// number of GPUs, worker `i` computes on GPU `i mod GPUs`. Small models leave most of a
    /// large card idle; several processes on it keep it busy. Each loads its own copy of the
    /// model, so size this by the jobs' peak memory.
    #[arg(long, default_value_t = 1)]
    pub workers_per_gpu: u32,
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
    if args.workers_per_gpu == 0 {
        bail!("--workers-per-gpu must be at least 1");
    }
    let shareable = gpus.len() * args.workers_per_gpu as usize;
    if !gpus.is_empty() && (args.workers as usize) > shareable {
        bail!(
            "--workers {} with --gpus {} and --workers-per-gpu {}: at most {} workers (a worker without a GPU of its own would compute on GPU 0 beside another; raise --workers-per-gpu to share them)",
            args.workers,
            gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            args.workers_per_gpu,
            shareable
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
        write_secret(&token_path, generate_token().as_bytes())?;
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
        let gpus = worker_gpus(&gpus, args.workers, index);
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

/// The GPUs worker `index` of `workers` offers: round-robin when there are at least as many
/// GPUs as workers (a worker may get several), else GPU `index mod GPUs` (workers share them).
fn worker_gpus(gpus: &[u32], workers: u32, index: u32) -> Vec<String> {
    if gpus.is_empty() {
        return Vec::new();
    }
    if workers as usize > gpus.len() {
        return vec![gpus[index as usize % gpus.len()].to_string()];
    }
    gpus.iter()
        .enumerate()
        .filter(|(position, _)| *position as u32 % workers == index)
        .map(|(_, gpu)| gpu.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::worker_gpus;

    #[test]
    fn gpus_are_dealt_round_robin_or_shared() {
        // As many GPUs as workers or more: each worker its own, round-robin.
        assert_eq!(worker_gpus(&[0, 1, 2], 2, 0), ["0", "2"]);
        assert_eq!(worker_gpus(&[0, 1, 2], 2, 1), ["1"]);
        // More workers than GPUs (--workers-per-gpu): GPU index mod count, shared.
        let dealt: Vec<Vec<String>> = (0..4).map(|i| worker_gpus(&[3, 5], 4, i)).collect();
        assert_eq!(dealt, [["3"], ["5"], ["3"], ["5"]]);
        assert!(worker_gpus(&[], 3, 1).is_empty());
    }
}
