//! Data-parallel train jobs as separate processes: a `lorasweep coordinator` and `lorasweep
//! worker`s on loopback, sweeps asking `resources: {gpus_per_job: 2}`. A worker offering two
//! CPU slots (`--cpu-slots 2`) runs the job's two ranks as threads, with the loss curve of the
//! same sweep on one rank; a gang spread over two CPU-only workers fails at once with a clear
//! error instead of waiting for a peer it cannot reach.

#[path = "../engine/tests/common/files.rs"]
mod files;
#[path = "common/process.rs"]
mod process;
#[path = "common/sweep.rs"]
mod sweep;

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use process::{bin, Proc};

const TOKEN: &str = "data-parallel-test-token-0123456789";

struct Setup {
    dir: tempfile::TempDir,
    url: String,
    coordinator: Proc,
}

impl Setup {
    fn start() -> Setup {
        let dir = sweep::folder(TOKEN);
        let address_file = dir.path().join("address");
        let mut command = bin();
        command
            .arg("coordinator")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--db")
            .arg(dir.path().join("state.db"))
            .arg("--token-file")
            .arg(dir.path().join("token"))
            .arg("--addr-file")
            .arg(&address_file)
            .args(["--lease-ttl-secs", "3", "--heartbeat-secs", "1"]);
        let mut coordinator =
            Proc::spawn("coordinator", command, dir.path().join("coordinator.log"));
        let started = Instant::now();
        while !address_file.exists() {
            if let Some(status) = coordinator.child.try_wait().unwrap() {
                panic!("the coordinator exited ({status}):\n{}", coordinator.log());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no address");
            sleep(Duration::from_millis(25));
        }
        let address = std::fs::read_to_string(&address_file).unwrap();
        Setup {
            url: format!("http://{}", address.trim()),
            dir,
            coordinator,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client(&self, args: &[&str]) -> Value {
        let out = bin()
            .args(args)
            .args(["--coordinator", &self.url])
            .arg("--token-file")
            .arg(self.path("token"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str(&text).unwrap_or(Value::String(text.trim().to_string()))
    }

    /// A worker with `extra` flags (`--cpu-slots 2`, …).
    fn worker(&self, id: &str, extra: &[&str]) -> Proc {
        let mut command = bin();
        command
            .arg("worker")
            .args(["--coordinator", &self.url])
            .arg("--token-file")
            .arg(self.path("token"))
            .args(["--worker-id", id])
            .arg("--work-dir")
            .arg(self.path(&format!("work-{id}")))
            .args(extra);
        Proc::spawn(id, command, self.path(&format!("{id}.log")))
    }

    /// Submits a sweep of one train job (and its evals) on the tiny model, over `ranks` ranks.
    fn submit(&self, name: &str, ranks: u32) -> String {
        let sweep = format!(
            "version: 1\n\
             name: {name}\n\
             models: [model]\n\
             tasks: [chat.jsonl]\n\
             probe: {{batches: 1, batch_size: 2, max_len: 64, rank: 4, always: false}}\n\
             train: {{steps: 6, batch_size: 4, max_len: 64, rank: 4, lr: 0.01, schedule: constant, warmup_ratio: 0.0, checkpoint_every: 2}}\n\
             eval: {{limit: 2, max_new_tokens: 4, batch_size: 2}}\n\
             sweep:\n  grid:\n    placement: [all]\n\
             resources: {{gpus_per_job: {ranks}, max_attempts: 1}}\n"
        );
        let file = self.path(&format!("{name}.yaml"));
        std::fs::write(&file, sweep).unwrap();
        match self.client(&["submit", file.to_str().unwrap()]) {
            Value::String(id) => id,
            other => other.to_string(),
        }
    }

    /// The sweep's status once it has ended; panics with the logs after `limit`.
    fn wait_ended(&self, sweep: &str, limit: Duration, workers: &[&Proc]) -> Value {
        let started = Instant::now();
        loop {
            let status = self.client(&["status", sweep, "--format", "json"]);
            if status["ended"].as_bool().unwrap() {
                return status;
            }
            if started.elapsed() > limit {
                let logs: Vec<String> = std::iter::once(&self.coordinator)
                    .chain(workers.iter().copied())
                    .map(|p| format!("--- {} ---\n{}", p.name, p.log()))
                    .collect();
                panic!(
                    "sweep {sweep} did not end within {limit:?}: {status:#}\n{}",
                    logs.join("\n")
                );
            }
            sleep(Duration::from_millis(100));
        }
    }
}

fn train_job(status: &Value) -> &Value {
    status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|job| job["kind"] == "train")
        .unwrap_or_else(|| panic!("no train job in {status:#}"))
}

fn losses(job: &Value) -> Vec<f64> {
    job["result"]["losses"]
        .as_array()
        .unwrap_or_else(|| panic!("no losses in {job:#}"))
        .iter()
        .map(|loss| loss.as_f64().unwrap())
        .collect()
}

#[test]
fn a_worker_with_two_cpu_slots_runs_a_two_rank_job_on_the_one_rank_curve() {
    let setup = Setup::start();
    let worker = setup.worker("w2", &["--cpu-slots", "2"]);
    setup.coordinator.wait_registered(&["w2"]);
    let two = setup.submit("two-ranks", 2);
    let one = setup.submit("one-rank", 1);
    let limit = Duration::from_secs(180);
    let two = setup.wait_ended(&two, limit, &[&worker]);
    let one = setup.wait_ended(&one, limit, &[&worker]);
    for status in [&two, &one] {
        let jobs = status["jobs"].as_array().unwrap();
        assert!(
            jobs.iter().all(|job| job["state"] == "succeeded"),
            "{status:#}\n{}",
            worker.log()
        );
    }
    let (parallel, single) = (train_job(&two), train_job(&one));
    assert_eq!(parallel["result"]["world_size"], 2, "{parallel:#}");
    assert_eq!(single["result"]["world_size"], 1, "{single:#}");
    let (ours, theirs) = (losses(parallel), losses(single));
    assert_eq!(ours.len(), 6);
    assert_eq!(ours.len(), theirs.len());
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "step {}: loss {a} over 2 ranks vs {b} on one",
            step + 1
        );
    }
    assert!(ours[5] < ours[0], "training lowered the loss: {ours:?}");
    assert!(
        worker.log().contains("data-parallel train job"),
        "{}",
        worker.log()
    );
}

#[test]
fn a_gang_spread_over_two_cpu_workers_fails_at_once_with_a_clear_error() {
    let setup = Setup::start();
    let first = setup.worker("c1", &["--cpu-slots", "1"]);
    let second = setup.worker("c2", &[]);
    setup.coordinator.wait_registered(&["c1", "c2"]);
    let started = Instant::now();
    let sweep = setup.submit("spread", 2);
    let status = setup.wait_ended(&sweep, Duration::from_secs(120), &[&first, &second]);
    let train = train_job(&status);
    assert_eq!(train["state"], "failed", "{status:#}");
    let error = train["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("a train job spread over several workers needs"),
        "{train:#}"
    );
    // The gang spanned both workers (one rank each); whichever got its lease first refused
    // its rank, and the failure ended the job (the other may never have started its rank).
    assert!(error.contains("2 ranks, 1 of them here"), "{train:#}");
    assert!(
        [&first, &second].iter().any(|worker| worker
            .log()
            .contains("a train job spread over several workers needs")),
        "{}\n{}",
        first.log(),
        second.log()
    );
    // Failed, not waited on: far sooner than any rendezvous timeout.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn slots_are_gpus_or_cpu_ranks_never_both_and_run_gives_every_worker_a_gpu() {
    let out = bin()
        .args(["worker", "--gpus", "0,1", "--cpu-slots", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--cpu-slots") && stderr.contains("cannot be used with"),
        "{stderr}"
    );
    let out = bin().args(["worker", "--cpu-slots", "0"]).output().unwrap();
    assert!(!out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["run", "sweep.yaml", "--workers", "3", "--gpus", "0,1"])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--workers 3 with --gpus 0,1 and --workers-per-gpu 1: at most 2 workers"),
        "{stderr}"
    );
}

/// `lorasweep train --data-parallel N` on the tiny model: its per-step losses.
fn train_losses(setup: &Setup, ranks: &str) -> Vec<f64> {
    let out = bin()
        .arg("train")
        .arg("--model")
        .arg(setup.path("model"))
        .arg("--data")
        .arg(setup.path("chat.jsonl"))
        .args([
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--max-len",
            "64",
            "--rank",
            "4",
        ])
        .args([
            "--lr",
            "0.01",
            "--schedule",
            "constant",
            "--warmup-ratio",
            "0",
        ])
        .args(["--data-parallel", ranks])
        .arg("--out")
        .arg(setup.path(&format!("train-{ranks}")))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "data-parallel: {ranks} rank(s) on cpu, all-reduce through threads"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("tokens/s"), "{stdout}");
    stdout
        .lines()
        .filter(|line| line.starts_with("step "))
        .map(|line| {
            line.split("loss ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn train_data_parallel_prints_the_same_losses_for_one_and_two_ranks() {
    let setup = Setup::start();
    let one = train_losses(&setup, "1");
    let two = train_losses(&setup, "2");
    assert_eq!(one.len(), 4, "{one:?}");
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        // Printed with 6 decimals.
        assert!((a - b).abs() <= 1e-5 * a.abs() + 1e-6, "{one:?} vs {two:?}");
    }
    assert!(setup.path("train-2/adapter_model.safetensors").is_file());
}
