//! SVG plots, drawn with plotters' SVG backend (text is left to the viewer's fonts, so no
//! font library is needed): the PAGE heatmap of one (model, task), the score against
//! trainable parameters of one (model, task) and the validity panel of one (model, task).

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use lorasweep_contract::ModuleKind;

use super::aggregate::{PageTask, TaskGroup, ValidityTask};
use super::tables::{direction, thousands};

const FONT: &str = "sans-serif";

/// Point colours that stay apart from each other and readable on white (Tableau 10).
const SERIES_COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Turns a plotters error (generic over the backend) into one that names the plot.
fn drawn<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) -> Result<T> {
    result.map_err(|error| anyhow!("cannot draw {what}: {error}"))
}

/// A colour of the viridis map for `fraction` in 0..=1.
fn viridis(fraction: f64) -> RGBColor {
    ViridisRGB::get_color(fraction.clamp(0.0, 1.0))
}

/// The heatmap of PAGE share per layer (rows, layer 0 at the bottom) and module kind
/// (columns), on a log colour scale with its legend; the dominant module is outlined.
/// `None` when the entry has no per-module scores.
pub fn heatmap_svg(model: &str, task: &PageTask) -> Result<Option<String>> {
    if task.modules.is_empty() || task.layers == 0 {
        return Ok(None);
    }
    let what = format!("the PAGE heatmap of {model} on {}", task.task);
    let kinds: Vec<ModuleKind> = ModuleKind::ALL
        .into_iter()
        .filter(|kind| task.modules.iter().any(|module| module.kind == *kind))
        .collect();
    let positive: Vec<f64> = task
        .modules
        .iter()
        .map(|module| module.share)
        .filter(|share| *share > 0.0 && share.is_finite())
        .collect();
    let high = positive.iter().copied().fold(f64::MIN, f64::max);
    let mut low = positive.iter().copied().fold(f64::MAX, f64::min);
    if positive.is_empty() {
        return Ok(None);
    }
    if low >= high {
        low = high / 10.0;
    }
    let fraction = |share: f64| (share.ln() - low.ln()) / (high.ln() - low.ln());
    let layers = task.layers;
    let row_height = (560 / layers as u32).clamp(12, 28);
    let height = (row_height * layers as u32 + 130).max(360);
    let width = 180 + 78 * kinds.len() as u32 + 150;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        drawn(&what, root.fill(&WHITE))?;
        let (main, legend) = root.split_horizontally(width - 150);
        let mut title = format!("PAGE share · {model} · {} (outlined: dominant)", task.task);
        if !task.settings.is_empty() {
            title.push_str(&format!(" ({})", task.settings));
        }
        let mut chart = drawn(
            &what,
            ChartBuilder::on(&main)
                .caption(title, (FONT, 18))
                .margin(12)
                .x_label_area_size(56)
                .y_label_area_size(56)
                // A segmented range holds both ends: 0..=n-1 is n cells.
                .build_cartesian_2d(
                    (0..kinds.len() as i32 - 1).into_segmented(),
                    (0..layers as i32 - 1).into_segmented(),
                ),
        )?;
        let kind_names: Vec<&str> = kinds.iter().map(|kind| kind.name()).collect();
        let label_step = layers.div_ceil(16).max(1) as i32;
        drawn(
            &what,
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(kinds.len())
                .y_labels(layers)
                .x_label_formatter(&|value| match value {
                    SegmentValue::CenterOf(index) => kind_names
                        .get(*index as usize)
                        .map_or(String::new(), |name| name.to_string()),
                    _ => String::new(),
                })
                .y_label_formatter(&|value| match value {
                    SegmentValue::CenterOf(layer) if layer % label_step == 0 => layer.to_string(),
                    _ => String::new(),
                })
                .x_desc("module kind")
                .y_desc("layer")
                .axis_desc_style((FONT, 15))
                .label_style((FONT, 13))
                .draw(),
        )?;
        let cell = |column: i32, layer: i32| {
            [
                (SegmentValue::Exact(column), SegmentValue::Exact(layer)),
                (
                    SegmentValue::Exact(column + 1),
                    SegmentValue::Exact(layer + 1),
                ),
            ]
        };
        let cells = task.modules.iter().filter_map(|module| {
            let column = kinds.iter().position(|kind| *kind == module.kind)? as i32;
            let colour = if module.share > 0.0 && module.share.is_finite() {
                viridis(fraction(module.share))
            } else {
                RGBColor(220, 220, 220)
            };
            Some(Rectangle::new(
                cell(column, module.layer as i32),
                colour.filled(),
            ))
        });
        drawn(&what, chart.draw_series(cells))?;
        if let Some(dominant) = task
            .dominant
            .as_ref()
            .and_then(|name| task.modules.iter().find(|module| module.name == *name))
        {
            if let Some(column) = kinds.iter().position(|kind| *kind == dominant.kind) {
                drawn(
                    &what,
                    chart.draw_series(std::iter::once(Rectangle::new(
                        cell(column as i32, dominant.layer as i32),
                        ShapeStyle::from(&RED).stroke_width(3),
                    ))),
                )?;
            }
        }
        // The legend: a colour bar on the same log scale, labelled in share.
        let mut bar = drawn(
            &what,
            ChartBuilder::on(&legend)
                .caption("share, log scale", (FONT, 14))
                .margin_top(40)
                .margin_bottom(66)
                .margin_right(16)
                .y_label_area_size(64)
                .build_cartesian_2d(0f64..1f64, (low..high).log_scale()),
        )?;
        drawn(
            &what,
            bar.configure_mesh()
                .disable_mesh()
                .disable_x_axis()
                .y_labels(6)
                .y_label_formatter(&|share| percent(*share))
                .label_style((FONT, 12))
                .draw(),
        )?;
        let steps = 64;
        let ratio = high / low;
        let bands = (0..steps).map(|step| {
            let bottom = low * ratio.powf(step as f64 / steps as f64);
            let top = low * ratio.powf((step + 1) as f64 / steps as f64);
            Rectangle::new(
                [(0.0, bottom), (1.0, top)],
                viridis((step as f64 + 0.5) / steps as f64).filled(),
            )
        });
        drawn(&what, bar.draw_series(bands))?;
        drawn(&what, root.present())?;
    }
    Ok(Some(svg))
}

/// Score (mean over seeds, error bar ± one standard deviation) against trainable
/// parameters on a log axis, one point per configuration; the base model is a dashed line.
pub fn score_plot_svg(group: &TaskGroup) -> Result<String> {
    let what = format!("the score plot of {} on {}", group.model, group.task);
    struct Point {
        label: String,
        parameters: f64,
        mean: f64,
        std: f64,
        baseline: bool,
    }
    let mut points: Vec<Point> = group
        .rows
        .iter()
        .filter_map(|row| {
            let parameters = row.trainable_parameters? as f64;
            let mean = row.score.mean?;
            (parameters > 0.0).then(|| Point {
                label: row.label.clone(),
                parameters,
                mean,
                std: row.score.std.unwrap_or(0.0),
                baseline: row.is_baseline,
            })
        })
        .collect();
    // Configurations with the same parameter count are spread a little so none hides.
    for index in 0..points.len() {
        let same: Vec<usize> = (0..points.len())
            .filter(|other| points[*other].parameters == points[index].parameters)
            .collect();
        if same.len() > 1 {
            let position = same.iter().position(|other| *other == index).unwrap_or(0) as f64;
            let centre = (same.len() - 1) as f64 / 2.0;
            points[index].parameters *= 1.0 + 0.06 * (position - centre);
        }
    }
    let base = group.base.as_ref().and_then(|base| base.mean);
    let mut values: Vec<f64> = points
        .iter()
        .flat_map(|point| [point.mean - point.std, point.mean + point.std])
        .collect();
    values.extend(base);
    let (mut bottom, mut top) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(low, high), value| {
            (low.min(*value), high.max(*value))
        });
    if values.is_empty() {
        (bottom, top) = (0.0, 1.0);
    }
    let pad = ((top - bottom) * 0.12).max(top.abs().max(1e-3) * 0.02);
    bottom -= pad;
    top += pad;
    let (mut left, mut right) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(low, high), point| {
            (low.min(point.parameters), high.max(point.parameters))
        });
    if points.is_empty() {
        (left, right) = (1e3, 1e7);
    }
    left /= 2.5;
    right *= 2.5;
    let legend_rows = points.len() + usize::from(base.is_some());
    let height = 440.max(100 + 22 * legend_rows as u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (880, height)).into_drawing_area();
        drawn(&what, root.fill(&WHITE))?;
        let (plot_area, legend_area) = root.split_horizontally(600);
        let mut chart = drawn(
            &what,
            ChartBuilder::on(&plot_area)
                .caption(
                    format!(
                        "{} · {}: score against trainable parameters",
                        group.model, group.task
                    ),
                    (FONT, 17),
                )
                .margin(14)
                .x_label_area_size(52)
                .y_label_area_size(70)
                .build_cartesian_2d((left..right).log_scale(), bottom..top),
        )?;
        drawn(
            &what,
            chart
                .configure_mesh()
                .x_desc("trainable parameters (log scale)")
                .y_desc(format!(
                    "{} ({})",
                    group.metric,
                    direction(group.higher_is_better)
                ))
                .x_label_formatter(&|value| compact_count(*value))
                .y_label_formatter(&|value| format!("{value:.3}"))
                .axis_desc_style((FONT, 15))
                .label_style((FONT, 12))
                .light_line_style(RGBColor(235, 235, 235))
                .draw(),
        )?;
        // The legend, beside the plot: one line per configuration.
        let mut legend_y = 48;
        drawn(
            &what,
            legend_area.draw(&Text::new(
                "error bars: ± 1 std over seeds",
                (8, legend_y - 26),
                (FONT, 12).into_font().color(&RGBColor(90, 90, 90)),
            )),
        )?;
        let grey = RGBColor(90, 90, 90);
        if let Some(base) = base {
            drawn(
                &what,
                chart.draw_series(DashedLineSeries::new(
                    [(left, base), (right, base)],
                    8,
                    5,
                    ShapeStyle::from(&grey).stroke_width(2),
                )),
            )?;
            drawn(
                &what,
                legend_area.draw(&PathElement::new(
                    vec![(8, legend_y), (26, legend_y)],
                    ShapeStyle::from(&grey).stroke_width(2),
                )),
            )?;
            drawn(
                &what,
                legend_area.draw(&Text::new(
                    format!("base model ({})", super::tables::score_text(base)),
                    (34, legend_y - 7),
                    (FONT, 13),
                )),
            )?;
            legend_y += 22;
        }
        if points.is_empty() {
            drawn(
                &what,
                plot_area.draw(&Text::new(
                    "no configuration has a score yet",
                    (180, height as i32 / 2),
                    (FONT, 16),
                )),
            )?;
        }
        for (index, point) in points.iter().enumerate() {
            let colour = SERIES_COLOURS[index % SERIES_COLOURS.len()].to_rgba();
            let style = ShapeStyle::from(&colour).stroke_width(2);
            drawn(
                &what,
                chart.draw_series(std::iter::once(ErrorBar::new_vertical(
                    point.parameters,
                    point.mean - point.std,
                    point.mean,
                    point.mean + point.std,
                    style,
                    10,
                ))),
            )?;
            let radius = if point.baseline { 7 } else { 5 };
            drawn(
                &what,
                chart.draw_series(std::iter::once(Circle::new(
                    (point.parameters, point.mean),
                    radius,
                    colour.filled(),
                ))),
            )?;
            let label = if point.baseline {
                format!("{} (baseline)", point.label)
            } else {
                point.label.clone()
            };
            drawn(
                &what,
                legend_area.draw(&Circle::new((17, legend_y), radius, colour.filled())),
            )?;
            drawn(
                &what,
                legend_area.draw(&Text::new(label, (34, legend_y - 7), (FONT, 13))),
            )?;
            legend_y += 22;
        }
        drawn(&what, root.present())?;
    }
    Ok(svg)
}

/// The validity panel of one (model, task): each panel module's realised gain against its
/// place in each rule's ranking (x = the fraction of all modules the rule scores below it,
/// 1 = the rule's top), one colour per rule, the zero-gain line dashed.
pub fn validity_svg(model: &str, task: &ValidityTask) -> Result<String> {
    let what = format!("the validity plot of {model} on {}", task.task);
    let gains: Vec<f64> = task
        .rules
        .iter()
        .flat_map(|rule| rule.points.iter().map(|point| point.2))
        .collect();
    let (mut bottom, mut top) = gains.iter().fold((0.0f64, 0.0f64), |(low, high), gain| {
        (low.min(*gain), high.max(*gain))
    });
    let pad = ((top - bottom) * 0.1).max(1e-3);
    bottom -= pad;
    top += pad;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (880, 440)).into_drawing_area();
        drawn(&what, root.fill(&WHITE))?;
        let (plot_area, legend_area) = root.split_horizontally(640);
        let mut chart = drawn(
            &what,
            ChartBuilder::on(&plot_area)
                .caption(
                    format!(
                        "{model} · {}: realised gain against the rule's ranking",
                        task.task
                    ),
                    (FONT, 17),
                )
                .margin(14)
                .x_label_area_size(52)
                .y_label_area_size(70)
                .build_cartesian_2d(-0.03f64..1.03f64, bottom..top),
        )?;
        drawn(
            &what,
            chart
                .configure_mesh()
                .x_desc("place in the rule's ranking (1 = its top module)")
                .y_desc(format!("gain in {} over the base model", task.metric))
                .x_label_formatter(&|value| format!("{value:.1}"))
                .y_label_formatter(&|value| format!("{value:+.3}"))
                .axis_desc_style((FONT, 15))
                .label_style((FONT, 12))
                .light_line_style(RGBColor(235, 235, 235))
                .draw(),
        )?;
        let grey = RGBColor(90, 90, 90);
        drawn(
            &what,
            chart.draw_series(DashedLineSeries::new(
                [(-0.03, 0.0), (1.03, 0.0)],
                8,
                5,
                ShapeStyle::from(&grey).stroke_width(1),
            )),
        )?;
        if gains.is_empty() {
            drawn(
                &what,
                plot_area.draw(&Text::new(
                    "no panel adapter has a score yet",
                    (200, 220),
                    (FONT, 16),
                )),
            )?;
        }
        let mut legend_y = 40;
        for (index, rule) in task.rules.iter().enumerate() {
            let colour = SERIES_COLOURS[index % SERIES_COLOURS.len()].to_rgba();
            drawn(
                &what,
                chart.draw_series(
                    rule.points
                        .iter()
                        .map(|(_, place, gain)| Circle::new((*place, *gain), 4, colour.filled())),
                ),
            )?;
            drawn(
                &what,
                legend_area.draw(&Circle::new((17, legend_y), 5, colour.filled())),
            )?;
            let label = match rule.tau {
                Some(tau) => format!("{} (τ-b {tau:+.2})", rule.rule),
                None => rule.rule.clone(),
            };
            drawn(
                &what,
                legend_area.draw(&Text::new(label, (34, legend_y - 7), (FONT, 13))),
            )?;
            legend_y += 22;
        }
        drawn(&what, root.present())?;
    }
    Ok(svg)
}

/// A share as a percentage with the digits a log axis needs: `12%`, `0.5%`, `0.03%`.
fn percent(share: f64) -> String {
    let value = share * 100.0;
    if value >= 1.0 {
        format!("{value:.0}%")
    } else if value >= 0.1 {
        format!("{value:.1}%")
    } else if value >= 0.01 {
        format!("{value:.2}%")
    } else {
        format!("{value:.1e}%")
    }
}

/// `1.2k`, `3.4M`: a parameter count in a few characters.
fn compact_count(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e9 {
        (value / 1e9, "G")
    } else if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        return thousands(value.round() as u64);
    };
    if scaled >= 100.0 {
        format!("{scaled:.0}{suffix}")
    } else {
        format!("{scaled:.1}{suffix}")
    }
}
