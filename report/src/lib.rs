//! Reports: a sweep's stored results turned into what a researcher publishes.
//!
//! The data path is `SweepResults` + probe files ([`snapshot::ReportInput`]) →
//! [`aggregate::build`] (pure: tables, seed-paired differences to the baseline with a 95% t
//! interval, an exact sign-flip permutation test, Holm's correction per table and Cohen's
//! d_z, ranks, PAGE findings; see [`stats`] for when a difference is labelled) →
//! [`render`] (pure: file name → content) → [`write`]. Nothing here talks to a
//! coordinator; `lorasweep report` fetches the input and saves it as a snapshot beside the
//! report (`data/`), so the same report can be made again offline.
//!
//! Files: `report.md`, `report.html` (self-contained, plots inlined), `results.csv` and
//! `results.json` (one row per job), `page_<model>_<task>.svg` (PAGE heatmaps) and
//! `score_<model>_<task>.svg` (score against trainable parameters) and, with a validity
//! panel, `validity_<model>_<task>.svg` (realised gain against each rule's ranking).

pub mod aggregate;
pub mod html;
pub mod plots;
pub mod snapshot;
pub mod stats;
pub mod tables;
pub mod terminal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use aggregate::{build, Report};
pub use snapshot::ReportInput;

/// Every report file, by file name: Markdown, CSV, JSON, the SVG plots and the HTML page.
pub fn render(report: &Report) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    let mut svgs = BTreeMap::new();
    for group in &report.groups {
        svgs.insert(group.plot_file.clone(), plots::score_plot_svg(group)?);
    }
    for model in &report.page {
        for task in &model.tasks {
            if let (Some(file), Some(svg)) = (
                task.heatmap_file.as_ref(),
                plots::heatmap_svg(&model.model, task)?,
            ) {
                svgs.insert(file.clone(), svg);
            }
        }
    }
    for model in &report.validity {
        for task in &model.tasks {
            svgs.insert(
                task.plot_file.clone(),
                plots::validity_svg(&model.model, task)?,
            );
        }
    }
    let blocks = tables::document(report);
    files.insert(
        "report.html".to_string(),
        html::page(
            &format!("Sweep report: {}", report.sweep.name),
            &blocks,
            &svgs,
        ),
    );
    files.insert("report.md".to_string(), tables::markdown(report) + "\n");
    files.insert("results.csv".to_string(), tables::csv(&report.jobs)?);
    files.insert(
        "results.json".to_string(),
        tables::results_json(&report.jobs)?,
    );
    files.extend(svgs);
    Ok(files)
}

/// Writes the rendered files into `dir` (created if missing); returns their paths.
pub fn write(files: &BTreeMap<String, String>, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::with_capacity(files.len());
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
