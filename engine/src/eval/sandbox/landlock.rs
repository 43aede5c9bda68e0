//! Landlock: the filesystem (and, where the kernel has them, TCP and signal) rules a program
//! runs under, granted to any process without privileges.
//!
//! The program may read and execute the system's files (`/usr`, `/lib*`, `/bin`, `/sbin`,
//! `/etc` and the interpreter's own prefixes), read and write its fresh working directory, and
//! use `/dev/null` and the random devices. Everything else — home, caches, the worker's scratch
//! and `--out`, token files, `/proc`, `/sys`, `/tmp` — is refused with `EACCES`. From ABI 4
//! the ruleset also handles TCP `connect` and `bind` with no rule allowing either, and from ABI
//! 6 it scopes signals and abstract UNIX sockets to the program's own processes, so it cannot
//! signal the worker that started it.
//!
//! The ruleset is built in the parent with the `landlock` crate (which allocates); the child
//! only calls `landlock_restrict_self` on its descriptor (see [`restrict_self`]).

use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::SandboxError;

/// The newest ABI whose rights we ask for; older kernels get what they support.
const TARGET_ABI: ABI = ABI::V6;

/// System directories the program may read and execute from, when they exist.
const SYSTEM_DIRS: [&str; 8] = [
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc",
];

/// Device files the program may read (and, for `/dev/null`, write).
const READ_DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// Whether Landlock is enforced here, found by applying a ruleset that grants nothing to a
/// throwaway thread (a Landlock domain binds only the thread that enters it and its future
/// children) and checking that it then cannot open `/`. Returns the kernel's ABI version, or
/// why Landlock is not in force: the crate's [`RulesetStatus`] says whether the kernel
/// enforced it, [`LandlockStatus`] why not.
pub(super) fn probe() -> Result<u32, String> {
    let probe = std::thread::Builder::new()
        .name("landlock-probe".into())
        .spawn(|| -> Result<(), String> {
            let status = Ruleset::default()
                .set_compatibility(CompatLevel::BestEffort)
                .handle_access(AccessFs::from_all(TARGET_ABI))
                .and_then(|ruleset| ruleset.create())
                .and_then(|created| created.restrict_self())
                .map_err(|error| format!("applying a ruleset failed: {error}"))?;
            match status.ruleset {
                RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => {}
                RulesetStatus::NotEnforced => {
                    return Err(match status.landlock {
                        LandlockStatus::NotImplemented => "the kernel has no landlock (Linux \
                             5.13 or newer with CONFIG_SECURITY_LANDLOCK), or a seccomp profile \
                             around this process hides its system calls"
                            .to_string(),
                        LandlockStatus::NotEnabled => "landlock is built into the kernel but \
                             not enabled at boot (add landlock to the lsm= boot parameter)"
                            .to_string(),
                        LandlockStatus::Available { .. } => {
                            "the kernel did not enforce the ruleset".to_string()
                        }
                    });
                }
            }
            match std::fs::read_dir("/") {
                Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
                Err(error) => Err(format!(
                    "unexpected error reading / under landlock: {error}"
                )),
                Ok(_) => Err("a ruleset granting nothing still let / be read".to_string()),
            }
        })
        .map_err(|error| format!("could not start the probe thread: {error}"))?;
    probe
        .join()
        .map_err(|_| "the probe thread panicked".to_string())??;
    Ok(kernel_abi())
}

/// The Landlock ABI version the running kernel reports (0 when it has none).
fn kernel_abi() -> u32 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag only
    // returns the ABI version (or -1); it reads no memory.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    u32::try_from(version).unwrap_or(0)
}

/// What a program may read: the system directories and its interpreter's prefixes, minus the
/// hidden paths (secrets such as a token file mounted under `/etc`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ReadPaths {
    /// Files and directories read (and executed) from, each with everything beneath it.
    pub(super) paths: Vec<PathBuf>,
}

impl ReadPaths {
    /// The system directories that exist here plus `extra` (the interpreter's prefixes and
    /// the folder of its executable), with every path of `hidden` carved out. The root
    /// directory is never added, not even through `extra`.
    ///
    /// Landlock only grants, never denies, so a hidden path under a granted directory is
    /// carved out by granting the directory's entries one by one instead, down the branch
    /// that leads to the hidden path; symbolic links get no rule of their own (Landlock
    /// checks the file they resolve to).
    pub(super) fn new(extra: &[PathBuf], hidden: &[PathBuf]) -> ReadPaths {
        let mut roots: Vec<PathBuf> = SYSTEM_DIRS.iter().map(PathBuf::from).collect();
        for path in extra {
            if path.is_absolute() && path != Path::new("/") && !roots.contains(path) {
                roots.push(path.clone());
            }
        }
        let hidden: Vec<PathBuf> = hidden
            .iter()
            .filter(|path| path.is_absolute())
            .flat_map(|path| [Some(path.clone()), std::fs::canonicalize(path).ok()])
            .flatten()
            .collect();
        let mut paths = Vec::new();
        for root in roots {
            if root.exists() {
                carve(&root, &hidden, &mut paths);
            }
        }
        paths.sort();
        paths.dedup();
        ReadPaths { paths }
    }
}

/// Adds `path` to `granted`, or, when a hidden path lies at or beneath it, its entries that
/// lead to no hidden path (and recurses into those that do).
fn carve(path: &Path, hidden: &[PathBuf], granted: &mut Vec<PathBuf>) {
    if hidden.iter().any(|secret| path.starts_with(secret)) {
        return;
    }
    if !hidden.iter().any(|secret| secret.starts_with(path)) {
        granted.push(path.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let is_link = entry.file_type().is_ok_and(|kind| kind.is_symlink());
        if !is_link {
            carve(&entry.path(), hidden, granted);
        }
    }
}

/// Builds the ruleset of one run: `read` readable, `workdir` readable and writable. Returns
/// the ruleset's descriptor for [`restrict_self`], or `None` when the kernel has no Landlock.
pub(super) fn ruleset(read: &ReadPaths, workdir: &Path) -> Result<Option<OwnedFd>, SandboxError> {
    let failed = |what: &str, error: &dyn std::fmt::Display| {
        SandboxError::Config(format!("building the landlock ruleset ({what}): {error}"))
    };
    let all_fs = AccessFs::from_all(TARGET_ABI);
    let read_fs = AccessFs::from_read(TARGET_ABI);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all_fs)
        .map_err(|e| failed("filesystem rights", &e))?;
    // Both are empty (and skipped by best effort) on kernels older than their ABI.
    ruleset = ruleset
        .handle_access(AccessNet::from_all(TARGET_ABI))
        .map_err(|e| failed("tcp rights", &e))?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(|e| failed("scopes", &e))?;
    let mut created = ruleset.create().map_err(|e| failed("create", &e))?;
    for path in &read.paths {
        // A file gets the file rights only (Landlock refuses directory rights on a file).
        let Ok(fd) = PathFd::new(path) else {
            continue;
        };
        let rights = if path.is_dir() {
            read_fs
        } else {
            read_fs & AccessFs::from_file(TARGET_ABI)
        };
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(|e| failed(&path.display().to_string(), &e))?;
    }
    for device in READ_DEVICES {
        let Ok(fd) = PathFd::new(device) else {
            continue;
        };
        let mut rights: landlock::BitFlags<AccessFs> = AccessFs::ReadFile.into();
        if device == "/dev/null" {
            rights |= AccessFs::WriteFile;
        }
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(|e| failed(device, &e))?;
    }
    let fd = PathFd::new(workdir).map_err(|e| failed("working directory", &e))?;
    created = created
        .add_rule(PathBeneath::new(fd, all_fs))
        .map_err(|e| failed("working directory", &e))?;
    let fd: Option<OwnedFd> = created.into();
    Ok(fd)
}

/// Applies a ruleset to the calling process. Runs in the child between `fork` and `exec`:
/// one raw system call, after `PR_SET_NO_NEW_PRIVS`.
pub(super) fn restrict_self(ruleset: RawFd) -> std::io::Result<()> {
    // SAFETY: landlock_restrict_self takes a descriptor and flags, no pointers.
    let result = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_path_is_carved_out_of_a_granted_directory() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path();
        for dir in ["etc/app/token", "etc/app/other", "etc/ssl"] {
            std::fs::create_dir_all(base.join(dir)).unwrap();
        }
        std::fs::write(base.join("etc/app/token/token"), "secret").unwrap();
        std::fs::write(base.join("etc/app/config"), "x").unwrap();
        std::fs::write(base.join("etc/hosts"), "x").unwrap();
        std::os::unix::fs::symlink(base.join("etc/app/token"), base.join("etc/link")).unwrap();

        let mut granted = Vec::new();
        carve(
            &base.join("etc"),
            &[base.join("etc/app/token/token")],
            &mut granted,
        );
        granted.sort();
        let expected: Vec<PathBuf> = ["etc/app/config", "etc/app/other", "etc/hosts", "etc/ssl"]
            .iter()
            .map(|path| base.join(path))
            .collect();
        // The token's own directory is walked into and holds nothing else; the symbolic link
        // gets no rule (Landlock checks what it points to).
        assert_eq!(granted, expected);

        let mut granted = Vec::new();
        carve(&base.join("etc"), &[base.join("elsewhere")], &mut granted);
        assert_eq!(granted, [base.join("etc")]);

        let mut granted = Vec::new();
        carve(&base.join("etc/app"), &[base.join("etc")], &mut granted);
        assert!(granted.is_empty());
    }
}
