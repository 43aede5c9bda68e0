//! Checks across sections, run once every section read cleanly: each sweep point against
//! the models it runs on. (The report section, read after them, is in `report`.)

use std::collections::{HashMap, HashSet};

use super::fields::{Field, ProbeField, TrainField};
use super::placement::{self, ModuleKind};
use super::raw::Context;
use super::validate::{AxisOrigins, Origin};
use super::{ModelGeometry, Sweep};

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
