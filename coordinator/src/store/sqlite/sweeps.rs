//! Sweeps: creating one with its jobs and dependencies (the plan checked first), finding
//! sweeps by their file, a sweep's status, the list of sweeps, a sweep's results and
//! cancelling it.
//!
//! It does not lease, report on or schedule jobs (`leasing`, `reports`).

use std::collections::{HashMap, HashSet};

use rusqlite::{params, OptionalExtension, Transaction};

use super::artifacts::artifact_infos;
use super::rows::{from_sql, load_jobs, state_of, timestamp, to_sql};
use super::SqliteStore;
use crate::domain::{
    count_states, has_ended, JobResult, JobState, SweepRecord, SweepResults, SweepStatus,
    SweepSummary, Timestamp,
};
use crate::graph::JobKey;
use crate::ids::SweepId;
use crate::store::{NewSweep, StoreError, StoreResult};

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

pub(super) fn create_sweep(
    store: &SqliteStore,
    sweep: NewSweep<'_>,
    now: Timestamp,
) -> StoreResult<SweepId> {
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
    store.write(|transaction| {
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
        let mut insert_dep =
            transaction.prepare("INSERT INTO job_deps(job_id, dep_id) VALUES (?1, ?2)")?;
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

pub(super) fn find_sweeps_by_spec(
    store: &SqliteStore,
    spec_yaml: &str,
) -> StoreResult<Vec<SweepId>> {
    store.read(|transaction| {
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

pub(super) fn sweep_status(store: &SqliteStore, sweep: SweepId) -> StoreResult<SweepStatus> {
    store.read(|transaction| {
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

pub(super) fn list_sweeps(store: &SqliteStore) -> StoreResult<Vec<SweepSummary>> {
    store.read(|transaction| {
        let counts = sweep_counts(transaction)?;
        let mut statement = transaction
            .prepare("SELECT id, name, created_ms, cancelled_ms FROM sweeps ORDER BY id DESC")?;
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

pub(super) fn sweep_results(store: &SqliteStore, sweep: SweepId) -> StoreResult<SweepResults> {
    store.read(|transaction| {
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

pub(super) fn cancel_sweep(
    store: &SqliteStore,
    sweep: SweepId,
    now: Timestamp,
) -> StoreResult<u32> {
    store.write(|transaction| {
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
