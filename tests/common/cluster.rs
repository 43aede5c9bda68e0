//! A lorasweep cluster as separate processes for the end-to-end tests: a `lorasweep
//! coordinator` on loopback with its database in a test folder, `lorasweep worker`s, and the
//! client verbs against it. Included beside `process` and `sweep` (`tests/common/`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{bin, Proc};

/// A test's folder: the model, the data, the sweep, the token, logs and state.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub address: Option<String>,
    /// `Some((ca, server name))` once the coordinator serves TLS.
    pub tls: Option<(PathBuf, String)>,
    /// Environment given to the coordinator and the workers started from now on.
    pub env: Vec<(String, PathBuf)>,
}

impl Cluster {
    pub fn new(token: &str) -> Cluster {
        let dir = crate::sweep::folder(token);
        Cluster {
            dir,
            address: None,
            tls: None,
            env: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn url(&self) -> String {
        let address = self.address.as_deref().expect("coordinator started");
        match &self.tls {
            Some((_, name)) => {
                let port = address.rsplit(':').next().unwrap();
                format!("https://{name}:{port}")
            }
            None => format!("http://{address}"),
        }
    }

    /// The client flags of this cluster: coordinator, token and, with TLS, the CA.
    pub fn client_flags(&self, command: &mut Command) {
        command
            .args(["--coordinator", &self.url()])
            .arg("--token-file")
            .arg(self.path("token"));
        if let Some((ca, _)) = &self.tls {
            command.arg("--ca").arg(ca);
        }
    }

    /// Starts a coordinator on `listen` (port 0 picks one) and waits until it serves.
    pub fn coordinator(&mut self, listen: &str, log: &str) -> Proc {
        self.coordinator_with(listen, log, &[])
    }

    pub fn coordinator_with(&mut self, listen: &str, log: &str, extra: &[&Path]) -> Proc {
        let addr_file = self.path("address");
        let _ = std::fs::remove_file(&addr_file);
        let mut command = bin();
        command
            .arg("coordinator")
            .args(["--listen", listen])
            .arg("--db")
            .arg(self.path("state.db"))
            .arg("--token-file")
            .arg(self.path("token"))
            .arg("--addr-file")
            .arg(&addr_file)
            .args(["--lease-ttl-secs", "3", "--heartbeat-secs", "1"])
            .args(extra)
            .envs(self.env.iter().map(|(name, value)| (name, value)));
        let mut process = Proc::spawn("coordinator", command, self.path(log));
        let started = Instant::now();
        while !addr_file.exists() {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("the coordinator exited ({status}):\n{}", process.log());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no address");
            sleep(Duration::from_millis(25));
        }
        self.address = Some(std::fs::read_to_string(&addr_file).unwrap());
        process
    }

    pub fn worker(&self, id: &str) -> Proc {
        self.worker_logged(id, &format!("{id}.log"))
    }

    /// A worker logging to `log` in the folder (a restarted worker keeps its id, not its log).
    pub fn worker_logged(&self, id: &str, log: &str) -> Proc {
        let mut command = bin();
        command.arg("worker");
        self.client_flags(&mut command);
        command
            .args(["--worker-id", id])
            .arg("--work-dir")
            .arg(self.path(&format!("work-{id}")))
            .envs(self.env.iter().map(|(name, value)| (name, value)));
        Proc::spawn(id, command, self.path(log))
    }

    pub fn client(&self, args: &[&str]) -> Output {
        let mut command = bin();
        command.args(args);
        self.client_flags(&mut command);
        command.output().unwrap()
    }

    pub fn submit(&self, sweep: &str) -> String {
        let file = self.path("sweep.yaml");
        std::fs::write(&file, sweep).unwrap();
        let out = self.client(&["submit", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn status(&self, sweep: &str) -> Value {
        let out = self.client(&["status", sweep, "--format", "json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls the sweep until `done` says so; panics with the logs after `limit`.
    pub fn wait_for(
        &self,
        sweep: &str,
        what: &str,
        limit: Duration,
        logs: &[&Proc],
        mut done: impl FnMut(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let status = self.status(sweep);
            if done(&status) {
                return status;
            }
            if started.elapsed() > limit {
                let logs: Vec<String> = logs
                    .iter()
                    .map(|process| format!("--- {} ---\n{}", process.name, process.log()))
                    .collect();
                panic!(
                    "waited {limit:?} for {what}; status: {status:#}\n{}",
                    logs.join("\n")
                );
            }
            sleep(Duration::from_millis(100));
        }
    }
}
