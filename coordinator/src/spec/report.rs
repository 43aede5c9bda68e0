//! The `report` section: the baseline the report compares against (by default vanilla LoRA,
//! when the sweep has it) and the validity panel (`report.validity`).

use super::fields::{read_value, Field, FieldValue, TrainField};
use super::placement::{ModuleKind, Placement};
use super::raw::{self, find, key_path, Context, Entry};
use super::{Baseline, ReportSettings, Rule, Sweep, Validity, Variant};

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
            validity: None,
        });
    };
    let entries = raw::mapping(
        context,
        &entry.value,
        "report",
        "a mapping of report settings",
        &["baseline", "validity"],
    )?;
    // Both are read before either error returns, so one run names every mistake.
    let baseline = match find(entries, "baseline") {
        Some(baseline) => read_baseline(context, baseline, sweep).map(Some),
        None => Some(default_baseline(sweep)),
    };
    let validity = match find(entries, "validity") {
        Some(validity) => read_validity(context, validity, sweep).map(Some),
        None => Some(None),
    };
    Some(ReportSettings {
        baseline: baseline?,
        validity: validity?,
    })
}

/// `report.validity`: `panel` (modules from the top of each rule's ranking, and as many at
/// random; at most the modules of the smallest model) and optional `rules`.
fn read_validity(context: &mut Context, entry: &Entry, sweep: &Sweep) -> Option<Validity> {
    let node = &entry.value;
    let entries = raw::mapping(
        context,
        node,
        "report.validity",
        "a mapping with `panel` (modules per rule) and optionally `rules`",
        &["panel", "rules"],
    )?;
    let modules = sweep
        .models
        .iter()
        .filter_map(|model| Some((model.id(), model.geometry()?)))
        .map(|(id, geometry)| (geometry.layers as usize * ModuleKind::ALL.len(), id))
        .min();
    let panel = match find(entries, "panel") {
        Some(panel) => {
            let path = "report.validity.panel";
            let value = raw::integer(context, &panel.value, path, 1, u64::from(u32::MAX))? as usize;
            if let Some((count, model)) = modules.filter(|(count, _)| value > *count) {
                context.error(
                    panel.value.loc,
                    path,
                    format!("at most the {count} modules of {model}"),
                    format!("{value}"),
                );
                return None;
            }
            value
        }
        None => {
            context.error(
                node.loc,
                "report.validity.panel",
                "`panel`: how many modules to take from the top of each rule's ranking (e.g. 8)",
                "no `panel`",
            );
            return None;
        }
    };
    let rules = match find(entries, "rules") {
        Some(rules) => read_rules(context, &rules.value)?,
        None => {
            let mut rules = vec![Rule::Page];
            for point in sweep.points() {
                if let Some(rule) = point.train.placement.rule() {
                    if !rules.contains(&rule) {
                        rules.push(rule);
                    }
                }
            }
            rules
        }
    };
    // The panel trains at the first point's rank on any module: every kind must hold it.
    if let Some(first) = sweep.points().first() {
        for model in &sweep.models {
            let Some(geometry) = model.geometry() else {
                continue;
            };
            let Some((limit, kind)) = ModuleKind::ALL
                .iter()
                .map(|kind| (geometry.max_rank(*kind), *kind))
                .min_by_key(|(limit, _)| *limit)
            else {
                continue;
            };
            if first.train.rank > limit {
                context.error(
                    node.loc,
                    "report.validity",
                    format!(
                        "a first sweep point whose rank fits every module of {} (≤ {limit}, \
                         set by {kind}): the panel trains at that rank",
                        model.id()
                    ),
                    format!("rank {}", first.train.rank),
                );
                return None;
            }
        }
    }
    let mut rules: Vec<Rule> = rules
        .into_iter()
        .filter(|rule| *rule != Rule::Random)
        .collect();
    rules.push(Rule::Random);
    Some(Validity { panel, rules })
}

/// `report.validity.rules`: a non-empty list of rule names, each once.
fn read_rules(context: &mut Context, node: &raw::Node) -> Option<Vec<Rule>> {
    let path = "report.validity.rules";
    let items = raw::list(context, node, path, "a list of placement rules", true)?;
    let names: Vec<&str> = Rule::ALL.iter().map(|rule| rule.name()).collect();
    let mut rules = Vec::new();
    let mut ok = true;
    for (index, item) in items.iter().enumerate() {
        let item_path = raw::index_path(path, index);
        let Some(text) = raw::string(context, item, &item_path, "a placement rule name") else {
            ok = false;
            continue;
        };
        match Rule::from_name(text) {
            Some(rule) if !rules.contains(&rule) => rules.push(rule),
            Some(rule) => {
                context.error(
                    item.loc,
                    &item_path,
                    "each rule once",
                    format!("{rule} again"),
                );
                ok = false;
            }
            None => {
                let hint = match raw::suggestion(text, &names) {
                    Some(close) => format!(" (did you mean `{close}`?)"),
                    None => String::new(),
                };
                context.error(
                    item.loc,
                    &item_path,
                    format!("a placement rule ({})", Rule::names_list()),
                    format!("`{text}`{hint}"),
                );
                ok = false;
            }
        }
    }
    ok.then_some(rules)
}

/// `report.baseline`: train fields and the values that pick the baseline's points.
fn read_baseline(context: &mut Context, baseline_entry: &Entry, sweep: &Sweep) -> Option<Baseline> {
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
    Some(baseline)
}
