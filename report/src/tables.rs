//! The report as text: Markdown (`report.md`), the tidy per-job table (`results.csv`,
//! `results.json`) and the aggregated tables as JSON (`--format json`), with the number
//! formats every output shares.

use anyhow::Result;
use serde_json::{Map, Value};

use super::aggregate::{
    plain, Comparison, ConfigRow, JobTable, ModelSummary, PageModel, Report, ScoreCell, TaskGroup,
    ValidityModel,
};
use super::stats::{self, EXACT_MAX_PAIRS, MIN_PAIRS_FOR_LABEL, PERMUTATION_DRAWS};

/// A score with four decimals.
pub fn score_text(value: f64) -> String {
    format!("{value:.4}")
}

/// A whole number with thousands separators.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// "higher is better" or "lower is better".
pub fn direction(higher_is_better: bool) -> &'static str {
    if higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    }
}

/// The score cell: `mean ± std`, or `failed` / `pending` when no seed has a score.
pub fn score_cell_text(cell: &ScoreCell) -> String {
    match (cell.mean, cell.std) {
        (Some(mean), Some(std)) => format!("{} ± {}", score_text(mean), score_text(std)),
        (Some(mean), None) => score_text(mean),
        (None, _) if cell.pending > 0 => "pending".to_string(),
        (None, _) if cell.failed > 0 => "failed".to_string(),
        (None, _) => "no result".to_string(),
    }
}

/// How many seeds are scored, and what happened to the others: `2/3 (1 failed)`.
pub fn seeds_text(cell: &ScoreCell) -> String {
    let mut text = format!("{}/{}", cell.n, cell.seeds.len());
    let mut missing = Vec::new();
    if cell.failed > 0 {
        missing.push(format!("{} failed", cell.failed));
    }
    if cell.pending > 0 {
        missing.push(format!("{} pending", cell.pending));
    }
    if !missing.is_empty() {
        text.push_str(&format!(" ({})", missing.join(", ")));
    }
    text
}

/// The difference to the baseline: the mean paired difference, its 95% t interval, the
/// Holm-adjusted sign-flip p and d_z, then `* better` / `* worse` when it earns a label, e.g.
/// `+0.0592 [+0.0100, +0.1100], p=0.031 (Holm), d=+1.20 * better`; below five pairs it ends
/// `n=2: too few seeds to tell` instead. The HTML page colours a cell by its `* better` /
/// `* worse` suffix.
pub fn comparison_text(row: &ConfigRow) -> String {
    if row.is_baseline {
        return "baseline".to_string();
    }
    let Some(comparison) = &row.versus_baseline else {
        return "–".to_string();
    };
    interval_text(comparison)
}

/// `p=0.031`, or `p<0.001`.
fn p_text(p: f64) -> String {
    if p < 0.001 {
        "p<0.001".to_string()
    } else {
        format!("p={p:.3}")
    }
}

fn interval_text(comparison: &Comparison) -> String {
    let mut parts = vec![format!("{:+.4}", comparison.mean)];
    if let (Some(low), Some(high)) = (comparison.low, comparison.high) {
        parts[0].push_str(&format!(" [{low:+.4}, {high:+.4}]"));
    }
    if comparison.pairs >= 2 {
        if let Some(p) = comparison.p_holm {
            parts.push(format!("{} (Holm)", p_text(p)));
        }
    }
    if let Some(d) = comparison.d_z {
        parts.push(format!("d={d:+.2}"));
    }
    if comparison.pairs < MIN_PAIRS_FOR_LABEL {
        parts.push(format!("n={}: too few seeds to tell", comparison.pairs));
    }
    let mut text = parts.join(", ");
    match comparison.better {
        Some(true) => text.push_str(" * better"),
        Some(false) => text.push_str(" * worse"),
        None => {}
    }
    text
}

fn optional(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or("–".to_string(), format)
}

/// A piece of a paragraph.
#[derive(Debug, Clone, PartialEq)]
pub enum Span {
    /// Plain text.
    Text(String),
    /// Code (a setting, a file name).
    Code(String),
    /// Emphasised text.
    Strong(String),
}

/// One block of the report document, rendered as Markdown or HTML.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// A heading of level 1 to 3.
    Heading(u8, String),
    /// A paragraph.
    Paragraph(Vec<Span>),
    /// A table: header and rows of plain text.
    Table(Vec<String>, Vec<Vec<String>>),
    /// A list of plain-text items.
    List(Vec<String>),
    /// A plot: its file name and a description.
    Image(String, String),
}

fn text(content: impl Into<String>) -> Span {
    Span::Text(content.into())
}

fn code(content: impl Into<String>) -> Span {
    Span::Code(content.into())
}

/// The leading cells naming a row: one per varying field (or one `configuration` cell).
fn setting_cells(group: &TaskGroup, row: &ConfigRow) -> Vec<String> {
    if group.fields.is_empty() {
        return vec![row.label.clone()];
    }
    group
        .fields
        .iter()
        .map(|field| row.settings.get(field).map_or("–".to_string(), plain))
        .collect()
}

fn setting_header(group: &TaskGroup) -> Vec<String> {
    if group.fields.is_empty() {
        vec!["configuration".to_string()]
    } else {
        group.fields.clone()
    }
}

/// `1 job`, `2 jobs`.
fn jobs(count: usize) -> String {
    if count == 1 {
        "1 job".to_string()
    } else {
        format!("{count} jobs")
    }
}

/// The status paragraphs: jobs per state, and a partial-results warning.
pub fn status_paragraphs(report: &Report) -> Vec<Vec<Span>> {
    let sweep = &report.sweep;
    let states: Vec<String> = sweep
        .counts
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(state, count)| format!("{count} {state}"))
        .collect();
    let mut paragraphs = vec![vec![
        text(format!("Sweep {} ", sweep.id)),
        code(&sweep.name),
        text(" from "),
        code(&sweep.file_name),
        text(format!(": {} ({}).", jobs(sweep.jobs), states.join(", "))),
    ]];
    if sweep.partial {
        paragraphs.push(vec![
            Span::Strong("Partial results:".to_string()),
            text(format!(
                " {} pending (queued or running), {} failed, skipped or cancelled; the tables cover the jobs that succeeded.",
                jobs(sweep.pending as usize),
                jobs(sweep.unsuccessful as usize)
            )),
        ]);
    }
    paragraphs
}

fn group_blocks(group: &TaskGroup, blocks: &mut Vec<Block>) {
    blocks.push(Block::Heading(
        2,
        format!("{} · {}", group.model, group.task),
    ));
    blocks.push(Block::Paragraph(vec![
        text("Score: "),
        code(&group.metric),
        text(format!(" ({}).", direction(group.higher_is_better))),
    ]));
    let mut header = setting_header(group);
    header.extend(
        [
            "trainable params",
            "% of LoRA",
            "score (mean ± std)",
            "seeds",
            "vs baseline [95% CI]",
            "train s",
            "tokens/s",
        ]
        .map(str::to_string),
    );
    let mut rows = Vec::new();
    if let Some(base) = &group.base {
        let mut cells = vec!["base model".to_string()];
        cells.resize(setting_header(group).len(), String::new());
        cells.extend([
            "0".to_string(),
            "–".to_string(),
            score_cell_text(base),
            seeds_text(base),
            "–".to_string(),
            "–".to_string(),
            "–".to_string(),
        ]);
        rows.push(cells);
    }
    for row in &group.rows {
        let mut cells = setting_cells(group, row);
        cells.extend([
            row.trainable_parameters.map_or("–".to_string(), thousands),
            optional(row.percent_of_lora, |percent| format!("{percent:.2}%")),
            score_cell_text(&row.score),
            seeds_text(&row.score),
            comparison_text(row),
            optional(row.train_wall_s, |seconds| format!("{seconds:.1}")),
            optional(row.tokens_per_s, |speed| format!("{speed:.0}")),
        ]);
        rows.push(cells);
    }
    blocks.push(Block::Table(header, rows));
    let failures: Vec<String> = group
        .base
        .iter()
        .flat_map(|base| {
            base.seeds.iter().filter_map(|seed| {
                seed.error
                    .as_ref()
                    .map(|error| format!("base model: {}", error.trim()))
            })
        })
        .chain(group.rows.iter().flat_map(|row| {
            row.score.seeds.iter().filter_map(move |seed| {
                seed.error.as_ref().map(|error| {
                    format!(
                        "{} seed {}: {}",
                        row.label,
                        seed.seed.map_or("–".to_string(), |seed| seed.to_string()),
                        error.trim()
                    )
                })
            })
        }))
        .collect();
    if !failures.is_empty() {
        blocks.push(Block::Paragraph(vec![text("Runs without a score:")]));
        blocks.push(Block::List(failures));
    }
    blocks.push(Block::Image(
        group.plot_file.clone(),
        format!(
            "{} on {}: {} against trainable parameters",
            group.model, group.task, group.metric
        ),
    ));
}

fn summary_blocks(summary: &ModelSummary, blocks: &mut Vec<Block>) {
    blocks.push(Block::Heading(
        2,
        format!("Across tasks · {}", summary.model),
    ));
    let averaging = if summary.same_metric {
        "The average score is over configurations scored on every task."
    } else {
        "The tasks use different metrics, so scores are not averaged; compare average ranks."
    };
    blocks.push(Block::Paragraph(vec![text(format!(
        "Rank 1 is the best score of the task in its own direction; ties share ranks. {averaging}"
    ))]));
    let mut header = vec!["configuration".to_string()];
    for (task, metric) in summary.tasks.iter().zip(&summary.metrics) {
        header.push(format!("{task} ({metric})"));
        header.push(format!("{task} rank"));
    }
    header.extend(["average rank".to_string(), "average score".to_string()]);
    let rows: Vec<Vec<String>> = summary
        .rows
        .iter()
        .map(|row| {
            let mut cells = vec![row.label.clone()];
            for (score, rank) in row.scores.iter().zip(&row.ranks) {
                cells.push(optional(*score, score_text));
                cells.push(optional(*rank, |rank| format!("{rank:.1}")));
            }
            cells.push(match row.average_rank {
                Some(rank) if row.tasks_scored < summary.tasks.len() => format!(
                    "{rank:.2} ({}/{} tasks)",
                    row.tasks_scored,
                    summary.tasks.len()
                ),
                Some(rank) => format!("{rank:.2}"),
                None => "–".to_string(),
            });
            cells.push(optional(row.average_score, score_text));
            cells
        })
        .collect();
    blocks.push(Block::Table(header, rows));
}

fn page_blocks(model: &PageModel, blocks: &mut Vec<Block>) {
    blocks.push(Block::Heading(2, format!("PAGE · {}", model.model)));
    let mut kinds: Vec<String> = Vec::new();
    for task in &model.tasks {
        for kind in task.share_by_kind.keys() {
            if !kinds.contains(kind) {
                kinds.push(kind.clone());
            }
        }
    }
    kinds.sort_by_key(|kind| kind_order(kind));
    let mut header: Vec<String> = [
        "task",
        "probe seeds",
        "dominant module",
        "top-1 share",
        "argmax stability",
    ]
    .map(str::to_string)
    .to_vec();
    header.extend(kinds.iter().cloned());
    let rows: Vec<Vec<String>> = model
        .tasks
        .iter()
        .map(|task| {
            let mut name = task.task.clone();
            if !task.settings.is_empty() {
                name.push_str(&format!(" ({})", task.settings));
            }
            let mut seeds = task
                .seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            if task.failed > 0 {
                seeds.push_str(&format!(" ({} failed)", task.failed));
            }
            if task.pending > 0 {
                seeds.push_str(&format!(" ({} pending)", task.pending));
            }
            let missing = if task.pending > 0 {
                "pending"
            } else {
                "failed"
            };
            let mut cells = vec![
                name,
                seeds.trim().to_string(),
                task.dominant.clone().unwrap_or_else(|| missing.to_string()),
                optional(task.top1_share, |share| format!("{share:.3}")),
                optional(task.argmax_stability, |share| format!("{share:.2}")),
            ];
            cells.extend(kinds.iter().map(|kind| {
                optional(task.share_by_kind.get(kind).copied(), |share| {
                    format!("{share:.3}")
                })
            }));
            cells
        })
        .collect();
    blocks.push(Block::Table(header, rows));
    blocks.push(Block::Paragraph(vec![text(
        "Shares are of the total PAGE over every module, merged over probe seeds (mean score); the columns by module kind sum each kind over layers. Argmax stability: per probe seed, the fraction of its batches whose own argmax is the seed's dominant module, averaged over seeds.",
    )]));
    if !model.kendall.is_empty() {
        blocks.push(Block::Paragraph(vec![text(
            "Kendall τ-b between the tasks' PAGE score vectors (+1: the same module ranking):",
        )]));
        let rows: Vec<Vec<String>> = model
            .kendall
            .iter()
            .map(|pair| {
                vec![
                    format!("{} vs {}", pair.first, pair.second),
                    optional(pair.tau, |tau| format!("{tau:+.3}")),
                    pair.modules.to_string(),
                ]
            })
            .collect();
        blocks.push(Block::Table(
            vec![
                "tasks".to_string(),
                "τ-b".to_string(),
                "modules".to_string(),
            ],
            rows,
        ));
    }
    match model.argmax_agrees {
        Some(true) => blocks.push(Block::Paragraph(vec![text(
            "The dominant module is the same on every task.",
        )])),
        Some(false) => blocks.push(Block::Paragraph(vec![text(
            "The dominant module differs between tasks.",
        )])),
        None => {}
    }
    for task in &model.tasks {
        if let Some(file) = &task.heatmap_file {
            blocks.push(Block::Image(
                file.clone(),
                format!(
                    "PAGE share of {} on {} by layer and module kind",
                    model.model, task.task
                ),
            ));
        }
    }
}

/// The validity panel of a model: one row per (task, rule), then each task's plot.
fn validity_blocks(model: &ValidityModel, blocks: &mut Vec<Block>) {
    blocks.push(Block::Heading(
        2,
        format!("Does the ranking predict the gain? · {}", model.model),
    ));
    blocks.push(Block::Paragraph(vec![text(format!(
        "Single-module adapters on a panel of modules (each rule's top modules and as many drawn at random), trained like the sweep's first point with each seed. Gain: the task metric minus the base model's (negated when lower is better), mean over seeds. τ-b: Kendall's rank correlation between the rule's probe score and the realised gain over the panel (+1: the rule orders the panel exactly as training did); p: a two-sided permutation test of τ-b = 0, Holm-adjusted over the rules of a task; below {} modules there is no p (too few modules to tell). Best's rank: where the module with the highest realised gain sits in the rule's ranking of every module. Top-1 hits: seeds whose best panel module is the rule's top module (one seed cannot tell a rule from luck). τ-b (loss): the same against the held-out loss reduction, where the eval reports a loss.",
        stats::TAU_MIN_PAIRS
    ))]));
    let header = [
        "task",
        "rule",
        "probe seeds",
        "modules",
        "τ-b (gain)",
        "p (Holm)",
        "verdict",
        "best's rank",
        "top-1 hits",
        "τ-b (loss)",
    ]
    .map(str::to_string)
    .to_vec();
    let mut rows = Vec::new();
    for task in &model.tasks {
        let raw: Vec<f64> = task.rules.iter().filter_map(|rule| rule.tau_p).collect();
        let mut adjusted = stats::holm(&raw).into_iter();
        for rule in &task.rules {
            let holm_p = rule.tau_p.and_then(|_| adjusted.next());
            let verdict = match (rule.tau, holm_p) {
                (None, _) if rule.probe_seeds == 0 => "no probe result".to_string(),
                (None, _) => "τ undefined".to_string(),
                (Some(_), None) => "too few modules to tell".to_string(),
                (Some(tau), Some(p)) if p < 0.05 && tau > 0.0 => "* predicts".to_string(),
                (Some(_), Some(p)) if p < 0.05 => "* ranks against".to_string(),
                (Some(_), Some(_)) => "no evidence".to_string(),
            };
            rows.push(vec![
                task.task.clone(),
                rule.rule.clone(),
                rule.probe_seeds.to_string(),
                rule.modules.to_string(),
                optional(rule.tau, |tau| format!("{tau:+.3}")),
                optional(holm_p, p_text),
                verdict,
                optional(rule.best_rank.map(|rank| rank as f64), |rank| {
                    format!("{rank:.0}")
                }),
                if rule.top1_seeds == 0 {
                    "–".to_string()
                } else if rule.top1_seeds == 1 {
                    format!("{}/1 (too few seeds to tell)", rule.top1_hits)
                } else {
                    format!("{}/{}", rule.top1_hits, rule.top1_seeds)
                },
                optional(rule.loss_tau, |tau| format!("{tau:+.3}")),
            ]);
        }
    }
    blocks.push(Block::Table(header, rows));
    let mut notes = Vec::new();
    for task in &model.tasks {
        let best = task.modules.first();
        let leader = task
            .rules
            .iter()
            .filter_map(|rule| Some((rule, rule.tau?)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let mut note = format!(
            "{}: {} panel modules scored over {} seed(s), base {} {}",
            task.task,
            task.modules.len(),
            task.seeds.len(),
            task.metric,
            optional(task.base, score_text),
        );
        if let Some(best) = best {
            note.push_str(&format!(
                "; realised best {} (gain {:+.4})",
                best.module, best.gain
            ));
        }
        if let Some((rule, tau)) = leader {
            note.push_str(&format!("; highest τ-b: {} ({tau:+.3})", rule.rule));
        }
        if task.missing > 0 {
            note.push_str(&format!(
                "; {} panel adapters not scored (pending or failed)",
                task.missing
            ));
        }
        notes.push(note);
    }
    blocks.push(Block::List(notes));
    for task in &model.tasks {
        blocks.push(Block::Image(
            task.plot_file.clone(),
            format!(
                "Realised gain against each rule's ranking, {} on {}",
                model.model, task.task
            ),
        ));
    }
}

/// "How to read this": what the comparison cell says and why it often gives no label.
fn how_to_read() -> Vec<Block> {
    let minimum = MIN_PAIRS_FOR_LABEL;
    vec![
        Block::Heading(2, "How to read this".to_string()),
        Block::Paragraph(vec![
            text("The vs baseline cell is the mean of the per-seed differences (the row minus its baseline at the same seed; positive means a higher score, whichever direction is better), its 95% t interval, the Holm-adjusted p-value of a permutation test and Cohen's d_z (the mean difference over the standard deviation of the differences; the interval and d_z are left out when the differences do not vary), e.g. "),
            code("+0.0592 [+0.0100, +0.1100], p=0.031 (Holm), d=+1.20 * better"),
            text(". The interval is for that comparison alone (not adjusted for the others), so it can exclude 0 without a label."),
        ]),
        Block::Paragraph(vec![text(format!(
            "p is from an exact sign-flip permutation test of the mean difference: if the row and its baseline do equally well, each seed's difference is as likely negative as positive, so p is the share of all 2^n sign assignments (n pairs) whose mean is at least as far from 0 as the observed one, the observed one included. Up to {EXACT_MAX_PAIRS} pairs every assignment is counted; beyond, {PERMUTATION_DRAWS} random assignments with a fixed seed. It assumes no distribution, only that without an effect the differences are symmetric around 0."
        ))]),
        Block::Paragraph(vec![text(
            "Holm: each table compares several rows with the baseline, and among many comparisons a small p comes by chance now and then. Holm's correction adjusts the p-values of one table together (the smallest times the number of comparisons, the next times one fewer, kept in order, at most 1), so the chance of any false label in a table stays at or under 5%.",
        )]),
        Block::Paragraph(vec![
            text(format!(
                "Labels: * better or * worse (in the metric's direction) appears only with at least {minimum} pairs and a Holm-adjusted p below 0.05. With fewer pairs the cell ends "
            )),
            code("n=2: too few seeds to tell"),
            text(": with n pairs the smallest possible p is 2/2^n (0.5 with 2 seeds, 0.25 with 3, 0.125 with 4), so even differences that all agree cannot be told from chance, and a spread estimated from two or three seeds is itself unreliable. Even 5 pairs cannot reach p < 0.05 (2/32 = 0.0625); 6 can for a single comparison, a table of several needs more. No label is not evidence of no difference: run more seeds."),
        ]),
    ]
}

/// The report as a document: what `report.md` and `report.html` render.
pub fn document(report: &Report) -> Vec<Block> {
    let mut blocks = vec![Block::Heading(
        1,
        format!("Sweep report: {}", report.sweep.name),
    )];
    blocks.extend(status_paragraphs(report).into_iter().map(Block::Paragraph));
    match &report.baseline {
        Some(baseline) => {
            blocks.push(Block::Paragraph(vec![
                text("Baseline: "),
                code(baseline),
                text(". Differences are a row minus the baseline row with the same other settings, paired by seed. % of LoRA compares trainable parameters with placement all, variant lora."),
            ]));
            blocks.extend(how_to_read());
        }
        None => blocks.push(Block::Paragraph(vec![text(
            "The sweep has no baseline: no differences are computed.",
        )])),
    }
    for group in &report.groups {
        group_blocks(group, &mut blocks);
    }
    for summary in report
        .summaries
        .iter()
        .filter(|summary| summary.tasks.len() > 1)
    {
        summary_blocks(summary, &mut blocks);
    }
    for model in report.page.iter().filter(|model| !model.tasks.is_empty()) {
        page_blocks(model, &mut blocks);
    }
    for model in &report.validity {
        validity_blocks(model, &mut blocks);
    }
    blocks
}

fn escape_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// `report.md`.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    for block in document(report) {
        match block {
            Block::Heading(level, title) => {
                out.push_str(&format!("{} {title}\n\n", "#".repeat(level as usize)));
            }
            Block::Paragraph(spans) => {
                for span in spans {
                    match span {
                        Span::Text(content) => out.push_str(&content.replace('*', "\\*")),
                        Span::Code(content) => out.push_str(&format!("`{content}`")),
                        Span::Strong(content) => out.push_str(&format!("**{content}**")),
                    }
                }
                out.push_str("\n\n");
            }
            Block::Table(header, rows) => {
                out.push_str(&format!("| {} |\n", header.join(" | ")));
                out.push_str(&format!(
                    "|{}|\n",
                    header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
                ));
                for row in rows {
                    let cells: Vec<String> = row.iter().map(|cell| escape_cell(cell)).collect();
                    out.push_str(&format!("| {} |\n", cells.join(" | ")));
                }
                out.push('\n');
            }
            Block::List(items) => {
                for item in items {
                    out.push_str(&format!("- {}\n", item.replace('\n', " ")));
                }
                out.push('\n');
            }
            Block::Image(file, description) => {
                out.push_str(&format!("![{description}]({file})\n\n"));
            }
        }
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// Sort key of a module kind: forward-pass order, unknown kinds last.
pub fn kind_order(kind: &str) -> usize {
    lorasweep_contract::ModuleKind::ALL
        .iter()
        .position(|known| known.name() == kind)
        .unwrap_or(usize::MAX)
}

/// `results.csv`: one row per job.
pub fn csv(table: &JobTable) -> Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(&table.columns)?;
    for row in &table.rows {
        writer.write_record(row.iter().map(plain))?;
    }
    let bytes = writer.into_inner().map_err(|error| error.into_error())?;
    Ok(String::from_utf8(bytes)?)
}

/// `results.json`: one object per job (the same columns as the CSV, nulls kept).
pub fn results_json(table: &JobTable) -> Result<String> {
    let records: Vec<Value> = table
        .rows
        .iter()
        .map(|row| {
            let record: Map<String, Value> = table
                .columns
                .iter()
                .cloned()
                .zip(row.iter().cloned())
                .collect();
            Value::Object(record)
        })
        .collect();
    Ok(serde_json::to_string_pretty(&records)? + "\n")
}

/// The aggregated tables as JSON (what `--format json` prints).
pub fn report_json(report: &Report) -> Result<String> {
    Ok(serde_json::to_string_pretty(report)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::SeedScore;

    fn seed(state: &str, score: Option<f64>) -> SeedScore {
        SeedScore {
            seed: Some(0),
            state: state.to_string(),
            score,
            error: None,
        }
    }

    fn cell(seeds: Vec<SeedScore>, mean: Option<f64>, failed: usize, pending: usize) -> ScoreCell {
        ScoreCell {
            mean,
            std: None,
            n: seeds.iter().filter(|seed| seed.score.is_some()).count(),
            failed,
            pending,
            seeds,
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_442_240), "2,442,240");
    }

    #[test]
    fn a_cell_without_scores_says_why_never_zero() {
        let failed = cell(vec![seed("failed", None)], None, 1, 0);
        assert_eq!(score_cell_text(&failed), "failed");
        assert_eq!(seeds_text(&failed), "0/1 (1 failed)");
        let pending = cell(
            vec![seed("failed", None), seed("pending", None)],
            None,
            1,
            1,
        );
        assert_eq!(score_cell_text(&pending), "pending");
        assert_eq!(seeds_text(&pending), "0/2 (1 failed, 1 pending)");
        let scored = cell(vec![seed("ok", Some(0.25))], Some(0.25), 0, 0);
        assert_eq!(score_cell_text(&scored), "0.2500");
    }
}
