//! The store's integrity check (`lorasweep coordinator --check`): SQLite's own checks, the
//! invariants the coordinator keeps between tables, and, given the artifact directory, that
//! every recorded artifact is a whole file with its recorded size and SHA-256.
//!
//! It reads; it repairs nothing.

use std::path::Path;

use rusqlite::Transaction;

use super::SqliteStore;
use crate::domain::JobState;
use crate::store::StoreResult;

/// What [`SqliteStore::check_integrity`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Jobs in the store.
    pub jobs: u64,
    /// Artifact records (and, with the directory, files checked).
    pub artifacts: u64,
    /// Each broken invariant, one sentence naming the row.
    pub violations: Vec<String>,
}

impl SqliteStore {
    /// Checks the database (SQLite's `integrity_check` and `foreign_key_check`) and the
    /// coordinator's invariants: every job in a known state; a finished job (succeeded,
    /// failed, skipped, cancelled) with its finish time and no lease left; a succeeded job with
    /// its result; attempts within the job's maximum; a running job with a lease of its
    /// epoch. With `artifact_dir`, every artifact record's file exists with the recorded size
    /// and SHA-256.
    pub fn check_integrity(&self, artifact_dir: Option<&Path>) -> StoreResult<IntegrityReport> {
        self.read(|transaction| check(transaction, artifact_dir))
    }
}

fn check(
    transaction: &Transaction<'_>,
    artifact_dir: Option<&Path>,
) -> StoreResult<IntegrityReport> {
    let mut report = IntegrityReport::default();
    let sqlite: Vec<String> = transaction
        .prepare("PRAGMA integrity_check")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if sqlite != ["ok"] {
        report
            .violations
            .extend(sqlite.into_iter().map(|line| format!("sqlite: {line}")));
    }
    let dangling: Vec<(String, i64, String)> = transaction
        .prepare("PRAGMA foreign_key_check")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (table, row, parent) in dangling {
        report.violations.push(format!(
            "{table} row {row} refers to a missing {parent} row"
        ));
    }
    type JobRow = (i64, String, String, i64, i64, Option<i64>, bool, i64);
    let jobs: Vec<JobRow> = transaction
        .prepare(
            "SELECT j.id, j.key, j.state, j.attempts, j.max_attempts, j.finished_ms,
                    j.result IS NOT NULL,
                    (SELECT COUNT(*) FROM leases l WHERE l.job_id = j.id AND l.epoch = j.epoch)
             FROM jobs j ORDER BY j.id",
        )?
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
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    report.jobs = jobs.len() as u64;
    for (id, key, state, attempts, max_attempts, finished, has_result, leases) in jobs {
        let job = format!("job {id} ({key})");
        let Some(state) = JobState::from_name(&state) else {
            report
                .violations
                .push(format!("{job} is in an unknown state {state:?}"));
            continue;
        };
        if attempts > max_attempts {
            report.violations.push(format!(
                "{job} has {attempts} attempts, more than its maximum {max_attempts}"
            ));
        }
        match state {
            JobState::Queued => {}
            JobState::Running if leases == 0 => report
                .violations
                .push(format!("{job} is running with no lease of its epoch")),
            JobState::Running => {}
            JobState::Succeeded | JobState::Failed | JobState::Skipped | JobState::Cancelled => {
                if finished.is_none() {
                    report
                        .violations
                        .push(format!("{job} is {} with no finish time", state.name()));
                }
                if leases > 0 {
                    report
                        .violations
                        .push(format!("{job} is {} but still leased", state.name()));
                }
                if state == JobState::Succeeded && !has_result {
                    report
                        .violations
                        .push(format!("{job} succeeded with no result"));
                }
            }
        }
    }
    let artifacts: Vec<(i64, String, String, String, i64)> = transaction
        .prepare("SELECT job_id, name, path, sha256, size FROM artifacts ORDER BY job_id, name")?
        .query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    report.artifacts = artifacts.len() as u64;
    if let Some(root) = artifact_dir {
        for (job, name, path, sha256, size) in artifacts {
            let file = root.join(&path);
            match crate::service::artifacts::digest_file(&file) {
                Ok((actual, actual_size)) if actual == sha256 && actual_size as i64 == size => {}
                Ok((actual, actual_size)) => report.violations.push(format!(
                    "artifact {name} of job {job} ({}) has {actual_size} bytes and sha256 {actual}; {size} bytes and {sha256} were recorded",
                    file.display()
                )),
                Err(error) => report.violations.push(format!(
                    "artifact {name} of job {job} ({}) cannot be read: {error}",
                    file.display()
                )),
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_store_is_sound_and_a_broken_invariant_is_named() {
        let store = SqliteStore::open_in_memory().unwrap();
        let report = store.check_integrity(None).unwrap();
        assert_eq!(report, IntegrityReport::default());
        store
            .write(|transaction| {
                transaction.execute_batch(
                    "INSERT INTO sweeps (id, name, file_name, spec_yaml, created_ms)
                         VALUES (1, 's', 's.yaml', '', 0);
                     INSERT INTO jobs (id, sweep_id, key, kind, model, task, params, gpus, state,
                                       attempts, max_attempts, created_ms, queued_ms)
                         VALUES (7, 1, 'train-a', 'train', 'm', 't', '{}', 0, 'succeeded', 4, 3, 0, 0);",
                )?;
                Ok(())
            })
            .unwrap();
        let report = store.check_integrity(None).unwrap();
        assert_eq!(report.jobs, 1);
        assert_eq!(
            report.violations,
            [
                "job 7 (train-a) has 4 attempts, more than its maximum 3",
                "job 7 (train-a) is succeeded with no finish time",
                "job 7 (train-a) succeeded with no result",
            ]
        );
    }

    #[test]
    fn an_artifact_file_that_differs_from_its_record_is_a_violation() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_memory().unwrap();
        std::fs::create_dir_all(dir.path().join("jobs/1/e1")).unwrap();
        std::fs::write(dir.path().join("jobs/1/e1/a.bin"), b"half").unwrap();
        let (sha, _) =
            crate::service::artifacts::digest_file(&dir.path().join("jobs/1/e1/a.bin")).unwrap();
        store
            .write(|transaction| {
                transaction.execute_batch(&format!(
                    "INSERT INTO sweeps (id, name, file_name, spec_yaml, created_ms)
                         VALUES (1, 's', 's.yaml', '', 0);
                     INSERT INTO jobs (id, sweep_id, key, kind, model, task, params, gpus, state,
                                       max_attempts, created_ms, queued_ms)
                         VALUES (1, 1, 'train-a', 'train', 'm', 't', '{{}}', 0, 'queued', 3, 0, 0);
                     INSERT INTO artifacts (job_id, name, kind, step, path, sha256, size, created_ms)
                         VALUES (1, 'a.bin', 'output', 0, 'jobs/1/e1/a.bin', '{sha}', 4, 0),
                                (1, 'b.bin', 'output', 0, 'jobs/1/e1/b.bin', '{sha}', 8, 0);"
                ))?;
                Ok(())
            })
            .unwrap();
        let report = store.check_integrity(Some(dir.path())).unwrap();
        assert_eq!(report.artifacts, 2);
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
        assert!(report.violations[0].contains("artifact b.bin of job 1"));
        // The whole file as recorded is sound; one byte changed is not.
        std::fs::write(dir.path().join("jobs/1/e1/a.bin"), b"hal!").unwrap();
        let report = store.check_integrity(Some(dir.path())).unwrap();
        assert_eq!(report.violations.len(), 2, "{:?}", report.violations);
    }
}
