//! Waiting for a run with a deadline, killing its process group, and reading how it ended.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use super::{Outcome, OUTPUT_TAIL_BYTES};

pub(super) fn outcome_of(status: ExitStatus, stderr_tail: String) -> Outcome {
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
pub(super) fn wait_with_deadline(
    process: &mut Child,
    deadline: Instant,
) -> io::Result<Option<ExitStatus>> {
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

pub(super) fn read_tail(mut file: File) -> io::Result<String> {
    let length = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(length.saturating_sub(OUTPUT_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
