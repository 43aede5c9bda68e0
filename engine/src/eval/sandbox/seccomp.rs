//! Seccomp: the system calls a program may not make, whatever its uid.
//!
//! Refused with `EPERM`:
//!
//! - `socket` for any family but `AF_UNIX`: no TCP, UDP, raw or netlink sockets, so no network
//!   even where there is no network namespace;
//! - looking into or changing other processes: `ptrace`, `process_vm_readv`/`writev`,
//!   `pidfd_getfd`, `process_madvise`;
//! - new namespaces and mounts: `unshare`, `setns`, `clone` with a namespace flag, `mount`,
//!   `umount2`, `pivot_root`, `chroot` and the new mount API;
//! - leaving its process group: `setsid`, `setpgid`, so that the group kill at the end of the
//!   run reaches every process it started even without a PID namespace or a dedicated uid;
//! - kernel surfaces an ordinary program never needs: `bpf`, `perf_event_open`, `keyctl`,
//!   `add_key`, `request_key`, `userfaultfd`, `io_uring_*` (whose operations bypass this
//!   filter), `open_by_handle_at`, module and kexec loading.
//!
//! `clone3` returns `ENOSYS`: its flags live in memory the filter cannot read, and the C
//! library falls back to `clone` on that error, whose flags it can.
//!
//! The programs are compiled once in the parent by `seccompiler`; the child only installs them
//! (`apply_filter` makes one `prctl` and one `seccomp` call on the prepared program).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SandboxError;

/// System calls refused whatever their arguments.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_process_madvise,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_setsid,
    libc::SYS_setpgid,
];

/// `clone` flags that create namespaces.
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// The compiled filters, installed in this order.
#[derive(Clone, Debug)]
pub(super) struct Filters {
    programs: Vec<BpfProgram>,
}

impl Filters {
    /// Compiles the filters for the running architecture.
    pub(super) fn new() -> Result<Filters, SandboxError> {
        let failed = |error: &dyn std::fmt::Display| {
            SandboxError::Config(format!("compiling the seccomp filter: {error}"))
        };
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| failed(&e))?;

        let mut refused: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for &call in DENIED {
            refused.insert(call, Vec::new());
        }
        let not_unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            libc::AF_UNIX as u64,
        )
        .map_err(|e| failed(&e))?;
        refused.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![not_unix]).map_err(|e| failed(&e))?],
        );
        let mut clone_rules = Vec::new();
        for flag in NAMESPACE_FLAGS {
            let flag = flag as u64;
            let condition = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(|e| failed(&e))?;
            clone_rules.push(SeccompRule::new(vec![condition]).map_err(|e| failed(&e))?);
        }
        refused.insert(libc::SYS_clone, clone_rules);
        let refused = SeccompFilter::new(
            refused,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(|e| failed(&e))?;

        let unknown = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| failed(&e))?;

        let programs = [refused, unknown]
            .into_iter()
            .map(|filter| BpfProgram::try_from(filter).map_err(|e| failed(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filters { programs })
    }

    /// Installs every filter on the calling thread. Runs in the child between `fork` and
    /// `exec`, after `PR_SET_NO_NEW_PRIVS`: no allocation on success.
    pub(super) fn install(&self) -> std::io::Result<()> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|error| match error {
                seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => io,
                _ => std::io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        }
        Ok(())
    }
}
