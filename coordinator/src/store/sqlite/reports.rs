//! A worker's reports on its lease: whether the lease is still current (and why not), then
//! progress, success (rank 0 only; a probe's result enters the probe cache), failure
//! (requeued or failed by [`FailureKind`]) and the rendezvous blob rank 0 publishes for
//! the other ranks.
//!
//! It does not lease jobs (`leasing`) or store artifacts (`artifacts`).

use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::Value;

use super::leasing::end_attempt;
use super::rows::{from_sql, parse_ranks, state_of, to_sql};
use super::SqliteStore;
use crate::domain::{FailureKind, JobState, Progress, RankSlot, ReportOutcome, Timestamp};
use crate::store::{LeaseRef, StoreError, StoreResult};

/// The job's state and epoch, and whether `lease.worker` holds a lease on it at that
/// epoch (with the lease's ranks).
pub(super) struct LeaseState {
    state: JobState,
    epoch: u64,
    held_ranks: Option<Vec<RankSlot>>,
}

pub(super) fn lease_state(
    transaction: &Transaction<'_>,
    lease: &LeaseRef,
) -> StoreResult<LeaseState> {
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
pub(super) fn stale_reason(current: &LeaseState, lease: &LeaseRef) -> Option<String> {
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

pub(super) fn record_progress(
    store: &SqliteStore,
    lease: &LeaseRef,
    progress: &Progress,
) -> StoreResult<ReportOutcome> {
    store.write(|transaction| {
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

pub(super) fn complete_job(
    store: &SqliteStore,
    lease: &LeaseRef,
    result: &Value,
    cache_key: Option<&str>,
    now: Timestamp,
) -> StoreResult<ReportOutcome> {
    store.write(|transaction| {
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

pub(super) fn fail_job(
    store: &SqliteStore,
    lease: &LeaseRef,
    error: &str,
    kind: FailureKind,
    now: Timestamp,
) -> StoreResult<ReportOutcome> {
    store.write(|transaction| {
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

pub(super) fn publish_rendezvous(
    store: &SqliteStore,
    lease: &LeaseRef,
    blob: &[u8],
) -> StoreResult<ReportOutcome> {
    store.write(|transaction| {
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

pub(super) fn fetch_rendezvous(
    store: &SqliteStore,
    lease: &LeaseRef,
) -> StoreResult<Option<Vec<u8>>> {
    store.read(|transaction| {
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
