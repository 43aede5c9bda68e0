//! The SQLite backend of [`Store`]: one connection behind a mutex, WAL journal on files,
//! every method one transaction.
//!
//! This file owns [`SqliteStore`], how it is opened, its transaction helpers (`read`,
//! `write`) and the [`Store`] impl, which only dispatches: the work is in
//! - `rows`: reading rows back (ids, timestamps, JSON and enum columns, whole job records);
//! - `sweeps`: creating sweeps and looking them up (status, list, results, cancel);
//! - `leasing`: workers, heartbeats, the scheduler's snapshot and its decisions, handing
//!   leased jobs to workers, retiring workers;
//! - `reports`: whether a lease is current, and a worker's reports on it (progress,
//!   success, failure, rendezvous);
//! - `artifacts`: artifact records and the probe cache;
//! - `metrics`: the counts behind `/metrics`.
//!
//! The schema and its migrations are not here (`super::migrations`).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use serde_json::Value;

use super::migrations::migrate;
use super::{LeaseRef, NewSweep, Store, StoreResult};
use crate::domain::{
    ArtifactInfo, ArtifactRecord, CacheHit, FailureKind, JobAssignment, JobRecord, MetricsSnapshot,
    Progress, ReportOutcome, SweepResults, SweepStatus, SweepSummary, Timestamp, WorkerRecord,
};
use crate::ids::{JobId, SweepId, WorkerId};
use crate::scheduler::{Decision, SchedulerConfig, Snapshot};

mod artifacts;
mod check;
mod leasing;
mod metrics;
mod reports;
mod rows;
mod sweeps;

pub use check::IntegrityReport;
use leasing::upsert_worker;
use reports::{lease_state, stale_reason};
use rows::job_record;

/// The SQLite store. See the module docs of [`crate::store`].
pub struct SqliteStore {
    connection: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SqliteStore")
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) a database file in WAL mode and migrates it.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        SqliteStore::with_connection(connection)
    }

    /// A private in-memory database (for tests and simulations).
    pub fn open_in_memory() -> StoreResult<SqliteStore> {
        SqliteStore::with_connection(Connection::open_in_memory()?)
    }

    fn with_connection(mut connection: Connection) -> StoreResult<SqliteStore> {
        connection.busy_timeout(Duration::from_secs(10))?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut connection)?;
        Ok(SqliteStore {
            connection: Mutex::new(connection),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock rolled its transaction back on drop; the
        // connection itself is still sound.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write<T>(&self, body: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let mut connection = self.lock();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = body(&transaction)?;
        transaction.commit()?;
        Ok(value)
    }

    fn read<T>(&self, body: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let mut connection = self.lock();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let value = body(&transaction)?;
        transaction.commit()?;
        Ok(value)
    }
}

impl Store for SqliteStore {
    fn create_sweep(&self, sweep: NewSweep<'_>, now: Timestamp) -> StoreResult<SweepId> {
        sweeps::create_sweep(self, sweep, now)
    }

    fn find_sweeps_by_spec(&self, spec_yaml: &str) -> StoreResult<Vec<SweepId>> {
        sweeps::find_sweeps_by_spec(self, spec_yaml)
    }

    fn sweep_status(&self, sweep: SweepId) -> StoreResult<SweepStatus> {
        sweeps::sweep_status(self, sweep)
    }

    fn list_sweeps(&self) -> StoreResult<Vec<SweepSummary>> {
        sweeps::list_sweeps(self)
    }

    fn sweep_results(&self, sweep: SweepId) -> StoreResult<SweepResults> {
        sweeps::sweep_results(self, sweep)
    }

    fn cancel_sweep(&self, sweep: SweepId, now: Timestamp) -> StoreResult<u32> {
        sweeps::cancel_sweep(self, sweep, now)
    }

    fn job(&self, job: JobId) -> StoreResult<JobRecord> {
        self.read(|transaction| job_record(transaction, job))
    }

    fn register_worker(&self, worker: &WorkerRecord) -> StoreResult<()> {
        self.write(|transaction| upsert_worker(transaction, worker))
    }

    fn heartbeat(
        &self,
        worker: &WorkerRecord,
        running: &[(JobId, u64)],
        lease_ttl: Duration,
    ) -> StoreResult<Vec<(JobId, u64)>> {
        leasing::heartbeat(self, worker, running, lease_ttl)
    }

    fn schedule_round(
        &self,
        now: Timestamp,
        config: SchedulerConfig,
        decide: &mut dyn FnMut(&Snapshot) -> Vec<Decision>,
    ) -> StoreResult<Vec<Decision>> {
        leasing::schedule_round(self, now, config, decide)
    }

    fn retire_worker(&self, worker: &WorkerId, now: Timestamp) -> StoreResult<Vec<JobId>> {
        leasing::retire_worker(self, worker, now)
    }

    fn take_assignments(&self, worker: &WorkerId) -> StoreResult<Vec<JobAssignment>> {
        leasing::take_assignments(self, worker)
    }

    fn lease_is_current(&self, lease: &LeaseRef) -> StoreResult<bool> {
        self.read(
            |transaction| Ok(stale_reason(&lease_state(transaction, lease)?, lease).is_none()),
        )
    }

    fn record_progress(&self, lease: &LeaseRef, progress: &Progress) -> StoreResult<ReportOutcome> {
        reports::record_progress(self, lease, progress)
    }

    fn complete_job(
        &self,
        lease: &LeaseRef,
        result: &Value,
        cache_key: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome> {
        reports::complete_job(self, lease, result, cache_key, now)
    }

    fn fail_job(
        &self,
        lease: &LeaseRef,
        error: &str,
        kind: FailureKind,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome> {
        reports::fail_job(self, lease, error, kind, now)
    }

    fn put_artifact(
        &self,
        lease: &LeaseRef,
        artifact: &ArtifactRecord,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome> {
        artifacts::put_artifact(self, lease, artifact, now)
    }

    fn artifact(&self, job: JobId, name: &str) -> StoreResult<Option<ArtifactRecord>> {
        artifacts::artifact(self, job, name)
    }

    fn artifacts(&self, job: JobId) -> StoreResult<Vec<ArtifactInfo>> {
        artifacts::artifacts(self, job)
    }

    fn lookup_cache(
        &self,
        lease: &LeaseRef,
        cache_key: &str,
        now: Timestamp,
    ) -> StoreResult<Option<CacheHit>> {
        artifacts::lookup_cache(self, lease, cache_key, now)
    }

    fn publish_rendezvous(&self, lease: &LeaseRef, blob: &[u8]) -> StoreResult<ReportOutcome> {
        reports::publish_rendezvous(self, lease, blob)
    }

    fn fetch_rendezvous(&self, lease: &LeaseRef) -> StoreResult<Option<Vec<u8>>> {
        reports::fetch_rendezvous(self, lease)
    }

    fn extend_all_leases(&self, until: Timestamp) -> StoreResult<u32> {
        leasing::extend_all_leases(self, until)
    }

    fn metrics(&self, now: Timestamp, worker_timeout: Duration) -> StoreResult<MetricsSnapshot> {
        metrics::metrics(self, now, worker_timeout)
    }
}
