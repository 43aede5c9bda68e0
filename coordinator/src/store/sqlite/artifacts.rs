//! Artifacts and the probe cache: the artifact records of a job, storing one under a
//! current lease, looking them up, and a cache lookup that attaches a cached job's
//! artifacts to the asking job.
//!
//! It does not hold the files (the coordinator's artifact folder does) and does not fill
//! the probe cache (a probe's success does, in `reports`).

use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::Value;

use super::reports::{lease_state, stale_reason};
use super::rows::{from_sql, job_record, to_sql};
use super::SqliteStore;
use crate::domain::{
    ArtifactInfo, ArtifactKind, ArtifactRecord, CacheHit, ReportOutcome, Timestamp,
};
use crate::ids::JobId;
use crate::store::{LeaseRef, StoreError, StoreResult};

pub(super) fn artifact_infos(
    transaction: &Transaction<'_>,
    job: JobId,
) -> StoreResult<Vec<ArtifactRecord>> {
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

pub(super) fn put_artifact(
    store: &SqliteStore,
    lease: &LeaseRef,
    artifact: &ArtifactRecord,
    now: Timestamp,
) -> StoreResult<ReportOutcome> {
    store.write(|transaction| {
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

pub(super) fn artifact(
    store: &SqliteStore,
    job: JobId,
    name: &str,
) -> StoreResult<Option<ArtifactRecord>> {
    store.read(|transaction| {
        Ok(artifact_infos(transaction, job)?
            .into_iter()
            .find(|record| record.info.name == name))
    })
}

pub(super) fn artifacts(store: &SqliteStore, job: JobId) -> StoreResult<Vec<ArtifactInfo>> {
    store.read(|transaction| {
        Ok(artifact_infos(transaction, job)?
            .into_iter()
            .map(|record| record.info)
            .collect())
    })
}

pub(super) fn lookup_cache(
    store: &SqliteStore,
    lease: &LeaseRef,
    cache_key: &str,
    now: Timestamp,
) -> StoreResult<Option<CacheHit>> {
    store.write(|transaction| {
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
