//! The counts behind the coordinator's `/metrics`: jobs per state, live and known
//! workers, lease expiries and the run time of succeeded jobs.
//!
//! It does not format them (`crate::service::metrics` does).

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::{params, OptionalExtension};

use super::leasing::LEASE_EXPIRIES;
use super::rows::{from_sql, kind_of, state_of, to_sql};
use super::SqliteStore;
use crate::domain::{JobState, MetricsSnapshot, Timestamp};
use crate::store::StoreResult;

pub(super) fn metrics(
    store: &SqliteStore,
    now: Timestamp,
    worker_timeout: Duration,
) -> StoreResult<MetricsSnapshot> {
    store.read(|transaction| {
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
