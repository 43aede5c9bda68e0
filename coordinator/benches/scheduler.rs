//! The scheduler benchmark (issue 4): a 10,000-job sweep on 200 simulated workers, in
//! process, through the real store (SQLite file, WAL) and the real scheduler, with no
//! network and no engine. Each simulated job finishes the moment its worker is next
//! visited, so what is measured is the coordinator's own cost:
//!
//! - submit: parse + validate the YAML, plan the graph, store every job;
//! - throughput: jobs leased, run and completed per second, end to end;
//! - lease latency: the wall time of one worker's poll (a scheduling round plus taking its
//!   assignments), what `PollWork` costs on the server, as p50 / p99 / max.
//!
//! Run: `cargo bench -p lorasweep-coordinator --bench scheduler` (release build).

use std::time::{Duration, Instant};

use lorasweep_coordinator::domain::{Timestamp, WorkerRecord};
use lorasweep_coordinator::graph::JobGraph;
use lorasweep_coordinator::ids::WorkerId;
use lorasweep_coordinator::scheduler::{schedule, SchedulerConfig};
use lorasweep_coordinator::spec::Sweep;
use lorasweep_coordinator::store::{LeaseRef, NewSweep, SqliteStore, Store};

const WORKERS: usize = 200;

/// Seeds per (placement, task): 1250 gives 10,004 jobs. `SCHEDULER_BENCH_SEEDS` changes it.
fn seeds() -> usize {
    std::env::var("SCHEDULER_BENCH_SEEDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1250)
}

fn sweep_yaml() -> String {
    let seeds: Vec<String> = (0..seeds()).map(|seed| seed.to_string()).collect();
    format!(
        "version: 1\nname: scheduler-bench\nmodels: [smollm2-135m]\ntasks: [math, chat]\n\
         sweep:\n  grid:\n    placement: [all, dominant]\n    seed: [{}]\n",
        seeds.join(", ")
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("state.db"))?;
    // The simulated workers heartbeat once per pass over all 200, and a pass can outlast
    // the default 30 s lease on a loaded machine: leases and liveness are not what is
    // measured here, so they are long.
    let config = SchedulerConfig {
        lease_ttl: Duration::from_secs(3600),
        worker_timeout: Duration::from_secs(3600),
        ..SchedulerConfig::default()
    };
    let yaml = sweep_yaml();

    let submit_started = Instant::now();
    let sweep = Sweep::from_yaml_str(&yaml, "bench.yaml", None)
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let graph = JobGraph::plan(&sweep);
    let total = graph.jobs().len();
    store.create_sweep(
        NewSweep {
            name: &sweep.name,
            file_name: "bench.yaml",
            spec_yaml: &yaml,
            jobs: graph.jobs(),
            max_attempts: sweep.resources.max_attempts,
        },
        Timestamp::now(),
    )?;
    let submit = submit_started.elapsed();

    let workers: Vec<WorkerRecord> = (0..WORKERS)
        .map(|index| WorkerRecord {
            id: WorkerId::new(format!("sim-{index:03}")).expect("valid id"),
            host: "bench".to_string(),
            gpus: vec![0],
            last_heartbeat: Timestamp::now(),
        })
        .collect();
    for worker in &workers {
        store.register_worker(worker)?;
    }

    let mut holding: Vec<Option<LeaseRef>> = vec![None; WORKERS];
    let mut latencies = Vec::with_capacity(2 * total);
    let mut completed = 0usize;
    let mut deciding = Duration::ZERO;
    let mut snapshot_jobs = 0usize;
    let run_started = Instant::now();
    let mut visit = 0u64;
    while completed < total {
        visit += 1;
        let mut progressed = visit.is_multiple_of(2);
        for (index, worker) in workers.iter().enumerate() {
            let now = Timestamp::now();
            // Every other visit the worker is still busy and only heartbeats.
            if !visit.is_multiple_of(2) {
                if let Some(lease) = holding[index].take() {
                    let outcome = store.complete_job(
                        &lease,
                        &serde_json::json!({"score": 0.5}),
                        None,
                        now,
                    )?;
                    anyhow::ensure!(outcome.is_accepted(), "completion refused: {outcome:?}");
                    completed += 1;
                    progressed = true;
                }
            }
            let running: Vec<_> = holding[index]
                .iter()
                .map(|lease| (lease.job, lease.epoch))
                .collect();
            store.heartbeat(
                &WorkerRecord {
                    last_heartbeat: now,
                    ..worker.clone()
                },
                &running,
                config.lease_ttl,
            )?;
            if holding[index].is_some() {
                continue;
            }
            let poll_started = Instant::now();
            store.schedule_round(now, config, &mut |snapshot| {
                let decide_started = Instant::now();
                let decisions = schedule(snapshot);
                deciding += decide_started.elapsed();
                snapshot_jobs += snapshot.jobs.len();
                decisions
            })?;
            let assignments = store.take_assignments(&worker.id)?;
            latencies.push(poll_started.elapsed());
            if let Some(assignment) = assignments.into_iter().next() {
                holding[index] = Some(LeaseRef {
                    job: assignment.job,
                    epoch: assignment.epoch,
                    worker: worker.id.clone(),
                });
                progressed = true;
            }
        }
        anyhow::ensure!(
            progressed,
            "the sweep stalled with {completed} of {total} done"
        );
    }
    let run = run_started.elapsed();
    latencies.sort_unstable();
    println!("scheduler benchmark: {total} jobs, {WORKERS} workers, SQLite file store");
    println!(
        "  submit (parse, plan, store): {:.3} s",
        submit.as_secs_f64()
    );
    println!(
        "  run: {:.2} s, {:.0} jobs/s leased and completed",
        run.as_secs_f64(),
        total as f64 / run.as_secs_f64()
    );
    println!(
        "  poll (schedule round + take assignments), {} polls: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    let polling: Duration = latencies.iter().sum();
    println!(
        "  of the poll time, the pure scheduler took {:.1}% (mean snapshot {} jobs); the store the rest",
        100.0 * deciding.as_secs_f64() / polling.as_secs_f64(),
        snapshot_jobs / latencies.len().max(1)
    );
    Ok(())
}
