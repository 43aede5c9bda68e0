//! The SQLite backend of [`Store`]: one connection behind a mutex, WAL journal on files,
//! every method one transaction.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde_json::Value;

use super::migrations::migrate;
use super::{LeaseRef, NewSweep, Store, StoreError, StoreResult};
use crate::domain::{
    count_states, has_ended, job_kind_from_name, ArtifactInfo, ArtifactKind, ArtifactRecord,
    CacheHit, DependencyOutput, FailureKind, JobAssignment, JobRecord, JobResult, JobState,
    MetricsSnapshot, Progress, RankSlot, ReportOutcome, SweepRecord, SweepResults, SweepStatus,
    SweepSummary, Timestamp, WorkerRecord,
};
use crate::graph::{JobKey, JobKind};
use crate::ids::{JobId, SweepId, WorkerId};
use crate::scheduler::{Decision, JobView, LeaseView, SchedulerConfig, Snapshot, WorkerView};

const LEASE_EXPIRIES: &str = "lease_expiries";

const JOB_COLUMNS: &str = "id, sweep_id, key, kind, model, task, params, gpus, state, attempts, \
     max_attempts, epoch, last_error, result, queued_ms, started_ms, finished_ms, \
     progress_step, progress_total, progress_loss, progress_tps, progress_message";

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

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn timestamp(value: i64) -> Timestamp {
    Timestamp(from_sql(value))
}

fn parse_json(
    table: &'static str,
    column: &'static str,
    row: i64,
    text: &str,
) -> StoreResult<Value> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
        table,
        column,
        row,
        detail: error.to_string(),
    })
}

fn parse_ranks(job: i64, text: &str) -> StoreResult<Vec<RankSlot>> {
    let pairs: Vec<(u32, u32)> =
        serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
            table: "leases",
            column: "ranks",
            row: job,
            detail: error.to_string(),
        })?;
    Ok(pairs
        .into_iter()
        .map(|(rank, gpu)| RankSlot { rank, gpu })
        .collect())
}

fn ranks_json(ranks: &[RankSlot]) -> String {
    let pairs: Vec<(u32, u32)> = ranks.iter().map(|slot| (slot.rank, slot.gpu)).collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_string())
}

fn parse_gpus(worker: &str, text: &str) -> StoreResult<Vec<u32>> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
        table: "workers",
        column: "gpus",
        row: 0,
        detail: format!("worker {worker}: {error}"),
    })
}

fn worker_id(table: &'static str, text: String) -> StoreResult<WorkerId> {
    WorkerId::new(text).map_err(|error| StoreError::Corrupt {
        table,
        column: "worker_id",
        row: 0,
        detail: error.to_string(),
    })
}

fn kind_of(row: i64, name: &str) -> StoreResult<JobKind> {
    job_kind_from_name(name).ok_or_else(|| StoreError::Corrupt {
        table: "jobs",
        column: "kind",
        row,
        detail: format!("unknown job kind {name:?}"),
    })
}

fn state_of(row: i64, name: &str) -> StoreResult<JobState> {
    JobState::from_name(name).ok_or_else(|| StoreError::Corrupt {
        table: "jobs",
        column: "state",
        row,
        detail: format!("unknown job state {name:?}"),
    })
}

/// A jobs row as read, before its text columns are checked.
struct JobRow {
    id: i64,
    sweep_id: i64,
    key: String,
    kind: String,
    model: String,
    task: String,
    params: String,
    gpus: i64,
    state: String,
    attempts: i64,
    max_attempts: i64,
    epoch: i64,
    last_error: Option<String>,
    result: Option<String>,
    queued_ms: i64,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    progress_step: i64,
    progress_total: i64,
    progress_loss: Option<f64>,
    progress_tps: Option<f64>,
    progress_message: String,
}

impl JobRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            id: row.get(0)?,
            sweep_id: row.get(1)?,
            key: row.get(2)?,
            kind: row.get(3)?,
            model: row.get(4)?,
            task: row.get(5)?,
            params: row.get(6)?,
            gpus: row.get(7)?,
            state: row.get(8)?,
            attempts: row.get(9)?,
            max_attempts: row.get(10)?,
            epoch: row.get(11)?,
            last_error: row.get(12)?,
            result: row.get(13)?,
            queued_ms: row.get(14)?,
            started_ms: row.get(15)?,
            finished_ms: row.get(16)?,
            progress_step: row.get(17)?,
            progress_total: row.get(18)?,
            progress_loss: row.get(19)?,
            progress_tps: row.get(20)?,
            progress_message: row.get(21)?,
        })
    }

    fn into_record(self, deps: Vec<JobId>, workers: Vec<WorkerId>) -> StoreResult<JobRecord> {
        let result = match &self.result {
            Some(text) => Some(parse_json("jobs", "result", self.id, text)?),
            None => None,
        };
        Ok(JobRecord {
            id: JobId(from_sql(self.id)),
            sweep: SweepId(from_sql(self.sweep_id)),
            kind: kind_of(self.id, &self.kind)?,
            state: state_of(self.id, &self.state)?,
            params: parse_json("jobs", "params", self.id, &self.params)?,
            key: JobKey(self.key),
            model: self.model,
            task: self.task,
            deps,
            gpus: u32::try_from(self.gpus).unwrap_or(1),
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            max_attempts: u32::try_from(self.max_attempts).unwrap_or(1),
            epoch: from_sql(self.epoch),
            last_error: self.last_error,
            result,
            workers,
            progress: Progress {
                step: from_sql(self.progress_step),
                total_steps: from_sql(self.progress_total),
                loss: self.progress_loss,
                tokens_per_second: self.progress_tps,
                message: self.progress_message,
            },
            queued_at: timestamp(self.queued_ms),
            started_at: self.started_ms.map(timestamp),
            finished_at: self.finished_ms.map(timestamp),
        })
    }
}

fn sweep_record(transaction: &Transaction<'_>, sweep: SweepId) -> StoreResult<SweepRecord> {
    transaction
        .query_row(
            "SELECT id, name, file_name, spec_yaml, created_ms, cancelled_ms FROM sweeps WHERE id = ?1",
            params![to_sql(sweep.0)],
            |row| {
                Ok(SweepRecord {
                    id: SweepId(from_sql(row.get(0)?)),
                    name: row.get(1)?,
                    file_name: row.get(2)?,
                    spec_yaml: row.get(3)?,
                    created: timestamp(row.get(4)?),
                    cancelled: row.get::<_, Option<i64>>(5)?.map(timestamp),
                })
            },
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound {
            what: "sweep",
            id: sweep.to_string(),
        })
}

/// Jobs matching `filter` (an SQL condition on `jobs`, with `?1` bound to `argument`), with
/// their dependencies and lease holders, in id order.
fn load_jobs(
    transaction: &Transaction<'_>,
    filter: &str,
    argument: i64,
) -> StoreResult<Vec<JobRecord>> {
    let mut statement = transaction.prepare(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE {filter} ORDER BY id"
    ))?;
    let rows: Vec<JobRow> = statement
        .query_map(params![argument], JobRow::read)?
        .collect::<rusqlite::Result<_>>()?;
    let mut deps: HashMap<i64, Vec<JobId>> = HashMap::new();
    let mut statement = transaction.prepare(&format!(
        "SELECT d.job_id, d.dep_id FROM job_deps d JOIN jobs ON jobs.id = d.job_id WHERE {filter} \
         ORDER BY d.job_id, d.dep_id"
    ))?;
    let mut query = statement.query(params![argument])?;
    while let Some(row) = query.next()? {
        deps.entry(row.get(0)?)
            .or_default()
            .push(JobId(from_sql(row.get(1)?)));
    }
    let mut holders: HashMap<i64, Vec<WorkerId>> = HashMap::new();
    let mut statement = transaction.prepare(&format!(
        "SELECT l.job_id, l.worker_id FROM leases l JOIN jobs ON jobs.id = l.job_id WHERE {filter} \
         ORDER BY l.job_id, l.worker_id"
    ))?;
    let mut query = statement.query(params![argument])?;
    while let Some(row) = query.next()? {
        let worker = worker_id("leases", row.get(1)?)?;
        holders.entry(row.get(0)?).or_default().push(worker);
    }
    rows.into_iter()
        .map(|row| {
            let id = row.id;
            row.into_record(
                deps.remove(&id).unwrap_or_default(),
                holders.remove(&id).unwrap_or_default(),
            )
        })
        .collect()
}

fn job_record(transaction: &Transaction<'_>, job: JobId) -> StoreResult<JobRecord> {
    load_jobs(transaction, "jobs.id = ?1", to_sql(job.0))?
        .pop()
        .ok_or_else(|| StoreError::NotFound {
            what: "job",
            id: job.to_string(),
        })
}

fn artifact_infos(transaction: &Transaction<'_>, job: JobId) -> StoreResult<Vec<ArtifactRecord>> {
    let mut statement = transaction.prepare(
        "SELECT name, kind, step, path, sha256, size FROM artifacts WHERE job_id = ?1 ORDER BY name",
    )?;
    let rows: Vec<(String, String, i64, String, String, i64)> = statement
        .query_map(params![to_sql(job.0)], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(name, kind, step, path, sha256, size)| {
            let kind = ArtifactKind::from_name(&kind).ok_or_else(|| StoreError::Corrupt {
                table: "artifacts",
                column: "kind",
                row: to_sql(job.0),
                detail: format!("unknown artifact kind {kind:?}"),
            })?;
            Ok(ArtifactRecord {
                info: ArtifactInfo {
                    job,
                    name,
                    sha256,
                    size: from_sql(size),
                    kind,
                    step: from_sql(step),
                },
                relative_path: path,
            })
        })
        .collect()
}

/// The job's state and epoch, and whether `lease.worker` holds a lease on it at that
/// epoch (with the lease's ranks).
struct LeaseState {
    state: JobState,
    epoch: u64,
    held_ranks: Option<Vec<RankSlot>>,
}

fn lease_state(transaction: &Transaction<'_>, lease: &LeaseRef) -> StoreResult<LeaseState> {
    let (state, epoch): (String, i64) = transaction
        .query_row(
            "SELECT state, epoch FROM jobs WHERE id = ?1",
            params![to_sql(lease.job.0)],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound {
            what: "job",
            id: lease.job.to_string(),
        })?;
    let ranks: Option<String> = transaction
        .query_row(
            "SELECT ranks FROM leases WHERE job_id = ?1 AND worker_id = ?2 AND epoch = ?3",
            params![
                to_sql(lease.job.0),
                lease.worker.as_str(),
                to_sql(lease.epoch)
            ],
            |row| row.get(0),
        )
        .optional()?;
    Ok(LeaseState {
        state: state_of(to_sql(lease.job.0), &state)?,
        epoch: from_sql(epoch),
        held_ranks: ranks
            .map(|text| parse_ranks(to_sql(lease.job.0), &text))
            .transpose()?,
    })
}

/// `None` when the lease is current; otherwise why a report on it is ignored.
fn stale_reason(current: &LeaseState, lease: &LeaseRef) -> Option<String> {
    if current.state != JobState::Running {
        return Some(format!("job {} is {}", lease.job, current.state));
    }
    if current.epoch != lease.epoch {
        return Some(format!(
            "stale lease: epoch {} but job {} is at epoch {}",
            lease.epoch, lease.job, current.epoch
        ));
    }
    if current.held_ranks.is_none() {
        return Some(format!(
            "worker {} holds no lease on job {}",
            lease.worker, lease.job
        ));
    }
    None
}

fn end_attempt(transaction: &Transaction<'_>, job: JobId) -> StoreResult<()> {
    transaction.execute(
        "DELETE FROM leases WHERE job_id = ?1",
        params![to_sql(job.0)],
    )?;
    transaction.execute(
        "DELETE FROM rendezvous WHERE job_id = ?1",
        params![to_sql(job.0)],
    )?;
    Ok(())
}

fn bump_counter(transaction: &Transaction<'_>, name: &str) -> StoreResult<()> {
    transaction.execute(
        "INSERT INTO counters(name, value) VALUES (?1, 1) \
         ON CONFLICT(name) DO UPDATE SET value = value + 1",
        params![name],
    )?;
    Ok(())
}

fn upsert_worker(transaction: &Transaction<'_>, worker: &WorkerRecord) -> StoreResult<()> {
    let gpus = serde_json::to_string(&worker.gpus).unwrap_or_else(|_| "[]".to_string());
    transaction.execute(
        "INSERT INTO workers(id, host, gpus, registered_ms, last_heartbeat_ms) VALUES (?1, ?2, ?3, ?4, ?4) \
         ON CONFLICT(id) DO UPDATE SET host = ?2, gpus = ?3, last_heartbeat_ms = ?4",
        params![worker.id.as_str(), worker.host, gpus, to_sql(worker.last_heartbeat.0)],
    )?;
    Ok(())
}

fn sweep_counts(transaction: &Transaction<'_>) -> StoreResult<HashMap<i64, Vec<JobState>>> {
    let mut statement = transaction
        .prepare("SELECT sweep_id, state, COUNT(*) FROM jobs GROUP BY sweep_id, state")?;
    let rows: Vec<(i64, String, i64)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut counts: HashMap<i64, Vec<JobState>> = HashMap::new();
    for (sweep, state, count) in rows {
        let state = state_of(0, &state)?;
        counts
            .entry(sweep)
            .or_default()
            .extend(std::iter::repeat_n(state, from_sql(count) as usize));
    }
    Ok(counts)
}

fn build_snapshot(
    transaction: &Transaction<'_>,
    now: Timestamp,
    config: SchedulerConfig,
) -> StoreResult<Snapshot> {
    const ACTIVE: &str = "state IN ('queued', 'running')";
    let mut statement = transaction.prepare(&format!(
        "SELECT id, key, state, gpus, attempts, max_attempts, epoch, queued_ms, finished_ms, last_error \
         FROM jobs WHERE {ACTIVE} OR id IN \
         (SELECT d.dep_id FROM job_deps d JOIN jobs a ON a.id = d.job_id WHERE a.{ACTIVE}) ORDER BY id"
    ))?;
    type Row6 = (
        i64,
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        Option<i64>,
        Option<String>,
    );
    let rows: Vec<Row6> = statement
        .query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
                row.get(8)?,
                row.get(9)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut deps: HashMap<i64, Vec<JobId>> = HashMap::new();
    let mut statement = transaction.prepare(&format!(
        "SELECT d.job_id, d.dep_id FROM job_deps d JOIN jobs a ON a.id = d.job_id WHERE a.{ACTIVE}"
    ))?;
    let mut query = statement.query([])?;
    while let Some(row) = query.next()? {
        deps.entry(row.get(0)?)
            .or_default()
            .push(JobId(from_sql(row.get(1)?)));
    }
    let mut leases: HashMap<i64, Vec<LeaseView>> = HashMap::new();
    let mut statement =
        transaction.prepare("SELECT job_id, worker_id, ranks, deadline_ms FROM leases")?;
    let mut query = statement.query([])?;
    while let Some(row) = query.next()? {
        let job: i64 = row.get(0)?;
        leases.entry(job).or_default().push(LeaseView {
            worker: worker_id("leases", row.get(1)?)?,
            ranks: parse_ranks(job, &row.get::<_, String>(2)?)?,
            deadline: timestamp(row.get(3)?),
        });
    }
    let mut jobs = Vec::with_capacity(rows.len());
    for (id, key, state, gpus, attempts, max_attempts, epoch, queued_ms, finished_ms, last_error) in
        rows
    {
        jobs.push(JobView {
            id: JobId(from_sql(id)),
            key,
            state: state_of(id, &state)?,
            deps: deps.remove(&id).unwrap_or_default(),
            gpus: u32::try_from(gpus).unwrap_or(1),
            attempts: u32::try_from(attempts).unwrap_or(0),
            max_attempts: u32::try_from(max_attempts).unwrap_or(1),
            epoch: from_sql(epoch),
            queued_at: timestamp(queued_ms),
            finished_at: finished_ms.map(timestamp),
            last_error,
            leases: leases.remove(&id).unwrap_or_default(),
        });
    }
    let mut statement =
        transaction.prepare("SELECT id, gpus, last_heartbeat_ms FROM workers ORDER BY id")?;
    let worker_rows: Vec<(String, String, i64)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut workers = Vec::with_capacity(worker_rows.len());
    for (id, gpus, heartbeat) in worker_rows {
        let gpus = parse_gpus(&id, &gpus)?;
        let record = WorkerRecord {
            id: worker_id("workers", id)?,
            host: String::new(),
            gpus,
            last_heartbeat: timestamp(heartbeat),
        };
        workers.push(WorkerView {
            slots: record.slots(),
            id: record.id,
            last_heartbeat: record.last_heartbeat,
        });
    }
    Ok(Snapshot {
        now,
        config,
        jobs,
        workers,
    })
}

fn changed_one(what: &str, job: JobId, rows: usize) -> StoreResult<()> {
    if rows == 1 {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        table: "jobs",
        column: "state",
        row: to_sql(job.0),
        detail: format!("scheduler decision {what} matched {rows} rows; the snapshot was stale"),
    })
}

fn apply_decision(
    transaction: &Transaction<'_>,
    decision: &Decision,
    now: Timestamp,
) -> StoreResult<()> {
    match decision {
        Decision::Requeue { job, epoch, reason } => {
            let rows = transaction.execute(
                "UPDATE jobs SET state = 'queued', queued_ms = ?3, last_error = ?4 \
                 WHERE id = ?1 AND state = 'running' AND epoch = ?2",
                params![to_sql(job.0), to_sql(*epoch), to_sql(now.0), reason],
            )?;
            changed_one("requeue", *job, rows)?;
            end_attempt(transaction, *job)?;
            bump_counter(transaction, LEASE_EXPIRIES)?;
            tracing::warn!(
                job = job.0,
                epoch,
                reason = reason.as_str(),
                "lease expired; job requeued"
            );
        }
        Decision::Fail { job, epoch, error } => {
            let rows = transaction.execute(
                "UPDATE jobs SET state = 'failed', finished_ms = ?3, last_error = ?4 \
                 WHERE id = ?1 AND state = 'running' AND epoch = ?2",
                params![to_sql(job.0), to_sql(*epoch), to_sql(now.0), error],
            )?;
            changed_one("fail", *job, rows)?;
            end_attempt(transaction, *job)?;
            bump_counter(transaction, LEASE_EXPIRIES)?;
            tracing::warn!(
                job = job.0,
                epoch,
                error = error.as_str(),
                "lease expired on the last attempt; job failed"
            );
        }
        Decision::Skip { job, reason } => {
            let rows = transaction.execute(
                "UPDATE jobs SET state = 'skipped', finished_ms = ?2, last_error = ?3 \
                 WHERE id = ?1 AND state = 'queued'",
                params![to_sql(job.0), to_sql(now.0), reason],
            )?;
            changed_one("skip", *job, rows)?;
            tracing::info!(job = job.0, reason = reason.as_str(), "job skipped");
        }
        Decision::Assign(assignment) => {
            let rows = transaction.execute(
                "UPDATE jobs SET state = 'running', epoch = ?2, attempts = ?3, started_ms = ?4, \
                 progress_step = 0, progress_total = 0, progress_loss = NULL, progress_tps = NULL, \
                 progress_message = '' WHERE id = ?1 AND state = 'queued'",
                params![
                    to_sql(assignment.job.0),
                    to_sql(assignment.epoch),
                    assignment.attempt,
                    to_sql(now.0)
                ],
            )?;
            changed_one("assign", assignment.job, rows)?;
            for placement in &assignment.placements {
                transaction.execute(
                    "INSERT INTO leases(job_id, worker_id, epoch, ranks, world_size, deadline_ms, delivered) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
                    params![
                        to_sql(assignment.job.0),
                        placement.worker.as_str(),
                        to_sql(assignment.epoch),
                        ranks_json(&placement.ranks),
                        assignment.world_size,
                        to_sql(assignment.deadline.0)
                    ],
                )?;
            }
            tracing::info!(
                job = assignment.job.0,
                epoch = assignment.epoch,
                attempt = assignment.attempt,
                workers = ?assignment.placements.iter().map(|p| p.worker.as_str()).collect::<Vec<_>>(),
                "job assigned"
            );
        }
    }
    Ok(())
}

impl Store for SqliteStore {
    fn create_sweep(&self, sweep: NewSweep<'_>, now: Timestamp) -> StoreResult<SweepId> {
        let mut seen: HashSet<&JobKey> = HashSet::new();
        for job in sweep.jobs {
            for dep in &job.deps {
                if !seen.contains(dep) {
                    return Err(StoreError::InvalidPlan(format!(
                        "job {} depends on {}, which is not planned before it",
                        job.key, dep
                    )));
                }
            }
            if !seen.insert(&job.key) {
                return Err(StoreError::InvalidPlan(format!(
                    "job key {} planned twice",
                    job.key
                )));
            }
        }
        if sweep.max_attempts == 0 {
            return Err(StoreError::InvalidPlan(
                "max_attempts must be at least 1".to_string(),
            ));
        }
        self.write(|transaction| {
            transaction.execute(
                "INSERT INTO sweeps(name, file_name, spec_yaml, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![sweep.name, sweep.file_name, sweep.spec_yaml, to_sql(now.0)],
            )?;
            let sweep_id = transaction.last_insert_rowid();
            let mut ids: HashMap<&JobKey, i64> = HashMap::new();
            let mut insert_job = transaction.prepare(
                "INSERT INTO jobs(sweep_id, key, kind, model, task, params, gpus, state, max_attempts, \
                 created_ms, queued_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, ?9)",
            )?;
            let mut insert_dep = transaction.prepare("INSERT INTO job_deps(job_id, dep_id) VALUES (?1, ?2)")?;
            for job in sweep.jobs {
                insert_job.execute(params![
                    sweep_id,
                    job.key.0,
                    job.kind.name(),
                    job.model,
                    job.task,
                    job.params.to_string(),
                    job.gpus.max(1),
                    sweep.max_attempts,
                    to_sql(now.0)
                ])?;
                let job_id = transaction.last_insert_rowid();
                for dep in &job.deps {
                    insert_dep.execute(params![job_id, ids[dep]])?;
                }
                ids.insert(&job.key, job_id);
            }
            Ok(SweepId(from_sql(sweep_id)))
        })
    }

    fn find_sweeps_by_spec(&self, spec_yaml: &str) -> StoreResult<Vec<SweepId>> {
        self.read(|transaction| {
            let mut statement = transaction.prepare(
                "SELECT id FROM sweeps WHERE spec_yaml = ?1 AND cancelled_ms IS NULL ORDER BY id DESC",
            )?;
            let ids = statement
                .query_map(params![spec_yaml], |row| row.get::<_, i64>(0))?
                .map(|id| id.map(|id| SweepId(from_sql(id))))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ids)
        })
    }

    fn sweep_status(&self, sweep: SweepId) -> StoreResult<SweepStatus> {
        self.read(|transaction| {
            let record = sweep_record(transaction, sweep)?;
            let jobs = load_jobs(transaction, "jobs.sweep_id = ?1", to_sql(sweep.0))?;
            let counts = count_states(jobs.iter().map(|job| &job.state));
            Ok(SweepStatus {
                id: record.id,
                name: record.name,
                file_name: record.file_name,
                created: record.created,
                cancelled: record.cancelled,
                ended: has_ended(&counts),
                counts,
                jobs,
            })
        })
    }

    fn list_sweeps(&self) -> StoreResult<Vec<SweepSummary>> {
        self.read(|transaction| {
            let counts = sweep_counts(transaction)?;
            let mut statement = transaction.prepare(
                "SELECT id, name, created_ms, cancelled_ms FROM sweeps ORDER BY id DESC",
            )?;
            let rows: Vec<(i64, String, i64, Option<i64>)> = statement
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows
                .into_iter()
                .map(|(id, name, created, cancelled)| {
                    let states = counts.get(&id).cloned().unwrap_or_default();
                    let counts = count_states(states.iter());
                    SweepSummary {
                        id: SweepId(from_sql(id)),
                        name,
                        created: timestamp(created),
                        cancelled: cancelled.is_some(),
                        ended: has_ended(&counts),
                        counts,
                    }
                })
                .collect())
        })
    }

    fn sweep_results(&self, sweep: SweepId) -> StoreResult<SweepResults> {
        self.read(|transaction| {
            let record = sweep_record(transaction, sweep)?;
            let jobs = load_jobs(transaction, "jobs.sweep_id = ?1", to_sql(sweep.0))?;
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                let artifacts = artifact_infos(transaction, job.id)?
                    .into_iter()
                    .map(|record| record.info)
                    .collect();
                results.push(JobResult { job, artifacts });
            }
            Ok(SweepResults {
                sweep: record,
                jobs: results,
            })
        })
    }

    fn cancel_sweep(&self, sweep: SweepId, now: Timestamp) -> StoreResult<u32> {
        self.write(|transaction| {
            sweep_record(transaction, sweep)?;
            transaction.execute(
                "UPDATE sweeps SET cancelled_ms = ?2 WHERE id = ?1 AND cancelled_ms IS NULL",
                params![to_sql(sweep.0), to_sql(now.0)],
            )?;
            transaction.execute(
                "DELETE FROM leases WHERE job_id IN (SELECT id FROM jobs WHERE sweep_id = ?1 AND state = 'running')",
                params![to_sql(sweep.0)],
            )?;
            let cancelled = transaction.execute(
                "UPDATE jobs SET state = 'cancelled', finished_ms = ?2, last_error = 'sweep cancelled' \
                 WHERE sweep_id = ?1 AND state IN ('queued', 'running')",
                params![to_sql(sweep.0), to_sql(now.0)],
            )?;
            Ok(u32::try_from(cancelled).unwrap_or(u32::MAX))
        })
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
        let deadline = worker.last_heartbeat.plus(lease_ttl);
        self.write(|transaction| {
            upsert_worker(transaction, worker)?;
            let mut stop = Vec::new();
            for (job, epoch) in running {
                let extended = transaction.execute(
                    "UPDATE leases SET deadline_ms = MAX(deadline_ms, ?4), delivered = 1 \
                     WHERE job_id = ?1 AND worker_id = ?2 AND epoch = ?3 \
                     AND EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND state = 'running' AND epoch = ?3)",
                    params![to_sql(job.0), worker.id.as_str(), to_sql(*epoch), to_sql(deadline.0)],
                )?;
                if extended == 0 {
                    stop.push((*job, *epoch));
                }
            }
            transaction.execute(
                "UPDATE leases SET deadline_ms = MAX(deadline_ms, ?2) WHERE worker_id = ?1 AND delivered = 0",
                params![worker.id.as_str(), to_sql(deadline.0)],
            )?;
            Ok(stop)
        })
    }

    fn schedule_round(
        &self,
        now: Timestamp,
        config: SchedulerConfig,
        decide: &mut dyn FnMut(&Snapshot) -> Vec<Decision>,
    ) -> StoreResult<Vec<Decision>> {
        self.write(|transaction| {
            let snapshot = build_snapshot(transaction, now, config)?;
            let decisions = decide(&snapshot);
            for decision in &decisions {
                apply_decision(transaction, decision, now)?;
            }
            Ok(decisions)
        })
    }

    fn retire_worker(&self, worker: &WorkerId, now: Timestamp) -> StoreResult<Vec<JobId>> {
        self.write(|transaction| {
            let mut statement = transaction.prepare(
                "SELECT DISTINCT l.job_id FROM leases l JOIN jobs j ON j.id = l.job_id \
                 WHERE l.worker_id = ?1 AND j.state = 'running' AND j.epoch = l.epoch ORDER BY l.job_id",
            )?;
            let jobs: Vec<i64> = statement
                .query_map(params![worker.as_str()], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut requeued = Vec::with_capacity(jobs.len());
            for job in jobs {
                transaction.execute(
                    "UPDATE jobs SET state = 'queued', queued_ms = ?2, attempts = MAX(attempts - 1, 0), \
                     last_error = ?3 WHERE id = ?1",
                    params![
                        job,
                        to_sql(now.0),
                        format!("interrupted: worker {} left", worker.as_str())
                    ],
                )?;
                let job = JobId(from_sql(job));
                end_attempt(transaction, job)?;
                requeued.push(job);
            }
            transaction.execute(
                "DELETE FROM workers WHERE id = ?1",
                params![worker.as_str()],
            )?;
            Ok(requeued)
        })
    }

    fn take_assignments(&self, worker: &WorkerId) -> StoreResult<Vec<JobAssignment>> {
        self.write(|transaction| {
            let mut statement = transaction.prepare(
                "SELECT l.job_id, l.epoch, l.ranks, l.world_size FROM leases l JOIN jobs j ON j.id = l.job_id \
                 WHERE l.worker_id = ?1 AND l.delivered = 0 AND j.state = 'running' AND j.epoch = l.epoch \
                 ORDER BY l.job_id",
            )?;
            let leases: Vec<(i64, i64, String, i64)> = statement
                .query_map(params![worker.as_str()], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut assignments = Vec::with_capacity(leases.len());
            for (job_id, epoch, ranks, world_size) in leases {
                let job = job_record(transaction, JobId(from_sql(job_id)))?;
                let mut dependencies = Vec::with_capacity(job.deps.len());
                for dep in &job.deps {
                    let dep_record = job_record(transaction, *dep)?;
                    dependencies.push(DependencyOutput {
                        job: dep_record.id,
                        key: dep_record.key,
                        kind: dep_record.kind,
                        result: dep_record.result.unwrap_or(Value::Null),
                        artifacts: artifact_infos(transaction, *dep)?
                            .into_iter()
                            .map(|record| record.info)
                            .collect(),
                    });
                }
                let resume_from = artifact_infos(transaction, job.id)?
                    .into_iter()
                    .map(|record| record.info)
                    .filter(|info| info.kind == ArtifactKind::Checkpoint)
                    .max_by_key(|info| info.step);
                transaction.execute(
                    "UPDATE leases SET delivered = 1 WHERE job_id = ?1 AND worker_id = ?2",
                    params![job_id, worker.as_str()],
                )?;
                assignments.push(JobAssignment {
                    job: job.id,
                    sweep: job.sweep,
                    key: job.key,
                    kind: job.kind,
                    model: job.model,
                    task: job.task,
                    params: job.params,
                    epoch: from_sql(epoch),
                    attempt: job.attempts,
                    world_size: u32::try_from(world_size).unwrap_or(1),
                    local_ranks: parse_ranks(job_id, &ranks)?,
                    dependencies,
                    resume_from,
                });
            }
            Ok(assignments)
        })
    }

    fn lease_is_current(&self, lease: &LeaseRef) -> StoreResult<bool> {
        self.read(
            |transaction| Ok(stale_reason(&lease_state(transaction, lease)?, lease).is_none()),
        )
    }

    fn record_progress(&self, lease: &LeaseRef, progress: &Progress) -> StoreResult<ReportOutcome> {
        self.write(|transaction| {
            let current = lease_state(transaction, lease)?;
            if let Some(reason) = stale_reason(&current, lease) {
                return Ok(ReportOutcome::Ignored(reason));
            }
            transaction.execute(
                "UPDATE jobs SET progress_step = ?2, progress_total = ?3, progress_loss = ?4, \
                 progress_tps = ?5, progress_message = ?6 WHERE id = ?1",
                params![
                    to_sql(lease.job.0),
                    to_sql(progress.step),
                    to_sql(progress.total_steps),
                    progress.loss,
                    progress.tokens_per_second,
                    progress.message
                ],
            )?;
            Ok(ReportOutcome::Accepted)
        })
    }

    fn complete_job(
        &self,
        lease: &LeaseRef,
        result: &Value,
        cache_key: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome> {
        self.write(|transaction| {
            let current = lease_state(transaction, lease)?;
            if let Some(reason) = stale_reason(&current, lease) {
                return Ok(ReportOutcome::Ignored(reason));
            }
            let has_rank_zero = current
                .held_ranks
                .as_ref()
                .is_some_and(|ranks| ranks.iter().any(|slot| slot.rank == 0));
            if !has_rank_zero {
                return Ok(ReportOutcome::Ignored(format!(
                    "worker {} does not run rank 0 of job {}; only rank 0 reports results",
                    lease.worker, lease.job
                )));
            }
            transaction.execute(
                "UPDATE jobs SET state = 'succeeded', result = ?2, finished_ms = ?3 WHERE id = ?1",
                params![to_sql(lease.job.0), result.to_string(), to_sql(now.0)],
            )?;
            end_attempt(transaction, lease.job)?;
            if let Some(key) = cache_key.filter(|key| !key.is_empty()) {
                transaction.execute(
                    "INSERT INTO probe_cache(content_key, job_id, created_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(content_key) DO UPDATE SET job_id = ?2, created_ms = ?3",
                    params![key, to_sql(lease.job.0), to_sql(now.0)],
                )?;
            }
            Ok(ReportOutcome::Accepted)
        })
    }

    fn fail_job(
        &self,
        lease: &LeaseRef,
        error: &str,
        kind: FailureKind,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome> {
        self.write(|transaction| {
            let current = lease_state(transaction, lease)?;
            if let Some(reason) = stale_reason(&current, lease) {
                return Ok(ReportOutcome::Ignored(reason));
            }
            let (attempts, max_attempts): (i64, i64) = transaction.query_row(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ?1",
                params![to_sql(lease.job.0)],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let job = to_sql(lease.job.0);
            match kind {
                FailureKind::Interrupted => {
                    transaction.execute(
                        "UPDATE jobs SET state = 'queued', queued_ms = ?2, attempts = MAX(attempts - 1, 0), \
                         last_error = ?3 WHERE id = ?1",
                        params![job, to_sql(now.0), format!("interrupted: {error}")],
                    )?;
                }
                FailureKind::Retryable if attempts < max_attempts => {
                    transaction.execute(
                        "UPDATE jobs SET state = 'queued', queued_ms = ?2, last_error = ?3 WHERE id = ?1",
                        params![job, to_sql(now.0), format!("attempt {attempts} of {max_attempts}: {error}")],
                    )?;
                }
                FailureKind::Retryable | FailureKind::Permanent => {
                    let error = if kind == FailureKind::Permanent {
                        format!("attempt {attempts} failed permanently: {error}")
                    } else {
                        format!("attempt {attempts} of {max_attempts}: {error}")
                    };
                    transaction.execute(
                        "UPDATE jobs SET state = 'failed', finished_ms = ?2, last_error = ?3 WHERE id = ?1",
                        params![job, to_sql(now.0), error],
                    )?;
                }
            }
            end_attempt(transaction, lease.job)?;
            Ok(ReportOutcome::Accepted)
        })
    }

    fn put_artifact(
        &self,
        lease: &LeaseRef,
        artifact: &ArtifactRecord,
        now: Timestamp,
    ) -> StoreResult<ReportOutcome> {
        self.write(|transaction| {
            let current = lease_state(transaction, lease)?;
            if let Some(reason) = stale_reason(&current, lease) {
                return Ok(ReportOutcome::Ignored(reason));
            }
            let info = &artifact.info;
            transaction.execute(
                "INSERT INTO artifacts(job_id, name, kind, step, path, sha256, size, created_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(job_id, name) DO UPDATE SET \
                 kind = ?3, step = ?4, path = ?5, sha256 = ?6, size = ?7, created_ms = ?8",
                params![
                    to_sql(lease.job.0),
                    info.name,
                    info.kind.name(),
                    to_sql(info.step),
                    artifact.relative_path,
                    info.sha256,
                    to_sql(info.size),
                    to_sql(now.0)
                ],
            )?;
            Ok(ReportOutcome::Accepted)
        })
    }

    fn artifact(&self, job: JobId, name: &str) -> StoreResult<Option<ArtifactRecord>> {
        self.read(|transaction| {
            Ok(artifact_infos(transaction, job)?
                .into_iter()
                .find(|record| record.info.name == name))
        })
    }

    fn artifacts(&self, job: JobId) -> StoreResult<Vec<ArtifactInfo>> {
        self.read(|transaction| {
            Ok(artifact_infos(transaction, job)?
                .into_iter()
                .map(|record| record.info)
                .collect())
        })
    }

    fn lookup_cache(
        &self,
        lease: &LeaseRef,
        cache_key: &str,
        now: Timestamp,
    ) -> StoreResult<Option<CacheHit>> {
        self.write(|transaction| {
            let current = lease_state(transaction, lease)?;
            if stale_reason(&current, lease).is_some() {
                return Ok(None);
            }
            let source: Option<i64> = transaction
                .query_row(
                    "SELECT c.job_id FROM probe_cache c JOIN jobs j ON j.id = c.job_id \
                     WHERE c.content_key = ?1 AND j.state = 'succeeded'",
                    params![cache_key],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(source) = source else {
                return Ok(None);
            };
            let source = JobId(from_sql(source));
            let record = job_record(transaction, source)?;
            let artifacts = artifact_infos(transaction, source)?;
            let mut attached = Vec::with_capacity(artifacts.len());
            for artifact in artifacts {
                if source != lease.job {
                    transaction.execute(
                        "INSERT INTO artifacts(job_id, name, kind, step, path, sha256, size, created_ms) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(job_id, name) DO UPDATE SET \
                         kind = ?3, step = ?4, path = ?5, sha256 = ?6, size = ?7, created_ms = ?8",
                        params![
                            to_sql(lease.job.0),
                            artifact.info.name,
                            artifact.info.kind.name(),
                            to_sql(artifact.info.step),
                            artifact.relative_path,
                            artifact.info.sha256,
                            to_sql(artifact.info.size),
                            to_sql(now.0)
                        ],
                    )?;
                }
                attached.push(ArtifactInfo {
                    job: lease.job,
                    ..artifact.info
                });
            }
            Ok(Some(CacheHit {
                source,
                result: record.result.unwrap_or(Value::Null),
                artifacts: attached,
            }))
        })
    }

    fn publish_rendezvous(&self, lease: &LeaseRef, blob: &[u8]) -> StoreResult<ReportOutcome> {
        self.write(|transaction| {
            let current = lease_state(transaction, lease)?;
            if let Some(reason) = stale_reason(&current, lease) {
                return Ok(ReportOutcome::Ignored(reason));
            }
            let has_rank_zero = current
                .held_ranks
                .as_ref()
                .is_some_and(|ranks| ranks.iter().any(|slot| slot.rank == 0));
            if !has_rank_zero {
                return Ok(ReportOutcome::Ignored(format!(
                    "worker {} does not run rank 0 of job {}",
                    lease.worker, lease.job
                )));
            }
            transaction.execute(
                "INSERT INTO rendezvous(job_id, epoch, blob) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(job_id, epoch) DO UPDATE SET blob = ?3",
                params![to_sql(lease.job.0), to_sql(lease.epoch), blob],
            )?;
            Ok(ReportOutcome::Accepted)
        })
    }

    fn fetch_rendezvous(&self, lease: &LeaseRef) -> StoreResult<Option<Vec<u8>>> {
        self.read(|transaction| {
            let current = lease_state(transaction, lease)?;
            if stale_reason(&current, lease).is_some() {
                return Ok(None);
            }
            Ok(transaction
                .query_row(
                    "SELECT blob FROM rendezvous WHERE job_id = ?1 AND epoch = ?2",
                    params![to_sql(lease.job.0), to_sql(lease.epoch)],
                    |row| row.get(0),
                )
                .optional()?)
        })
    }

    fn extend_all_leases(&self, until: Timestamp) -> StoreResult<u32> {
        self.write(|transaction| {
            let rows = transaction.execute(
                "UPDATE leases SET deadline_ms = ?1 WHERE deadline_ms < ?1",
                params![to_sql(until.0)],
            )?;
            Ok(u32::try_from(rows).unwrap_or(u32::MAX))
        })
    }

    fn metrics(&self, now: Timestamp, worker_timeout: Duration) -> StoreResult<MetricsSnapshot> {
        self.read(|transaction| {
            let mut statement =
                transaction.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
            let rows: Vec<(String, i64)> = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut jobs_by_state: BTreeMap<JobState, u32> =
                JobState::ALL.into_iter().map(|state| (state, 0)).collect();
            for (state, count) in rows {
                jobs_by_state.insert(
                    state_of(0, &state)?,
                    u32::try_from(count).unwrap_or(u32::MAX),
                );
            }
            let since = now
                .0
                .saturating_sub(u64::try_from(worker_timeout.as_millis()).unwrap_or(u64::MAX));
            let live_workers: i64 = transaction.query_row(
                "SELECT COUNT(*) FROM workers WHERE last_heartbeat_ms >= ?1",
                params![to_sql(since)],
                |row| row.get(0),
            )?;
            let known_workers: i64 =
                transaction.query_row("SELECT COUNT(*) FROM workers", [], |row| row.get(0))?;
            let lease_expiries: Option<i64> = transaction
                .query_row(
                    "SELECT value FROM counters WHERE name = ?1",
                    params![LEASE_EXPIRIES],
                    |row| row.get(0),
                )
                .optional()?;
            let mut statement = transaction.prepare(
                "SELECT id, kind, finished_ms - started_ms FROM jobs WHERE state = 'succeeded' \
                 AND started_ms IS NOT NULL AND finished_ms IS NOT NULL",
            )?;
            let rows: Vec<(i64, String, i64)> = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut job_durations = Vec::with_capacity(rows.len());
            for (id, kind, millis) in rows {
                job_durations.push((kind_of(id, &kind)?, from_sql(millis) as f64 / 1000.0));
            }
            Ok(MetricsSnapshot {
                jobs_by_state,
                live_workers: u32::try_from(live_workers).unwrap_or(0),
                known_workers: u32::try_from(known_workers).unwrap_or(0),
                lease_expiries: from_sql(lease_expiries.unwrap_or(0)),
                job_durations,
            })
        })
    }
}
