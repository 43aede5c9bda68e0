//! The chaos test of exactly-once: a sweep of 201 tiny jobs on a coordinator and three
//! workers, run once without faults and once under a seeded schedule of faults —
//! SIGKILL and restart of workers, SIGSTOP/SIGCONT of workers (past the lease when long), SIGKILL
//! and restart of the coordinator, an artifact upload that stops midway
//! (`LORASWEEP_FAULTS` `upload-abort-<worker>`) and a full disk under the coordinator's
//! artifact directory (`disk-full`: its writes fail with `ENOSPC`).
//!
//! At the end: every job is in exactly one terminal state (succeeded) and counted once in the
//! report; the report equals the fault-free run's (times and attempt counts aside); the store
//! and every artifact file pass `lorasweep coordinator --check`; no half-written upload is
//! visible under the artifact directory; a full disk was refused with a clear error. It prints
//! the seed (`LORASWEEP_CHAOS_SEED` replays one), the faults injected, the jobs and the
//! violations.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "../engine/tests/common/files.rs"]
mod files;
#[path = "common/process.rs"]
mod process;
#[path = "common/sweep.rs"]
mod sweep;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use cluster::Cluster;
use process::{bin, Proc};

const TOKEN: &str = "chaos-test-token-0123456789abcdef";
const WORKERS: [&str; 3] = ["w1", "w2", "w3"];
/// Faults the chaotic run injects at least.
const MIN_FAULTS: usize = 30;

/// 10 placements × 10 seeds: 100 train jobs, 100 evaluations of their adapters and one of the
/// base model.
fn chaos_sweep() -> String {
    "version: 1\n\
     name: chaos\n\
     models: [model]\n\
     tasks: [chat.jsonl]\n\
     train: {steps: 24, batch_size: 2, max_len: 48, rank: 2, checkpoint_every: 8}\n\
     eval: {limit: 2, max_new_tokens: 4, batch_size: 2}\n\
     sweep:\n  grid:\n    placement: [all, kind:q_proj, kind:k_proj, kind:v_proj, kind:o_proj, \
     kind:gate_proj, kind:up_proj, kind:down_proj, explicit:layers.0.mlp.down_proj, \
     explicit:layers.1.self_attn.q_proj]\n    seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n\
     resources: {max_attempts: 12}\n"
        .to_string()
}

/// A cluster with the fault switches folder given to every process.
struct Run {
    cluster: Cluster,
    faults: PathBuf,
    coordinator: Proc,
    coordinator_starts: usize,
    workers: BTreeMap<&'static str, Proc>,
    worker_starts: usize,
    /// Every log a worker incarnation wrote.
    worker_logs: Vec<PathBuf>,
    coordinator_logs: Vec<PathBuf>,
}

impl Run {
    fn start() -> Run {
        let mut cluster = Cluster::new(TOKEN);
        let faults = cluster.path("faults");
        std::fs::create_dir_all(&faults).unwrap();
        cluster
            .env
            .push(("LORASWEEP_FAULTS".into(), faults.clone()));
        let coordinator = cluster.coordinator("127.0.0.1:0", "coordinator-0.log");
        let mut run = Run {
            coordinator_logs: vec![coordinator.log.clone()],
            cluster,
            faults,
            coordinator,
            coordinator_starts: 1,
            workers: BTreeMap::new(),
            worker_starts: 0,
            worker_logs: Vec::new(),
        };
        for id in WORKERS {
            run.start_worker(id);
        }
        run.coordinator.wait_registered(&WORKERS);
        run
    }

    fn start_worker(&mut self, id: &'static str) {
        let log = format!("{id}-{}.log", self.worker_starts);
        self.worker_starts += 1;
        let worker = self.cluster.worker_logged(id, &log);
        self.worker_logs.push(worker.log.clone());
        self.workers.insert(id, worker);
    }

    fn restart_coordinator(&mut self, pause: Duration) {
        self.coordinator.kill();
        sleep(pause);
        let address = self.cluster.address.clone().unwrap();
        let log = format!("coordinator-{}.log", self.coordinator_starts);
        self.coordinator_starts += 1;
        self.coordinator = self.cluster.coordinator(&address, &log);
        self.coordinator_logs.push(self.coordinator.log.clone());
    }

    /// The sweep's status, or `None` while the coordinator cannot answer (restarting).
    fn status(&self, sweep: &str) -> Option<Value> {
        let out = self.cluster.client(&["status", sweep, "--format", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn ended(&self, sweep: &str) -> Option<Value> {
        self.status(sweep)
            .filter(|status| status["ended"].as_bool().unwrap_or(false))
    }

    fn wait_ended(&self, sweep: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            if let Some(status) = self.ended(sweep) {
                return status;
            }
            if started.elapsed() > limit {
                let logs: Vec<String> = self
                    .coordinator_logs
                    .iter()
                    .chain(&self.worker_logs)
                    .map(|path| {
                        let text = std::fs::read_to_string(path).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(40).collect();
                        format!("--- {} ---\n{}", path.display(), tail.join("\n"))
                    })
                    .collect();
                panic!(
                    "the sweep did not end within {limit:?}: {:#}\n{}",
                    self.status(sweep).unwrap_or_default(),
                    logs.join("\n")
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// `lorasweep report --format json`, with what legitimately differs between runs (times,
    /// throughputs, attempts, where a train job resumed) taken out.
    fn report(&self, sweep: &str) -> Value {
        let out = self.cluster.client(&["report", sweep, "--format", "json"]);
        assert!(
            out.status.success(),
            "report failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The runs live in different folders: their paths (and file names made of them) go.
        let folder = self.cluster.dir.path();
        let name = folder.file_name().unwrap().to_string_lossy().to_string();
        let text = String::from_utf8(out.stdout)
            .unwrap()
            .replace(folder.to_str().unwrap(), "<run>")
            .replace(&name, "<run>");
        let mut report: Value = serde_json::from_str(&text).unwrap();
        strip_run_specific(&mut report);
        report
    }

    /// Stops everything and runs `lorasweep coordinator --check` on the files left; returns
    /// its output, the partial uploads visible among the artifacts, and the logs.
    fn stop_and_check(mut self) -> (String, Vec<PathBuf>, Vec<String>, Vec<String>) {
        for worker in self.workers.values_mut() {
            resume(worker);
            worker.kill();
        }
        self.coordinator.kill();
        let out = bin()
            .arg("coordinator")
            .arg("--check")
            .arg("--db")
            .arg(self.cluster.path("state.db"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let check = if out.status.success() {
            text
        } else {
            format!("FAILED: {text}")
        };
        let read = |paths: &[PathBuf]| -> Vec<String> {
            paths
                .iter()
                .map(|path| std::fs::read_to_string(path).unwrap_or_default())
                .collect()
        };
        let worker_logs = read(&self.worker_logs);
        let coordinator_logs = read(&self.coordinator_logs);
        let stray = stray_parts(&self.cluster.path("artifacts"));
        (check, stray, worker_logs, coordinator_logs)
    }
}

/// A line on the test's standard error past the harness's capture, so that CI's log shows
/// the seed and the summary of a passing run too.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn signal(process: &Proc, signal: i32) {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe {
        libc::kill(process.child.id() as i32, signal);
    }
}

fn resume(process: &Proc) {
    signal(process, libc::SIGCONT);
}

/// Removes, at any depth, the keys whose values depend on timing or on the faults met.
fn strip_run_specific(value: &mut Value) {
    const RUN_SPECIFIC: &[&str] = &[
        "attempts",
        "resumed_from",
        "last_error",
        "peak_rss_gib",
        "queued_at_ms",
        "started_at_ms",
        "finished_at_ms",
        "created_ms",
        "queued_ms",
        "started_ms",
        "finished_ms",
        "sweep",
        "sweep_id",
        "generated",
    ];
    match value {
        Value::Object(map) => {
            // Seconds and rates (`wall_s`, `train_wall_s`, `tokens_per_s`, …) too.
            map.retain(|key, _| !RUN_SPECIFIC.contains(&key.as_str()) && !key.ends_with("_s"));
            map.values_mut().for_each(strip_run_specific);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_run_specific),
        _ => {}
    }
}

/// How many lines of the logs contain `needle`, per job id (the `job=` field).
fn per_job(logs: &[String], needle: &str) -> BTreeMap<u64, usize> {
    let mut found = BTreeMap::new();
    for line in logs.iter().flat_map(|log| log.lines()) {
        if !line.contains(needle) {
            continue;
        }
        let id = line
            .split(" job=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse::<u64>().ok());
        if let Some(id) = id {
            *found.entry(id).or_insert(0) += 1;
        }
    }
    found
}

/// Files under the artifact directory's job folders that are not whole artifacts.
fn stray_parts(artifacts: &Path) -> Vec<PathBuf> {
    let mut stray = Vec::new();
    let mut folders = vec![artifacts.join("jobs")];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "part")
            {
                stray.push(path);
            }
        }
    }
    stray
}

#[derive(Debug, Default)]
struct Injected {
    worker_kills: usize,
    worker_stops: usize,
    coordinator_restarts: usize,
    upload_aborts: usize,
    disk_full: usize,
}

impl Injected {
    fn total(&self) -> usize {
        self.worker_kills
            + self.worker_stops
            + self.coordinator_restarts
            + self.upload_aborts
            + self.disk_full
    }
}

#[test]
fn exactly_once_holds_under_kills_stops_restarts_broken_uploads_and_a_full_disk() {
    let seed: u64 = std::env::var("LORASWEEP_CHAOS_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| rand::random::<u64>() % 1_000_000);
    say(&format!(
        "chaos: seed {seed} (replay with LORASWEEP_CHAOS_SEED={seed})"
    ));
    let started = Instant::now();

    // The fault-free run.
    let calm = Run::start();
    let calm_id = calm.cluster.submit(&chaos_sweep());
    let calm_status = calm.wait_ended(&calm_id, Duration::from_secs(600));
    let calm_report = calm.report(&calm_id);
    let calm_seconds = started.elapsed().as_secs_f64();
    let (calm_check, calm_stray, _, _) = calm.stop_and_check();
    assert!(calm_stray.is_empty(), "{calm_stray:?}");
    let jobs = calm_status["jobs"].as_array().unwrap().len();
    assert!(jobs >= 200, "{jobs} jobs");
    assert_eq!(
        calm_status["counts"]["succeeded"].as_u64(),
        Some(jobs as u64),
        "the fault-free run: {calm_status:#}"
    );
    assert!(!calm_check.starts_with("FAILED"), "{calm_check}");

    // The chaotic run.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut run = Run::start();
    let id = run.cluster.submit(&chaos_sweep());
    let mut injected = Injected::default();
    let mut stopped: Vec<&'static str> = Vec::new();
    let mut disk_full_refusals = 0;
    let mut first_of_each: Vec<u32> = vec![0, 25, 50, 65, 85];
    first_of_each.sort_by_key(|_| rng.random::<u32>());
    let chaos_started = Instant::now();
    loop {
        sleep(Duration::from_millis(rng.random_range(150..700)));
        for id in stopped.drain(..) {
            resume(&run.workers[id]);
        }
        if injected.total() >= MIN_FAULTS && run.ended(&id).is_some() {
            break;
        }
        assert!(
            chaos_started.elapsed() < Duration::from_secs(900),
            "the chaotic run did not end; {injected:?}"
        );
        // Past the minimum, faults thin out so that the sweep can finish.
        if injected.total() >= MIN_FAULTS && rng.random_bool(0.7) {
            continue;
        }
        let worker = WORKERS[rng.random_range(0..WORKERS.len())];
        // Each kind of fault once first (in a seeded order), then at random.
        let kind = match first_of_each.pop() {
            Some(kind) => kind,
            None => rng.random_range(0..100),
        };
        match kind {
            0..=24 => {
                run.workers.get_mut(worker).unwrap().kill();
                sleep(Duration::from_millis(rng.random_range(0..1500)));
                run.start_worker(worker);
                injected.worker_kills += 1;
            }
            25..=49 => {
                // 1 to 6 s: past the 3 s lease, the job is handed to another worker while
                // this one sleeps, and its late result must not count.
                signal(&run.workers[worker], libc::SIGSTOP);
                sleep(Duration::from_millis(rng.random_range(1000..6000)));
                stopped.push(worker);
                injected.worker_stops += 1;
            }
            50..=64 => {
                run.restart_coordinator(Duration::from_millis(rng.random_range(100..1500)));
                injected.coordinator_restarts += 1;
            }
            65..=84 => {
                std::fs::write(run.faults.join(format!("upload-abort-{worker}")), "").unwrap();
                injected.upload_aborts += 1;
            }
            _ => {
                let switch = run.faults.join("disk-full");
                std::fs::write(&switch, "").unwrap();
                // Full until an upload has been refused (or 4 s), then freed.
                let full_since = Instant::now();
                let refusals = |run: &Run| {
                    std::fs::read_to_string(&run.coordinator.log)
                        .unwrap_or_default()
                        .matches("the artifact directory is full")
                        .count()
                };
                let before = refusals(&run);
                while refusals(&run) == before && full_since.elapsed() < Duration::from_secs(4) {
                    sleep(Duration::from_millis(50));
                }
                disk_full_refusals += refusals(&run) - before;
                std::fs::remove_file(&switch).unwrap();
                injected.disk_full += 1;
            }
        }
    }
    let status = run.wait_ended(&id, Duration::from_secs(300));
    let report = run.report(&id);
    let chaos_seconds = chaos_started.elapsed().as_secs_f64();
    let (check, stray, worker_logs, coordinator_logs) = run.stop_and_check();

    let mut violations: Vec<String> = Vec::new();
    let states = status["jobs"].as_array().unwrap();
    if states.len() != jobs {
        violations.push(format!("{} jobs, {jobs} planned", states.len()));
    }
    let mut keys = BTreeMap::new();
    for job in states {
        *keys
            .entry(job["key"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
        if job["state"] != "succeeded" {
            violations.push(format!(
                "job {} ended {} ({})",
                job["key"], job["state"], job["last_error"]
            ));
        }
    }
    for (key, n) in &keys {
        if *n != 1 {
            violations.push(format!("job {key} is listed {n} times"));
        }
    }
    // Accepted completions, from the workers: at most one per job (a lost reply retried
    // after a coordinator restart is answered "not counted").
    for (job, n) in per_job(&worker_logs, "job succeeded") {
        if n > 1 {
            violations.push(format!("job {job} was accepted as done {n} times"));
        }
    }
    if report != calm_report {
        violations.push(format!(
            "the report differs from the fault-free run's:\n{}\nvs\n{}",
            serde_json::to_string(&report).unwrap(),
            serde_json::to_string(&calm_report).unwrap()
        ));
    }
    if check.starts_with("FAILED") {
        violations.push(format!("store check: {check}"));
    }
    for part in stray {
        violations.push(format!("a partial upload is visible: {}", part.display()));
    }
    if injected.disk_full > 0 && disk_full_refusals == 0 {
        violations.push("a full disk was never refused with a clear error".into());
    }
    // Results and progress a worker sent on a lease it had lost (stopped past the lease, or
    // cut off by a restart): refused, and counted here to show the faults reached them.
    let late: usize = worker_logs
        .iter()
        .map(|log| {
            log.matches("result not counted").count()
                + log.matches("lease lost").count()
                + log.matches("job stopped").count()
        })
        .sum();
    let refused = coordinator_logs
        .iter()
        .flat_map(|log| log.lines())
        .find(|line| line.contains("the artifact directory is full"));
    if let Some(line) = refused {
        if !line.contains("No space left on device") {
            violations.push(format!("the full-disk error does not say so: {line}"));
        }
    }

    say(&format!(
        "chaos: seed {seed}; faults injected {} ({} worker kills, {} worker stops, {} coordinator \
         restarts, {} broken uploads, {} full disks with {} uploads refused); jobs {jobs}; \
         fault-free run {calm_seconds:.0} s, chaotic run {chaos_seconds:.0} s; {late} jobs stopped \
         or results refused on a lost lease; store check: {}; violations {}",
        injected.total(),
        injected.worker_kills,
        injected.worker_stops,
        injected.coordinator_restarts,
        injected.upload_aborts,
        injected.disk_full,
        disk_full_refusals,
        check.trim(),
        violations.len()
    ));
    assert!(injected.total() >= MIN_FAULTS, "{injected:?}");
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}
