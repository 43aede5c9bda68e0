//! Hostile completions, scored the way a code-evaluation job scores them: each one tries to
//! escape and answers the problem correctly only when its escape worked, so a pass means the
//! sandbox leaked and every case must be scored as a failure. Each test also checks the host
//! side (no file written, no connection accepted, no process left, the secret not printed).
//!
//! The suite runs as whatever uid runs the tests; when that is root (as in CI),
//! [`the_same_cases_hold_for_uid_65534`] re-runs every `hostile_` test in a child process
//! that has dropped to uid 65534 with no groups, so both the root mode (dedicated uid,
//! namespaces) and the unprivileged mode (Landlock, seccomp and the rlimits alone, plus
//! whatever namespaces the kernel grants) are proven on the same machine.
//!
//! The worker's files (home, scratch, `--out`, cache, token) are simulated by a folder tree
//! outside `/tmp` (so a private `/tmp` does not hide it) whose folders are world-writable and
//! whose token is world-readable: neither the dedicated uid nor file modes stand in the way,
//! only the sandbox's own layers.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lorasweep_engine::eval::code::{self, Completion, Problem, SampleResult};
use lorasweep_engine::eval::sandbox::{Limits, Sandbox, SandboxConfig, SandboxError};

/// The unprivileged uid (and gid) of the second run.
const NOBODY: u32 = 65534;
/// Set in the child run: the folder its worlds are made in (one the child may write).
const ROOT_ENV: &str = "LORASWEEP_HOSTILE_ROOT";
/// Set in the child run: a secret in the test process's own environment, which a program
/// must not read through `/proc/<pid>/environ`.
const SECRET_ENV: &str = "LORASWEEP_HOSTILE_SECRET";
/// Set in a child run: build the sandbox without namespaces, as in a container that refuses
/// them (the shipped Kubernetes worker), so that Landlock, seccomp and the rlimits hold alone.
const NO_NAMESPACES_ENV: &str = "LORASWEEP_HOSTILE_NO_NAMESPACES";
/// `landlock` or `seccomp`: remove that layer (accepting the weak level) to watch the cases it
/// holds fail. For proving the suite, never set in CI.
const REMOVE_LAYER_ENV: &str = "LORASWEEP_HOSTILE_REMOVE_LAYER";
/// Set in the child of [`a_kernel_without_landlock_is_detected_and_refused`], which runs
/// under a seccomp filter that answers `ENOSYS` to the Landlock system calls.
const NO_LANDLOCK_CHILD_ENV: &str = "LORASWEEP_HOSTILE_NO_LANDLOCK_CHILD";

fn limits() -> Limits {
    Limits {
        wall: Duration::from_secs(4),
        cpu_seconds: 3,
        address_space_bytes: 1 << 30,
        file_size_bytes: 8 << 20,
        processes: 8,
        open_files: 64,
        tmpfs_bytes: 32 << 20,
    }
}

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let removed = std::env::var(REMOVE_LAYER_ENV).ok();
        let sandbox = Sandbox::new(SandboxConfig {
            limits: limits(),
            parallelism: 2,
            use_namespaces: std::env::var_os(NO_NAMESPACES_ENV).is_none(),
            landlock: removed.as_deref() != Some("landlock"),
            seccomp: removed.as_deref() != Some("seccomp"),
            allow_weak: removed.is_some(),
            ..SandboxConfig::default()
        })
        .unwrap_or_else(|error| panic!("the strong sandbox must be available: {error}"));
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        eprintln!(
            "hostile suite as uid {uid}: python {}, isolation {}",
            sandbox.python().display(),
            sandbox.isolation()
        );
        match removed {
            Some(layer) => eprintln!("{layer} removed on purpose ({REMOVE_LAYER_ENV})"),
            None => assert!(sandbox.isolation().is_strong(), "{}", sandbox.isolation()),
        }
        sandbox
    })
}

/// The worker's files, as a hostile program would look for them.
struct World {
    _root: tempfile::TempDir,
    home: PathBuf,
    scratch: PathBuf,
    out: PathBuf,
    cache: PathBuf,
    token: PathBuf,
    secret: String,
}

impl World {
    fn new() -> World {
        let base = std::env::var_os(ROOT_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
        let root = tempfile::Builder::new()
            .prefix("hostile-")
            .tempdir_in(&base)
            .unwrap();
        let open = |path: &Path| {
            std::fs::create_dir_all(path).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
        };
        open(root.path());
        let folder = |name: &str| {
            let path = root.path().join(name);
            open(&path);
            path
        };
        let (home, scratch, out, cache) = (
            folder("home"),
            folder("scratch"),
            folder("out"),
            folder("cache"),
        );
        let secret = format!("token-{:032x}", rand_u128());
        let token = root.path().join("token");
        std::fs::write(&token, &secret).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o666)).unwrap();
        World {
            _root: root,
            home,
            scratch,
            out,
            cache,
            token,
            secret,
        }
    }
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut bytes))
        .unwrap();
    u128::from_le_bytes(bytes)
}

/// `def add(a, b)`, tested with `add(1, 2) == 3`.
fn problem() -> Problem {
    Problem {
        task_id: "Hostile/0".into(),
        prompt: "def add(a, b):\n".into(),
        canonical_solution: "    return a + b\n".into(),
        test: "\ndef check(candidate):\n    assert candidate(1, 2) == 3\n".into(),
        entry_point: "add".into(),
    }
}

/// A completion whose `attempt()` (Python, a function body) returns True when the escape
/// worked; only then does `add` answer correctly.
fn escaping(attempt: &str) -> String {
    let body: String = attempt
        .lines()
        .map(|line| format!("        {line}\n"))
        .collect();
    format!(
        "    import os, sys, socket, signal, time
    def attempt():
{body}
    try:
        worked = bool(attempt())
    except BaseException as error:
        print('contained:', type(error).__name__, error, flush=True)
        worked = False
    print('worked' if worked else 'did not work', flush=True)
    return a + b if worked else None
"
    )
}

fn score(completion: &str) -> SampleResult {
    let problems = [problem()];
    let completions = [Completion {
        task_id: "Hostile/0".into(),
        completion: completion.to_string(),
    }];
    let mut scored = code::score_completions(sandbox(), &problems, &completions)
        .expect("the sandbox itself works");
    assert_eq!(scored.results.len(), 1);
    scored.results.remove(0)
}

/// Scores `completion` and requires a failure.
fn assert_scored_as_failure(what: &str, completion: &str) -> SampleResult {
    let result = score(completion);
    assert!(
        !result.passed,
        "{what}: the escape worked and was scored as passing: {result:?}"
    );
    eprintln!(
        "{what}: failed as it must ({:?}; {})",
        result.outcome,
        result
            .note
            .as_deref()
            .unwrap_or("")
            .lines()
            .last()
            .unwrap_or("")
    );
    result
}

/// The sandbox still scores an honest completion as passing.
fn assert_sandbox_still_works() {
    let result = score("    return a + b\n");
    assert!(result.passed, "an honest completion must pass: {result:?}");
}

/// Processes whose command line contains `marker`.
fn processes_with_marker(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
                .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
                .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(marker))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn hostile_an_honest_completion_passes() {
    assert_sandbox_still_works();
}

#[test]
fn hostile_infinite_loop() {
    let started = Instant::now();
    assert_scored_as_failure("infinite loop", &escaping("while True:\n    pass"));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_sandbox_still_works();
}

#[test]
fn hostile_fork_bomb() {
    let marker = format!("lorasweep-bomb-{}-{:x}", std::process::id(), rand_u128());
    // Two bombs in the background, and the program itself counts how many processes it can
    // start: the escape is getting past the process limit (8).
    let attempt = format!(
        "code = 'import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass\\n'
for _ in range(2):
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', code, {marker:?}])
made = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    made += 1
print('forked', made)
return made >= 200"
    );
    let started = Instant::now();
    assert_scored_as_failure("fork bomb", &escaping(&attempt));
    assert!(started.elapsed() < Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(processes_with_marker(&marker), 0, "bomb processes survived");
    assert_sandbox_still_works();
}

#[test]
fn hostile_detached_child() {
    let marker = format!(
        "lorasweep-detached-{}-{:x}",
        std::process::id(),
        rand_u128()
    );
    // A child that leaves the process group would outlive the run where there is no PID
    // namespace and no dedicated uid (the group kill is what ends the run there).
    let attempt = format!(
        "child = os.fork()
if child == 0:
    for leave in (os.setsid, lambda: os.setpgid(0, 0)):
        try:
            leave()
        except OSError:
            pass
    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker:?}])
time.sleep(0.5)
return os.getpgid(child) != os.getpgrp()"
    );
    assert_scored_as_failure("child leaving the process group", &escaping(&attempt));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        processes_with_marker(&marker),
        0,
        "the detached child survived"
    );
}

#[test]
fn hostile_huge_allocation() {
    assert_scored_as_failure(
        "8 GiB allocation",
        &escaping("x = bytearray(8 << 30)\nreturn len(x) == 8 << 30"),
    );
    assert_scored_as_failure(
        "growing allocation",
        &escaping(
            "chunks = []\nfor _ in range(64):\n    chunks.append(bytearray(64 << 20))\nreturn True",
        ),
    );
    assert_sandbox_still_works();
}

#[test]
fn hostile_huge_file() {
    let attempt = "block = b'x' * (1 << 20)
with open('big.bin', 'wb') as f:
    for _ in range(1024):
        f.write(block)
return os.path.getsize('big.bin') >= 1 << 30";
    assert_scored_as_failure("1 GiB file", &escaping(attempt));
    assert_sandbox_still_works();
}

#[test]
fn hostile_writes_outside_the_working_directory() {
    let world = World::new();
    let targets = [
        ("home", world.home.join(".bashrc")),
        ("scratch", world.scratch.join("job.json")),
        ("out dir", world.out.join("state.db")),
        ("cache", world.cache.join("model.gguf")),
        ("token", world.token.clone()),
    ];
    for (what, path) in &targets {
        let attempt = format!(
            "with open({path:?}, 'a') as f:\n    f.write('escaped')\nreturn True",
            path = path.display().to_string()
        );
        assert_scored_as_failure(&format!("write into {what}"), &escaping(&attempt));
        if *what == "token" {
            assert_eq!(std::fs::read_to_string(path).unwrap(), world.secret);
        } else {
            assert!(!path.exists(), "{what}: {} was written", path.display());
        }
    }
    // The real home and the system directories are out of reach too.
    let attempt = "import pathlib
for path in [os.path.expanduser('~/.lorasweep-escape'), '/etc/lorasweep-escape', '/usr/lorasweep-escape']:
    try:
        pathlib.Path(path).write_text('escaped')
        return True
    except OSError as error:
        print(path, error)
return False";
    assert_scored_as_failure("write into home or system folders", &escaping(attempt));
    assert!(!Path::new("/etc/lorasweep-escape").exists());
    assert!(!Path::new("/usr/lorasweep-escape").exists());
}

#[test]
fn hostile_reads_the_token_and_the_environment() {
    let world = World::new();
    let attempt = format!(
        "with open({path:?}) as f:\n    print('read', f.read())\nreturn True",
        path = world.token.display().to_string()
    );
    let result = assert_scored_as_failure("read of the token file", &escaping(&attempt));
    assert!(!format!("{result:?}").contains(&world.secret));

    // The test process plays the worker: its environment (the child run puts a secret there)
    // must not be readable, neither directly nor by walking /proc.
    let pid = std::process::id();
    let attempt = format!(
        "found = False
for path in ['/proc/{pid}/environ', '/proc/1/environ'] + ['/proc/%s/environ' % p for p in os.listdir('/proc') if p.isdigit()]:
    try:
        with open(path, 'rb') as f:
            data = f.read()
        if path == '/proc/{pid}/environ' or b'SECRET' in data:
            print('read', path, data[:200])
            found = True
    except OSError:
        pass
return found"
    );
    let result = assert_scored_as_failure("read of /proc/*/environ", &escaping(&attempt));
    if let Ok(secret) = std::env::var(SECRET_ENV) {
        assert!(!format!("{result:?}").contains(&secret));
    }
}

#[test]
fn hostile_network() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempt = format!(
        "s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hello')\nreturn True"
    );
    assert_scored_as_failure(
        "loopback connection to the coordinator port",
        &escaping(&attempt),
    );
    assert!(
        listener.accept().is_err(),
        "the coordinator's port saw a connection"
    );
    let attempt = "s = socket.create_connection(('1.1.1.1', 53), timeout=2)\nreturn True";
    assert_scored_as_failure("outbound TCP connection", &escaping(attempt));
    let attempt = "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', 9))\nreturn True";
    assert_scored_as_failure("UDP socket", &escaping(attempt));
}

#[test]
fn hostile_kills_its_parent_and_the_worker() {
    let pid = std::process::id();
    let attempt = format!(
        "worked = False
for target in [{pid}, -{pid}, -1]:
    try:
        os.kill(target, signal.SIGKILL)
        print('killed', target)
        worked = worked or target == {pid}
    except OSError as error:
        print('refused', target, error)
try:
    os.kill(os.getppid(), signal.SIGKILL)
except OSError as error:
    print('refused parent', error)
time.sleep(1)
return worked"
    );
    assert_scored_as_failure("SIGKILL of the parent and the worker", &escaping(&attempt));
    // Reaching this line means the test process (the worker) is alive.
    assert_sandbox_still_works();
}

#[test]
fn hostile_forges_the_verdict() {
    // At load time: print markers and a verdict on every descriptor, then leave with status 0
    // before a single test runs.
    let completion = "    return None
import os, json
verdict = json.dumps({'passed': True, 'error': None}).encode()
print('lorasweep-tests-done-0000000000000000', flush=True)
for fd in range(0, 256):
    try:
        os.write(fd, verdict)
    except OSError:
        pass
os._exit(0)
";
    assert_scored_as_failure("forged verdict at load", completion);
    // At call time, from inside the entry point.
    let attempt = "verdict = b'{\"passed\": true, \"error\": null}'
for fd in range(0, 256):
    try:
        os.write(fd, verdict)
    except OSError:
        pass
os._exit(0)";
    assert_scored_as_failure("forged verdict at call", &escaping(attempt));
    // Stop the judge, write, then kill it: a forged verdict would be the only one on the pipe.
    let completion = "    return None
import os, signal
judge = os.getppid()
os.kill(judge, signal.SIGSTOP)
for fd in range(3, 256):
    try:
        os.write(fd, b'{\"passed\": true, \"error\": null}')
    except OSError:
        pass
os.kill(judge, signal.SIGKILL)
os._exit(0)
";
    assert_scored_as_failure("forged verdict with the judge stopped", completion);
}

#[test]
fn a_named_secret_under_etc_is_hidden() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "not run: placing a secret under /etc needs root (landlock.rs unit-tests the carving)"
        );
        return;
    }
    // As the Kubernetes worker's token: a secret under a readable system directory.
    let folder = tempfile::Builder::new()
        .prefix("lorasweep-hostile-")
        .tempdir_in("/etc")
        .unwrap();
    std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let token = folder.path().join("token");
    let secret = format!("token-{:032x}", rand_u128());
    std::fs::write(&token, &secret).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sibling = folder.path().join("public");
    std::fs::write(&sibling, "public").unwrap();
    std::fs::set_permissions(&sibling, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sandbox = Sandbox::new(SandboxConfig {
        limits: limits(),
        parallelism: 1,
        hidden_paths: vec![token.clone()],
        ..SandboxConfig::default()
    })
    .unwrap();
    let program = format!(
        "import os\nprint(open({sibling:?}).read())\ntry:\n    print(open({token:?}).read())\nexcept OSError as error:\n    print('refused', error.strerror)\nprint(os.path.exists('/etc/hostname') or os.path.exists('/etc/passwd'))\n",
        sibling = sibling.display().to_string(),
        token = token.display().to_string()
    );
    let report = sandbox.run(&program).unwrap();
    assert!(report.outcome.passed(), "{report:?}");
    assert!(
        !report.stdout_tail.contains(&secret),
        "{}",
        report.stdout_tail
    );
    assert!(
        report.stdout_tail.contains("refused Permission denied"),
        "{}",
        report.stdout_tail
    );
    assert!(
        report.stdout_tail.starts_with("public\n"),
        "{}",
        report.stdout_tail
    );
}

#[test]
fn a_kernel_without_landlock_is_detected_and_refused() {
    if std::env::var_os(NO_LANDLOCK_CHILD_ENV).is_some() {
        // Here the Landlock system calls fail with ENOSYS, as on a kernel without Landlock.
        let config = SandboxConfig {
            limits: limits(),
            parallelism: 1,
            ..SandboxConfig::default()
        };
        match Sandbox::new(config.clone()) {
            Err(error @ SandboxError::WeakIsolation { .. }) => {
                let text = error.to_string();
                eprintln!("refusal without landlock: {text}");
                assert!(text.contains("the kernel has no landlock"), "{text}");
                assert!(text.contains("--allow-weak-sandbox"), "{text}");
                let SandboxError::WeakIsolation { missing, .. } = error else {
                    unreachable!()
                };
                assert_eq!(missing, ["landlock"]);
            }
            other => panic!("a kernel without landlock must be refused: {other:?}"),
        }
        let weak = Sandbox::new(SandboxConfig {
            allow_weak: true,
            ..config
        })
        .expect("the weak level, accepted, builds");
        assert_eq!(weak.isolation().landlock_abi, 0);
        assert!(weak.isolation().seccomp);
        let report = weak.run("print('ran')\n").unwrap();
        assert_eq!(report.stdout_tail, "ran\n", "{report:?}");
        return;
    }
    let filter = seccompiler::SeccompFilter::new(
        [
            libc::SYS_landlock_create_ruleset,
            libc::SYS_landlock_add_rule,
            libc::SYS_landlock_restrict_self,
        ]
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "a_kernel_without_landlock_is_detected_and_refused",
            "--exact",
            "--nocapture",
        ])
        .env(NO_LANDLOCK_CHILD_ENV, "1");
    // SAFETY: apply_filter makes one prctl and one seccomp call on the program compiled
    // before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            seccompiler::apply_filter(&program)
                .map_err(|error| std::io::Error::other(error.to_string()))
        });
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- with the landlock system calls answering ENOSYS ---\n{stdout}\n{stderr}");
    assert!(output.status.success());
    assert!(stdout.contains("test result: ok. 1 passed"), "{stdout}");
    assert!(stderr.contains("refusal without landlock"), "{stderr}");
}

#[test]
fn weak_levels_are_refused_unless_accepted() {
    let config = SandboxConfig {
        limits: limits(),
        parallelism: 1,
        landlock: false,
        ..SandboxConfig::default()
    };
    match Sandbox::new(config.clone()) {
        Err(error @ SandboxError::WeakIsolation { .. }) => {
            let text = error.to_string();
            assert!(text.contains("landlock"), "{text}");
            assert!(text.contains("--allow-weak-sandbox"), "{text}");
            eprintln!("refusal: {text}");
        }
        other => panic!("a sandbox without landlock must be refused: {other:?}"),
    }
    let config = SandboxConfig {
        seccomp: false,
        landlock: true,
        ..config
    };
    match Sandbox::new(config.clone()) {
        Err(SandboxError::WeakIsolation { missing, .. }) => assert_eq!(missing, ["seccomp"]),
        other => panic!("a sandbox without seccomp must be refused: {other:?}"),
    }
    let weak = Sandbox::new(SandboxConfig {
        allow_weak: true,
        ..config
    })
    .expect("an accepted weak level builds");
    assert!(!weak.isolation().is_strong());
    assert!(weak.isolation().to_string().starts_with("weak:"));
}

#[test]
fn the_same_cases_hold_for_uid_65534() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!(
            "not re-executed: this process already runs as uid {euid} (not root), so the \
             hostile_ cases of this run are the unprivileged ones; dropping to {NOBODY} needs root"
        );
        return;
    }
    // Unprivileged with the namespaces the kernel grants, unprivileged without any (as the
    // Kubernetes worker), and root without namespaces (dedicated uid, Landlock, seccomp).
    for (uid, namespaces) in [(NOBODY, true), (NOBODY, false), (0, false)] {
        rerun_hostile_suite(uid, namespaces);
    }
}

/// Runs every `hostile_` test in a child process of this test binary as `uid`.
fn rerun_hostile_suite(uid: u32, namespaces: bool) {
    let base = tempfile::Builder::new()
        .prefix("hostile-child-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    std::os::unix::fs::chown(base.path(), Some(uid), Some(uid)).unwrap();
    let secret = format!("secret-{:032x}", rand_u128());
    let exe = std::env::current_exe().unwrap();
    let mut command = Command::new(&exe);
    command
        .args(["hostile_", "--test-threads=1", "--nocapture"])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", base.path())
        .env(ROOT_ENV, base.path())
        .env(SECRET_ENV, &secret)
        .current_dir(base.path());
    if !namespaces {
        command.env(NO_NAMESPACES_ENV, "1");
    }
    if let Some(layer) = std::env::var_os(REMOVE_LAYER_ENV) {
        command.env(REMOVE_LAYER_ENV, layer);
    }
    if uid != 0 {
        command.uid(uid).gid(uid);
    }
    let output = command.output().expect("re-executing the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let what = format!(
        "uid {uid}, {}",
        if namespaces {
            "namespaces as granted"
        } else {
            "no namespaces"
        }
    );
    eprintln!("--- the hostile suite as {what} ---\n{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "the hostile suite failed as {what}"
    );
    let passed = stdout
        .lines()
        .find_map(|line| line.strip_prefix("test result: ok. "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse::<usize>().ok())
        .unwrap_or(0);
    assert!(passed >= 11, "only {passed} hostile tests ran as {what}");
    assert!(
        stderr.contains(&format!("hostile suite as uid {uid}:")),
        "{stderr}"
    );
    assert!(!stdout.contains(&secret) && !stderr.contains(&secret));
}
