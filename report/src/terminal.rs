//! The summary printed after `lorasweep run` and `lorasweep report`: per model, one aligned
//! table with a row per configuration and, per task, the score and the difference to the
//! baseline.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};

use super::aggregate::Report;
use super::tables::{comparison_text, score_cell_text, seeds_text, thousands};

/// The summary tables, with the sweep's status first.
pub fn summary(report: &Report) -> String {
    let sweep = &report.sweep;
    let mut out = format!(
        "sweep {} ({}): {} jobs, {} succeeded",
        sweep.id,
        sweep.name,
        sweep.jobs,
        sweep.counts.get("succeeded").copied().unwrap_or(0)
    );
    if sweep.partial {
        out.push_str(&format!(
            "; partial: {} pending, {} failed/skipped/cancelled",
            sweep.pending, sweep.unsuccessful
        ));
    }
    out.push('\n');
    let models: Vec<&String> = report
        .summaries
        .iter()
        .map(|summary| &summary.model)
        .collect();
    for model in models {
        let groups: Vec<_> = report
            .groups
            .iter()
            .filter(|group| &group.model == model)
            .collect();
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Disabled);
        let mut header = vec!["configuration".to_string(), "params".to_string()];
        for group in &groups {
            let arrow = if group.higher_is_better { "↑" } else { "↓" };
            header.push(format!("{} {} {arrow}", group.task, group.metric));
            header.push("seeds".to_string());
            header.push("vs baseline".to_string());
        }
        if groups.len() > 1 {
            header.push("avg rank".to_string());
        }
        table.set_header(header);
        let summary = report
            .summaries
            .iter()
            .find(|summary| &summary.model == model);
        let mut labels: Vec<String> = Vec::new();
        if groups.iter().any(|group| group.base.is_some()) {
            labels.push("base model".to_string());
        }
        for group in &groups {
            for row in &group.rows {
                if !labels.contains(&row.label) {
                    labels.push(row.label.clone());
                }
            }
        }
        for label in &labels {
            let mut cells = vec![label.clone()];
            let parameters = groups
                .iter()
                .flat_map(|group| group.rows.iter())
                .find(|row| &row.label == label)
                .and_then(|row| row.trainable_parameters);
            cells.push(if label == "base model" {
                "0".to_string()
            } else {
                parameters.map_or("–".to_string(), thousands)
            });
            for group in &groups {
                if label == "base model" {
                    match &group.base {
                        Some(base) => {
                            cells.push(score_cell_text(base));
                            cells.push(seeds_text(base));
                        }
                        None => cells.extend(["–".to_string(), "–".to_string()]),
                    }
                    cells.push("–".to_string());
                    continue;
                }
                match group.rows.iter().find(|row| &row.label == label) {
                    Some(row) => {
                        cells.push(score_cell_text(&row.score));
                        cells.push(seeds_text(&row.score));
                        cells.push(comparison_text(row));
                    }
                    None => cells.extend(["–".to_string(), "–".to_string(), "–".to_string()]),
                }
            }
            if groups.len() > 1 {
                let rank = summary
                    .and_then(|summary| summary.rows.iter().find(|row| &row.label == label))
                    .and_then(|row| row.average_rank);
                cells.push(rank.map_or("–".to_string(), |rank| format!("{rank:.2}")));
            }
            table.add_row(cells);
        }
        for index in 1..table.column_count() {
            if let Some(column) = table.column_mut(index) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        out.push_str(&format!("{model}\n{table}\n"));
    }
    out
}
