//! Run untrusted Python in a separate, confined process.
//!
//! Model-written code is hostile until proven otherwise. Each program runs as its own
//! `python3` process with:
//!
//! - a wall-clock timeout, after which its whole process group is killed;
//! - resource limits set in the child before `exec`: CPU seconds, address space, file size,
//!   number of processes and open files, no core dumps;
//! - a fresh, empty working directory, a cleared environment (a minimal `PATH`, a fixed
//!   `PYTHONHASHSEED`, no bytecode files) and stdin from `/dev/null`;
//! - Landlock (any process may use it): read-only system paths, read-write only its own fresh
//!   working directory; no home, cache, scratch, token or `/proc`; from ABI 4 no TCP, from
//!   ABI 6 no signals to processes outside the sandbox ([`landlock`]);
//! - seccomp: no sockets but `AF_UNIX`, no `ptrace`, `process_vm_*`, mounts, namespaces,
//!   `bpf`, keyrings, `perf_event_open`, `io_uring` ([`seccomp`]); `PR_SET_NO_NEW_PRIVS`;
//! - where the kernel allows it, fresh namespaces: a network namespace (no usable interface,
//!   not even loopback), a mount namespace whose `/tmp`, `/var/tmp` and `/dev/shm` are small
//!   private tmpfs mounts, and a PID namespace, so that every process the program starts dies
//!   with it ([`namespaces`]);
//! - when we run as root, a dedicated unprivileged uid per concurrent run: root ignores
//!   `RLIMIT_NPROC`, so without this a fork bomb would not be bounded, and the uid also
//!   keeps the program out of files only root may write ([`uid`]).
//!
//! Which layers work is probed once by [`Sandbox::new`] ([`probe`]): the strongest level the
//! kernel accepts is used for every run and reported in [`Isolation`]. Below Landlock +
//! seccomp + rlimits it refuses to build, unless [`SandboxConfig::allow_weak`] says the weaker
//! level is accepted: never a silent downgrade. Building a sandbox also makes this process
//! non-dumpable, so that programs running under its uid cannot read its memory, environment
//! or descriptors through `/proc` or `ptrace`.
//!
//! Code under test reports through [`verdict`]: the tests run in a process the completion
//! never runs in, and their verdict comes back on a pipe the completion holds no end of.
//!
//! The rest: [`rlimits`] (the resource limits), [`child`] (everything done between `fork`
//! and `exec`) and [`spawn`] (waiting, killing and reading the outcome). `docs/security.md`
//! states the threat model and what stays out of scope.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod child;
mod landlock;
mod namespaces;
mod probe;
mod rlimits;
mod seccomp;
mod spawn;
mod uid;
mod verdict;

pub use lorasweep_contract::{Identity, Isolation};
pub use verdict::{TestProgram, Verdict};

use namespaces::Namespaces;
use spawn::{outcome_of, read_tail, wait_with_deadline};
use uid::UidLease;

/// The command-line flag that accepts a sandbox weaker than Landlock + seccomp + rlimits
/// (`lorasweep worker`, `eval` and `score` take it; `lorasweep run` passes [`ALLOW_WEAK_ENV`] on
/// to its workers).
pub const ALLOW_WEAK_FLAG: &str = "--allow-weak-sandbox";
/// The environment variable that does the same as [`ALLOW_WEAK_FLAG`].
pub const ALLOW_WEAK_ENV: &str = "LORASWEEP_ALLOW_WEAK_SANDBOX";

/// How much of a program's stdout and stderr is kept (the end of each).
pub(crate) const OUTPUT_TAIL_BYTES: u64 = 4096;
/// File name of the program inside its working directory ([`Sandbox::run`]).
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
    /// Apply Landlock. Turning it off gives a weak level, which needs `allow_weak`.
    pub landlock: bool,
    /// Paths the program must not read even where they lie under a readable system
    /// directory (e.g. a token file mounted under `/etc`); Landlock carves them out.
    pub hidden_paths: Vec<PathBuf>,
    /// Apply the seccomp filter. Turning it off gives a weak level, which needs `allow_weak`.
    pub seccomp: bool,
    /// Accept a level below Landlock + seccomp + rlimits (see [`Isolation::is_strong`]);
    /// without it [`Sandbox::new`] refuses with [`SandboxError::WeakIsolation`]. The command
    /// line sets it with [`ALLOW_WEAK_FLAG`] or [`ALLOW_WEAK_ENV`].
    pub allow_weak: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            parallelism: std::thread::available_parallelism().map_or(1, |n| n.get()),
            python: None,
            uid_base: 1_900_000_000,
            use_namespaces: true,
            landlock: true,
            hidden_paths: Vec::new(),
            seccomp: true,
            allow_weak: false,
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
    /// The machine grants less than Landlock + seccomp + rlimits, and the weaker level was
    /// not accepted explicitly.
    #[error(
        "code evaluation refused: the sandbox cannot apply {} here ({reasons}); programs would \
         run with only {isolation}. Pass {ALLOW_WEAK_FLAG} (or set {ALLOW_WEAK_ENV}=1) to accept \
         that weaker confinement; docs/security.md says what each layer stops",
        missing.join(" and ")
    )]
    WeakIsolation {
        /// The layers that are not in force.
        missing: Vec<&'static str>,
        /// Why each is not.
        reasons: String,
        /// What would be in force.
        isolation: Isolation,
    },
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

/// The result of one tested program ([`Sandbox::run_tests`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestReport {
    /// How the harness process ended, its output and the confinement.
    pub run: RunReport,
    /// What the judge reported; `None` when it reported nothing (killed, timed out).
    pub verdict: Option<Verdict>,
}

impl TestReport {
    /// Whether the judge reported that every test passed.
    pub fn passed(&self) -> bool {
        self.verdict.as_ref().is_some_and(|verdict| verdict.passed)
    }
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
/// then [`run`](Sandbox::run) or [`run_tests`](Sandbox::run_tests) as many programs as needed.
#[derive(Debug)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    parallelism: usize,
    uid_base: u32,
    running_as_root: bool,
    namespaces: Namespaces,
    private_dirs: Vec<PathBuf>,
    landlock_abi: u32,
    read_paths: landlock::ReadPaths,
    seccomp: Option<Arc<seccomp::Filters>>,
}

/// What one run executes.
enum Job<'a> {
    /// `main.py` in the working directory; the outcome is the exit status.
    Script(&'a str),
    /// The test harness; the outcome is its verdict.
    Tests(&'a TestProgram),
}

impl Sandbox {
    /// Finds an interpreter and the strongest confinement this machine allows (see
    /// [`probe`]). Refuses with [`SandboxError::WeakIsolation`] below Landlock + seccomp +
    /// rlimits unless [`SandboxConfig::allow_weak`] is set.
    pub fn new(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        probe::build(config)
    }

    /// The interpreter in use (the real executable, not a shim).
    pub fn python(&self) -> &std::path::Path {
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
            landlock_abi: self.landlock_abi,
            seccomp: self.seccomp.is_some(),
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
        self.in_parallel(programs, |program| self.run(program))
    }

    /// Tests many programs, at most [`parallelism`](Sandbox::parallelism) at once; results
    /// are in the order of `programs`.
    pub fn run_all_tests(&self, programs: &[TestProgram]) -> Vec<Result<TestReport, SandboxError>> {
        self.in_parallel(programs, |program| self.run_tests(program))
    }

    fn in_parallel<T: Sync, R: Send>(
        &self,
        programs: &[T],
        run: impl Fn(&T) -> Result<R, SandboxError> + Sync,
    ) -> Vec<Result<R, SandboxError>> {
        let workers = self.parallelism.min(programs.len()).max(1);
        let next = AtomicUsize::new(0);
        let (sender, receiver) = mpsc::channel();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let sender = sender.clone();
                let next = &next;
                let run = &run;
                scope.spawn(move || loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(program) = programs.get(index) else {
                        break;
                    };
                    if sender.send((index, run(program))).is_err() {
                        break;
                    }
                });
            }
        });
        drop(sender);
        let mut results: Vec<Option<Result<R, SandboxError>>> =
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

    /// Runs one program to completion (or to the wall-clock limit); its outcome is its exit
    /// status.
    pub fn run(&self, program: &str) -> Result<RunReport, SandboxError> {
        Ok(self.execute(Job::Script(program))?.0)
    }

    /// Runs a solution against its tests through the harness (see [`verdict`]): the tests
    /// run in a process the solution never runs in, and the verdict comes back on a pipe the
    /// solution holds no end of.
    pub fn run_tests(&self, program: &TestProgram) -> Result<TestReport, SandboxError> {
        let (run, verdict) = self.execute(Job::Tests(program))?;
        Ok(TestReport { run, verdict })
    }

    fn execute(&self, job: Job<'_>) -> Result<(RunReport, Option<Verdict>), SandboxError> {
        let lease = if self.running_as_root {
            Some(UidLease::acquire(self.uid_base)?)
        } else {
            None
        };
        let credentials = lease.as_ref().map(|lease| (lease.uid, lease.uid));

        // A fresh directory on the host; the standard library enters it before the mount
        // namespace (if any) covers /tmp, so the program keeps it as its working directory.
        let workdir = tempfile::Builder::new()
            .prefix("lorasweep-sandbox-")
            .tempdir()
            .map_err(io_error("creating the sandbox working directory"))?;
        if let Job::Script(program) = job {
            std::fs::write(workdir.path().join(PROGRAM_FILE), program)
                .map_err(io_error("writing the program"))?;
        }
        if let Some((uid, gid)) = credentials {
            std::os::unix::fs::chown(workdir.path(), Some(uid), Some(gid))
                .map_err(io_error("handing the working directory to the sandbox uid"))?;
        }
        let ruleset = if self.landlock_abi > 0 {
            landlock::ruleset(&self.read_paths, workdir.path())?
        } else {
            None
        };
        let (verdict_read, inherited, arguments) = match job {
            Job::Script(_) => (None, Vec::new(), Vec::new()),
            Job::Tests(program) => {
                let channel = verdict::Channel::new(program)?;
                let [verdict_fd, payload_fd] = channel.arguments();
                let (read, inherited) = channel.split();
                let arguments = vec![
                    "-B".to_string(),
                    "-s".to_string(),
                    "-c".to_string(),
                    verdict::HARNESS.to_string(),
                    verdict_fd,
                    payload_fd,
                ];
                (Some(read), inherited, arguments)
            }
        };
        let nproc_base = if credentials.is_some() {
            0
        } else {
            // SAFETY: getuid has no preconditions and cannot fail.
            rlimits::tasks_of_uid(unsafe { libc::getuid() })
        };
        let plan = child::Plan::new(child::PlanInput {
            namespaces: self.namespaces,
            private_dirs: &self.private_dirs,
            workdir: workdir.path(),
            limits: &self.limits,
            nproc_base,
            credentials,
            landlock: ruleset,
            seccomp: self.seccomp.clone(),
            inherited,
        })?;

        let stdout = tempfile::tempfile().map_err(io_error("creating the stdout file"))?;
        let stderr = tempfile::tempfile().map_err(io_error("creating the stderr file"))?;
        let mut command = Command::new(&self.python);
        match job {
            Job::Script(_) => command.args(["-B", "-s", PROGRAM_FILE]),
            Job::Tests(_) => command.args(&arguments),
        };
        command
            .env_clear()
            .env("PATH", CHILD_PATH)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONHASHSEED", "0")
            .env("PYTHONIOENCODING", "utf-8")
            .env("LC_ALL", "C.UTF-8")
            .current_dir(workdir.path())
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
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe work is allowed. `Plan::enter` allocates nothing and makes only
        // raw system calls on data prepared before the fork (see the `child` module).
        unsafe {
            command.pre_exec(move || plan.enter());
        }

        let started = Instant::now();
        let spawned = command.spawn();
        // The plan (inside the command) holds the ruleset and the harness's ends of its
        // descriptors: close ours now, so that only the child keeps them.
        drop(command);
        let mut process =
            spawned.map_err(io_error(format!("starting {}", self.python.display())))?;
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
        let verdict = verdict_read.and_then(verdict::read_verdict);
        drop(workdir);
        drop(lease);
        Ok((
            RunReport {
                outcome,
                stdout_tail,
                wall_s,
                isolation: self.isolation(),
            },
            verdict,
        ))
    }
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
