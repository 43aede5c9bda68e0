//! Checks across sections, run once every section read cleanly: each sweep point against
//! the models it runs on, and the report baseline against the points.

use std::collections::{HashMap, HashSet};

use super::fields::{read_value, Field, FieldValue, ProbeField, TrainField};
use super::placement::{self, ModuleKind, Placement};
use super::raw::{self, find, key_path, Context, Entry};
use super::validate::{AxisOrigins, Origin};
use super::{Baseline, ModelGeometry, ReportSettings, Sweep, Variant};

/// Where a field's value at a point came from: its axis value, its fixed value, or nowhere
/// (a default).
fn origin_at<'o>(
    field: Field,
    sweep: &Sweep,
    indices: &[usize],
    fixed: &'o HashMap<Field, Origin>,
    axis_origins: &'o AxisOrigins,
) -> Option<&'o Origin> {
    let position = sweep
        .axes
        .grid
        .iter()
        .chain(&sweep.axes.zip)
        .position(|axis| axis.field == field);
    match position {
        Some(position) => axis_origins.at(position).get(indices[position]),
        None => fixed.get(&field),
    }
}

/// The smallest `max_rank` among the kinds, with the kind that sets it.
fn rank_limit(geometry: &ModelGeometry, kinds: &[ModuleKind]) -> Option<(u32, ModuleKind)> {
    kinds
        .iter()
        .map(|kind| (geometry.max_rank(*kind), *kind))
        .min_by_key(|(limit, _)| *limit)
}

/// Checks each point against each model whose geometry is known: placements must name
/// modules that exist, ranks must fit the modules they may land on.
pub(crate) fn check_points(
    context: &mut Context,
    sweep: &Sweep,
    model_origins: &[Origin],
    fixed: &HashMap<Field, Origin>,
    axis_origins: &AxisOrigins,
) {
    let mut checked: HashSet<(usize, u32, String, u32, bool)> = HashSet::new();
    let points = sweep.points();
    let mut index_lists: Vec<Vec<usize>> = Vec::with_capacity(points.len());
    sweep
        .axes
        .for_each_point(|indices| index_lists.push(indices.to_vec()));
    for (model_index, model) in sweep.models.iter().enumerate() {
        let Some(geometry) = model.geometry() else {
            continue;
        };
        let model_id = model.id();
        let model_origin = &model_origins[model_index];
        for (point, indices) in points.iter().zip(&index_lists) {
            let train = &point.train;
            let probes = train.placement.needs_probe() || sweep.probe.always;
            let signature = (
                model_index,
                train.rank,
                train.placement.to_string(),
                point.probe.rank,
                probes,
            );
            if !checked.insert(signature) {
                continue;
            }
            let at = |field: Field| {
                origin_at(field, sweep, indices, fixed, axis_origins).unwrap_or(model_origin)
            };
            let placement_origin = at(Field::Train(TrainField::Placement));
            for (expected, found) in
                placement::check_against(&train.placement, &model_id, &geometry)
            {
                context.error(
                    placement_origin.loc,
                    &placement_origin.path,
                    expected,
                    found,
                );
            }
            if let Some(kinds) = train.placement.candidate_kinds() {
                if let Some((limit, kind)) = rank_limit(&geometry, &kinds) {
                    if train.rank > limit {
                        let rank_origin = at(Field::Train(TrainField::Rank));
                        let (d_in, d_out) = geometry.module_dims(kind);
                        context.error(
                            rank_origin.loc,
                            &rank_origin.path,
                            format!(
                                "a rank ≤ {limit} for placement `{}` on {model_id} \
                                 ({kind} is {d_in} → {d_out})",
                                train.placement
                            ),
                            format!("rank {}", train.rank),
                        );
                    }
                }
            }
            if probes {
                if let Some((limit, kind)) = rank_limit(&geometry, &ModuleKind::ALL) {
                    if point.probe.rank > limit {
                        let rank_origin = at(Field::Probe(ProbeField::Rank));
                        let (d_in, d_out) = geometry.module_dims(kind);
                        context.error(
                            rank_origin.loc,
                            &rank_origin.path,
                            format!(
                                "a probe rank ≤ {limit}, the smallest module of {model_id} \
                                 ({kind} is {d_in} → {d_out})"
                            ),
                            format!("rank {}", point.probe.rank),
                        );
                    }
                }
            }
        }
    }
}

/// The default baseline: vanilla LoRA on every module, when the sweep has such points.
fn default_baseline(sweep: &Sweep) -> Option<Baseline> {
    let baseline = Baseline {
        fields: vec![
            (TrainField::Placement, FieldValue::Placement(Placement::All)),
            (TrainField::Variant, FieldValue::Variant(Variant::Lora)),
        ],
    };
    sweep
        .points()
        .iter()
        .any(|point| baseline.matches(&point.train))
        .then_some(baseline)
}

pub(crate) fn read_report(
    context: &mut Context,
    entry: Option<&Entry>,
    sweep: &Sweep,
) -> Option<ReportSettings> {
    let Some(entry) = entry else {
        return Some(ReportSettings {
            baseline: default_baseline(sweep),
        });
    };
    let entries = raw::mapping(
        context,
        &entry.value,
        "report",
        "a mapping of report settings",
        &["baseline"],
    )?;
    let Some(baseline_entry) = find(entries, "baseline") else {
        return Some(ReportSettings {
            baseline: default_baseline(sweep),
        });
    };
    let allowed: Vec<&str> = TrainField::ALL.iter().map(|field| field.name()).collect();
    let baseline_node = &baseline_entry.value;
    let fields = raw::mapping(
        context,
        baseline_node,
        "report.baseline",
        "a mapping of train fields to the baseline's values",
        &allowed,
    )?;
    if fields.is_empty() {
        context.error(
            baseline_node.loc,
            "report.baseline",
            "at least one train field, e.g. {placement: all, variant: lora}",
            "an empty mapping",
        );
        return None;
    }
    let points = sweep.points();
    let mut baseline = Baseline { fields: Vec::new() };
    let mut ok = true;
    for field_entry in fields {
        let Some(field) = TrainField::from_name(&field_entry.key) else {
            ok = false; // reported as an unknown key
            continue;
        };
        let path = key_path("report.baseline", &field_entry.key);
        let Some(value) = read_value(
            context,
            &field_entry.value,
            &path,
            Field::Train(field).kind(),
        ) else {
            ok = false;
            continue;
        };
        let mut taken: Vec<FieldValue> = Vec::new();
        for point in &points {
            let point_value = field.get(&point.train);
            if !taken.contains(&point_value) {
                taken.push(point_value);
            }
        }
        if !taken.contains(&value) {
            let listed: Vec<String> = taken.iter().map(ToString::to_string).collect();
            context.error(
                field_entry.value.loc,
                &path,
                format!(
                    "one of the values the sweep gives `{field}`: {}",
                    listed.join(", ")
                ),
                format!("{value}"),
            );
            ok = false;
            continue;
        }
        baseline.fields.push((field, value));
    }
    if !ok {
        return None;
    }
    if !points.iter().any(|point| baseline.matches(&point.train)) {
        let described: Vec<String> = baseline
            .fields
            .iter()
            .map(|(field, value)| format!("{field} {value}"))
            .collect();
        context.error(
            baseline_node.loc,
            "report.baseline",
            "a baseline that matches at least one sweep point",
            format!("no point with {}", described.join(", ")),
        );
        return None;
    }
    Some(ReportSettings {
        baseline: Some(baseline),
    })
}
