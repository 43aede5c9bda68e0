//! The dedicated uid of root mode: one unprivileged uid per concurrent run, held through a lock
//! file, and every process of that uid killed when the run ends.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use super::{child, io_error, SandboxError, UID_SLOTS};

/// A dedicated uid held for one run (root mode). The lock file makes it exclusive across
/// every sandbox on the machine, in this process or another.
pub(super) struct UidLease {
    pub(super) uid: u32,
    _lock: File,
}

impl UidLease {
    pub(super) fn acquire(base: u32) -> Result<UidLease, SandboxError> {
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
    pub(super) fn kill_all_processes(&self) {
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
