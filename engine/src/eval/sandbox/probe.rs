//! What this machine grants, found once when a [`Sandbox`] is built: an interpreter that
//! runs confined, the Landlock ABI, whether the seccomp filter installs, and the strongest set
//! of namespaces the kernel lets us create.
//!
//! Landlock is probed on a throwaway thread that applies a ruleset to itself
//! ([`landlock::probe`]), seccomp by a forked child that installs the filter
//! ([`child::probe_seccomp`]); the namespaces by running a trivial program under each
//! candidate level, strongest first, with the layers found. Below Landlock + seccomp + rlimits
//! the build is refused unless the configuration accepts a weak level.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::{
    child, landlock, seccomp, with_causes, Identity, Isolation, Namespaces, Sandbox, SandboxConfig,
    SandboxError, PRIVATE_DIRS, UID_SLOTS,
};

/// Builds a sandbox for `config` (see [`Sandbox::new`]).
pub(super) fn build(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
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
    make_undumpable();
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

    let layers = Layers::probe(&config)?;
    let weakest = Isolation {
        landlock_abi: layers.landlock_abi,
        seccomp: layers.seccomp.is_some(),
        network: false,
        filesystem: false,
        pid: false,
        identity: if running_as_root {
            Identity::DedicatedUid
        } else {
            Identity::Inherited
        },
    };
    if !weakest.is_strong() && !config.allow_weak {
        return Err(SandboxError::WeakIsolation {
            missing: weakest.missing(),
            reasons: layers.reasons.join("; "),
            isolation: weakest,
        });
    }

    let mut failures = Vec::new();
    for candidate in candidates {
        let (python, prefixes) = match resolve_interpreter(&candidate) {
            Ok(found) => found,
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
                landlock_abi: layers.landlock_abi,
                read_paths: landlock::ReadPaths::new(&prefixes, &config.hidden_paths),
                seccomp: layers.seccomp.clone(),
            };
            match sandbox.run("import sys\nassert sys.version_info >= (3,)\n") {
                Ok(report) if report.outcome.passed() => {
                    tracing::debug!(
                        python = %python.display(),
                        isolation = %sandbox.isolation(),
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

/// Landlock and seccomp as this process can apply them.
struct Layers {
    /// The Landlock ABI, 0 when Landlock is off or refused.
    landlock_abi: u32,
    /// The compiled filters, `None` when seccomp is off or refused.
    seccomp: Option<Arc<seccomp::Filters>>,
    /// Why a layer is missing, one entry per missing layer.
    reasons: Vec<String>,
}

impl Layers {
    fn probe(config: &SandboxConfig) -> Result<Layers, SandboxError> {
        let mut reasons = Vec::new();
        let landlock_abi = if !config.landlock {
            reasons.push("landlock: turned off in the sandbox configuration".to_string());
            0
        } else {
            match landlock::probe() {
                Ok(abi) => abi,
                Err(why) => {
                    reasons.push(format!("landlock: {why}"));
                    0
                }
            }
        };
        let seccomp = if !config.seccomp {
            reasons.push("seccomp: turned off in the sandbox configuration".to_string());
            None
        } else {
            let filters = seccomp::Filters::new()?;
            match child::probe_seccomp(&filters) {
                Ok(()) => Some(Arc::new(filters)),
                Err(why) => {
                    reasons.push(format!("seccomp: {why}"));
                    None
                }
            }
        };
        Ok(Layers {
            landlock_abi,
            seccomp,
            reasons,
        })
    }
}

/// Makes this process non-dumpable: its `/proc/<pid>` files then belong to root, so programs
/// running under our uid (a weak level without Landlock) cannot read its environment, memory
/// or descriptors, nor `ptrace` it. Core dumps of this process are lost; root can still
/// inspect it.
fn make_undumpable() {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not make this process non-dumpable"
        );
    }
}

pub(super) fn validate_limits(limits: &super::Limits) -> Result<(), SandboxError> {
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
/// our environment, which the sandbox clears) and the prefixes its standard library lives
/// under, which Landlock must let it read.
fn resolve_interpreter(candidate: &Path) -> Result<(PathBuf, Vec<PathBuf>), String> {
    let output = Command::new(candidate)
        .args([
            "-c",
            "import sys; sys.stdout.write('\\0'.join([sys.executable or ''] + \
             sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})))",
        ])
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
    let mut parts = output
        .stdout
        .split(|byte| *byte == 0)
        .map(|part| PathBuf::from(std::ffi::OsStr::from_bytes(part)));
    let executable = parts
        .next()
        .filter(|path| !path.as_os_str().is_empty())
        .unwrap_or_else(|| candidate.to_path_buf());
    let mut prefixes: Vec<PathBuf> = parts.filter(|path| path.is_absolute()).collect();
    // The executable's own folder (and, for a symlink, its target's), e.g. a venv's bin.
    for path in [
        Some(executable.clone()),
        std::fs::canonicalize(&executable).ok(),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(folder) = path.parent() {
            prefixes.push(folder.to_path_buf());
        }
    }
    Ok((executable, prefixes))
}
