//! The resource limits every run gets, set in the child before `exec`: CPU seconds, address
//! space, file size, processes, open files, and no core dumps.

use super::Limits;

/// One `setrlimit` call: the resource and its soft and hard limits.
pub(super) type Rlimit = (libc::__rlimit_resource_t, libc::rlimit);

/// The limits of `limits` as `setrlimit` arguments.
pub(super) fn table(limits: &Limits) -> Vec<Rlimit> {
    vec![
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
    ]
}

fn rlimit(soft: u64, hard: u64) -> libc::rlimit {
    libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    }
}
