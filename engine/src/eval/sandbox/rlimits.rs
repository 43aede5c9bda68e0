//! The resource limits every run gets, set in the child before `exec`: CPU seconds, address
//! space, file size, processes, open files, and no core dumps.

use super::Limits;

/// One `setrlimit` call: the resource and its soft and hard limits.
pub(super) type Rlimit = (libc::__rlimit_resource_t, libc::rlimit);

/// The limits of `limits` as `setrlimit` arguments. `RLIMIT_NPROC` counts every task of the
/// program's uid, so where the program shares our uid the `nproc_base` tasks we already run
/// (the worker's threads) are added to its allowance; a dedicated uid starts from 0.
pub(super) fn table(limits: &Limits, nproc_base: u64) -> Vec<Rlimit> {
    let processes = limits.processes.saturating_add(nproc_base);
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
        (libc::RLIMIT_NPROC, rlimit(processes, processes)),
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

/// Tasks (threads included) whose real uid is `uid`, as `RLIMIT_NPROC` counts them.
pub(super) fn tasks_of_uid(uid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut tasks = 0;
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .iter()
            .all(u8::is_ascii_digit)
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            tasks += field("Threads:").unwrap_or(1);
        }
    }
    tasks
}
