//! The coordinator's domain types: what the store keeps, what the scheduler reasons about,
//! and what the client and the worker agent see. Wire (protobuf) types never appear here;
//! [`crate::convert`] translates at the edge.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::graph::{JobKey, JobKind};
use crate::ids::{JobId, SweepId, WorkerId};

/// Wall-clock time in milliseconds since the Unix epoch. Durable (it is stored), so leases
/// survive a coordinator restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }

    /// This time plus a duration.
    pub fn plus(self, duration: Duration) -> Timestamp {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(millis))
    }

    /// Milliseconds from `earlier` to this time (0 when `earlier` is later).
    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Where a job is in its life.
///
/// `queued → running → succeeded`; `running → queued` when a lease expires or an attempt
/// fails with attempts left; `running → failed` when none are left; `queued → skipped`
/// when a dependency did not succeed; `queued | running → cancelled` when its sweep is
/// cancelled. `succeeded`, `failed`, `skipped` and `cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting for its dependencies or for free slots.
    Queued,
    /// Leased to one or more workers.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Out of attempts, or failed permanently; the error is kept.
    Failed,
    /// Not run because a dependency did not succeed; the reason is kept.
    Skipped,
    /// Its sweep was cancelled.
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Skipped,
        JobState::Cancelled,
    ];

    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Skipped => "skipped",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state with this lowercase name.
    pub fn from_name(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.name() == name)
    }

    /// Whether the state is final.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The lowercase name of a job kind.
pub fn job_kind_name(kind: JobKind) -> &'static str {
    kind.name()
}

/// The job kind with this lowercase name.
pub fn job_kind_from_name(name: &str) -> Option<JobKind> {
    [JobKind::Probe, JobKind::Train, JobKind::Eval]
        .into_iter()
        .find(|kind| kind.name() == name)
}

/// What an artifact is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArtifactKind {
    /// A result file of the job (an adapter, probe scores).
    Output,
    /// A training checkpoint; the newest one is handed to the next attempt.
    Checkpoint,
}

impl ArtifactKind {
    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            ArtifactKind::Output => "output",
            ArtifactKind::Checkpoint => "checkpoint",
        }
    }

    /// The kind with this lowercase name.
    pub fn from_name(name: &str) -> Option<ArtifactKind> {
        match name {
            "output" => Some(ArtifactKind::Output),
            "checkpoint" => Some(ArtifactKind::Checkpoint),
            _ => None,
        }
    }
}

/// The most characters an artifact name may have.
pub const MAX_ARTIFACT_NAME_LEN: usize = 128;

/// Whether `name` may name an artifact: 1 to 128 characters from letters, digits, `.`, `_`,
/// `-`, not starting with a dot (so it is a plain file name, never a path).
pub fn is_valid_artifact_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ARTIFACT_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "._-".contains(character))
}

/// An artifact the coordinator holds, as workers and clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// The job it belongs to.
    pub job: JobId,
    /// Its file name, unique within the job.
    pub name: String,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// Output or checkpoint.
    pub kind: ArtifactKind,
    /// The training step of a checkpoint; 0 for outputs.
    pub step: u64,
}

/// An artifact as stored: its info and where its file lies, relative to the artifact
/// directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// What clients see.
    pub info: ArtifactInfo,
    /// Path relative to the coordinator's artifact directory.
    pub relative_path: String,
}

/// One GPU slot leased to one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankSlot {
    /// The rank in the job's world.
    pub rank: u32,
    /// The device index on the worker (0 on a CPU-only worker).
    pub gpu: u32,
}

/// A finished dependency of a job, handed to the worker with the job.
#[derive(Debug, Clone, PartialEq)]
pub struct DependencyOutput {
    /// The dependency.
    pub job: JobId,
    /// Its key.
    pub key: JobKey,
    /// Its kind.
    pub kind: JobKind,
    /// Its result.
    pub result: Value,
    /// Its artifacts.
    pub artifacts: Vec<ArtifactInfo>,
}

/// One job handed to one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct JobAssignment {
    /// The job.
    pub job: JobId,
    /// Its sweep.
    pub sweep: SweepId,
    /// Its key in the sweep's graph.
    pub key: JobKey,
    /// What it does.
    pub kind: JobKind,
    /// The model id.
    pub model: String,
    /// The task id.
    pub task: String,
    /// Every resolved setting of the job.
    pub params: Value,
    /// The lease epoch, echoed on every call about this job.
    pub epoch: u64,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Ranks in the whole job.
    pub world_size: u32,
    /// The ranks this worker runs.
    pub local_ranks: Vec<RankSlot>,
    /// Results and artifacts of the job's dependencies.
    pub dependencies: Vec<DependencyOutput>,
    /// The newest checkpoint of an earlier attempt.
    pub resume_from: Option<ArtifactInfo>,
}

/// Live progress of a running job.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Steps in all (0 when unknown).
    pub total_steps: u64,
    /// The latest loss.
    pub loss: Option<f64>,
    /// The latest throughput.
    pub tokens_per_second: Option<f64>,
    /// A short free-form status.
    pub message: String,
}

/// How a job attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Retry while attempts are left.
    Retryable,
    /// Retrying cannot help: fail now.
    Permanent,
    /// The worker is shutting down: requeue without counting the attempt.
    Interrupted,
}

/// What a worker's report about a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The report changed the job.
    Accepted,
    /// The report was ignored (duplicate, stale lease, job already final), with why.
    Ignored(String),
}

impl ReportOutcome {
    /// Whether the report changed the job.
    pub fn is_accepted(&self) -> bool {
        matches!(self, ReportOutcome::Accepted)
    }
}

/// A sweep as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRecord {
    /// Its id.
    pub id: SweepId,
    /// The name from the file.
    pub name: String,
    /// The file name it was submitted as.
    pub file_name: String,
    /// The file's text.
    pub spec_yaml: String,
    /// When it was submitted.
    pub created: Timestamp,
    /// When it was cancelled.
    pub cancelled: Option<Timestamp>,
}

/// A job as stored, with its live progress.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// Its sweep.
    pub sweep: SweepId,
    /// Its key in the sweep's graph.
    pub key: JobKey,
    /// What it does.
    pub kind: JobKind,
    /// The model id.
    pub model: String,
    /// The task id.
    pub task: String,
    /// Every resolved setting.
    pub params: Value,
    /// Jobs that must succeed first.
    pub deps: Vec<JobId>,
    /// GPU slots it needs, leased together.
    pub gpus: u32,
    /// Where it is.
    pub state: JobState,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The lease epoch of its latest attempt (0 before the first).
    pub epoch: u64,
    /// The error of the latest failed attempt, or why it was skipped.
    pub last_error: Option<String>,
    /// Its result, once succeeded.
    pub result: Option<Value>,
    /// Workers holding its current lease.
    pub workers: Vec<WorkerId>,
    /// Live progress of the current attempt.
    pub progress: Progress,
    /// When it entered the queue last.
    pub queued_at: Timestamp,
    /// When its latest attempt started.
    pub started_at: Option<Timestamp>,
    /// When it reached a final state.
    pub finished_at: Option<Timestamp>,
}

/// Jobs of a sweep by state, with every state present.
pub type StateCounts = BTreeMap<JobState, u32>;

/// Counts jobs by state, every state present (zero when none).
pub fn count_states<'a>(states: impl IntoIterator<Item = &'a JobState>) -> StateCounts {
    let mut counts: StateCounts = JobState::ALL.into_iter().map(|state| (state, 0)).collect();
    for state in states {
        *counts.entry(*state).or_insert(0) += 1;
    }
    counts
}

/// Whether a sweep with these counts has ended (nothing queued or running).
pub fn has_ended(counts: &StateCounts) -> bool {
    counts.get(&JobState::Queued).copied().unwrap_or(0) == 0
        && counts.get(&JobState::Running).copied().unwrap_or(0) == 0
}

/// A sweep with its jobs (without its file text; see [`SweepResults`] for that).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepStatus {
    /// The sweep.
    pub id: SweepId,
    /// The name from the file.
    pub name: String,
    /// The file name it was submitted as.
    pub file_name: String,
    /// When it was submitted.
    pub created: Timestamp,
    /// When it was cancelled.
    pub cancelled: Option<Timestamp>,
    /// Jobs by state.
    pub counts: StateCounts,
    /// Whether no job is queued or running.
    pub ended: bool,
    /// Every job, in id order.
    pub jobs: Vec<JobRecord>,
}

/// A sweep in a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSummary {
    /// The sweep.
    pub id: SweepId,
    /// Its name.
    pub name: String,
    /// When it was submitted.
    pub created: Timestamp,
    /// Whether it was cancelled.
    pub cancelled: bool,
    /// Jobs by state.
    pub counts: StateCounts,
    /// Whether no job is queued or running.
    pub ended: bool,
}

/// One job's outcome, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct JobResult {
    /// The job.
    pub job: JobRecord,
    /// Its artifacts.
    pub artifacts: Vec<ArtifactInfo>,
}

/// A sweep's outcomes, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepResults {
    /// The sweep.
    pub sweep: SweepRecord,
    /// Every job with its result.
    pub jobs: Vec<JobResult>,
}

/// A worker as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    /// Its id.
    pub id: WorkerId,
    /// Its host name.
    pub host: String,
    /// The GPU slots it offers; empty for one CPU slot.
    pub gpus: Vec<u32>,
    /// When it last registered or heartbeated.
    pub last_heartbeat: Timestamp,
}

impl WorkerRecord {
    /// The slots the scheduler may lease: the GPUs, or slot 0 for a CPU-only worker.
    pub fn slots(&self) -> Vec<u32> {
        if self.gpus.is_empty() {
            vec![0]
        } else {
            self.gpus.clone()
        }
    }
}

/// A cached result found by content key.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheHit {
    /// The job that computed it.
    pub source: JobId,
    /// Its result.
    pub result: Value,
    /// Its artifacts, now also attached to the asking job.
    pub artifacts: Vec<ArtifactInfo>,
}

/// Tallies the metrics endpoint reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsSnapshot {
    /// Jobs by state over every sweep.
    pub jobs_by_state: StateCounts,
    /// Workers that heartbeated within the liveness window.
    pub live_workers: u32,
    /// Workers ever registered.
    pub known_workers: u32,
    /// Leases that expired since the store was created.
    pub lease_expiries: u64,
    /// Seconds of each succeeded job's last attempt, with its kind.
    pub job_durations: Vec<(JobKind, f64)>,
}
