//! Parameters as the report reads them: flattened to dotted keys ([`flatten`]), the train
//! fields that vary across a sweep and their order, the baseline's settings, row labels,
//! plain-text values ([`plain`]), file-name parts ([`file_part`]) and the lenient, typed
//! read of a stored job's parameters ([`StoredParams`]).
//!
//! It does not build any table: the configuration rows are in `configs`, the PAGE
//! findings in `page` and the per-job table in `jobs`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{json, Value};

use lorasweep_contract::{JobKey, Metric};
use lorasweep_coordinator::domain::{JobRecord, JobResult};
use lorasweep_coordinator::graph::{canonical_json, JobKind};
use lorasweep_coordinator::spec::Sweep;

/// Train fields shown first when they vary, in this order; the others follow by name.
const LEADING_FIELDS: [&str; 4] = ["placement", "variant", "rank", "alpha"];

/// The value of a JSON scalar as plain text (strings without quotes).
pub fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(";"),
        other => other.to_string(),
    }
}

/// Parameters flattened to dotted keys (`probe.rank`); arrays and scalars are leaves.
pub(super) fn flatten(params: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, inner, out);
                }
            }
            leaf => {
                out.insert(prefix.to_string(), leaf.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", params, &mut out);
    out
}

/// The train settings (but the seed) that take more than one non-null value across the
/// sweep's train jobs: the columns that tell configurations apart.
pub(super) fn varying_fields(jobs: &[JobResult]) -> Vec<String> {
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for job in jobs.iter().filter(|job| job.job.kind == JobKind::Train) {
        for (key, value) in flatten(&job.job.params) {
            if key != "seed" && !value.is_null() {
                values
                    .entry(key)
                    .or_default()
                    .insert(canonical_json(&value));
            }
        }
    }
    let mut fields: Vec<String> = values
        .into_iter()
        .filter(|(_, distinct)| distinct.len() > 1)
        .map(|(key, _)| key)
        .collect();
    fields.sort_by_key(|field| {
        (
            LEADING_FIELDS
                .iter()
                .position(|leading| leading == field)
                .unwrap_or(LEADING_FIELDS.len()),
            field.clone(),
        )
    });
    fields
}

/// The train settings of the baseline rows: the sweep file's `report.baseline` (or its
/// default, vanilla LoRA on every module); vanilla LoRA when the file cannot be read.
pub(super) fn baseline_overrides(spec: Option<&Sweep>) -> Vec<(String, Value)> {
    match spec {
        Some(spec) => spec
            .report
            .baseline
            .as_ref()
            .map(|baseline| {
                baseline
                    .fields
                    .iter()
                    .map(|(field, value)| (field.name().to_string(), value.to_json()))
                    .collect()
            })
            .unwrap_or_default(),
        None => vanilla_lora(),
    }
}

pub(super) fn vanilla_lora() -> Vec<(String, Value)> {
    vec![
        ("placement".to_string(), json!("all")),
        ("variant".to_string(), json!("lora")),
    ]
}

pub(super) fn label_of(
    fields: &[String],
    settings: &BTreeMap<String, Value>,
    fallback: &Value,
) -> String {
    if fields.is_empty() {
        return plain(fallback);
    }
    fields
        .iter()
        .map(|field| {
            let value = settings.get(field).map_or("-".to_string(), plain);
            match field.as_str() {
                "placement" | "variant" => value,
                "rank" => format!("r={value}"),
                other => format!("{other}={value}"),
            }
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The parameters the report reads from a stored job, typed by the job contract. Lenient: a
/// field that is missing or of another type (a job stored by another version) is `None`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(super) struct StoredParams {
    #[serde(deserialize_with = "lenient")]
    pub(super) seed: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) adapter: Option<JobKey>,
    #[serde(deserialize_with = "lenient")]
    pub(super) metric: Option<Metric>,
}

impl StoredParams {
    pub(super) fn of(job: &JobRecord) -> StoredParams {
        StoredParams::deserialize(&job.params).unwrap_or_default()
    }
}

/// A field that reads as `None` when it is null or does not fit its type.
pub(super) fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

/// A model or task id as part of a file name: letters, digits, `.`, `_`, `-`.
pub fn file_part(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || "._-".contains(character) {
                character
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|character| character == '-' || character == '.');
    if trimmed.is_empty() {
        "unnamed".to_string()
    } else {
        trimmed.chars().take(60).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_parts_are_plain_names() {
        assert_eq!(file_part("smollm2-135m"), "smollm2-135m");
        assert_eq!(file_part("/data/my task.jsonl"), "data-my-task.jsonl");
        assert_eq!(file_part("///"), "unnamed");
    }
}
