//! The worker agent against an in-process coordinator, with a test executor (a test double
//! that sleeps, writes small files, checkpoints and reads its dependencies) instead of the
//! engine: whole sweeps, a lost worker resumed from its checkpoint, cancellation, shutdown,
//! the probe cache across sweeps, and a gang over two workers with a rendezvous.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lorasweep_coordinator::client::{ClientOptions, CoordinatorClient, WorkerIdentity};
use lorasweep_coordinator::domain::{ArtifactKind, JobAssignment, JobState, Progress};
use lorasweep_coordinator::graph::JobKind;
use lorasweep_coordinator::ids::{SweepId, WorkerId};
use lorasweep_coordinator::scheduler::SchedulerConfig;
use lorasweep_coordinator::service::{start, CoordinatorOptions, RunningCoordinator};
use lorasweep_coordinator::store::{SqliteStore, Store};
use lorasweep_worker::agent::{
    run_agent, AgentOptions, ExecError, JobContext, JobExecutor, JobOutput, OutputFile,
};
use serde_json::json;
use tokio::sync::watch;

const TOKEN: &str = "agent-test-token-0123456789";

/// probe → train(all), train(dominant) → evals, plus the base eval: 6 jobs.
const SWEEP: &str = "version: 1
name: agent-test
models: [smollm2-135m]
tasks: [math]
sweep: {grid: {placement: [all, dominant]}}
";

/// What the test executor saw, for assertions.
#[derive(Default)]
struct Journal {
    /// (job key, epoch) of every attempt that ran to success.
    successes: Vec<(String, u64)>,
    /// Keys of jobs that observed cancellation.
    cancellations: Vec<String>,
    /// Keys of probe jobs answered from the cache.
    cache_hits: Vec<String>,
    /// Steps each train attempt resumed from.
    resumed_from: HashMap<(String, u64), u64>,
    /// (job key, epoch, rank) of every rank that got past the rendezvous.
    ranks_started: Vec<(String, u64, u32)>,
}

/// Stands in for NCCL's collective set-up: every rank of an attempt waits here until all
/// `world_size` ranks arrived (both test workers share one executor in-process).
#[derive(Default)]
struct Collective {
    arrived: Mutex<HashMap<(u64, u64), u32>>,
    changed: std::sync::Condvar,
}

impl Collective {
    fn join(&self, job: &JobAssignment, context: &JobContext) -> Result<(), ExecError> {
        let id = (job.job.0, job.epoch);
        let mut arrived = self.arrived.lock().unwrap();
        *arrived.entry(id).or_insert(0) += job.local_ranks.len() as u32;
        self.changed.notify_all();
        while arrived[&id] < job.world_size {
            if context.is_cancelled() {
                return Err(ExecError::Cancelled);
            }
            arrived = self
                .changed
                .wait_timeout(arrived, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        Ok(())
    }
}

/// A test double for the engine: "trains" by sleeping `step_time` per step, checkpoints
/// every two steps, reads its dependencies' artifacts, resumes from a checkpoint.
struct TestExecutor {
    steps: u64,
    step_time: Duration,
    journal: Arc<Mutex<Journal>>,
    /// Set to make this executor stop at once, as if its process died.
    dead: Arc<AtomicBool>,
    collective: Collective,
}

impl TestExecutor {
    fn new(steps: u64, step_time: Duration, journal: Arc<Mutex<Journal>>) -> TestExecutor {
        TestExecutor {
            steps,
            step_time,
            journal,
            dead: Arc::new(AtomicBool::new(false)),
            collective: Collective::default(),
        }
    }
}

impl JobExecutor for TestExecutor {
    fn run(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError> {
        let outcome = self.run_job(job, context);
        if matches!(outcome, Err(ExecError::Cancelled)) {
            self.journal
                .lock()
                .unwrap()
                .cancellations
                .push(job.key.0.clone());
        }
        outcome
    }
}

impl TestExecutor {
    fn run_job(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError> {
        let key = job.key.0.clone();
        if job.kind == JobKind::Probe {
            let cache_key = format!("probe:{}:{}:{}", job.model, job.task, job.params);
            if let Some(hit) = context.cached(&cache_key)? {
                self.journal.lock().unwrap().cache_hits.push(key.clone());
                self.journal
                    .lock()
                    .unwrap()
                    .successes
                    .push((key, job.epoch));
                return Ok(JobOutput {
                    result: hit.result,
                    artifacts: Vec::new(),
                    cache_key: Some(cache_key),
                });
            }
        }
        // Dependencies' artifacts must arrive intact.
        let inputs = context.work_dir().join("inputs");
        for dependency in &job.dependencies {
            for artifact in dependency
                .artifacts
                .iter()
                .filter(|a| a.kind == ArtifactKind::Output)
            {
                let path = context.fetch_artifact(artifact, &inputs)?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|error| ExecError::Retryable(error.to_string()))?;
                if text != format!("output of {}", dependency.key) {
                    return Err(ExecError::Permanent(format!(
                        "dependency artifact {} is wrong: {text}",
                        artifact.name
                    )));
                }
            }
        }
        if job.world_size > 1 {
            let expected = format!("nccl-id-{}-{}", job.job, job.epoch).into_bytes();
            if job.local_ranks.iter().any(|slot| slot.rank == 0) {
                context.publish_rendezvous(&expected)?;
            } else if context.wait_rendezvous(Duration::from_secs(10))? != expected {
                return Err(ExecError::Permanent("rendezvous bytes differ".to_string()));
            }
            self.collective.join(job, context)?;
        }
        for slot in &job.local_ranks {
            self.journal
                .lock()
                .unwrap()
                .ranks_started
                .push((key.clone(), job.epoch, slot.rank));
        }
        let mut start = 0;
        if let Some(checkpoint) = &job.resume_from {
            let path = context.fetch_artifact(checkpoint, &context.work_dir().join("resume"))?;
            let text = std::fs::read_to_string(path)
                .map_err(|error| ExecError::Retryable(error.to_string()))?;
            start = text
                .trim()
                .parse()
                .map_err(|_| ExecError::Permanent(format!("bad checkpoint {text}")))?;
        }
        self.journal
            .lock()
            .unwrap()
            .resumed_from
            .insert((key.clone(), job.epoch), start);
        let steps = if job.kind == JobKind::Train {
            self.steps
        } else {
            2
        };
        for step in start..steps {
            if self.dead.load(Ordering::SeqCst) {
                return Err(ExecError::Retryable("process died".to_string()));
            }
            if context.is_cancelled() {
                return Err(ExecError::Cancelled);
            }
            std::thread::sleep(self.step_time);
            context.progress(Progress {
                step: step + 1,
                total_steps: steps,
                loss: Some(1.0 / (step + 1) as f64),
                tokens_per_second: Some(1000.0),
                message: "testing".to_string(),
            });
            if job.kind == JobKind::Train && (step + 1) % 2 == 0 {
                let file = context.work_dir().join("checkpoint.txt");
                std::fs::write(&file, format!("{}", step + 1)).unwrap();
                context.save_checkpoint(&file, step + 1)?;
            }
        }
        let output = context.work_dir().join("output.txt");
        std::fs::write(&output, format!("output of {key}")).unwrap();
        self.journal
            .lock()
            .unwrap()
            .successes
            .push((key.clone(), job.epoch));
        Ok(JobOutput {
            result: json!({"key": key, "resumed_from": start, "world_size": job.world_size}),
            artifacts: vec![OutputFile {
                name: "output.txt".to_string(),
                path: output,
            }],
            cache_key: (job.kind == JobKind::Probe)
                .then(|| format!("probe:{}:{}:{}", job.model, job.task, job.params)),
        })
    }
}

struct Cluster {
    coordinator: RunningCoordinator,
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn new() -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info")
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        let mut options =
            CoordinatorOptions::new("127.0.0.1:0".parse().unwrap(), dir.path().join("artifacts"));
        options.token = Some(TOKEN.to_string());
        options.scheduler = SchedulerConfig {
            lease_ttl: Duration::from_secs(2),
            worker_timeout: Duration::from_secs(2),
            gang_patience: Duration::from_secs(5),
        };
        options.heartbeat_interval = Duration::from_millis(250);
        options.tick_interval = Duration::from_millis(100);
        let coordinator = start(store.clone(), options).await.unwrap();
        Cluster {
            coordinator,
            store,
            dir,
        }
    }

    fn client(&self) -> CoordinatorClient {
        let mut options = ClientOptions::new(format!("http://{}", self.coordinator.address));
        options.token = Some(TOKEN.to_string());
        CoordinatorClient::connect(&options).unwrap()
    }

    /// Starts an agent; returns its shutdown switch and task.
    fn agent(
        &self,
        name: &str,
        gpus: &[u32],
        executor: Arc<dyn JobExecutor>,
    ) -> (
        watch::Sender<bool>,
        tokio::task::JoinHandle<lorasweep_worker::agent::AgentSummary>,
    ) {
        let identity = WorkerIdentity {
            id: WorkerId::new(name).unwrap(),
            host: "localhost".to_string(),
            gpus: gpus.to_vec(),
        };
        let mut options = AgentOptions::new(identity, self.dir.path().join("work").join(name));
        options.poll_interval = Duration::from_millis(50);
        let (stop, stopped) = watch::channel(false);
        let client = self.client();
        let task =
            tokio::spawn(
                async move { run_agent(client, options, executor, stopped).await.unwrap() },
            );
        (stop, task)
    }

    async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&dyn Store) -> bool,
    ) {
        let started = Instant::now();
        while !done(self.store.as_ref()) {
            assert!(started.elapsed() < timeout, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ended(&self, sweep: SweepId, timeout: Duration) {
        self.wait_until("the sweep to end", timeout, |store| {
            store.sweep_status(sweep).unwrap().ended
        })
        .await;
    }
}

fn success_counts(journal: &Mutex<Journal>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (key, _) in &journal.lock().unwrap().successes {
        *counts.entry(key.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_finish_a_sweep_with_every_job_done_once() {
    let cluster = Cluster::new().await;
    let journal = Arc::new(Mutex::new(Journal::default()));
    let executor = Arc::new(TestExecutor::new(
        4,
        Duration::from_millis(20),
        journal.clone(),
    ));
    let sweep = cluster
        .client()
        .submit_sweep(SWEEP, "agent.yaml", false)
        .await
        .unwrap()
        .sweep;
    let (stop_a, agent_a) = cluster.agent("agent-a", &[], executor.clone());
    let (stop_b, agent_b) = cluster.agent("agent-b", &[], executor);
    cluster.wait_ended(sweep, Duration::from_secs(30)).await;
    let results = cluster.store.sweep_results(sweep).unwrap();
    assert_eq!(results.jobs.len(), 6);
    for result in &results.jobs {
        assert_eq!(
            result.job.state,
            JobState::Succeeded,
            "{}: {:?}",
            result.job.key,
            result.job.last_error
        );
        assert_eq!(
            result.job.result.as_ref().unwrap()["key"],
            result.job.key.0.as_str()
        );
        assert_eq!(
            result
                .artifacts
                .iter()
                .filter(|a| a.kind == ArtifactKind::Output)
                .count(),
            1
        );
    }
    let trains = results
        .jobs
        .iter()
        .filter(|result| result.job.kind == JobKind::Train);
    for train in trains {
        let checkpoints = train
            .artifacts
            .iter()
            .filter(|a| a.kind == ArtifactKind::Checkpoint)
            .count();
        assert_eq!(checkpoints, 2, "checkpoints at steps 2 and 4 were uploaded");
    }
    assert!(success_counts(&journal).values().all(|count| *count == 1));
    stop_a.send(true).unwrap();
    stop_b.send(true).unwrap();
    let (a, b) = (agent_a.await.unwrap(), agent_b.await.unwrap());
    assert_eq!(a.succeeded + b.succeeded, 6);
    cluster.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_s_train_job_finishes_elsewhere_from_its_last_checkpoint() {
    let cluster = Cluster::new().await;
    let journal = Arc::new(Mutex::new(Journal::default()));
    let sweep_text =
        "version: 1\nname: lost\nmodels: [smollm2-135m]\ntasks: [math]\nprobe: {always: false}\n";
    let sweep = cluster
        .client()
        .submit_sweep(sweep_text, "lost.yaml", false)
        .await
        .unwrap()
        .sweep;
    let doomed = Arc::new(TestExecutor::new(
        12,
        Duration::from_millis(150),
        journal.clone(),
    ));
    let dead = doomed.dead.clone();
    let (_stop_doomed, doomed_agent) = cluster.agent("doomed", &[], doomed);
    let train = cluster
        .store
        .sweep_status(sweep)
        .unwrap()
        .jobs
        .into_iter()
        .find(|job| job.kind == JobKind::Train)
        .unwrap()
        .id;
    cluster
        .wait_until(
            "a checkpoint of the train job",
            Duration::from_secs(30),
            |store| {
                store
                    .artifacts(train)
                    .unwrap()
                    .iter()
                    .any(|a| a.kind == ArtifactKind::Checkpoint && a.step >= 4)
            },
        )
        .await;
    // The worker dies: no more heartbeats, no report.
    doomed_agent.abort();
    dead.store(true, Ordering::SeqCst);
    let checkpoint_step = cluster
        .store
        .artifacts(train)
        .unwrap()
        .iter()
        .filter(|a| a.kind == ArtifactKind::Checkpoint)
        .map(|a| a.step)
        .max()
        .unwrap();
    let rescuer = Arc::new(TestExecutor::new(
        12,
        Duration::from_millis(20),
        journal.clone(),
    ));
    let (stop, rescuer_agent) = cluster.agent("rescuer", &[], rescuer);
    cluster.wait_ended(sweep, Duration::from_secs(40)).await;
    let record = cluster.store.job(train).unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.attempts, 2, "one lost attempt, one that finished");
    let resumed_from = record.result.as_ref().unwrap()["resumed_from"]
        .as_u64()
        .unwrap();
    assert!(
        resumed_from >= checkpoint_step,
        "resumed from {resumed_from}, checkpoint was at {checkpoint_step}"
    );
    assert!(resumed_from > 0);
    let successes = journal
        .lock()
        .unwrap()
        .successes
        .iter()
        .filter(|(key, _)| *key == record.key.0)
        .count();
    assert_eq!(successes, 1, "the train job finished exactly once");
    assert_eq!(
        cluster
            .store
            .metrics(
                lorasweep_coordinator::domain::Timestamp::now(),
                Duration::from_secs(2)
            )
            .unwrap()
            .lease_expiries,
        1
    );
    stop.send(true).unwrap();
    rescuer_agent.await.unwrap();
    cluster.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_sweep_stops_its_running_job_at_the_next_heartbeat() {
    let cluster = Cluster::new().await;
    let journal = Arc::new(Mutex::new(Journal::default()));
    let sweep_text =
        "version: 1\nname: cancel\nmodels: [smollm2-135m]\ntasks: [math]\nprobe: {always: false}\n";
    let client = cluster.client();
    let sweep = client
        .submit_sweep(sweep_text, "cancel.yaml", false)
        .await
        .unwrap()
        .sweep;
    let executor = Arc::new(TestExecutor::new(
        400,
        Duration::from_millis(25),
        journal.clone(),
    ));
    let (stop, agent) = cluster.agent("w", &[], executor);
    cluster
        .wait_until(
            "the executor to start the train job",
            Duration::from_secs(20),
            |_| {
                journal
                    .lock()
                    .unwrap()
                    .resumed_from
                    .keys()
                    .any(|(key, _)| key.starts_with("train-"))
            },
        )
        .await;
    client.cancel_sweep(sweep).await.unwrap();
    let started = Instant::now();
    while journal.lock().unwrap().cancellations.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the job did not stop"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = client.sweep_status(sweep).await.unwrap();
    assert!(status.ended);
    assert!(status
        .jobs
        .iter()
        .all(|job| job.state != JobState::Succeeded || job.kind == JobKind::Eval));
    stop.send(true).unwrap();
    let summary = agent.await.unwrap();
    assert!(summary.stopped >= 1);
    cluster.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_a_worker_down_requeues_its_job_without_counting_an_attempt() {
    let cluster = Cluster::new().await;
    let journal = Arc::new(Mutex::new(Journal::default()));
    let sweep_text = "version: 1\nname: shutdown\nmodels: [smollm2-135m]\ntasks: [math]\nprobe: {always: false}\n";
    let sweep = cluster
        .client()
        .submit_sweep(sweep_text, "s.yaml", false)
        .await
        .unwrap()
        .sweep;
    let executor = Arc::new(TestExecutor::new(
        400,
        Duration::from_millis(25),
        journal.clone(),
    ));
    let (stop, agent) = cluster.agent("w", &[], executor);
    cluster
        .wait_until(
            "the executor to start a job",
            Duration::from_secs(20),
            |_| !journal.lock().unwrap().resumed_from.is_empty(),
        )
        .await;
    stop.send(true).unwrap();
    let summary = agent.await.unwrap();
    assert_eq!(summary.interrupted, 1);
    let status = cluster.store.sweep_status(sweep).unwrap();
    assert_eq!(status.counts[&JobState::Running], 0);
    let interrupted = status
        .jobs
        .iter()
        .find(|job| {
            job.last_error
                .as_deref()
                .is_some_and(|error| error.starts_with("interrupted"))
        })
        .expect("the interrupted job");
    assert_eq!(interrupted.state, JobState::Queued);
    assert_eq!(interrupted.attempts, 0);
    cluster.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sweep_reuses_the_cached_probe() {
    let cluster = Cluster::new().await;
    let journal = Arc::new(Mutex::new(Journal::default()));
    let executor = Arc::new(TestExecutor::new(
        2,
        Duration::from_millis(10),
        journal.clone(),
    ));
    let (stop, agent) = cluster.agent("w", &[0, 1], executor);
    let client = cluster.client();
    let first = client
        .submit_sweep(SWEEP, "first.yaml", false)
        .await
        .unwrap()
        .sweep;
    cluster.wait_ended(first, Duration::from_secs(30)).await;
    assert!(journal.lock().unwrap().cache_hits.is_empty());
    let second_text = SWEEP.replace("name: agent-test", "name: agent-test-again");
    let second = client
        .submit_sweep(&second_text, "second.yaml", false)
        .await
        .unwrap()
        .sweep;
    cluster.wait_ended(second, Duration::from_secs(30)).await;
    assert_eq!(journal.lock().unwrap().cache_hits.len(), 1);
    let results = cluster.store.sweep_results(second).unwrap();
    assert!(results
        .jobs
        .iter()
        .all(|result| result.job.state == JobState::Succeeded));
    let probe = results
        .jobs
        .iter()
        .find(|result| result.job.kind == JobKind::Probe)
        .unwrap();
    assert_eq!(
        probe.artifacts.len(),
        1,
        "the cached probe's output is attached"
    );
    stop.send(true).unwrap();
    agent.await.unwrap();
    cluster.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_spans_two_workers_and_shares_rank_zero_s_rendezvous() {
    let cluster = Cluster::new().await;
    let journal = Arc::new(Mutex::new(Journal::default()));
    let sweep_text = "version: 1\nname: gang\nmodels: [smollm2-135m]\ntasks: [math]\nprobe: {always: false}\nresources: {gpus_per_job: 2}\n";
    let sweep = cluster
        .client()
        .submit_sweep(sweep_text, "gang.yaml", false)
        .await
        .unwrap()
        .sweep;
    let executor = Arc::new(TestExecutor::new(
        4,
        Duration::from_millis(20),
        journal.clone(),
    ));
    let (stop_a, agent_a) = cluster.agent("rank-a", &[0], executor.clone());
    let (stop_b, agent_b) = cluster.agent("rank-b", &[0], executor);
    cluster.wait_ended(sweep, Duration::from_secs(30)).await;
    let results = cluster.store.sweep_results(sweep).unwrap();
    let train = results
        .jobs
        .iter()
        .find(|result| result.job.kind == JobKind::Train)
        .unwrap();
    assert_eq!(
        train.job.state,
        JobState::Succeeded,
        "{:?}",
        train.job.last_error
    );
    assert_eq!(train.job.result.as_ref().unwrap()["world_size"], 2);
    let mut ranks: Vec<(u64, u32)> = journal
        .lock()
        .unwrap()
        .ranks_started
        .iter()
        .filter(|(key, _, _)| *key == train.job.key.0)
        .map(|(_, epoch, rank)| (*epoch, *rank))
        .collect();
    ranks.sort();
    assert_eq!(
        ranks,
        vec![(1, 0), (1, 1)],
        "both ranks passed the rendezvous in the first attempt"
    );
    assert_eq!(train.job.attempts, 1);
    stop_a.send(true).unwrap();
    stop_b.send(true).unwrap();
    agent_a.await.unwrap();
    agent_b.await.unwrap();
    cluster.coordinator.shutdown().await.unwrap();
}
