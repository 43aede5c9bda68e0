//! Versioned schema migrations, applied in order on open. The version lives in SQLite's
//! `user_version`; migration `i` (0-based) takes the schema from version `i` to `i + 1`.
//! Never edit a released migration: add one.

use rusqlite::Connection;

use super::{StoreError, StoreResult};

/// Every migration, oldest first.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "
    CREATE TABLE sweeps (
        id            INTEGER PRIMARY KEY,
        name          TEXT    NOT NULL,
        file_name     TEXT    NOT NULL,
        spec_yaml     TEXT    NOT NULL,
        created_ms    INTEGER NOT NULL,
        cancelled_ms  INTEGER
    );

    CREATE TABLE jobs (
        id                INTEGER PRIMARY KEY,
        sweep_id          INTEGER NOT NULL REFERENCES sweeps(id),
        key               TEXT    NOT NULL,
        kind              TEXT    NOT NULL,
        model             TEXT    NOT NULL,
        task              TEXT    NOT NULL,
        params            TEXT    NOT NULL,
        gpus              INTEGER NOT NULL,
        state             TEXT    NOT NULL,
        attempts          INTEGER NOT NULL DEFAULT 0,
        max_attempts      INTEGER NOT NULL,
        epoch             INTEGER NOT NULL DEFAULT 0,
        last_error        TEXT,
        result            TEXT,
        created_ms        INTEGER NOT NULL,
        queued_ms         INTEGER NOT NULL,
        started_ms        INTEGER,
        finished_ms       INTEGER,
        progress_step     INTEGER NOT NULL DEFAULT 0,
        progress_total    INTEGER NOT NULL DEFAULT 0,
        progress_loss     REAL,
        progress_tps      REAL,
        progress_message  TEXT    NOT NULL DEFAULT '',
        UNIQUE (sweep_id, key)
    );
    CREATE INDEX jobs_by_state ON jobs(state);

    CREATE TABLE job_deps (
        job_id  INTEGER NOT NULL REFERENCES jobs(id),
        dep_id  INTEGER NOT NULL REFERENCES jobs(id),
        PRIMARY KEY (job_id, dep_id)
    );
    CREATE INDEX job_deps_by_dep ON job_deps(dep_id);

    -- One row per worker of a running job's gang.
    CREATE TABLE leases (
        job_id       INTEGER NOT NULL REFERENCES jobs(id),
        worker_id    TEXT    NOT NULL,
        epoch        INTEGER NOT NULL,
        ranks        TEXT    NOT NULL,
        world_size   INTEGER NOT NULL,
        deadline_ms  INTEGER NOT NULL,
        delivered    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, worker_id)
    );
    CREATE INDEX leases_by_worker ON leases(worker_id);

    CREATE TABLE artifacts (
        job_id      INTEGER NOT NULL REFERENCES jobs(id),
        name        TEXT    NOT NULL,
        kind        TEXT    NOT NULL,
        step        INTEGER NOT NULL,
        path        TEXT    NOT NULL,
        sha256      TEXT    NOT NULL,
        size        INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        PRIMARY KEY (job_id, name)
    );

    CREATE TABLE workers (
        id                 TEXT PRIMARY KEY,
        host               TEXT    NOT NULL,
        gpus               TEXT    NOT NULL,
        registered_ms      INTEGER NOT NULL,
        last_heartbeat_ms  INTEGER NOT NULL
    );

    CREATE TABLE probe_cache (
        content_key  TEXT PRIMARY KEY,
        job_id       INTEGER NOT NULL REFERENCES jobs(id),
        created_ms   INTEGER NOT NULL
    );

    CREATE TABLE rendezvous (
        job_id  INTEGER NOT NULL REFERENCES jobs(id),
        epoch   INTEGER NOT NULL,
        blob    BLOB    NOT NULL,
        PRIMARY KEY (job_id, epoch)
    );

    CREATE TABLE counters (
        name   TEXT PRIMARY KEY,
        value  INTEGER NOT NULL
    );
    ",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to [`SCHEMA_VERSION`], one transaction per migration.
pub(super) fn migrate(connection: &mut Connection) -> StoreResult<()> {
    let found: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.pragma_update(None, "user_version", version)?;
        transaction.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}
