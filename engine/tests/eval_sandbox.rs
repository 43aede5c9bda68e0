//! The code sandbox against ordinary and hostile programs. Each hostile program must fail
//! (or be stopped) on its own, leave nothing behind, and leave the sandbox usable.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lorasweep_engine::eval::sandbox::{Identity, Limits, Outcome, Sandbox, SandboxConfig};

/// Tight limits so hostile programs are stopped quickly.
fn limits() -> Limits {
    Limits {
        wall: Duration::from_secs(3),
        cpu_seconds: 2,
        address_space_bytes: 512 << 20,
        file_size_bytes: 8 << 20,
        processes: 8,
        open_files: 32,
        tmpfs_bytes: 32 << 20,
    }
}

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let sandbox = Sandbox::new(SandboxConfig {
            limits: limits(),
            parallelism: 2,
            ..SandboxConfig::default()
        })
        .expect("a sandbox can be built on this machine");
        eprintln!(
            "sandbox: python {}, isolation {:?}",
            sandbox.python().display(),
            sandbox.isolation()
        );
        sandbox
    })
}

fn run(program: &str) -> lorasweep_engine::eval::sandbox::RunReport {
    sandbox().run(program).expect("the sandbox itself works")
}

/// Processes on the machine whose command line contains `marker`.
fn processes_with_marker(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(marker))
        .count()
}

/// A unique string to find a test's processes by.
fn unique_marker(what: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "lorasweep-{what}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn assert_sandbox_still_works() {
    let report = run("print(sum(range(10)))\n");
    assert_eq!(report.outcome, Outcome::Passed);
    assert_eq!(report.stdout_tail.trim(), "45");
}

#[test]
fn a_correct_program_passes_and_its_output_is_kept() {
    let report = run("import math\nassert math.sqrt(16) == 4\nprint('ok')\n");
    assert_eq!(report.outcome, Outcome::Passed, "{report:?}");
    assert_eq!(report.stdout_tail, "ok\n");
}

#[test]
fn a_failed_assertion_fails_with_its_traceback() {
    let report = run("def f():\n    return 1\nassert f() == 2, 'wrong answer'\n");
    match report.outcome {
        Outcome::Failed {
            exit_code,
            stderr_tail,
        } => {
            assert_eq!(exit_code, 1);
            assert!(
                stderr_tail.contains("AssertionError: wrong answer"),
                "{stderr_tail}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn the_environment_is_cleared_and_the_directory_empty() {
    let program = r#"
import os, sys
keys = sorted(os.environ)
assert set(keys) <= {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "PYTHONIOENCODING", "LC_ALL", "LC_CTYPE"}, keys
assert os.environ["PYTHONHASHSEED"] == "0"
assert os.listdir(".") == ["main.py"], os.listdir(".")
assert sys.stdin.read() == ""
print(hash("lorasweep"))
"#;
    let first = run(program);
    assert_eq!(first.outcome, Outcome::Passed, "{first:?}");
    // The test harness's own environment (cargo sets CARGO_* for tests) must not leak.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    // A fixed hash seed makes string hashes reproducible between runs.
    let second = run(program);
    assert_eq!(first.stdout_tail, second.stdout_tail);
}

#[test]
fn an_infinite_loop_is_stopped() {
    let started = Instant::now();
    let report = run("while True:\n    pass\n");
    // CPU limit (2 s, SIGKILL at 3 s) or the 3 s wall clock, whichever comes first.
    assert!(
        matches!(report.outcome, Outcome::TimedOut | Outcome::Crashed { .. }),
        "{report:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_sandbox_still_works();
}

#[test]
fn sleeping_past_the_wall_clock_times_out() {
    let started = Instant::now();
    let report = run("import time\ntime.sleep(60)\n");
    assert_eq!(report.outcome, Outcome::TimedOut);
    assert!(
        report.wall_s >= 3.0 && report.wall_s < 6.0,
        "{}",
        report.wall_s
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_huge_allocation_fails_with_memory_error() {
    let report = run("x = bytearray(8 * 1024 ** 3)\n");
    match &report.outcome {
        Outcome::Failed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("MemoryError"), "{stderr_tail}")
        }
        other => panic!("expected MemoryError, got {other:?}"),
    }
    let report = run("chunks = []\nwhile True:\n    chunks.append(b'x' * (64 << 20))\n");
    assert!(!report.outcome.passed(), "{report:?}");
    assert_sandbox_still_works();
}

#[test]
fn a_gigabyte_write_is_stopped_by_the_file_size_limit() {
    let program = r#"
block = b"x" * (1 << 20)
with open("big.bin", "wb") as f:
    for _ in range(1024):
        f.write(block)
"#;
    let report = run(program);
    match &report.outcome {
        // Python ignores SIGXFSZ, so the write fails with EFBIG ("File too large"); with a
        // private tmpfs smaller than the limit it may be ENOSPC instead.
        Outcome::Failed { stderr_tail, .. } => assert!(
            stderr_tail.contains("File too large") || stderr_tail.contains("No space left"),
            "{stderr_tail}"
        ),
        Outcome::Crashed { signal, .. } => assert_eq!(*signal, libc::SIGXFSZ),
        other => panic!("a 1 GiB write must not succeed: {other:?}"),
    }
}

#[test]
fn writing_outside_the_working_directory_does_not_reach_the_host() {
    let name = format!("lorasweep-escape-{}-{}", std::process::id(), rand_suffix());
    let host_tmp = Path::new("/tmp").join(&name);
    let private = tempfile::tempdir().unwrap();
    let protected = private.path().join("owned-by-the-test");
    let program = format!(
        r#"
import os
results = []
for path in [{tmp:?}, {protected:?}]:
    try:
        with open(path, "w") as f:
            f.write("escaped")
        results.append("wrote " + path)
    except OSError as error:
        results.append("refused " + path + ": " + error.strerror)
print("\n".join(results))
"#,
        tmp = host_tmp.display().to_string(),
        protected = protected.display().to_string()
    );
    let report = run(&program);
    assert_eq!(report.outcome, Outcome::Passed, "{report:?}");
    let isolation = sandbox().isolation();
    if isolation.filesystem {
        assert!(
            !host_tmp.exists(),
            "the program's /tmp must be private: {}",
            report.stdout_tail
        );
    } else {
        eprintln!("no mount namespace here; /tmp writes reach the host");
        let _ = std::fs::remove_file(&host_tmp);
    }
    if isolation.identity == Identity::DedicatedUid {
        // Running as an unprivileged uid, it cannot write into a directory only we own.
        assert!(!protected.exists(), "{}", report.stdout_tail);
        assert!(
            report.stdout_tail.contains("refused"),
            "{}",
            report.stdout_tail
        );
    }
}

fn rand_suffix() -> u64 {
    Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id()) << 20
}

#[test]
fn no_network_to_the_host() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        r#"
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
print("connected")
"#
    );
    let report = run(&program);
    let accepted = listener.accept().is_ok();
    // Seccomp refuses the socket itself (EPERM) whether or not there is a network namespace.
    assert!(!report.outcome.passed(), "{report:?}");
    assert!(!accepted, "the host listener must not see a connection");
    match &report.outcome {
        Outcome::Failed { stderr_tail, .. } => assert!(
            stderr_tail.contains("PermissionError") || stderr_tail.contains("not permitted"),
            "{stderr_tail}"
        ),
        other => panic!("expected a refused socket, got {other:?}"),
    }
}

#[test]
fn the_process_limit_bounds_forking() {
    // Fork children that sleep, counting how many forks the kernel allows; each child
    // exits on its own after a while even if nothing kills it.
    let program = r#"
import os, time
made = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    made += 1
print(made)
"#;
    let report = run(program);
    assert_eq!(report.outcome, Outcome::Passed, "{report:?}");
    let made: usize = report.stdout_tail.trim().parse().unwrap();
    assert!(made < 8, "forked {made} processes with a limit of 8");
    assert_sandbox_still_works();
}

#[test]
fn a_fork_bomb_fails_that_sample_only() {
    let before = Instant::now();
    let marker = unique_marker("bomb");
    // The bomb re-executes itself with the marker on its command line, so that every one of
    // its processes can be found afterwards.
    let bomb = format!(
        r#"
import os, sys
code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
os.execv(sys.executable, [sys.executable, "-c", code, {marker:?}])
"#
    );
    let programs = vec![
        bomb,
        "print('fine')\n".to_string(),
        "import time\ntime.sleep(0.5)\nprint('also fine')\n".to_string(),
    ];
    let reports = sandbox().run_all(&programs);
    let outcomes: Vec<&Outcome> = reports
        .iter()
        .map(|report| &report.as_ref().unwrap().outcome)
        .collect();
    assert!(
        matches!(outcomes[0], Outcome::TimedOut | Outcome::Crashed { .. }),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(outcomes[1], &Outcome::Passed);
    assert_eq!(outcomes[2], &Outcome::Passed);
    assert!(before.elapsed() < Duration::from_secs(15));
    // Nothing of the bomb survives it.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(processes_with_marker(&marker), 0, "bomb processes survived");
    assert_sandbox_still_works();
}

#[test]
fn background_children_die_with_the_program() {
    let marker = unique_marker("orphan");
    // The child tries to leave the process group and the session (seccomp refuses both), then
    // sleeps under a command line carrying the marker.
    let program = format!(
        r#"
import os, sys
if os.fork() == 0:
    for leave in (os.setsid, lambda: os.setpgid(0, 0)):
        try:
            leave()
        except OSError:
            pass
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", {marker:?}])
import time
time.sleep(0.5)
print("parent done")
"#
    );
    let report = run(&program);
    assert_eq!(report.outcome, Outcome::Passed, "{report:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        processes_with_marker(&marker),
        0,
        "the detached child survived its program"
    );
}

#[test]
fn programs_run_in_parallel_and_keep_their_order() {
    let programs: Vec<String> = (0..6)
        .map(|i| format!("import time\ntime.sleep(0.3)\nprint({i})\n"))
        .collect();
    let started = Instant::now();
    let reports = sandbox().run_all(&programs);
    let elapsed = started.elapsed();
    let printed: Vec<String> = reports
        .iter()
        .map(|report| report.as_ref().unwrap().stdout_tail.trim().to_string())
        .collect();
    assert_eq!(printed, ["0", "1", "2", "3", "4", "5"]);
    // Six 0.3 s sleeps two at a time: about 0.9 s plus start-up, well under 6 * 0.3 + slack.
    assert!(elapsed < Duration::from_secs_f64(1.8 + 1.5), "{elapsed:?}");
    let distinct: HashSet<String> = printed.into_iter().collect();
    assert_eq!(distinct.len(), 6);
}

#[test]
fn without_namespaces_the_limits_still_hold() {
    let sandbox = Sandbox::new(SandboxConfig {
        limits: limits(),
        parallelism: 1,
        use_namespaces: false,
        ..SandboxConfig::default()
    })
    .unwrap();
    let isolation = sandbox.isolation();
    assert!(!isolation.network && !isolation.filesystem && !isolation.pid);

    let report = sandbox.run("while True:\n    pass\n").unwrap();
    assert!(!report.outcome.passed(), "{report:?}");

    let report = sandbox
        .run("import os\nprint(sorted(os.listdir('.')))\n")
        .unwrap();
    assert_eq!(report.stdout_tail.trim(), "['main.py']");

    if isolation.identity == Identity::DedicatedUid {
        // Root ignores RLIMIT_NPROC; the dedicated uid is what bounds forking here.
        let report = sandbox
            .run("import os, time\nmade = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n    made += 1\nprint(made)\n")
            .unwrap();
        let made: usize = report.stdout_tail.trim().parse().unwrap();
        assert!(made < 8, "forked {made}");

        // Without a PID namespace, a detached child is swept by uid after the run.
        let marker = unique_marker("orphan-no-ns");
        let program = format!(
            "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker:?}])\nimport time\ntime.sleep(0.5)\n"
        );
        let report = sandbox.run(&program).unwrap();
        assert_eq!(report.outcome, Outcome::Passed, "{report:?}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(processes_with_marker(&marker), 0);
    }
}
