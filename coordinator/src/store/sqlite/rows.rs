//! Reading rows back: ids and timestamps between Rust and SQLite integers, JSON and enum
//! columns checked as they are read (a bad value is [`StoreError::Corrupt`], naming the
//! table, column and row), and whole job records with their dependencies and lease holders.
//!
//! It does not write anything, and knows no sweep, lease or artifact rules.

use std::collections::HashMap;

use rusqlite::{params, Row, Transaction};
use serde_json::Value;

use crate::domain::{job_kind_from_name, JobRecord, JobState, Progress, RankSlot, Timestamp};
use crate::graph::{JobKey, JobKind};
use crate::ids::{JobId, SweepId, WorkerId};
use crate::store::{StoreError, StoreResult};

const JOB_COLUMNS: &str = "id, sweep_id, key, kind, model, task, params, gpus, state, attempts, \
     max_attempts, epoch, last_error, result, queued_ms, started_ms, finished_ms, \
     progress_step, progress_total, progress_loss, progress_tps, progress_message";

pub(super) fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn timestamp(value: i64) -> Timestamp {
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

pub(super) fn parse_ranks(job: i64, text: &str) -> StoreResult<Vec<RankSlot>> {
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

pub(super) fn ranks_json(ranks: &[RankSlot]) -> String {
    let pairs: Vec<(u32, u32)> = ranks.iter().map(|slot| (slot.rank, slot.gpu)).collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_string())
}

pub(super) fn parse_gpus(worker: &str, text: &str) -> StoreResult<Vec<u32>> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
        table: "workers",
        column: "gpus",
        row: 0,
        detail: format!("worker {worker}: {error}"),
    })
}

pub(super) fn worker_id(table: &'static str, text: String) -> StoreResult<WorkerId> {
    WorkerId::new(text).map_err(|error| StoreError::Corrupt {
        table,
        column: "worker_id",
        row: 0,
        detail: error.to_string(),
    })
}

pub(super) fn kind_of(row: i64, name: &str) -> StoreResult<JobKind> {
    job_kind_from_name(name).ok_or_else(|| StoreError::Corrupt {
        table: "jobs",
        column: "kind",
        row,
        detail: format!("unknown job kind {name:?}"),
    })
}

pub(super) fn state_of(row: i64, name: &str) -> StoreResult<JobState> {
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

/// Jobs matching `filter` (an SQL condition on `jobs`, with `?1` bound to `argument`), with
/// their dependencies and lease holders, in id order.
pub(super) fn load_jobs(
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

pub(super) fn job_record(transaction: &Transaction<'_>, job: JobId) -> StoreResult<JobRecord> {
    load_jobs(transaction, "jobs.id = ?1", to_sql(job.0))?
        .pop()
        .ok_or_else(|| StoreError::NotFound {
            what: "job",
            id: job.to_string(),
        })
}
