//! The `sweep:` section: grid and zip axes, each a field and a list of values.

use std::collections::HashMap;

use super::fields::{read_value, Field, FieldValue};
use super::raw::{self, find, index_path, key_path, Context, Entry, Node, Value};
use super::validate::{AxisOrigins, Origin};
use super::{Axis, SweepAxes, MAX_POINTS};

pub(crate) fn read_axes(
    context: &mut Context,
    node: &Node,
    fixed: &HashMap<Field, Origin>,
) -> Option<(SweepAxes, AxisOrigins)> {
    let entries = raw::mapping(
        context,
        node,
        "sweep",
        "a mapping with `grid` and/or `zip`",
        &["grid", "zip"],
    )?;
    if entries.is_empty() {
        context.error(node.loc, "sweep", "`grid` and/or `zip`", "an empty mapping");
        return None;
    }
    let mut seen: HashMap<Field, Origin> = HashMap::new();
    let grid = match find(entries, "grid") {
        Some(entry) => read_axis_group(context, &entry.value, "sweep.grid", fixed, &mut seen, true),
        None => Some((Vec::new(), Vec::new())),
    };
    let zip = match find(entries, "zip") {
        Some(entry) => read_axis_group(context, &entry.value, "sweep.zip", fixed, &mut seen, false)
            .and_then(|(axes, origins)| check_zip(context, &entry.value, axes, origins)),
        None => Some((Vec::new(), Vec::new())),
    };
    let ((grid, grid_origins), (zip, zip_origins)) = (grid?, zip?);
    let axes = SweepAxes { grid, zip };
    let count = axes.point_count();
    if count > MAX_POINTS {
        context.error(
            node.loc,
            "sweep",
            format!("at most {MAX_POINTS} points per model and task"),
            format!("{count} points"),
        );
        return None;
    }
    Some((
        axes,
        AxisOrigins {
            grid: grid_origins,
            zip: zip_origins,
        },
    ))
}

type AxisGroup = (Vec<Axis>, Vec<Vec<Origin>>);

fn read_axis_group(
    context: &mut Context,
    node: &Node,
    section: &str,
    fixed: &HashMap<Field, Origin>,
    seen: &mut HashMap<Field, Origin>,
    distinct_values: bool,
) -> Option<AxisGroup> {
    let entries = match &node.value {
        Value::Map(entries) if entries.is_empty() => {
            context.error(node.loc, section, "at least one axis", "an empty mapping");
            return None;
        }
        Value::Map(entries) => entries,
        Value::Invalid => return None,
        _ => {
            context.error(
                node.loc,
                section,
                "a mapping of field names to lists of values",
                raw::describe(node),
            );
            return None;
        }
    };
    let mut axes = Vec::new();
    let mut origins = Vec::new();
    let mut ok = true;
    for entry in entries {
        let path = key_path(section, &entry.key);
        let Some(field) = Field::parse_axis_name(&entry.key) else {
            report_unknown_axis(context, entry, &path);
            ok = false;
            continue;
        };
        if let Some(first) = seen.get(&field) {
            context.error(
                entry.key_loc,
                &path,
                "each field in at most one axis",
                format!("`{field}` again (first at {})", first.describe()),
            );
            ok = false;
            continue;
        }
        seen.insert(
            field,
            Origin {
                loc: entry.key_loc,
                path: path.clone(),
            },
        );
        if let Some(fixed_at) = fixed.get(&field) {
            context.error(
                entry.key_loc,
                &path,
                format!(
                    "an axis over a field that is not also fixed (remove {} or this axis)",
                    field.fixed_path()
                ),
                format!("`{field}` also set at {}", fixed_at.describe()),
            );
            ok = false;
            continue;
        }
        let Some(items) = raw::list(context, &entry.value, &path, "list of values", true) else {
            ok = false;
            continue;
        };
        let mut values: Vec<FieldValue> = Vec::new();
        let mut value_origins = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let item_path = index_path(&path, index);
            let Some(value) = read_value(context, item, &item_path, field.kind()) else {
                ok = false;
                continue;
            };
            if distinct_values {
                if let Some(first) = values.iter().position(|other| *other == value) {
                    context.error(
                        item.loc,
                        &item_path,
                        "distinct values in a grid axis",
                        format!("{value} again (first at {})", index_path(&path, first)),
                    );
                    ok = false;
                    continue;
                }
            }
            values.push(value);
            value_origins.push(Origin {
                loc: item.loc,
                path: item_path,
            });
        }
        axes.push(Axis { field, values });
        origins.push(value_origins);
    }
    ok.then_some((axes, origins))
}

fn report_unknown_axis(context: &mut Context, entry: &Entry, path: &str) {
    let names = Field::axis_names();
    let name = entry.key.as_str();
    let found = match name {
        "seeds" | "probe.seeds" => {
            "`probe.seeds`, which is a list already (set probe.seeds instead)".to_string()
        }
        "probe.always" => "`probe.always`, which cannot vary".to_string(),
        "models" | "model" | "tasks" | "task" => {
            format!("`{name}` (models and tasks are the top-level lists, crossed with the sweep)")
        }
        _ => {
            let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
            match raw::suggestion(name, &candidates) {
                Some(close) => format!("unknown field `{name}` (did you mean `{close}`?)"),
                None => format!("unknown field `{name}`"),
            }
        }
    };
    context.error(
        entry.key_loc,
        path,
        format!("a train or probe field: {}", names.join(", ")),
        found,
    );
}

/// Zip lists must have the same length and no repeated combination.
fn check_zip(
    context: &mut Context,
    node: &Node,
    axes: Vec<Axis>,
    origins: Vec<Vec<Origin>>,
) -> Option<AxisGroup> {
    let Value::Map(entries) = &node.value else {
        return None;
    };
    let expected_len = axes.first()?.values.len();
    let mut ok = true;
    for (axis, entry) in axes.iter().zip(entries).skip(1) {
        if axis.values.len() != expected_len {
            context.error(
                entry.value.loc,
                &key_path("sweep.zip", &entry.key),
                format!(
                    "{expected_len} values, as many as sweep.zip.{}",
                    entries[0].key
                ),
                format!("{} values", axis.values.len()),
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let mut combinations: HashMap<String, usize> = HashMap::new();
    for index in 0..expected_len {
        let combination: Vec<String> = axes
            .iter()
            .map(|axis| format!("{} {}", axis.field, axis.values[index]))
            .collect();
        let combination = combination.join(", ");
        if let Some(first) = combinations.get(&combination) {
            context.error(
                entries[0].value.loc,
                "sweep.zip",
                "distinct combinations of zipped values",
                format!("entry {index} repeats entry {first} ({combination})"),
            );
            ok = false;
        } else {
            combinations.insert(combination, index);
        }
    }
    ok.then_some((axes, origins))
}
