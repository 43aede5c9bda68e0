//! Code that runs in forked children. Everything here is called between `fork` and `exec`
//! (or `_exit`), so it must be async-signal-safe: no allocation, no locks, only raw system
//! calls on memory prepared by the parent before the fork.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::seccomp::Filters;
use super::{landlock, rlimits, Limits, Namespaces, SandboxError};

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
    workdir_mount: Option<WorkdirMount>,
    rlimits: Vec<rlimits::Rlimit>,
    credentials: Option<(libc::uid_t, libc::gid_t)>,
    landlock: Option<OwnedFd>,
    seccomp: Option<Arc<Filters>>,
    inherited: Vec<OwnedFd>,
}

/// The working directory made visible again at its own path inside the private `/tmp`: the
/// interpreter reopens its script by absolute path, which the tmpfs would otherwise hide.
struct WorkdirMount {
    /// Folders to create in the tmpfs, outermost first (the last is the mount point).
    folders: Vec<CString>,
    /// `/proc/self/cwd`: the host directory the child already stands in.
    source: CString,
}

/// What a [`Plan`] is made from.
pub(super) struct PlanInput<'a> {
    /// The namespaces to enter.
    pub namespaces: Namespaces,
    /// Directories that get a private tmpfs (mount namespace only).
    pub private_dirs: &'a [PathBuf],
    /// The working directory on the host (the child's current directory).
    pub workdir: &'a std::path::Path,
    /// The resource limits.
    pub limits: &'a Limits,
    /// Tasks our uid already runs, which `RLIMIT_NPROC` counts too (0 for a dedicated uid).
    pub nproc_base: u64,
    /// The dedicated uid and gid, in root mode.
    pub credentials: Option<(u32, u32)>,
    /// The Landlock ruleset to restrict to.
    pub landlock: Option<OwnedFd>,
    /// The seccomp filters to install.
    pub seccomp: Option<Arc<Filters>>,
    /// Descriptors python inherits at their own number (the harness's verdict pipe and
    /// payload); every other descriptor of ours is close-on-exec.
    pub inherited: Vec<OwnedFd>,
}

fn c_string(text: &[u8]) -> Result<CString, SandboxError> {
    CString::new(text).map_err(|_| SandboxError::Config("a path contains a nul byte".into()))
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
        let rlimits = rlimits::table(input.limits, input.nproc_base);
        let private_dirs = input
            .private_dirs
            .iter()
            .map(|dir| c_string(dir.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let covering = input
            .private_dirs
            .iter()
            .filter(|dir| input.workdir.starts_with(dir))
            .max_by_key(|dir| dir.components().count());
        let workdir_mount = match covering {
            Some(dir) if input.namespaces.mount => {
                let mut folders = Vec::new();
                let mut path = dir.clone();
                let rest = input.workdir.strip_prefix(dir).unwrap_or(input.workdir);
                for part in rest.components() {
                    path.push(part);
                    folders.push(c_string(path.as_os_str().as_bytes())?);
                }
                Some(WorkdirMount {
                    folders,
                    source: c_string(b"/proc/self/cwd")?,
                })
            }
            _ => None,
        };
        Ok(Plan {
            namespaces: input.namespaces,
            workdir_mount,
            id_maps,
            root: c_string(b"/")?,
            tmpfs: c_string(b"tmpfs")?,
            tmpfs_options: c_string(
                format!("size={},mode=1777", input.limits.tmpfs_bytes).as_bytes(),
            )?,
            private_dirs,
            rlimits,
            credentials: input.credentials,
            landlock: input.landlock,
            seccomp: input.seccomp,
            inherited: input.inherited,
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
            // A non-dumpable process (see `Sandbox::new`) may not write its own id maps: the
            // files of /proc/self then belong to root. Python becomes dumpable at exec anyway.
            // SAFETY: prctl with integer arguments only.
            check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) })?;
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
        // SAFETY: prctl with integer arguments only. No setuid binary may raise privileges
        // (and Landlock and seccomp need this flag from an unprivileged process).
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        if let Some(ruleset) = &self.landlock {
            landlock::restrict_self(ruleset.as_raw_fd())?;
        }
        for fd in &self.inherited {
            // SAFETY: fcntl on a descriptor the plan owns; clearing FD_CLOEXEC in this
            // child's table only, so python inherits it.
            check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) })?;
        }
        // The seccomp filter goes last but one: it refuses calls made above (unshare,
        // mount). The program dies if its supervisor does; a credential change clears the
        // parent-death signal, so it is set after setuid.
        if let Some(filters) = &self.seccomp {
            filters.install()?;
        }
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })?;
        Ok(())
    }

    /// Private tmpfs over the world-writable directories. The working directory is on the
    /// host (the standard library entered it before this runs), so the mounts do not hide it.
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
        if let Some(workdir) = &self.workdir_mount {
            for folder in &workdir.folders {
                // SAFETY: nul-terminated path owned by `self`.
                check(unsafe { libc::mkdir(folder.as_ptr(), 0o755) })?;
            }
            let Some(target) = workdir.folders.last() else {
                return Ok(());
            };
            // SAFETY: nul-terminated paths owned by `self`; null for the unused arguments.
            check(unsafe {
                libc::mount(
                    workdir.source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            })?;
            // SAFETY: as above.
            check(unsafe { libc::chdir(target.as_ptr()) })?;
        }
        Ok(())
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

/// Forks a child that installs `filters` and then asks for an `AF_INET` socket, which must be
/// refused: a refusal to install (a seccomp profile around us, a kernel without the feature)
/// or a filter that does not bite is found once, before any program runs.
pub(super) fn probe_seccomp(filters: &Filters) -> Result<(), String> {
    const NO_NEW_PRIVS_FAILED: i32 = 1;
    const INSTALL_FAILED: i32 = 2;
    const INEFFECTIVE: i32 = 3;
    // SAFETY: the child makes raw system calls on memory prepared before the fork (the
    // compiled filters) and leaves by _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: prctl with integer arguments only.
        let status = if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            NO_NEW_PRIVS_FAILED
        } else if filters.install().is_err() {
            INSTALL_FAILED
        } else {
            // SAFETY: socket takes integers; a descriptor it returns is closed by _exit.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
                INEFFECTIVE
            } else {
                0
            }
        };
        // SAFETY: _exit ends the child without running any Rust code.
        unsafe { libc::_exit(status) }
    }
    if pid < 0 {
        return Err(format!(
            "could not fork the seccomp probe: {}",
            io::Error::last_os_error()
        ));
    }
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable c_int; `pid` is our child.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        if waited == pid {
            break;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(format!(
                "waiting for the seccomp probe: {}",
                io::Error::last_os_error()
            ));
        }
    }
    if !libc::WIFEXITED(status) {
        return Err(format!("the seccomp probe died (wait status {status})"));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        NO_NEW_PRIVS_FAILED => Err("PR_SET_NO_NEW_PRIVS was refused".to_string()),
        INSTALL_FAILED => Err("installing the seccomp filter was refused".to_string()),
        INEFFECTIVE => {
            Err("the filter was installed but did not refuse an AF_INET socket".to_string())
        }
        other => Err(format!("the seccomp probe exited with status {other}")),
    }
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
