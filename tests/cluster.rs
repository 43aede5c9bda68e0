//! The orchestrator as separate processes, the way a cluster runs it: a `lorasweep
//! coordinator` and `lorasweep worker`s talking gRPC on loopback, sweeps submitted with
//! `lorasweep submit` and followed with `lorasweep status --format json`. Faults are real:
//! workers and the coordinator are killed with SIGKILL.
//!
//! The sweeps train a tiny Hugging Face model (written by the tests) on a fixture chat file,
//! so each scenario takes seconds on two cores.

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
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use cluster::Cluster;
use process::{bin, Proc};

const TOKEN: &str = "cluster-test-token-0123456789";

/// A sweep over the tiny model and the fixture chat file beside it, by relative paths (taken
/// from the sweep file's folder); `train` is the YAML of the train mapping.
fn sweep(name: &str, probe: bool, placements: &str, train: &str) -> String {
    format!(
        "version: 1\n\
         name: {name}\n\
         models: [model]\n\
         tasks: [chat.jsonl]\n\
         probe: {{batches: 1, batch_size: 2, max_len: 64, rank: 4, always: {probe}}}\n\
         train: {train}\n\
         eval: {{limit: 4, max_new_tokens: 8, batch_size: 2}}\n\
         sweep:\n  grid:\n    placement: [{placements}]\n\
         resources: {{max_attempts: 3}}\n"
    )
}

fn jobs(status: &Value) -> &Vec<Value> {
    status["jobs"].as_array().unwrap()
}

fn job<'a>(status: &'a Value, prefix: &str) -> &'a Value {
    jobs(status)
        .iter()
        .find(|job| job["key"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} job in {status:#}"))
}

fn ended(status: &Value) -> bool {
    status["ended"].as_bool().unwrap()
}

fn count(status: &Value, state: &str) -> u64 {
    status["counts"][state].as_u64().unwrap_or(0)
}

/// How many times each job key was started, from the workers' logs.
fn starts(logs: &[String]) -> BTreeMap<String, usize> {
    let mut starts = BTreeMap::new();
    for log in logs {
        for line in log.lines().filter(|line| line.contains("job started")) {
            let key = line
                .split("key=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap()
                .trim_matches('"')
                .to_string();
            *starts.entry(key).or_default() += 1;
        }
    }
    starts
}

#[test]
fn a_sweep_runs_across_a_coordinator_and_two_workers() {
    let mut cluster = Cluster::new(TOKEN);
    let coordinator = cluster.coordinator("127.0.0.1:0", "coordinator.log");
    let one = cluster.worker("w1");
    let two = cluster.worker("w2");
    coordinator.wait_registered(&["w1", "w2"]);
    let id = cluster.submit(&sweep(
        "two-workers",
        true,
        "all, dominant",
        "{steps: 6, batch_size: 2, max_len: 64, rank: 4, checkpoint_every: 2}",
    ));
    let status = cluster.wait_for(
        &id,
        "the sweep to end",
        Duration::from_secs(120),
        &[&coordinator, &one, &two],
        ended,
    );
    assert_eq!(count(&status, "succeeded"), 6, "{status:#}");
    for job in jobs(&status) {
        assert_eq!(job["attempts"], 1, "{job:#}");
        assert!(job["result"].is_object(), "{job:#}");
    }
    let dominant = jobs(&status)
        .iter()
        .find(|job| {
            job["kind"] == "train" && job["result"]["modules"].as_array().unwrap().len() == 1
        })
        .expect("the dominant train job adapts one module");
    assert_eq!(
        dominant["result"]["modules"][0]["name"],
        job(&status, "probe")["result"]["dominant"]
    );
    let logs = [one.log(), two.log()];
    let started = starts(&logs);
    assert_eq!(started.len(), 6, "{started:?}");
    assert!(started.values().all(|&n| n == 1), "{started:?}");
    for (worker, log) in ["w1", "w2"].iter().zip(&logs) {
        assert!(
            log.contains("job started"),
            "{worker} ran nothing; the sweep did not spread:\n{log}"
        );
    }
}

#[test]
fn a_worker_killed_mid_training_leaves_the_job_to_another_that_resumes_it() {
    let mut cluster = Cluster::new(TOKEN);
    let coordinator = cluster.coordinator("127.0.0.1:0", "coordinator.log");
    let mut first = cluster.worker("w1");
    coordinator.wait_registered(&["w1"]);
    let id = cluster.submit(&sweep(
        "killed-worker",
        false,
        "all",
        "{steps: 1500, batch_size: 2, max_len: 64, rank: 4, checkpoint_every: 25}",
    ));
    cluster.wait_for(
        &id,
        "training past two checkpoints",
        Duration::from_secs(120),
        &[&coordinator, &first],
        |status| job(status, "train")["step"].as_u64().unwrap_or(0) >= 60,
    );
    first.kill();
    let second = cluster.worker("w2");
    let status = cluster.wait_for(
        &id,
        "the sweep to end after the kill",
        Duration::from_secs(300),
        &[&coordinator, &second],
        ended,
    );
    assert_eq!(count(&status, "succeeded"), 3, "{status:#}");
    let train = job(&status, "train");
    assert_eq!(train["attempts"], 2, "the lost attempt counts: {train:#}");
    let resumed = train["result"]["resumed_from"].as_u64().unwrap_or(0);
    assert!(
        resumed >= 25 && resumed.is_multiple_of(25),
        "the second worker did not resume from a checkpoint: {train:#}"
    );
    // The loss curve is whole: the steps before the checkpoint came with it.
    assert_eq!(train["result"]["losses"].as_array().unwrap().len(), 1500);
    assert!(coordinator.log().contains("lease expired; job requeued"));
    let started = starts(&[first.log(), second.log()]);
    let train_key = train["key"].as_str().unwrap();
    assert_eq!(started[train_key], 2, "{started:?}");
    assert!(
        started.iter().all(|(key, &n)| key == train_key || n == 1),
        "{started:?}"
    );
}

#[test]
fn a_coordinator_killed_and_restarted_loses_nothing_and_reruns_nothing() {
    let mut cluster = Cluster::new(TOKEN);
    let mut coordinator = cluster.coordinator("127.0.0.1:0", "coordinator-1.log");
    let address = cluster.address.clone().unwrap();
    let worker = cluster.worker("w1");
    coordinator.wait_registered(&["w1"]);
    let id = cluster.submit(&sweep(
        "killed-coordinator",
        true,
        "all",
        "{steps: 1500, batch_size: 2, max_len: 64, rank: 4, checkpoint_every: 25}",
    ));
    let before = cluster.wait_for(
        &id,
        "the probe to finish and training to run",
        Duration::from_secs(120),
        &[&coordinator, &worker],
        |status| {
            job(status, "probe")["state"] == "succeeded"
                && job(status, "train")["step"].as_u64().unwrap_or(0) >= 30
        },
    );
    coordinator.kill();
    sleep(Duration::from_millis(1500));
    // Same database, same address: the worker reconnects by itself.
    let coordinator = cluster.coordinator(&address, "coordinator-2.log");
    let status = cluster.wait_for(
        &id,
        "the sweep to end after the restart",
        Duration::from_secs(300),
        &[&coordinator, &worker],
        ended,
    );
    assert_eq!(count(&status, "succeeded"), 4, "{status:#}");
    let probe_before = job(&before, "probe");
    let probe_after = job(&status, "probe");
    assert_eq!(probe_before["result"], probe_after["result"]);
    let started = starts(&[worker.log()]);
    assert_eq!(started.len(), 4, "{started:?}");
    assert!(
        started.values().all(|&n| n == 1),
        "a job ran twice: {started:?}"
    );
    for job in jobs(&status) {
        assert_eq!(job["attempts"], 1, "{job:#}");
    }
    let train = job(&status, "train");
    assert_eq!(train["result"]["losses"].as_array().unwrap().len(), 1500);
}

#[test]
fn a_wrong_token_is_refused_clearly() {
    let mut cluster = Cluster::new(TOKEN);
    let coordinator = cluster.coordinator("127.0.0.1:0", "coordinator.log");
    std::fs::write(cluster.path("wrong"), "not-the-token").unwrap();
    let file = cluster.path("sweep.yaml");
    std::fs::write(
        &file,
        sweep("refused", false, "all", "{steps: 1, batch_size: 2}"),
    )
    .unwrap();
    let submit = bin()
        .arg("submit")
        .arg(&file)
        .args(["--coordinator", &cluster.url()])
        .arg("--token-file")
        .arg(cluster.path("wrong"))
        .output()
        .unwrap();
    assert!(!submit.status.success());
    let stderr = String::from_utf8_lossy(&submit.stderr);
    assert!(stderr.contains("token"), "{stderr}");
    assert!(submit.stdout.is_empty());
    let tokenless = bin()
        .args(["status", "1", "--coordinator", &cluster.url()])
        .output()
        .unwrap();
    assert!(!tokenless.status.success());
    let stderr = String::from_utf8_lossy(&tokenless.stderr);
    assert!(stderr.contains("token"), "{stderr}");
    let mut command = bin();
    command
        .arg("worker")
        .args(["--coordinator", &cluster.url()])
        .arg("--token-file")
        .arg(cluster.path("wrong"))
        .args(["--worker-id", "intruder"]);
    let mut intruder = Proc::spawn("intruder", command, cluster.path("intruder.log"));
    let exit = intruder.wait_exit(Duration::from_secs(30));
    assert!(!exit.success());
    let log = intruder.log();
    assert!(log.contains("token"), "{log}");
    assert!(!coordinator.log().contains("worker registered"));
}

/// A private CA and a server certificate for `localhost` (and 127.0.0.1), made with the
/// openssl command line. Returns (ca.pem, server.pem, server.key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=lorasweep test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[test]
fn a_sweep_runs_over_tls_and_clients_without_the_ca_are_refused() {
    let mut cluster = Cluster::new(TOKEN);
    let (ca, cert, key) = certificates(cluster.dir.path());
    let coordinator = cluster.coordinator_with(
        "127.0.0.1:0",
        "coordinator.log",
        &[Path::new("--tls-cert"), &cert, Path::new("--tls-key"), &key],
    );
    assert!(
        coordinator.log().contains("tls=true"),
        "{}",
        coordinator.log()
    );
    cluster.tls = Some((ca, "localhost".to_string()));
    let worker = cluster.worker("w1");
    coordinator.wait_registered(&["w1"]);
    let id = cluster.submit(&sweep(
        "over-tls",
        false,
        "all",
        "{steps: 3, batch_size: 2, max_len: 64, rank: 4}",
    ));
    let status = cluster.wait_for(
        &id,
        "the sweep to end over TLS",
        Duration::from_secs(120),
        &[&coordinator, &worker],
        ended,
    );
    assert_eq!(count(&status, "succeeded"), 3, "{status:#}");
    // Without the CA the server's certificate is not trusted; plain HTTP is not spoken.
    let url = cluster.url();
    let address = cluster.address.clone().unwrap();
    for coordinator_url in [url, format!("http://{address}")] {
        let out = bin()
            .args(["status", &id, "--coordinator", &coordinator_url])
            .arg("--token-file")
            .arg(cluster.path("token"))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{coordinator_url} answered without the CA"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("coordinator"), "{stderr}");
    }
}

/// `lorasweep run FILE --workers N --out DIR` in its own process group, as a shell runs it.
fn run_command(cluster: &Cluster, out: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = bin();
    command
        .arg("run")
        .arg(cluster.path("sweep.yaml"))
        .args(["--workers", "2", "--out"])
        .arg(out)
        .process_group(0);
    command
}

#[test]
fn run_resumes_after_ctrl_c_and_redoes_nothing_once_finished() {
    let cluster = Cluster::new(TOKEN);
    std::fs::write(
        cluster.path("sweep.yaml"),
        sweep(
            "embedded",
            true,
            "all, dominant",
            "{steps: 1500, batch_size: 2, max_len: 64, rank: 4, checkpoint_every: 25}",
        ),
    )
    .unwrap();
    let out = cluster.path("run");
    let mut first = Proc::spawn(
        "run",
        run_command(&cluster, &out),
        cluster.path("run-1.log"),
    );
    // Follow it through its own coordinator once training is under way.
    let started = Instant::now();
    let mut observer = Cluster {
        dir: tempfile::tempdir().unwrap(),
        address: None,
        tls: None,
        env: Vec::new(),
    };
    std::fs::write(observer.path("token"), "").unwrap();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "run did not start training:\n{}",
            first.log()
        );
        if let (Ok(address), Ok(token)) = (
            std::fs::read_to_string(out.join("coordinator.addr")),
            std::fs::read_to_string(out.join("token")),
        ) {
            observer.address = Some(address.trim().to_string());
            std::fs::write(observer.path("token"), token).unwrap();
            let status = observer.client(&["status", "1", "--format", "json"]);
            if status.status.success() {
                let status: Value = serde_json::from_slice(&status.stdout).unwrap();
                let trained = jobs(&status)
                    .iter()
                    .filter(|job| job["kind"] == "train")
                    .any(|job| job["step"].as_u64().unwrap_or(0) >= 30);
                if trained {
                    break;
                }
            }
        }
        sleep(Duration::from_millis(100));
    }
    // Ctrl-C: the whole foreground process group gets SIGINT.
    let group = format!("-{}", first.child.id());
    let signalled = Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap();
    assert!(signalled.success());
    let exit = first.wait_exit(Duration::from_secs(90));
    assert_eq!(exit.code(), Some(130), "{}", first.log());
    assert!(first.log().contains("run the same command again to resume"));

    let second = run_command(&cluster, &out).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(stderr.contains("resuming sweep 1"), "{stderr}");
    let report = out.join("report");
    assert!(
        report.join("report.md").is_file(),
        "no report in {}",
        report.display()
    );
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("results.json")).unwrap())
            .unwrap();
    // At least one train job was stopped by Ctrl-C mid-training and resumed from its
    // checkpoint; every job succeeded on the attempt it started (interruptions are free).
    let mut rows = Vec::new();
    collect_rows(&results, &mut rows);
    let trains: Vec<&Value> = rows
        .iter()
        .copied()
        .filter(|row| row["kind"] == "train")
        .collect();
    assert_eq!(trains.len(), 2, "{results:#}");
    let resumed = |row: &Value| {
        row.as_object()
            .unwrap()
            .iter()
            .filter(|(key, _)| key.ends_with("resumed_from"))
            .filter_map(|(_, value)| value.as_u64())
            .max()
            .unwrap_or(0)
    };
    assert!(trains.iter().any(|row| resumed(row) >= 25), "{results:#}");
    assert!(
        rows.iter()
            .all(|row| row["state"] == "succeeded" && row["attempts"] == 1),
        "{results:#}"
    );

    // A third run finds everything finished and runs nothing.
    let third = run_command(&cluster, &out).output().unwrap();
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{stderr}");
    assert!(stderr.contains("resuming sweep 1"), "{stderr}");
    let worker_logs: String = (0..2)
        .map(|index| {
            std::fs::read_to_string(out.join(format!("logs/worker-{index}.log")))
                .unwrap_or_default()
        })
        .collect();
    assert!(
        !worker_logs.contains("job started"),
        "a finished sweep ran jobs again:\n{worker_logs}"
    );
}

#[test]
fn run_stops_with_a_clear_error_when_every_worker_dies() {
    let cluster = Cluster::new(TOKEN);
    std::fs::write(
        cluster.path("sweep.yaml"),
        sweep(
            "orphaned",
            true,
            "all",
            "{steps: 1500, batch_size: 2, max_len: 64, rank: 4, checkpoint_every: 25}",
        ),
    )
    .unwrap();
    let out = cluster.path("run");
    let mut run = Proc::spawn("run", run_command(&cluster, &out), cluster.path("run.log"));
    let started = Instant::now();
    while !(0..2).any(|index| {
        std::fs::read_to_string(out.join(format!("logs/worker-{index}.log")))
            .is_ok_and(|log| log.contains("job started"))
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no worker started a job:\n{}",
            run.log()
        );
        sleep(Duration::from_millis(100));
    }
    // Both workers die at once, as under the kernel's out-of-memory killer.
    let workers = format!("{}/work/worker-", out.display());
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &workers])
        .status()
        .unwrap();
    assert!(killed.success(), "no worker process matched {workers}");
    let exit = run.wait_exit(Duration::from_secs(60));
    let log = run.log();
    assert_eq!(exit.code(), Some(1), "{log}");
    assert!(
        log.contains("every worker exited before the sweep ended"),
        "{log}"
    );
    assert!(
        log.contains("run the same command again to resume"),
        "{log}"
    );
    for index in 0..2 {
        let name = format!("worker-{index}.log");
        assert!(
            log.contains(&name),
            "the error does not name {name}:\n{log}"
        );
    }
    // Nothing of the run is left running: its coordinator stopped too.
    let state = out.join("state.db").display().to_string();
    let left = Command::new("pgrep").args(["-f", &state]).output().unwrap();
    assert!(
        left.stdout.is_empty(),
        "the coordinator still runs: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// Every JSON object that has a `kind` and a `state`: the per-job rows of a report.
fn collect_rows<'a>(value: &'a Value, rows: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if map.contains_key("kind") && map.contains_key("state") && map.contains_key("key") {
                rows.push(value);
            } else {
                map.values().for_each(|value| collect_rows(value, rows));
            }
        }
        Value::Array(items) => items.iter().for_each(|value| collect_rows(value, rows)),
        _ => {}
    }
}
