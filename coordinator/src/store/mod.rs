//! The durable state of the coordinator: sweeps, jobs, leases, artifacts, workers and the
//! probe cache, behind one [`Store`] trait. [`SqliteStore`] is the backend (SQLite in WAL
//! mode, versioned migrations); `tests/store_conformance.rs` runs one suite against each
//! way of opening it.
//!
//! Every method is one transaction. Worker reports carry the lease epoch they were given;
//! a report for a stale epoch, for a lease the worker does not hold, or for a job already
//! final is ignored with a reason ([`ReportOutcome::Ignored`]), so a result delivered twice
//! or after a re-lease is never counted twice.

mod migrations;
mod sqlite;

use std::time::Duration;

use serde_json::Value;

use crate::domain::{
    ArtifactInfo, ArtifactRecord, CacheHit, FailureKind, JobAssignment, JobRecord, MetricsSnapshot,
    Progress, ReportOutcome, SweepResults, SweepStatus, SweepSummary, Timestamp, WorkerRecord,
};
use crate::graph::PlannedJob;
use crate::ids::{JobId, SweepId, WorkerId};
use crate::scheduler::{Decision, SchedulerConfig, Snapshot};

pub use migrations::SCHEMA_VERSION;
pub use sqlite::{IntegrityReport, SqliteStore};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The sweep, job or artifact does not exist.
    #[error("{what} {id} not found")]
    NotFound {
        /// `sweep`, `job`, `artifact`.
        what: &'static str,
        /// Its id as text.
        id: String,
    },
    /// The plan handed to `create_sweep` is inconsistent.
    #[error("invalid job plan: {0}")]
    InvalidPlan(String),
    /// The database was written by a newer lorasweep.
    #[error("database schema version {found} is newer than this lorasweep supports ({supported}); upgrade lorasweep")]
    SchemaTooNew {
        /// The version found.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// A stored value cannot be read back (hand-edited or damaged database).
    #[error("corrupt stored value in {table}.{column} (row {row}): {detail}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Column.
        column: &'static str,
        /// Row id.
        row: i64,
        /// What is wrong.
        detail: String,
    },
    /// The database itself failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sqlite(error) => matches!(
                error.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// A sweep to create, with its planned jobs (dependencies before dependents).
#[derive(Debug, Clone, Copy)]
pub struct NewSweep<'a> {
    /// The name from the file.
    pub name: &'a str,
    /// The file name as submitted.
    pub file_name: &'a str,
    /// The file's text.
    pub spec_yaml: &'a str,
    /// The planned jobs; each key once, each dependency an earlier key.
    pub jobs: &'a [PlannedJob],
    /// Attempts allowed per job.
    pub max_attempts: u32,
}

/// Where a worker's report comes from: the job, the lease epoch it was given, the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRef {
    /// The job.
    pub job: JobId,
    /// The epoch of the lease.
    pub epoch: u64,
    /// The worker holding it.
    pub worker: WorkerId,
}

/// The coordinator's durable state. See the module docs.
pub trait Store: Send + Sync {
    /// Stores a sweep and its jobs (all queued).
    fn create_sweep(&self, sweep: NewSweep<'_>, now: Timestamp) -> StoreResult<SweepId>;

    /// The uncancelled sweeps submitted with exactly this text, newest first. The same text
    /// from two folders names different files, so callers compare the jobs too.
    fn find_sweeps_by_spec(&self, spec_yaml: &str) -> StoreResult<Vec<SweepId>>;

    /// A sweep with every job and the counts by state.
    fn sweep_status(&self, sweep: SweepId) -> StoreResult<SweepStatus>;

    /// Every sweep, newest first.
    fn list_sweeps(&self) -> StoreResult<Vec<SweepSummary>>;

    /// A sweep's jobs with their results and artifacts.
    fn sweep_results(&self, sweep: SweepId) -> StoreResult<SweepResults>;

    /// Cancels a sweep: queued and running jobs become cancelled (running ones are told to
    /// stop at their next heartbeat). Returns how many jobs were cancelled; 0 when it was
    /// cancelled already or had ended.
    fn cancel_sweep(&self, sweep: SweepId, now: Timestamp) -> StoreResult<u32>;

    /// One job.
    fn job(&self, job: JobId) -> StoreResult<JobRecord>;

    /// Records a worker (new or returning) and its offer.
    fn register_worker(&self, worker: &WorkerRecord) -> StoreResult<()>;

    /// A worker's heartbeat: records it (registering an unknown worker on the spot), extends
    /// the leases it holds on the jobs it says it runs (and those not yet delivered to it),
    /// and returns the reported jobs it must stop: cancelled, finished, or re-leased.
    fn heartbeat(
        &self,
        worker: &WorkerRecord,
        running: &[(JobId, u64)],
        lease_ttl: Duration,
    ) -> StoreResult<Vec<(JobId, u64)>>;

    /// One scheduling round in one transaction: builds the [`Snapshot`], asks `decide`,
    /// applies its decisions, and returns them.
    fn schedule_round(
        &self,
        now: Timestamp,
        config: SchedulerConfig,
        decide: &mut dyn FnMut(&Snapshot) -> Vec<Decision>,
    ) -> StoreResult<Vec<Decision>>;

    /// A worker leaving cleanly: forgets it, so no round offers it work, and requeues
    /// every running job leased to it (delivered or not) without counting the attempt.
    /// Returns the requeued jobs.
    fn retire_worker(&self, worker: &WorkerId, now: Timestamp) -> StoreResult<Vec<JobId>>;

    /// The assignments leased to this worker that it has not been given yet; they are
    /// marked delivered.
    fn take_assignments(&self, worker: &WorkerId) -> StoreResult<Vec<JobAssignment>>;

    /// Whether this lease is current (job running at that epoch, held by that worker).
    fn lease_is_current(&self, lease: &LeaseRef) -> StoreResult<bool>;

    /// Live progress of a running job.
    fn record_progress(&self, lease: &LeaseRef, progress: &Progress) -> StoreResult<ReportOutcome>;

    /// The job succeeded with this result (from the worker running rank 0). With a cache
    /// key, the result and its artifacts are remembered for [`Store::lookup_cache`].
    fn complete_job(
        &self,
        lease: &LeaseRef,
        result: &Value,
        cache_key: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome>;

    /// The attempt failed: requeued while attempts are left (not counting an interrupted
    /// attempt), failed otherwise or when the failure is permanent.
    fn fail_job(
        &self,
        lease: &LeaseRef,
        error: &str,
        kind: FailureKind,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome>;

    /// Records an uploaded artifact (its file is already in place), replacing one of the same
    /// name.
    fn put_artifact(
        &self,
        lease: &LeaseRef,
        artifact: &ArtifactRecord,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome>;

    /// One artifact of a job.
    fn artifact(&self, job: JobId, name: &str) -> StoreResult<Option<ArtifactRecord>>;

    /// Every artifact of a job.
    fn artifacts(&self, job: JobId) -> StoreResult<Vec<ArtifactInfo>>;

    /// A cached result by content key. On a hit, its artifacts are attached to the asking
    /// job. `None` on a miss or when the lease is not current.
    fn lookup_cache(
        &self,
        lease: &LeaseRef,
        cache_key: &str,
        now: Timestamp,
    ) -> StoreResult<Option<CacheHit>>;

    /// Rank 0 of a gang publishes its rendezvous bytes (the NCCL unique id).
    fn publish_rendezvous(&self, lease: &LeaseRef, blob: &[u8]) -> StoreResult<ReportOutcome>;

    /// The rendezvous bytes of the lease's attempt, once published.
    fn fetch_rendezvous(&self, lease: &LeaseRef) -> StoreResult<Option<Vec<u8>>>;

    /// Pushes every lease deadline to at least `until` (after a coordinator restart, so
    /// live workers have time to reconnect). Returns how many leases were extended.
    fn extend_all_leases(&self, until: Timestamp) -> StoreResult<u32>;

    /// Tallies for the metrics endpoint.
    fn metrics(&self, now: Timestamp, worker_timeout: Duration) -> StoreResult<MetricsSnapshot>;
}
