//! Placements in sweep files: the grammar is the job contract's ([`Placement`]); this module
//! checks a placement against a model's geometry before anything runs.

pub use lorasweep_contract::{ModuleId as ModuleName, ModuleKind, Placement};

use super::models::ModelGeometry;

/// Checks the placement against a model's geometry. Each problem is `(expected, found)`.
pub(crate) fn check_against(
    placement: &Placement,
    model: &str,
    geometry: &ModelGeometry,
) -> Vec<(String, String)> {
    let modules = geometry.layers.saturating_mul(ModuleKind::ALL.len() as u32);
    let mut problems = Vec::new();
    match placement {
        Placement::TopK(count, _) | Placement::Ranked(count, _) | Placement::Random(count)
            if *count as u64 > u64::from(modules) =>
        {
            problems.push((
                format!(
                    "at most {modules} modules ({model} has {} layers × 7 kinds)",
                    geometry.layers
                ),
                format!("{placement}"),
            ));
        }
        Placement::Explicit(names) => {
            for name in names {
                if name.layer as u64 >= u64::from(geometry.layers) {
                    problems.push((
                        format!(
                            "a layer index below {} ({model} has {} layers)",
                            geometry.layers, geometry.layers
                        ),
                        format!("{name}"),
                    ));
                }
            }
        }
        Placement::BudgetMatched(params, _) => {
            let smallest = ModuleKind::ALL
                .iter()
                .map(|kind| {
                    let (d_in, d_out) = geometry.module_dims(*kind);
                    u64::from(d_in) + u64::from(d_out)
                })
                .min()
                .unwrap_or(0);
            if *params < smallest {
                problems.push((
                    format!(
                        "a parameter target ≥ {smallest} (one rank-1 adapter on the smallest module of {model})"
                    ),
                    format!("{placement}"),
                ));
            }
        }
        _ => {}
    }
    problems
}
