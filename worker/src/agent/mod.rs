//! The worker agent: registers with the coordinator, heartbeats, pulls jobs while it has
//! free slots, runs each through a [`JobExecutor`] on a blocking thread, streams progress,
//! uploads checkpoints as they come and outputs at the end, and reports the result.
//!
//! The executor (the engine) knows nothing of gRPC: everything it needs from the
//! coordinator goes through the [`JobContext`] it is handed.
//!
//! Failure handling:
//! - the coordinator unreachable: calls are retried with backoff; jobs keep running;
//! - a job told to stop (cancelled, re-leased elsewhere, another rank finished): its
//!   context reports cancellation and its outcome is not reported;
//! - shutdown (Ctrl-C): running jobs are cancelled and reported as interrupted, which
//!   requeues them without counting an attempt.
//!
//! This file owns the agent loop: registration, heartbeats, leasing jobs into free slots,
//! running each (`JobRunner`), streaming its progress, uploading its checkpoints and
//! outputs, reporting its outcome, and the retry of coordinator calls. It does not own
//! what a running job sees (`context`: [`JobContext`], [`ContextError`]) or the contract
//! with the executor (`exec`: [`JobExecutor`], [`JobOutput`], [`OutputFile`],
//! [`ExecError`]); both are re-exported here, so `agent::X` paths are unchanged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use lorasweep_coordinator::client::{ClientError, CoordinatorClient, Registration, WorkerIdentity};
use lorasweep_coordinator::domain::{
    ArtifactKind, FailureKind, JobAssignment, Progress, ReportOutcome,
};
use lorasweep_coordinator::ids::{JobId, WorkerId};
use lorasweep_coordinator::store::LeaseRef;

mod context;
mod exec;

pub use context::{ContextError, JobContext};
pub use exec::{ExecError, JobExecutor, JobOutput, OutputFile};

use context::QueuedUpload;

/// Retries a call while its error is retryable (coordinator unreachable or busy), with
/// backoff from 200 ms to 5 s, for up to about two minutes, or until `cancelled`.
async fn retrying<T, F, Fut>(
    call: &'static str,
    cancelled: &AtomicBool,
    mut attempt: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut delay = Duration::from_millis(200);
    let mut waited = Duration::ZERO;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error)
                if error.is_retryable()
                    && waited < Duration::from_secs(120)
                    && !cancelled.load(Ordering::SeqCst) =>
            {
                tracing::warn!(call, %error, retry_in = ?delay, "coordinator call failed; retrying");
                tokio::time::sleep(delay).await;
                waited += delay;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Who the worker is and what it offers.
    pub identity: WorkerIdentity,
    /// Where job scratch folders go.
    pub work_dir: PathBuf,
    /// How long to wait between polls when there is nothing to do.
    pub poll_interval: Duration,
    /// How long to keep retrying the first registration while the coordinator is not up.
    pub connect_patience: Duration,
}

impl AgentOptions {
    /// One-second polls, one minute of connect patience.
    pub fn new(identity: WorkerIdentity, work_dir: PathBuf) -> AgentOptions {
        AgentOptions {
            identity,
            work_dir,
            poll_interval: Duration::from_secs(1),
            connect_patience: Duration::from_secs(60),
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator refused the worker (wrong token, protocol mismatch) or stayed away.
    #[error("worker {worker} cannot join the coordinator: {source}")]
    Refused {
        /// The worker.
        worker: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The work folder cannot be created.
    #[error("cannot create work folder {path}: {source}")]
    WorkDir {
        /// The folder.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// What the agent did before it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentSummary {
    /// Jobs reported succeeded (and accepted).
    pub succeeded: u32,
    /// Attempts reported failed.
    pub failed: u32,
    /// Jobs stopped because the coordinator said so.
    pub stopped: u32,
    /// Jobs interrupted by shutdown.
    pub interrupted: u32,
}

struct Running {
    epoch: u64,
    slots: usize,
    cancelled: Arc<AtomicBool>,
}

enum Finished {
    Succeeded,
    Failed,
    Stopped,
    Interrupted,
}

/// Runs the agent until `shutdown` turns true (then interrupts running jobs and returns)
/// or the coordinator refuses the worker.
pub async fn run_agent(
    client: CoordinatorClient,
    options: AgentOptions,
    executor: Arc<dyn JobExecutor>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<AgentSummary, AgentError> {
    std::fs::create_dir_all(&options.work_dir).map_err(|source| AgentError::WorkDir {
        path: options.work_dir.display().to_string(),
        source,
    })?;
    let registration = register(&client, &options, &mut shutdown).await?;
    let Some(registration) = registration else {
        return Ok(AgentSummary::default());
    };
    tracing::info!(
        worker = options.identity.id.as_str(),
        heartbeat = ?registration.heartbeat_interval,
        "worker registered"
    );
    let total_slots = options.identity.gpus.len().max(1);
    let running: Arc<Mutex<HashMap<JobId, Running>>> = Arc::new(Mutex::new(HashMap::new()));
    let shutting_down = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let mut jobs: JoinSet<Finished> = JoinSet::new();
    let mut summary = AgentSummary::default();

    let heartbeat = {
        let client = client.clone();
        let identity = options.identity.clone();
        let running = running.clone();
        let interval = registration.heartbeat_interval;
        tokio::spawn(async move { heartbeat_loop(client, identity, running, interval).await })
    };
    let abort_heartbeat = AbortOnDrop(heartbeat);

    loop {
        while let Some(finished) = jobs.try_join_next() {
            tally(&mut summary, finished.unwrap_or(Finished::Failed));
        }
        let used: usize = lock(&running).values().map(|job| job.slots).sum();
        if used < total_slots {
            match client.poll_work(&options.identity.id).await {
                Ok(assignments) => {
                    for assignment in assignments {
                        let cancelled = Arc::new(AtomicBool::new(false));
                        lock(&running).insert(
                            assignment.job,
                            Running {
                                epoch: assignment.epoch,
                                slots: assignment.local_ranks.len().max(1),
                                cancelled: cancelled.clone(),
                            },
                        );
                        tracing::info!(
                            job = assignment.job.0,
                            key = assignment.key.0.as_str(),
                            kind = assignment.kind.name(),
                            epoch = assignment.epoch,
                            attempt = assignment.attempt,
                            "job started"
                        );
                        let runner = JobRunner {
                            client: client.clone(),
                            executor: executor.clone(),
                            work_root: options.work_dir.clone(),
                            worker: options.identity.clone(),
                            cancelled,
                            shutting_down: shutting_down.clone(),
                            running: running.clone(),
                            wake: wake.clone(),
                        };
                        jobs.spawn(runner.run(assignment));
                    }
                }
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, "poll failed; coordinator unreachable, retrying");
                }
                Err(error) => {
                    tracing::error!(%error, "coordinator refused to hand out work");
                    if matches!(
                        error.code(),
                        Some(tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition)
                    ) {
                        shutting_down.store(true, Ordering::SeqCst);
                        interrupt_all(&running);
                        while let Some(finished) = jobs.join_next().await {
                            tally(&mut summary, finished.unwrap_or(Finished::Failed));
                        }
                        return Err(AgentError::Refused {
                            worker: options.identity.id.to_string(),
                            source: error,
                        });
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(options.poll_interval) => {}
            _ = wake.notified() => {}
            _ = stop_requested(&mut shutdown) => {
                tracing::info!(jobs = lock(&running).len(), "worker shutting down; interrupting running jobs");
                shutting_down.store(true, Ordering::SeqCst);
                interrupt_all(&running);
                while let Some(finished) = jobs.join_next().await {
                    tally(&mut summary, finished.unwrap_or(Finished::Failed));
                }
                // No heartbeat may re-register the worker after it has left.
                drop(abort_heartbeat);
                leave(&client, &options.identity.id).await;
                return Ok(summary);
            }
        }
    }
}

/// Says goodbye so that work the coordinator leased to this worker but never delivered is
/// requeued now rather than when its lease expires. Best effort: a coordinator that is
/// gone will expire the leases anyway.
async fn leave(client: &CoordinatorClient, worker: &WorkerId) {
    match tokio::time::timeout(Duration::from_secs(5), client.leave(worker)).await {
        Ok(Ok(requeued)) if requeued.is_empty() => tracing::info!("left the coordinator"),
        Ok(Ok(requeued)) => tracing::info!(
            requeued = ?requeued.iter().map(|job| job.0).collect::<Vec<_>>(),
            "left the coordinator; it requeued the jobs still leased here"
        ),
        Ok(Err(error)) => tracing::warn!(%error, "could not say goodbye; leases will expire"),
        Err(_) => tracing::warn!("coordinator did not answer the goodbye; leases will expire"),
    }
}

/// Resolves once `true` is sent (or the sender is gone).
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn interrupt_all(running: &Mutex<HashMap<JobId, Running>>) {
    for job in lock(running).values() {
        job.cancelled.store(true, Ordering::SeqCst);
    }
}

fn tally(summary: &mut AgentSummary, finished: Finished) {
    match finished {
        Finished::Succeeded => summary.succeeded += 1,
        Finished::Failed => summary.failed += 1,
        Finished::Stopped => summary.stopped += 1,
        Finished::Interrupted => summary.interrupted += 1,
    }
}

/// Registers, retrying while the coordinator is unreachable for up to `connect_patience`.
/// `None` when shutdown came first.
async fn register(
    client: &CoordinatorClient,
    options: &AgentOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Registration>, AgentError> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match client.register(&options.identity).await {
            Ok(registration) => return Ok(Some(registration)),
            Err(error) if error.is_retryable() && started.elapsed() < options.connect_patience => {
                tracing::debug!(%error, "coordinator not reachable yet");
            }
            Err(source) => {
                return Err(AgentError::Refused {
                    worker: options.identity.id.to_string(),
                    source,
                })
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_requested(shutdown) => return Ok(None),
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn heartbeat_loop(
    client: CoordinatorClient,
    identity: WorkerIdentity,
    running: Arc<Mutex<HashMap<JobId, Running>>>,
    interval: Duration,
) {
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        let reported: Vec<(JobId, u64)> = lock(&running)
            .iter()
            .map(|(job, state)| (*job, state.epoch))
            .collect();
        match client.heartbeat(&identity, &reported).await {
            Ok(stop) => {
                let running = lock(&running);
                for (job, epoch) in stop {
                    if let Some(state) = running.get(&job).filter(|state| state.epoch == epoch) {
                        if !state.cancelled.swap(true, Ordering::SeqCst) {
                            tracing::info!(job = job.0, epoch, "coordinator says stop: job cancelled, re-leased or finished elsewhere");
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed"),
        }
    }
}

struct JobRunner {
    client: CoordinatorClient,
    executor: Arc<dyn JobExecutor>,
    work_root: PathBuf,
    worker: WorkerIdentity,
    cancelled: Arc<AtomicBool>,
    shutting_down: Arc<AtomicBool>,
    running: Arc<Mutex<HashMap<JobId, Running>>>,
    wake: Arc<Notify>,
}

impl JobRunner {
    async fn run(self, assignment: JobAssignment) -> Finished {
        let job = assignment.job;
        let finished = self.run_inner(assignment).await;
        lock(&self.running).remove(&job);
        self.wake.notify_one();
        finished
    }

    async fn run_inner(&self, assignment: JobAssignment) -> Finished {
        let lease = LeaseRef {
            job: assignment.job,
            epoch: assignment.epoch,
            worker: self.worker.id.clone(),
        };
        let work_dir = self
            .work_root
            .join("jobs")
            .join(format!("{}-e{}", assignment.job, assignment.epoch));
        if let Err(error) = tokio::fs::create_dir_all(&work_dir).await {
            return self
                .report_failure(
                    &lease,
                    &format!("cannot create {}: {error}", work_dir.display()),
                    FailureKind::Retryable,
                )
                .await;
        }
        let latest_progress = Arc::new(Mutex::new(None));
        let progress_ready = Arc::new(Notify::new());
        let (uploads, upload_queue) = mpsc::unbounded_channel();
        let context = JobContext {
            client: self.client.clone(),
            runtime: Handle::current(),
            lease: lease.clone(),
            work_dir: work_dir.clone(),
            cancelled: self.cancelled.clone(),
            latest_progress: latest_progress.clone(),
            progress_ready: progress_ready.clone(),
            uploads,
        };
        let progress_task = tokio::spawn(progress_loop(
            self.client.clone(),
            lease.clone(),
            latest_progress,
            progress_ready,
            self.cancelled.clone(),
        ));
        let _abort_progress = AbortOnDrop(progress_task);
        let uploader = tokio::spawn(upload_loop(
            self.client.clone(),
            lease.clone(),
            upload_queue,
            self.cancelled.clone(),
        ));

        let executor = self.executor.clone();
        let job = assignment.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let outcome = executor.run(&job, &context);
            drop(context); // closes the upload queue
            outcome
        })
        .await;
        let upload_error = uploader
            .await
            .unwrap_or_else(|error| Some(format!("upload task failed: {error}")));

        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(panic) => Err(ExecError::Retryable(format!("executor panicked: {panic}"))),
        };
        if self.cancelled.load(Ordering::SeqCst) || matches!(outcome, Err(ExecError::Cancelled)) {
            if self.shutting_down.load(Ordering::SeqCst) {
                return self
                    .report_failure(&lease, "worker shut down", FailureKind::Interrupted)
                    .await;
            }
            tracing::info!(job = lease.job.0, epoch = lease.epoch, "job stopped");
            return Finished::Stopped;
        }
        let output = match outcome {
            Ok(output) => output,
            Err(ExecError::Permanent(message)) => {
                return self
                    .report_failure(&lease, &message, FailureKind::Permanent)
                    .await
            }
            Err(error) => {
                return self
                    .report_failure(&lease, &error.to_string(), FailureKind::Retryable)
                    .await
            }
        };
        if let Some(error) = upload_error {
            tracing::warn!(
                job = lease.job.0,
                error = error.as_str(),
                "a checkpoint upload failed; the job finished anyway"
            );
        }
        let runs_rank_zero = assignment.local_ranks.iter().any(|slot| slot.rank == 0);
        if !runs_rank_zero {
            tracing::info!(job = lease.job.0, "ranks done; rank 0 reports the result");
            return Finished::Succeeded;
        }
        for file in &output.artifacts {
            let uploaded = retrying("upload artifact", &self.cancelled, || {
                let client = self.client.clone();
                let lease = lease.clone();
                async move {
                    client
                        .upload_artifact(&lease, &file.path, &file.name, ArtifactKind::Output, 0)
                        .await
                }
            })
            .await;
            if let Err(error) = uploaded {
                return self
                    .report_failure(
                        &lease,
                        &format!("cannot upload {}: {error}", file.name),
                        FailureKind::Retryable,
                    )
                    .await;
            }
        }
        let reported = retrying("complete job", &self.cancelled, || {
            let client = self.client.clone();
            let lease = lease.clone();
            let result = output.result.clone();
            let cache_key = output.cache_key.clone();
            async move {
                client
                    .complete_job(&lease, &result, cache_key.as_deref())
                    .await
            }
        })
        .await;
        match reported {
            Ok(ReportOutcome::Accepted) => {
                tracing::info!(job = lease.job.0, epoch = lease.epoch, "job succeeded");
                let _ = tokio::fs::remove_dir_all(&work_dir).await;
                Finished::Succeeded
            }
            Ok(ReportOutcome::Ignored(reason)) => {
                tracing::info!(
                    job = lease.job.0,
                    reason = reason.as_str(),
                    "result not counted"
                );
                Finished::Stopped
            }
            Err(error) => {
                tracing::error!(job = lease.job.0, %error, "could not report the result; the lease will expire and the job rerun");
                Finished::Failed
            }
        }
    }

    async fn report_failure(&self, lease: &LeaseRef, message: &str, kind: FailureKind) -> Finished {
        let never_cancelled = AtomicBool::new(false);
        let reported = retrying("fail job", &never_cancelled, || {
            let client = self.client.clone();
            let lease = lease.clone();
            async move { client.fail_job(&lease, message, kind).await }
        })
        .await;
        if let Err(error) = reported {
            tracing::error!(job = lease.job.0, %error, "could not report the failure");
        }
        if kind == FailureKind::Interrupted {
            tracing::info!(job = lease.job.0, "job interrupted; it will be requeued");
            return Finished::Interrupted;
        }
        tracing::warn!(
            job = lease.job.0,
            epoch = lease.epoch,
            error = message,
            ?kind,
            "job attempt failed"
        );
        Finished::Failed
    }
}

/// Sends the latest progress at most once a second; a refusal stops the job.
async fn progress_loop(
    client: CoordinatorClient,
    lease: LeaseRef,
    latest: Arc<Mutex<Option<Progress>>>,
    ready: Arc<Notify>,
    cancelled: Arc<AtomicBool>,
) {
    loop {
        ready.notified().await;
        let progress = lock(&latest).take();
        let Some(progress) = progress else { continue };
        match client.report_progress(&lease, &progress).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    job = lease.job.0,
                    "coordinator declined progress: stopping the job"
                );
                cancelled.store(true, Ordering::SeqCst);
            }
            Err(error) => tracing::debug!(%error, "progress not delivered"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Uploads queued checkpoints in order; returns the first error, if any.
async fn upload_loop(
    client: CoordinatorClient,
    lease: LeaseRef,
    mut queue: mpsc::UnboundedReceiver<QueuedUpload>,
    cancelled: Arc<AtomicBool>,
) -> Option<String> {
    let mut first_error = None;
    while let Some(upload) = queue.recv().await {
        let result = retrying("upload checkpoint", &cancelled, || {
            let client = client.clone();
            let lease = lease.clone();
            let path = upload.path.clone();
            let name = upload.name.clone();
            async move {
                client
                    .upload_artifact(&lease, &path, &name, ArtifactKind::Checkpoint, upload.step)
                    .await
            }
        })
        .await;
        match result {
            Ok(artifact) => {
                tracing::info!(
                    job = lease.job.0,
                    name = artifact.name.as_str(),
                    step = artifact.step,
                    "checkpoint uploaded"
                );
                let _ = tokio::fs::remove_file(&upload.path).await;
            }
            Err(error) => {
                if error.code() == Some(tonic::Code::FailedPrecondition) {
                    cancelled.store(true, Ordering::SeqCst);
                }
                tracing::warn!(job = lease.job.0, %error, "checkpoint upload failed");
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    first_error
}
