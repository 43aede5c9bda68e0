//! Real processes for the end-to-end tests: the `lorasweep` binary with a clean environment,
//! and children that log to a file and are killed when dropped.
#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The binary under test, without the caller's token or coordinator in its environment.
pub fn bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lorasweep"));
    command
        .env_remove("LORASWEEP_TOKEN")
        .env_remove("LORASWEEP_COORDINATOR")
        .env("RUST_LOG", "info");
    command
}

/// The binary run to completion with `args`, logging warnings only.
pub fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

/// Runs a command that must fail without panicking; returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

/// Runs a command that must succeed; returns its stdout.
pub fn succeeds(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A child process killed (SIGKILL) when dropped, its output in a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Proc {
        let file = File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} did not exit within {limit:?}; its log:\n{}",
                self.name,
                self.log()
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Proc {
    /// For a coordinator: waits until each of `workers` is in its log as registered.
    pub fn wait_registered(&self, workers: &[&str]) {
        let started = Instant::now();
        loop {
            let log = self.log();
            if workers.iter().all(|id| {
                log.lines()
                    .any(|line| line.contains("worker registered") && line.contains(id))
            }) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "workers {workers:?} did not register:\n{log}"
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
