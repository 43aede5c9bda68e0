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
//! Over 800 lines on purpose, for now: every confinement layer, the probe of which layers the
//! kernel grants, and the child-side set-up between `fork` and `exec` must be read together to
//! check that none is skipped. The trust issue (Landlock, seccomp, an unforgeable verdict)
//! rebuilds this file; split it by layer then.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How much of a program's stdout and stderr is kept (the end of each).
const OUTPUT_TAIL_BYTES: u64 = 4096;
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

/// Which namespaces a run enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Namespaces {
    user: bool,
    net: bool,
    mount: bool,
    pid: bool,
}

impl Namespaces {
    const NONE: Namespaces = Namespaces {
        user: false,
        net: false,
        mount: false,
        pid: false,
    };

    fn clone_flags(self) -> libc::c_int {
        let mut flags = 0;
        if self.user {
            flags |= libc::CLONE_NEWUSER;
        }
        if self.net {
            flags |= libc::CLONE_NEWNET;
        }
        if self.mount {
            flags |= libc::CLONE_NEWNS;
        }
        if self.pid {
            flags |= libc::CLONE_NEWPID;
        }
        flags
    }
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

fn outcome_of(status: ExitStatus, stderr_tail: String) -> Outcome {
    if let Some(code) = status.code() {
        if code == 0 {
            Outcome::Passed
        } else {
            Outcome::Failed {
                exit_code: code,
                stderr_tail,
            }
        }
    } else {
        Outcome::Crashed {
            signal: status.signal().unwrap_or(0),
            stderr_tail,
        }
    }
}

/// Waits for the child until `deadline`; `Ok(None)` means it was killed at the deadline.
/// Either way its process group is killed before the child is reaped, while its pid (the
/// group's id) cannot yet be reused.
fn wait_with_deadline(process: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if has_exited(process.id())? {
            kill_process_group(process.id());
            return process.wait().map(Some);
        }
        let now = Instant::now();
        if now >= deadline {
            kill_process_group(process.id());
            // The group kill reached it unless it left the group; kill it directly as well.
            let _ = process.kill();
            process.wait()?;
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Whether the child has exited, without reaping it.
fn has_exited(pid: u32) -> io::Result<bool> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid and writable; WNOWAIT leaves the child to be reaped by
    // `Child::wait`, WNOHANG makes this a poll.
    let result = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (or left it zeroed when nothing changed: si_pid 0).
    Ok(unsafe { info.si_pid() } != 0)
}

fn kill_process_group(leader: u32) {
    let Ok(pgid) = libc::pid_t::try_from(leader) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions; a negative pid names the process group
    // that `process_group(0)` created for this child (ESRCH once it is empty is fine).
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn read_tail(mut file: File) -> io::Result<String> {
    let length = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(length.saturating_sub(OUTPUT_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
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

/// A dedicated uid held for one run (root mode). The lock file makes it exclusive across
/// every sandbox on the machine, in this process or another.
struct UidLease {
    uid: u32,
    _lock: File,
}

impl UidLease {
    fn acquire(base: u32) -> Result<UidLease, SandboxError> {
        let dir = std::env::temp_dir().join("lorasweep-sandbox-uids");
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let meta = std::fs::symlink_metadata(&dir)
            .map_err(io_error(format!("inspecting {}", dir.display())))?;
        {
            use std::os::unix::fs::MetadataExt;
            if !meta.is_dir() || meta.uid() != 0 {
                return Err(SandboxError::Config(format!(
                    "{} must be a directory owned by root",
                    dir.display()
                )));
            }
        }
        let started = Instant::now();
        loop {
            for offset in 0..UID_SLOTS {
                let uid = base + offset;
                let path = dir.join(format!("uid-{uid}.lock"));
                let lock = File::options()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(io_error(format!("opening {}", path.display())))?;
                match lock.try_lock() {
                    Ok(()) => {
                        let lease = UidLease { uid, _lock: lock };
                        // A previous holder that crashed may have left processes behind.
                        lease.kill_all_processes();
                        return Ok(lease);
                    }
                    Err(std::fs::TryLockError::WouldBlock) => continue,
                    Err(std::fs::TryLockError::Error(error)) => {
                        return Err(io_error(format!("locking {}", path.display()))(error))
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(SandboxError::Config(format!(
                    "all {UID_SLOTS} sandbox uids from {base} stayed busy for 10 minutes"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills every process running as this uid, wherever it went (a new session, a new
    /// process group), and waits until they are gone. The kill is done from a forked helper
    /// that takes the uid, since `kill(-1, ..)` reaches exactly the processes of the caller's
    /// uid. Killed orphans stay zombies until init reaps them, and zombies still count
    /// against `RLIMIT_NPROC`, so the uid is only handed on once none is left.
    fn kill_all_processes(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            child::kill_all_of_uid(self.uid);
            if processes_of_uid(self.uid) == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(uid = self.uid, "sandbox processes outlived the sweep");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How many processes (zombies included) have `uid` as their real uid.
fn processes_of_uid(uid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().as_bytes().iter().all(u8::is_ascii_digit))
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("status")).ok())
        .filter(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .and_then(|real| real.parse::<u32>().ok())
                == Some(uid)
        })
        .count()
}

/// Code that runs in forked children. Everything here is called between `fork` and `exec`
/// (or `_exit`), so it must be async-signal-safe: no allocation, no locks, only raw system
/// calls on memory prepared by the parent before the fork.
mod child {
    use std::ffi::CString;
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    use super::{Limits, Namespaces, SandboxError, PRIVATE_WORKDIR, PROGRAM_FILE};

    /// The contents of a user namespace's id maps.
    struct IdMaps {
        setgroups_path: CString,
        uid_map_path: CString,
        gid_map_path: CString,
        uid_line: Vec<u8>,
        gid_line: Vec<u8>,
    }

    /// Everything the child does, prepared in the parent.
    pub(super) struct Plan {
        namespaces: Namespaces,
        id_maps: Option<IdMaps>,
        root: CString,
        tmpfs: CString,
        tmpfs_options: CString,
        private_dirs: Vec<CString>,
        workdir: CString,
        program_file: CString,
        program: Vec<u8>,
        rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
        credentials: Option<(libc::uid_t, libc::gid_t)>,
    }

    pub(super) struct PlanInput<'a> {
        pub namespaces: Namespaces,
        pub private_dirs: &'a [PathBuf],
        pub limits: &'a Limits,
        pub program: &'a [u8],
        pub credentials: Option<(u32, u32)>,
    }

    fn c_string(text: &[u8]) -> Result<CString, SandboxError> {
        CString::new(text).map_err(|_| SandboxError::Config("a path contains a nul byte".into()))
    }

    fn rlimit(soft: u64, hard: u64) -> libc::rlimit {
        libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        }
    }

    impl Plan {
        pub(super) fn new(input: PlanInput<'_>) -> Result<Plan, SandboxError> {
            let id_maps = if input.namespaces.user {
                // SAFETY: getuid and getgid have no preconditions and cannot fail.
                let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
                Some(IdMaps {
                    setgroups_path: c_string(b"/proc/self/setgroups")?,
                    uid_map_path: c_string(b"/proc/self/uid_map")?,
                    gid_map_path: c_string(b"/proc/self/gid_map")?,
                    uid_line: format!("{uid} {uid} 1\n").into_bytes(),
                    gid_line: format!("{gid} {gid} 1\n").into_bytes(),
                })
            } else {
                None
            };
            let limits = input.limits;
            let rlimits = vec![
                (
                    libc::RLIMIT_CPU,
                    rlimit(limits.cpu_seconds, limits.cpu_seconds + 1),
                ),
                (
                    libc::RLIMIT_AS,
                    rlimit(limits.address_space_bytes, limits.address_space_bytes),
                ),
                (
                    libc::RLIMIT_FSIZE,
                    rlimit(limits.file_size_bytes, limits.file_size_bytes),
                ),
                (
                    libc::RLIMIT_NPROC,
                    rlimit(limits.processes, limits.processes),
                ),
                (
                    libc::RLIMIT_NOFILE,
                    rlimit(limits.open_files, limits.open_files),
                ),
                (libc::RLIMIT_CORE, rlimit(0, 0)),
            ];
            let private_dirs = input
                .private_dirs
                .iter()
                .map(|dir| c_string(dir.as_os_str().as_bytes()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Plan {
                namespaces: input.namespaces,
                id_maps,
                root: c_string(b"/")?,
                tmpfs: c_string(b"tmpfs")?,
                tmpfs_options: c_string(
                    format!("size={},mode=1777", input.limits.tmpfs_bytes).as_bytes(),
                )?,
                private_dirs,
                workdir: c_string(PRIVATE_WORKDIR.as_bytes())?,
                program_file: c_string(PROGRAM_FILE.as_bytes())?,
                program: input.program.to_vec(),
                rlimits,
                credentials: input.credentials,
            })
        }

        /// Runs in the child between fork and exec. On success the caller execs python.
        pub(super) fn enter(&self) -> io::Result<()> {
            let flags = self.namespaces.clone_flags();
            if flags != 0 {
                // SAFETY: unshare takes no pointers.
                check(unsafe { libc::unshare(flags) })?;
            }
            if let Some(maps) = &self.id_maps {
                write_file(&maps.setgroups_path, b"deny")?;
                write_file(&maps.uid_map_path, &maps.uid_line)?;
                write_file(&maps.gid_map_path, &maps.gid_line)?;
            }
            if self.namespaces.mount {
                self.make_private_filesystem()?;
            }
            for (resource, limit) in &self.rlimits {
                // SAFETY: `limit` is a valid rlimit that outlives the call.
                check(unsafe { libc::setrlimit(*resource, limit) })?;
            }
            if self.namespaces.pid {
                // Only children of this process enter the new PID namespace: fork once, let
                // the child (PID 1 there) become python, and stay behind as its supervisor.
                // SAFETY: fork in a single-threaded child; both sides continue with
                // async-signal-safe calls only.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(io::Error::last_os_error());
                }
                if pid > 0 {
                    supervise(pid);
                }
            }
            if let Some((uid, gid)) = self.credentials {
                // SAFETY: setgroups with a zero count reads no memory; setgid and setuid
                // take plain integers.
                check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
                check(unsafe { libc::setgid(gid) })?;
                check(unsafe { libc::setuid(uid) })?;
            }
            // SAFETY: prctl with integer arguments only. No setuid binary may raise
            // privileges, and the program dies if its supervisor does (a credential change
            // clears the parent-death signal, so it is set last).
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
            check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })?;
            Ok(())
        }

        /// Private tmpfs over the world-writable directories, and a fresh working directory
        /// holding the program inside the private `/tmp`.
        fn make_private_filesystem(&self) -> io::Result<()> {
            // Make every mount private first, or the tmpfs mounts would propagate to the host.
            // SAFETY: the pointers are nul-terminated strings owned by `self` or null, which
            // mount accepts for unused arguments.
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    self.root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            })?;
            for dir in &self.private_dirs {
                // SAFETY: as above.
                check(unsafe {
                    libc::mount(
                        self.tmpfs.as_ptr(),
                        dir.as_ptr(),
                        self.tmpfs.as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        self.tmpfs_options.as_ptr().cast(),
                    )
                })?;
            }
            // SAFETY: nul-terminated path owned by `self`.
            check(unsafe { libc::mkdir(self.workdir.as_ptr(), 0o700) })?;
            if let Some((uid, gid)) = self.credentials {
                // SAFETY: as above.
                check(unsafe { libc::chown(self.workdir.as_ptr(), uid, gid) })?;
            }
            // SAFETY: as above.
            check(unsafe { libc::chdir(self.workdir.as_ptr()) })?;
            // SAFETY: as above; the new file is closed by write_all_and_close.
            let fd = unsafe {
                libc::open(
                    self.program_file.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    0o644,
                )
            };
            check(fd)?;
            write_all_and_close(fd, &self.program)
        }
    }

    /// The supervisor left in the parent PID namespace: wait for python, then exit the way
    /// it did, so the sandbox sees its status. Never returns.
    fn supervise(pid: libc::pid_t) -> ! {
        // Die with the thread that spawned us; python, whose parent-death signal points at
        // us, then dies too, and with it the whole PID namespace.
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        }
        // Close every inherited descriptor beyond stdio, above all the pipe through which
        // the standard library learns that exec succeeded: holding it open would make the
        // spawn wait for the whole run.
        // SAFETY: close_range takes integers; on kernels without it fall back to close().
        let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        if closed != 0 {
            for fd in 3..4096 {
                // SAFETY: closing a descriptor we own (or EBADF) is harmless here.
                unsafe {
                    libc::close(fd);
                }
            }
        }
        let mut status: libc::c_int = 0;
        loop {
            // SAFETY: `status` is a valid, writable c_int.
            let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
            if waited == pid {
                break;
            }
            if waited < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // SAFETY: _exit ends the process without running any Rust code.
                unsafe { libc::_exit(126) }
            }
        }
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            // SAFETY: restore the default action and die of the same signal; _exit covers
            // signals whose default action is not to terminate.
            unsafe {
                libc::signal(signal, libc::SIG_DFL);
                libc::kill(libc::getpid(), signal);
                libc::_exit(128 + signal)
            }
        }
        // SAFETY: as above.
        unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
    }

    /// Forks a helper that takes `uid` and sends SIGKILL to every process of that uid.
    pub(super) fn kill_all_of_uid(uid: u32) {
        // SAFETY: the child only makes async-signal-safe system calls and leaves by _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: integer-only system calls, then _exit.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(1);
                }
                // kill(-1) reaches every process this uid may signal except the caller;
                // repeat while it still finds some (a fork bomb may fork meanwhile).
                for _ in 0..1000 {
                    if libc::kill(-1, libc::SIGKILL) != 0 {
                        break;
                    }
                }
                libc::_exit(0);
            }
        }
        if pid > 0 {
            let mut status: libc::c_int = 0;
            // SAFETY: `status` is a valid, writable c_int; `pid` is our child.
            unsafe {
                libc::waitpid(pid, &mut status, 0);
            }
        } else {
            tracing::warn!(
                error = %io::Error::last_os_error(),
                "could not fork the sandbox uid sweeper"
            );
        }
    }

    fn check(result: libc::c_int) -> io::Result<()> {
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn write_file(path: &CString, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: nul-terminated path owned by the caller.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        check(fd)?;
        write_all_and_close(fd, bytes)
    }

    fn write_all_and_close(fd: libc::c_int, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            // SAFETY: `bytes` is valid for `bytes.len()` bytes.
            let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
            if written < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // SAFETY: closing the descriptor we opened.
                unsafe { libc::close(fd) };
                return Err(error);
            }
            bytes = &bytes[written as usize..];
        }
        // SAFETY: closing the descriptor we opened.
        check(unsafe { libc::close(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
