//! Leasing: workers and their heartbeats, the scheduler's [`Snapshot`] and how its
//! [`Decision`]s are applied (requeue, fail, skip, assign), handing newly leased jobs to
//! their workers (with dependency outputs and the checkpoint to resume from), retiring a
//! worker, extending every lease, and ending an attempt.
//!
//! It does not decide anything (`crate::scheduler` does) and does not take reports on a
//! lease (`reports`).

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::{params, Transaction};
use serde_json::Value;

use super::artifacts::artifact_infos;
use super::rows::{
    from_sql, job_record, parse_gpus, parse_ranks, ranks_json, state_of, timestamp, to_sql,
    worker_id,
};
use super::SqliteStore;
use crate::domain::{ArtifactKind, DependencyOutput, JobAssignment, Timestamp, WorkerRecord};
use crate::ids::{JobId, WorkerId};
use crate::scheduler::{Decision, JobView, LeaseView, SchedulerConfig, Snapshot, WorkerView};
use crate::store::{StoreError, StoreResult};

pub(super) const LEASE_EXPIRIES: &str = "lease_expiries";

pub(super) fn end_attempt(transaction: &Transaction<'_>, job: JobId) -> StoreResult<()> {
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

pub(super) fn upsert_worker(
    transaction: &Transaction<'_>,
    worker: &WorkerRecord,
) -> StoreResult<()> {
    let gpus = serde_json::to_string(&worker.gpus).unwrap_or_else(|_| "[]".to_string());
    transaction.execute(
        "INSERT INTO workers(id, host, gpus, registered_ms, last_heartbeat_ms) VALUES (?1, ?2, ?3, ?4, ?4) \
         ON CONFLICT(id) DO UPDATE SET host = ?2, gpus = ?3, last_heartbeat_ms = ?4",
        params![worker.id.as_str(), worker.host, gpus, to_sql(worker.last_heartbeat.0)],
    )?;
    Ok(())
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

pub(super) fn heartbeat(
    store: &SqliteStore,
    worker: &WorkerRecord,
    running: &[(JobId, u64)],
    lease_ttl: Duration,
) -> StoreResult<Vec<(JobId, u64)>> {
    let deadline = worker.last_heartbeat.plus(lease_ttl);
    store.write(|transaction| {
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

pub(super) fn schedule_round(
    store: &SqliteStore,
    now: Timestamp,
    config: SchedulerConfig,
    decide: &mut dyn FnMut(&Snapshot) -> Vec<Decision>,
) -> StoreResult<Vec<Decision>> {
    store.write(|transaction| {
        let snapshot = build_snapshot(transaction, now, config)?;
        let decisions = decide(&snapshot);
        for decision in &decisions {
            apply_decision(transaction, decision, now)?;
        }
        Ok(decisions)
    })
}

pub(super) fn retire_worker(
    store: &SqliteStore,
    worker: &WorkerId,
    now: Timestamp,
) -> StoreResult<Vec<JobId>> {
    store.write(|transaction| {
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

pub(super) fn take_assignments(
    store: &SqliteStore,
    worker: &WorkerId,
) -> StoreResult<Vec<JobAssignment>> {
    store.write(|transaction| {
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

pub(super) fn extend_all_leases(store: &SqliteStore, until: Timestamp) -> StoreResult<u32> {
    store.write(|transaction| {
        let rows = transaction.execute(
            "UPDATE leases SET deadline_ms = ?1 WHERE deadline_ms < ?1",
            params![to_sql(until.0)],
        )?;
        Ok(u32::try_from(rows).unwrap_or(u32::MAX))
    })
}
