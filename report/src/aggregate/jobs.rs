//! The tidy per-job table ([`JobTable`], written as `results.csv` and `results.json`): one
//! row per job with its ids, state, attempts and timings, every train, probe and eval
//! parameter, the result columns in a fixed order, then metrics and shares by kind.
//!
//! It does not aggregate over seeds or configurations (`configs`, `page`) and does not
//! format the table (`crate::tables`).

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{json, Map, Value};

use lorasweep_coordinator::domain::JobResult;
use lorasweep_coordinator::graph::JobKind;
use lorasweep_coordinator::ids::JobId;

use super::params::flatten;

/// One row per job: ids, state, attempts, timings, every parameter and every metric.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobTable {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows, each with a value per column (null when it does not apply).
    pub rows: Vec<Vec<Value>>,
}

/// Result fields written in this order (after the ids, state, timings and parameters).
const RESULT_COLUMNS: [&str; 13] = [
    "score",
    "n",
    "trainable_parameters",
    "final_loss",
    "tokens",
    "tokens_per_s",
    "wall_s",
    "resumed_from",
    "dominant",
    "top1_share",
    "argmax_stability",
    "estimator",
    "a_init",
];

pub(super) fn job_table(jobs: &[JobResult], by_id: &HashMap<JobId, &JobResult>) -> JobTable {
    let mut records: Vec<Map<String, Value>> = Vec::with_capacity(jobs.len());
    for outcome in jobs {
        let job = &outcome.job;
        let mut record = Map::new();
        let mut put = |key: &str, value: Value| {
            record.insert(key.to_string(), value);
        };
        put("job_id", json!(job.id.0));
        put("key", json!(job.key.0));
        put("kind", json!(job.kind.name()));
        put("model", json!(job.model));
        put("task", json!(job.task));
        put("state", json!(job.state.name()));
        put("attempts", json!(job.attempts));
        put("max_attempts", json!(job.max_attempts));
        put("queued_at_ms", json!(job.queued_at.0));
        put("started_at_ms", json!(job.started_at.map(|time| time.0)));
        put("finished_at_ms", json!(job.finished_at.map(|time| time.0)));
        put(
            "run_s",
            match (job.started_at, job.finished_at) {
                (Some(started), Some(finished)) => {
                    json!(finished.millis_since(started) as f64 / 1000.0)
                }
                _ => Value::Null,
            },
        );
        put("last_error", json!(job.last_error));
        let train = match job.kind {
            JobKind::Train => Some(job),
            JobKind::Eval => job
                .deps
                .iter()
                .filter_map(|dep| by_id.get(dep))
                .find(|dep| dep.job.kind == JobKind::Train)
                .map(|dep| &dep.job),
            JobKind::Probe => None,
        };
        if let Some(train) = train {
            for (key, value) in flatten(&train.params) {
                match key.strip_prefix("probe.") {
                    Some(probe_key) => record.insert(format!("probe.{probe_key}"), value),
                    None => record.insert(format!("train.{key}"), value),
                };
            }
        }
        let prefix = match job.kind {
            JobKind::Probe => "probe",
            JobKind::Eval => "eval",
            JobKind::Train => "",
        };
        if !prefix.is_empty() {
            for (key, value) in flatten(&job.params) {
                record.insert(format!("{prefix}.{key}"), value);
            }
        }
        if let Some(result) = &job.result {
            for column in RESULT_COLUMNS {
                if let Some(value) = result.get(column) {
                    record.insert(column.to_string(), value.clone());
                }
            }
            if let Some(Value::Array(modules)) = result.get("modules") {
                record.insert("adapter_modules".to_string(), json!(modules.len()));
            }
            for nested in ["metrics", "share_by_kind"] {
                if let Some(Value::Object(map)) = result.get(nested) {
                    for (key, value) in map {
                        record.insert(format!("{nested}.{key}"), value.clone());
                    }
                }
            }
        }
        records.push(record);
    }
    let fixed = [
        "job_id",
        "key",
        "kind",
        "model",
        "task",
        "state",
        "attempts",
        "max_attempts",
        "queued_at_ms",
        "started_at_ms",
        "finished_at_ms",
        "run_s",
    ];
    let present: BTreeSet<&String> = records.iter().flat_map(|record| record.keys()).collect();
    let mut columns: Vec<String> = fixed.iter().map(|name| name.to_string()).collect();
    for prefix in ["train.", "probe.", "eval."] {
        columns.extend(
            present
                .iter()
                .filter(|name| name.starts_with(prefix))
                .map(|name| name.to_string()),
        );
    }
    columns.extend(
        RESULT_COLUMNS
            .iter()
            .chain(&["adapter_modules"])
            .filter(|name| present.iter().any(|present| present == *name))
            .map(|name| name.to_string()),
    );
    for prefix in ["metrics.", "share_by_kind."] {
        columns.extend(
            present
                .iter()
                .filter(|name| name.starts_with(prefix))
                .map(|name| name.to_string()),
        );
    }
    columns.push("last_error".to_string());
    let rows = records
        .iter()
        .map(|record| {
            columns
                .iter()
                .map(|column| record.get(column).cloned().unwrap_or(Value::Null))
                .collect()
        })
        .collect();
    JobTable { columns, rows }
}
