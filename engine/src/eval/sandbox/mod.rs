//! Run untrusted Python in a separate, confined process.
//!
//! Model-written code is hostile until proven otherwise. Each program runs as its own
//! `python3` process with:
//!
//! - a wall-clock timeout, after which its whole process group is killed;
//! - resource limits set in the child before `exec`: CPU seconds, address space, file size,
//!   number of processes and open files, no core dumps;
//! - an empty working directory, a cleared environment (a minimal `PATH`, a fixed
//!   `PYTHONHASHSEED`, no bytecode files) and stdin from `/dev/null`;
//! - where the kernel allows it, fresh namespaces: a network namespace (no usable interface,
//!   not even loopback), a mount namespace whose `/tmp`, `/var/tmp` and `/dev/shm` are small
//!   private tmpfs mounts (the working directory lives there too) and a PID namespace, so
//!   that every process the program starts dies with it;
//! - when we run as root, a dedicated unprivileged uid per concurrent run: root ignores
//!   `RLIMIT_NPROC`, so without this a fork bomb would not be bounded, and the uid also
//!   keeps the program out of files only root may write.
//!
//! Which namespaces work is probed once by [`Sandbox::new`]: the strongest level the kernel
//! accepts is used for every run and reported in [`Isolation`]. Network isolation is only
//! given up when the kernel refuses to create the namespaces (containers often do).
//!
//! Not covered: the program can read any world-readable file on the machine (there is no
//! chroot), and without a mount namespace it can write to world-writable directories such
//! as `/tmp` (each file bounded by the file-size limit).
//!
//! The layers live one per file: [`namespaces`] (which namespaces a run enters), [`rlimits`]
//! (the resource limits), [`uid`] (the dedicated uid of root mode), [`child`] (everything done
//! between `fork` and `exec`) and [`spawn`] (waiting, killing and reading the outcome).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod child;
mod namespaces;
mod rlimits;
mod spawn;
mod uid;

use namespaces::Namespaces;
use spawn::{outcome_of, read_tail, wait_with_deadline};
use uid::UidLease;

/// How much of a program's stdout and stderr is kept (the end of each).
pub(crate) const OUTPUT_TAIL_BYTES: u64 = 4096;
/// The directory inside the private `/tmp` where the program runs (mount namespace only).
const PRIVATE_WORKDIR: &str = "/tmp/sandbox";
/// File name of the program inside its working directory.
const PROGRAM_FILE: &str = "main.py";
/// Directories that get a private tmpfs when a mount namespace is available.
const PRIVATE_DIRS: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];
/// The `PATH` the program sees.
const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How many dedicated uids (from [`SandboxConfig::uid_base`]) root mode may use.
const UID_SLOTS: u32 = 256;

/// Resource limits for one program run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock time before the whole process group is killed.
    pub wall: Duration,
    /// CPU seconds (`RLIMIT_CPU`); the process is killed one second after.
    pub cpu_seconds: u64,
    /// Address space of each process (`RLIMIT_AS`), in bytes.
    pub address_space_bytes: u64,
    /// Largest file any process may write (`RLIMIT_FSIZE`), in bytes; covers stdout/stderr.
    pub file_size_bytes: u64,
    /// Processes (threads included) the program may have at once (`RLIMIT_NPROC`).
    pub processes: u64,
    /// Open file descriptors per process (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Size of each private tmpfs (`/tmp`, `/var/tmp`, `/dev/shm`) in bytes.
    pub tmpfs_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            wall: Duration::from_secs(10),
            cpu_seconds: 10,
            address_space_bytes: 1 << 30,
            file_size_bytes: 16 << 20,
            processes: 16,
            open_files: 64,
            tmpfs_bytes: 64 << 20,
        }
    }
}

/// How to build a [`Sandbox`].
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Limits applied to every run.
    pub limits: Limits,
    /// Programs run at once by [`Sandbox::run_all`] (at least 1).
    pub parallelism: usize,
    /// The interpreter; `None` searches `python3` on `PATH`.
    pub python: Option<PathBuf>,
    /// First of the dedicated uids used when running as root.
    pub uid_base: u32,
    /// Try namespaces (network, mount, PID; a user namespace when not root). `false` runs
    /// with the resource limits and the dedicated uid alone, as on a kernel that refuses them.
    pub use_namespaces: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            parallelism: std::thread::available_parallelism().map_or(1, |n| n.get()),
            python: None,
            uid_base: 1_900_000_000,
            use_namespaces: true,
        }
    }
}

/// How a program run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Exited with status 0.
    Passed,
    /// Exited with a non-zero status (an exception, a failed assert, `sys.exit(1)`).
    Failed {
        /// The exit status.
        exit_code: i32,
        /// The end of what it wrote to stderr.
        stderr_tail: String,
    },
    /// Still running at the wall-clock limit; it was killed.
    TimedOut,
    /// Killed by a signal (for example SIGKILL at the CPU limit, or SIGSEGV).
    Crashed {
        /// The signal number.
        signal: i32,
        /// The end of what it wrote to stderr.
        stderr_tail: String,
    },
}

impl Outcome {
    /// Whether the program exited with status 0.
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Passed)
    }
}

/// Who the program runs as, relative to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// We are root; each run gets its own unprivileged uid.
    DedicatedUid,
    /// Our own uid, inside a new user namespace (needed to create the other namespaces).
    UserNamespace,
    /// Our own uid, unchanged.
    Inherited,
}

/// Which confinement was in force, beyond the resource limits that always are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// Own network namespace: no network, not even to 127.0.0.1.
    pub network: bool,
    /// Own mount namespace: private `/tmp`, `/var/tmp`, `/dev/shm` and working directory.
    pub filesystem: bool,
    /// Own PID namespace: all its processes are killed when the program ends.
    pub pid: bool,
    /// Who the program runs as.
    pub identity: Identity,
}

/// The result of one program run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// The end of what it wrote to stdout.
    pub stdout_tail: String,
    /// Wall-clock seconds from spawn to exit (or kill).
    pub wall_s: f64,
    /// The confinement it ran under.
    pub isolation: Isolation,
}

/// What can go wrong running a program (as opposed to the program failing).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No interpreter on `PATH`.
    #[error("python3 was not found on PATH; the code sandbox needs a python 3 interpreter")]
    PythonNotFound,
    /// Interpreters were found but none could run confined.
    #[error("no python3 interpreter could run in the sandbox: {0}")]
    PythonUnusable(String),
    /// The configuration cannot work.
    #[error("invalid sandbox configuration: {0}")]
    Config(String),
    /// An operating-system call failed.
    #[error("{context}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An error and its chain of causes on one line.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let context = context.into();
    move |source| SandboxError::Io { context, source }
}

/// A confined Python runner. Build once with [`Sandbox::new`] (which probes the machine),
/// then [`run`](Sandbox::run) or [`run_all`](Sandbox::run_all) as many programs as needed.
#[derive(Debug)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    parallelism: usize,
    uid_base: u32,
    running_as_root: bool,
    namespaces: Namespaces,
    private_dirs: Vec<PathBuf>,
}

impl Sandbox {
    /// Finds an interpreter and the strongest confinement this machine allows, by running a
    /// trivial program under each candidate until one works.
    pub fn new(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        validate_limits(&config.limits)?;
        if config.parallelism == 0 {
            return Err(SandboxError::Config(
                "parallelism must be at least 1".into(),
            ));
        }
        if config.uid_base == 0 || config.uid_base.checked_add(UID_SLOTS).is_none() {
            return Err(SandboxError::Config(format!(
                "uid_base {} leaves no room for {UID_SLOTS} dedicated uids",
                config.uid_base
            )));
        }
        let candidates = match &config.python {
            Some(path) => vec![path.clone()],
            None => python_on_path(),
        };
        if candidates.is_empty() {
            return Err(SandboxError::PythonNotFound);
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let running_as_root = unsafe { libc::geteuid() } == 0;
        let private_dirs: Vec<PathBuf> = PRIVATE_DIRS
            .iter()
            .map(PathBuf::from)
            .filter(|dir| dir.is_dir())
            .collect();
        let full = Namespaces {
            user: !running_as_root,
            net: true,
            mount: private_dirs.iter().any(|dir| dir == Path::new("/tmp")),
            pid: true,
        };
        let network_only = Namespaces {
            user: !running_as_root,
            net: true,
            mount: false,
            pid: false,
        };
        let mut levels = if config.use_namespaces {
            vec![full, network_only, Namespaces::NONE]
        } else {
            vec![Namespaces::NONE]
        };
        levels.dedup();

        let mut failures = Vec::new();
        for candidate in candidates {
            let python = match resolve_interpreter(&candidate) {
                Ok(python) => python,
                Err(reason) => {
                    failures.push(format!("{}: {reason}", candidate.display()));
                    continue;
                }
            };
            for &namespaces in &levels {
                let sandbox = Sandbox {
                    python: python.clone(),
                    limits: config.limits.clone(),
                    parallelism: config.parallelism,
                    uid_base: config.uid_base,
                    running_as_root,
                    namespaces,
                    private_dirs: private_dirs.clone(),
                };
                match sandbox.run("import sys\nassert sys.version_info >= (3,)\n") {
                    Ok(report) if report.outcome.passed() => {
                        tracing::debug!(
                            python = %python.display(),
                            isolation = ?sandbox.isolation(),
                            "sandbox ready"
                        );
                        return Ok(sandbox);
                    }
                    Ok(report) => failures.push(format!(
                        "{} with {namespaces:?}: probe {:?}",
                        python.display(),
                        report.outcome
                    )),
                    Err(error) => failures.push(format!(
                        "{} with {namespaces:?}: {}",
                        python.display(),
                        with_causes(&error)
                    )),
                }
            }
        }
        Err(SandboxError::PythonUnusable(failures.join("; ")))
    }

    /// The interpreter in use (the real executable, not a shim).
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// The limits applied to every run.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many programs [`run_all`](Sandbox::run_all) runs at once.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// The confinement every run gets.
    pub fn isolation(&self) -> Isolation {
        Isolation {
            network: self.namespaces.net,
            filesystem: self.namespaces.mount,
            pid: self.namespaces.pid,
            identity: if self.running_as_root {
                Identity::DedicatedUid
            } else if self.namespaces.user {
                Identity::UserNamespace
            } else {
                Identity::Inherited
            },
        }
    }

    /// Runs many programs, at most [`parallelism`](Sandbox::parallelism) at once; results are
    /// in the order of `programs`.
    pub fn run_all(&self, programs: &[String]) -> Vec<Result<RunReport, SandboxError>> {
        let workers = self.parallelism.min(programs.len()).max(1);
        let next = AtomicUsize::new(0);
        let (sender, receiver) = mpsc::channel();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let sender = sender.clone();
                let next = &next;
                scope.spawn(move || loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(program) = programs.get(index) else {
                        break;
                    };
                    if sender.send((index, self.run(program))).is_err() {
                        break;
                    }
                });
            }
        });
        drop(sender);
        let mut results: Vec<Option<Result<RunReport, SandboxError>>> =
            programs.iter().map(|_| None).collect();
        for (index, result) in receiver {
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(SandboxError::Config(
                        "a sandbox worker thread stopped early".into(),
                    ))
                })
            })
            .collect()
    }

    /// Runs one program to completion (or to the wall-clock limit).
    pub fn run(&self, program: &str) -> Result<RunReport, SandboxError> {
        let lease = if self.running_as_root {
            Some(UidLease::acquire(self.uid_base)?)
        } else {
            None
        };
        let credentials = lease.as_ref().map(|lease| (lease.uid, lease.uid));

        // Without a mount namespace the program runs in a fresh directory on the host.
        let host_workdir = if self.namespaces.mount {
            None
        } else {
            let dir = tempfile::Builder::new()
                .prefix("lorasweep-sandbox-")
                .tempdir()
                .map_err(io_error("creating the sandbox working directory"))?;
            std::fs::write(dir.path().join(PROGRAM_FILE), program)
                .map_err(io_error("writing the program"))?;
            if let Some((uid, gid)) = credentials {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                    .map_err(io_error("handing the working directory to the sandbox uid"))?;
            }
            Some(dir)
        };

        let plan = child::Plan::new(child::PlanInput {
            namespaces: self.namespaces,
            private_dirs: &self.private_dirs,
            limits: &self.limits,
            program: program.as_bytes(),
            credentials,
        })?;

        let stdout = tempfile::tempfile().map_err(io_error("creating the stdout file"))?;
        let stderr = tempfile::tempfile().map_err(io_error("creating the stderr file"))?;
        let mut command = Command::new(&self.python);
        command
            .args(["-B", "-s", PROGRAM_FILE])
            .env_clear()
            .env("PATH", CHILD_PATH)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONHASHSEED", "0")
            .env("PYTHONIOENCODING", "utf-8")
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                stdout
                    .try_clone()
                    .map_err(io_error("sharing the stdout file"))?,
            ))
            .stderr(Stdio::from(
                stderr
                    .try_clone()
                    .map_err(io_error("sharing the stderr file"))?,
            ))
            .process_group(0);
        if let Some(dir) = &host_workdir {
            command.current_dir(dir.path());
        }
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe work is allowed. `Plan::enter` allocates nothing and makes only
        // raw system calls on data prepared before the fork (see the `child` module).
        unsafe {
            command.pre_exec(move || plan.enter());
        }

        let started = Instant::now();
        let mut process = command
            .spawn()
            .map_err(io_error(format!("starting {}", self.python.display())))?;
        let status = wait_with_deadline(&mut process, started + self.limits.wall);
        let wall_s = started.elapsed().as_secs_f64();
        if let Some(lease) = &lease {
            if !self.namespaces.pid {
                lease.kill_all_processes();
            }
        }
        let status = status.map_err(io_error("waiting for the program"))?;

        let stderr_tail = read_tail(stderr).map_err(io_error("reading the program's stderr"))?;
        let stdout_tail = read_tail(stdout).map_err(io_error("reading the program's stdout"))?;
        let outcome = match status {
            None => Outcome::TimedOut,
            Some(status) => outcome_of(status, stderr_tail),
        };
        drop(host_workdir);
        drop(lease);
        Ok(RunReport {
            outcome,
            stdout_tail,
            wall_s,
            isolation: self.isolation(),
        })
    }
}

fn validate_limits(limits: &Limits) -> Result<(), SandboxError> {
    let checks = [
        ("wall", limits.wall.is_zero()),
        ("cpu_seconds", limits.cpu_seconds == 0),
        (
            "address_space_bytes",
            limits.address_space_bytes < (64 << 20),
        ),
        ("file_size_bytes", limits.file_size_bytes == 0),
        ("processes", limits.processes < 2),
        ("open_files", limits.open_files < 8),
        ("tmpfs_bytes", limits.tmpfs_bytes < (1 << 20)),
    ];
    for (name, too_small) in checks {
        if too_small {
            return Err(SandboxError::Config(format!(
                "limit {name} is too small for python to start"
            )));
        }
    }
    Ok(())
}

/// Every executable `python3` on `PATH`, in order.
fn python_on_path() -> Vec<PathBuf> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    std::env::split_paths(&path)
        .map(|dir| dir.join("python3"))
        .filter(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .collect()
}

/// Asks the interpreter for its real executable (PATH entries are often shims that need
/// our environment, which the sandbox clears).
fn resolve_interpreter(candidate: &Path) -> Result<PathBuf, String> {
    let output = Command::new(candidate)
        .args(["-c", "import sys; sys.stdout.write(sys.executable or '')"])
        .stdin(Stdio::null())
        .output()
        .map_err(|error| error.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let executable = PathBuf::from(std::ffi::OsStr::from_bytes(&output.stdout));
    if executable.as_os_str().is_empty() {
        return Ok(candidate.to_path_buf());
    }
    Ok(executable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn zero_limits_are_rejected() {
        let mut config = SandboxConfig::default();
        config.limits.processes = 0;
        let error = Sandbox::new(config).unwrap_err();
        assert!(error.to_string().contains("processes"), "{error}");
    }

    #[test]
    fn zero_parallelism_is_rejected() {
        let config = SandboxConfig {
            parallelism: 0,
            ..SandboxConfig::default()
        };
        let error = Sandbox::new(config).unwrap_err();
        assert!(error.to_string().contains("parallelism"), "{error}");
    }

    #[test]
    fn missing_interpreter_is_reported() {
        let config = SandboxConfig {
            python: Some(PathBuf::from("/nonexistent/python3")),
            ..SandboxConfig::default()
        };
        let error = Sandbox::new(config).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/python3"),
            "{error}"
        );
    }

    #[test]
    fn exit_statuses_map_to_outcomes() {
        assert_eq!(
            outcome_of(ExitStatus::from_raw(0), String::new()),
            Outcome::Passed
        );
        assert_eq!(
            outcome_of(ExitStatus::from_raw(3 << 8), "boom".into()),
            Outcome::Failed {
                exit_code: 3,
                stderr_tail: "boom".into()
            }
        );
        assert_eq!(
            outcome_of(ExitStatus::from_raw(libc::SIGKILL), String::new()),
            Outcome::Crashed {
                signal: libc::SIGKILL,
                stderr_tail: String::new()
            }
        );
    }
}
