//! The long-running verbs: `coordinator` (the gRPC server with its database and artifacts)
//! and `worker` (the agent that leases jobs and runs them on this machine's slots).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use lorasweep_coordinator::client::WorkerIdentity;
use lorasweep_coordinator::ids::WorkerId;
use lorasweep_coordinator::scheduler::SchedulerConfig;
use lorasweep_coordinator::service::auth::token_from;
use lorasweep_coordinator::service::{start, CoordinatorOptions, TlsIdentity};
use lorasweep_coordinator::store::{SqliteStore, Store};
use lorasweep_engine::eval::sandbox::{Sandbox, SandboxConfig, ALLOW_WEAK_ENV};
use lorasweep_worker::agent::{run_agent, AgentOptions, JobExecutor};

use crate::cli::connect::{connect, ConnectArgs};
use crate::cli::runtime::{runtime, shutdown_signal};

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
    /// Check the database and the artifact directory instead of serving: SQLite's own
    /// checks, every job in one consistent state, every recorded artifact a whole file with its
    /// recorded size and SHA-256. Prints what was checked; exits with status 1 on a violation.
    /// Run it on a stopped coordinator's files.
    #[arg(long)]
    pub check: bool,
    /// Shut down when standard input closes (used by `lorasweep run`).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
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
    /// Check the database and the artifact directory instead of serving: SQLite's own
    /// checks, every job in one consistent state, every recorded artifact a whole file with its
    /// recorded size and SHA-256. Prints what was checked; exits with status 1 on a violation.
    /// Run it on a stopped coordinator's files.
    #[arg(long)]
    pub check: bool,
    /// Shut down when standard input closes (used by `lorasweep run`).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
    /// Accept a code sandbox weaker than Landlock + seccomp + resource limits (by default
    /// code-evaluation jobs refuse to run below that level; docs/security.md).
    #[arg(long = "allow-weak-sandbox", env = ALLOW_WEAK_ENV)]
    pub allow_weak_sandbox: bool,
}

/// The code sandbox of a worker's eval jobs: the token file is hidden from the programs even
/// when it lies under a readable system directory (a Kubernetes secret under `/etc`).
fn sandbox_config(args: &WorkerArgs) -> SandboxConfig {
    SandboxConfig {
        allow_weak: args.allow_weak_sandbox,
        hidden_paths: args.connect.token_file.iter().cloned().collect(),
        ..SandboxConfig::default()
    }
}

/// Probes the code sandbox once at start and logs the isolation level it obtained, or why
/// code evaluation will refuse to run (the worker still serves other jobs).
fn report_sandbox(config: &SandboxConfig) {
    match Sandbox::new(config.clone()) {
        Ok(sandbox) => {
            let isolation = sandbox.isolation();
            if isolation.is_strong() {
                tracing::info!(%isolation, python = %sandbox.python().display(), "code sandbox ready");
            } else {
                tracing::warn!(
                    %isolation,
                    python = %sandbox.python().display(),
                    "code sandbox below the strong level, accepted by --allow-weak-sandbox"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "code evaluation will refuse to run on this worker"),
    }
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
    Ok(Arc::new(
        EngineExecutor::new(slots).with_sandbox(sandbox_config(args)),
    ))
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

/// `--artifacts`, or `artifacts` beside the database.
fn artifact_dir(args: &CoordinatorArgs) -> PathBuf {
    args.artifacts.clone().unwrap_or_else(|| {
        args.db
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("artifacts")
    })
}

/// `lorasweep coordinator --check`.
fn check_store(args: &CoordinatorArgs) -> Result<()> {
    if !args.db.is_file() {
        bail!("--check: no database at {}", args.db.display());
    }
    let artifacts = artifact_dir(args);
    let store = SqliteStore::open(&args.db)
        .with_context(|| format!("cannot open database {}", args.db.display()))?;
    let report = store
        .check_integrity(Some(&artifacts))
        .with_context(|| format!("cannot check database {}", args.db.display()))?;
    for violation in &report.violations {
        println!("violation: {violation}");
    }
    println!(
        "{}: {} jobs, {} artifacts checked against {}; {} violations",
        args.db.display(),
        report.jobs,
        report.artifacts,
        artifacts.display(),
        report.violations.len()
    );
    if !report.violations.is_empty() {
        bail!(
            "{} has {} integrity violations",
            args.db.display(),
            report.violations.len()
        );
    }
    Ok(())
}

/// `lorasweep coordinator`: serves until Ctrl-C or SIGTERM.
pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    if args.check {
        return check_store(&args);
    }
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
    let artifacts = artifact_dir(&args);
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

/// Writes `content` to `path` through a temporary beside it and a rename, so a reader sees the
/// old file or the whole new one; the file gets the usual mode (0666 less the umask).
pub(crate) fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    write_through_temporary(path, content, 0o666)
}

/// [`write_atomically`] for a secret such as a bearer token: the temporary is created with mode
/// 0600, so neither it nor the file it becomes is ever readable by anyone but its owner.
pub(crate) fn write_secret(path: &Path, content: &[u8]) -> Result<()> {
    write_through_temporary(path, content, 0o600)
}

fn write_through_temporary(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let temporary = PathBuf::from(format!("{}.tmp", path.display()));
    let mut file = create_fresh(&temporary, mode)?;
    if let Err(error) = file.write_all(content).and_then(|()| file.sync_all()) {
        drop(file);
        let _ = std::fs::remove_file(&temporary);
        return Err(error).with_context(|| format!("cannot write {}", temporary.display()));
    }
    drop(file);
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Creates `path` anew with `mode` (less the umask) from its first byte. A file already there (a
/// crashed writer's temporary, or one planted with wider bits) is removed, never reused, and
/// `create_new` refuses to follow a link put in its place meanwhile.
fn create_fresh(path: &Path, mode: u32) -> Result<std::fs::File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot remove stale {}", path.display()))
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
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
    report_sandbox(&sandbox_config(&args));
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

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::{create_fresh, write_atomically, write_secret};

    /// Sets the process's umask for the guard's life (umask is process-wide: only tests that
    /// look at modes should care, and they set the one they need).
    struct Umask(libc::mode_t);

    impl Umask {
        fn set(mask: libc::mode_t) -> Self {
            // SAFETY: umask only swaps the process's file-creation mask.
            Umask(unsafe { libc::umask(mask) })
        }
    }

    impl Drop for Umask {
        fn drop(&mut self) {
            // SAFETY: as above; restores the mask found.
            unsafe { libc::umask(self.0) };
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secrets_are_private_from_their_first_byte() {
        let folder = tempfile::tempdir().unwrap();
        let _umask = Umask::set(0o000);

        // The temporary itself, as created and before a byte is written: owner-only even with a
        // permissive umask (a later chmod would leave a window where others can open it).
        let temporary = folder.path().join("probe.tmp");
        let file = create_fresh(&temporary, 0o600).unwrap();
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        drop(file);

        // A stale, world-readable temporary left where the secret's goes is replaced, not reused.
        let token = folder.path().join("token");
        let stale = folder.path().join("token.tmp");
        std::fs::write(&stale, "old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_secret(&token, b"secret").unwrap();
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "secret");
        assert_eq!(mode(&token), 0o600);
        assert!(!stale.exists());

        // Rewriting keeps it private; ordinary files keep the usual mode.
        write_secret(&token, b"another").unwrap();
        assert_eq!(mode(&token), 0o600);
        let address = folder.path().join("coordinator.addr");
        write_atomically(&address, b"127.0.0.1:1").unwrap();
        assert_eq!(mode(&address), 0o666);
    }
}
