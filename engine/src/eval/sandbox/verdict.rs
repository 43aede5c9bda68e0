//! The verdict of a tested program, through a channel the program cannot write.
//!
//! Threat model: the completion is hostile and runs with everything the sandbox allows — it
//! can read its own source, print anything, exit with any status, write to every descriptor it
//! holds and look at `/proc` where it may. A marker on stdout or an exit status therefore
//! proves nothing: the completion can print the marker and call `os._exit(0)` before a single
//! test runs. And the tests cannot report from inside the completion's process either: code
//! that runs before them in the same interpreter can forge whatever they would send.
//!
//! So the completion and the tests never share a process. The harness (`harness.py`, run with
//! the tests' source on an inherited descriptor and the write end of a pipe on another)
//! forks the *solution process* first, before it reads anything; that process closes every
//! descriptor except its own two pipe ends, receives the solution, and answers calls of the
//! entry point. The *judge* — the harness's first process — then reads the tests, runs them
//! with `candidate` calling into the solution process (arguments and results cross as tagged
//! JSON, decoded into plain built-in values only: no pickle, no eval, no object of the
//! solution's classes), and writes `{"passed": …}` to the verdict pipe. Only a normal return
//! from `check(candidate)` writes `passed: true`.
//!
//! What the solution process cannot do, and why:
//!
//! - write the verdict pipe: it holds no descriptor of it, and cannot get one through
//!   `/proc/<judge>/fd` (Landlock grants no access to `/proc`; the judge is also
//!   non-dumpable, so its `/proc` files belong to root) nor `pidfd_getfd` (seccomp);
//! - change the judge's memory or code: `ptrace`, `process_vm_writev` and `/proc/<pid>/mem`
//!   are refused (seccomp, Landlock, non-dumpable); the judge imports only from the standard
//!   library (the working directory is taken off `sys.path` before anything is imported, so
//!   a module planted there is never loaded);
//! - read the tests: they exist only in the judge's memory and the payload descriptor, which
//!   the solution process closed before running foreign code.
//!
//! What it still can do — and what stays out of scope: return wrong values (the tests judge
//! them), stop or kill the judge (then no verdict is written: a failure), and exploit tests
//! that are too weak. The verdict says "these tests passed on the values the completion
//! returned", nothing more.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use super::{io_error, SandboxError};

/// The harness's source, run with `python3 -B -s -c`.
pub(super) const HARNESS: &str = include_str!("harness.py");

/// Longest verdict read back; the harness writes a few hundred bytes.
const VERDICT_LIMIT: u64 = 64 << 10;

/// A solution and the tests it must pass (HumanEval's layout).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestProgram {
    /// The code under test (the prompt followed by the completion), run in the solution
    /// process.
    pub solution: String,
    /// Trusted definitions the tests may use (the problem's prompt: helper functions, the
    /// entry point's signature), run in the judge. A prompt that does not compile on its own
    /// is retried with a `pass` body and otherwise left out.
    pub helpers: String,
    /// Test code that defines `check(candidate)`, run in the judge.
    pub tests: String,
    /// The function of the solution that `check` is called with.
    pub entry_point: String,
}

/// What the judge reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// `check(candidate)` returned normally.
    pub passed: bool,
    /// Why not: the end of the traceback, or what happened to the solution process.
    pub error: Option<String>,
}

/// The descriptors of one tested run.
pub(super) struct Channel {
    /// Our end of the verdict pipe.
    read: OwnedFd,
    /// The end the judge inherits.
    pub(super) write: OwnedFd,
    /// The payload (an unlinked file) the judge inherits.
    pub(super) payload: OwnedFd,
}

impl Channel {
    /// A fresh pipe and the payload file for `program`.
    pub(super) fn new(program: &TestProgram) -> Result<Channel, SandboxError> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io_error("creating the verdict pipe")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let payload = serde_json::json!({
            "solution": program.solution,
            "helpers": program.helpers,
            "tests": program.tests,
            "entry_point": program.entry_point,
        });
        let mut file = tempfile::tempfile().map_err(io_error("creating the test payload"))?;
        file.write_all(payload.to_string().as_bytes())
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .map_err(io_error("writing the test payload"))?;
        Ok(Channel {
            read,
            write,
            payload: file.into(),
        })
    }

    /// The harness's arguments: the descriptor numbers of the verdict pipe and the payload.
    pub(super) fn arguments(&self) -> [String; 2] {
        [
            self.write.as_raw_fd().to_string(),
            self.payload.as_raw_fd().to_string(),
        ]
    }

    /// Splits off our read end; the other two go to the child's plan.
    pub(super) fn split(self) -> (OwnedFd, Vec<OwnedFd>) {
        (self.read, vec![self.write, self.payload])
    }
}

/// Reads the verdict once the program has ended, without waiting on a writer that may still
/// hold the pipe. `None` when the judge wrote nothing parseable (it was killed, timed out, or
/// never got there).
pub(super) fn read_verdict(read: OwnedFd) -> Option<Verdict> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(read.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(read.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut bytes = Vec::new();
    let _ = File::from(read).take(VERDICT_LIMIT).read_to_end(&mut bytes);
    serde_json::from_slice(&bytes).ok()
}
