//! From the located YAML tree to a [`Sweep`]: every key checked, every value read with its
//! type and range, defaults filled in. The `sweep:` axes are read in [`super::axes`]; the
//! checks across sections (ranks against models, the baseline against the points) are in
//! [`super::checks`] and run only when every section read cleanly, so one typo does not
//! cause a cascade of unrelated errors. Errors are collected in the [`Context`].

use std::collections::HashMap;
use std::path::Path;

use super::axes::read_axes;
use super::checks::check_points;
use super::fields::{read_value, Field, ProbeField, TrainField};
use super::models::{read_hf_geometry, resolve, ModelRef, PackagedModel, TaskRef};
use super::raw::{self, find, index_path, key_path, Context, Entry, Loc, Node, Value};
use super::report::read_report;
use super::{
    EvalSettings, ProbeSettings, ReportSettings, Resources, Sweep, SweepAxes, TrainSettings,
    SPEC_VERSION,
};
use super::{Metric, NamedTask};

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "models",
    "tasks",
    "probe",
    "train",
    "eval",
    "sweep",
    "resources",
    "report",
];

/// Where a value was written.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub loc: Loc,
    pub path: String,
}

impl Origin {
    pub fn describe(&self) -> String {
        format!(
            "{} (line {}, column {})",
            self.path, self.loc.line, self.loc.column
        )
    }
}

/// Where each axis value was written, parallel to [`SweepAxes`].
#[derive(Debug, Default)]
pub(crate) struct AxisOrigins {
    pub grid: Vec<Vec<Origin>>,
    pub zip: Vec<Vec<Origin>>,
}

impl AxisOrigins {
    pub fn at(&self, position: usize) -> &[Origin] {
        if position < self.grid.len() {
            &self.grid[position]
        } else {
            &self.zip[position - self.grid.len()]
        }
    }
}

pub(crate) fn build(root: &Node, context: &mut Context, base_dir: Option<&Path>) -> Option<Sweep> {
    let entries = raw::mapping(
        context,
        root,
        "",
        "a mapping of sweep settings (version, name, models, tasks, …)",
        TOP_KEYS,
    )?;
    let version = required(
        context,
        root,
        entries,
        "version",
        "the sweep file version, 1",
    )
    .and_then(|entry| read_version(context, &entry.value));
    let name = required(context, root, entries, "name", "the sweep's name")
        .and_then(|entry| read_name(context, &entry.value));
    let models = required(context, root, entries, "models", "a list of models")
        .and_then(|entry| read_models(context, &entry.value, base_dir));
    let tasks = required(context, root, entries, "tasks", "a list of tasks")
        .and_then(|entry| read_tasks(context, &entry.value, base_dir));

    let mut fixed: HashMap<Field, Origin> = HashMap::new();
    let probe = match find(entries, "probe") {
        Some(entry) => read_probe(context, &entry.value, &mut fixed),
        None => Some(ProbeSettings::default()),
    };
    let train = match find(entries, "train") {
        Some(entry) => read_train(context, &entry.value, &mut fixed),
        None => Some(TrainSettings::default()),
    };
    let eval = match find(entries, "eval") {
        Some(entry) => read_eval(context, &entry.value),
        None => Some(EvalSettings::default()),
    };
    let resources = match find(entries, "resources") {
        Some(entry) => read_resources(context, &entry.value),
        None => Some(Resources::default()),
    };
    let axes = match find(entries, "sweep") {
        Some(entry) => read_axes(context, &entry.value, &fixed),
        None => Some((SweepAxes::default(), AxisOrigins::default())),
    };

    let (Some(_), Some(name), Some((models, model_origins)), Some(tasks)) =
        (version, name, models, tasks)
    else {
        return None;
    };
    let (Some(probe), Some(train), Some(eval), Some(resources), Some((axes, axis_origins))) =
        (probe, train, eval, resources, axes)
    else {
        return None;
    };
    let mut sweep = Sweep {
        name,
        models,
        tasks,
        probe,
        train,
        eval,
        axes,
        resources,
        report: ReportSettings {
            baseline: None,
            validity: None,
        },
    };
    if context.error_count() > 0 {
        return None;
    }
    check_points(context, &sweep, &model_origins, &fixed, &axis_origins);
    sweep.report = read_report(context, find(entries, "report"), &sweep)?;
    Some(sweep)
}

/// The entry of a required key, or an error at the mapping.
fn required<'n>(
    context: &mut Context,
    mapping: &Node,
    entries: &'n [Entry],
    key: &str,
    what: &str,
) -> Option<&'n Entry> {
    let entry = find(entries, key);
    if entry.is_none() {
        context.error(
            mapping.loc,
            key,
            format!("a `{key}` key ({what})"),
            "no such key",
        );
    }
    entry
}

fn read_version(context: &mut Context, node: &Node) -> Option<u64> {
    let expected = format!("{SPEC_VERSION} (the sweep file version this build reads)");
    match node.value {
        Value::Int(value) if value >= 0 && value as u64 == SPEC_VERSION => Some(SPEC_VERSION),
        Value::Invalid => None,
        _ => {
            context.error(node.loc, "version", expected, raw::describe(node));
            None
        }
    }
}

fn read_name(context: &mut Context, node: &Node) -> Option<String> {
    let expected =
        "a name of 1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit";
    let text = raw::string(context, node, "name", expected)?;
    let valid = !text.is_empty()
        && text.len() <= 64
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Some(text.to_string())
    } else {
        context.error(node.loc, "name", expected, raw::describe(node));
        None
    }
}

fn read_models(
    context: &mut Context,
    node: &Node,
    base_dir: Option<&Path>,
) -> Option<(Vec<ModelRef>, Vec<Origin>)> {
    let items = raw::list(context, node, "models", "list of models", true)?;
    let mut models = Vec::new();
    let mut origins: Vec<Origin> = Vec::new();
    let mut ok = true;
    for (index, item) in items.iter().enumerate() {
        let path = index_path("models", index);
        let Some(model) = read_model(context, item, &path, base_dir) else {
            ok = false;
            continue;
        };
        if let Some(first) = models
            .iter()
            .position(|other: &ModelRef| other.id() == model.id())
        {
            context.error(
                item.loc,
                &path,
                "each model once",
                format!("`{}` again (first at {})", model.id(), origins[first].path),
            );
            ok = false;
            continue;
        }
        models.push(model);
        origins.push(Origin {
            loc: item.loc,
            path,
        });
    }
    ok.then_some((models, origins))
}

fn read_model(
    context: &mut Context,
    node: &Node,
    path: &str,
    base_dir: Option<&Path>,
) -> Option<ModelRef> {
    let expected = format!(
        "a model: {}, a .gguf file or a Hugging Face model directory",
        PackagedModel::names_list()
    );
    let text = raw::string(context, node, path, &expected)?;
    if let Some(model) = PackagedModel::from_name(text) {
        return Some(ModelRef::Packaged { model });
    }
    let resolved = resolve(text, base_dir);
    if text.ends_with(".gguf") {
        if base_dir.is_some() && context.checks_paths() && !resolved.is_file() {
            context.error(
                node.loc,
                path,
                "an existing GGUF file",
                format!("no file at {}", resolved.display()),
            );
            return None;
        }
        return Some(ModelRef::Gguf { path: resolved });
    }
    let looks_like_path = text.contains('/') || text.starts_with('.');
    let is_local_dir = base_dir.is_some() && context.checks_paths() && resolved.is_dir();
    // Text from another machine that names a folder there was checked on that machine.
    let remote_folder = base_dir.is_some() && !context.checks_paths();
    if !looks_like_path && !is_local_dir && !remote_folder {
        let names: Vec<&str> = PackagedModel::ALL
            .iter()
            .map(|model| model.name())
            .collect();
        let hint = match raw::suggestion(text, &names) {
            Some(close) => format!(" (did you mean `{close}`?)"),
            None => String::new(),
        };
        context.error(
            node.loc,
            path,
            expected,
            format!("{}{hint}", raw::describe(node)),
        );
        return None;
    }
    if base_dir.is_none() || !context.checks_paths() {
        return Some(ModelRef::HfDir {
            path: resolved,
            geometry: None,
        });
    }
    if !is_local_dir {
        context.error(
            node.loc,
            path,
            "an existing Hugging Face model directory",
            format!("no directory at {}", resolved.display()),
        );
        return None;
    }
    match read_hf_geometry(&resolved) {
        Ok(geometry) => Some(ModelRef::HfDir {
            path: resolved,
            geometry: Some(geometry),
        }),
        Err((expected, found)) => {
            context.error(node.loc, path, expected, found);
            None
        }
    }
}

fn read_tasks(context: &mut Context, node: &Node, base_dir: Option<&Path>) -> Option<Vec<TaskRef>> {
    let items = raw::list(context, node, "tasks", "list of tasks", true)?;
    let mut tasks: Vec<TaskRef> = Vec::new();
    let mut paths: Vec<String> = Vec::new();
    let mut ok = true;
    for (index, item) in items.iter().enumerate() {
        let path = index_path("tasks", index);
        let Some(task) = read_task(context, item, &path, base_dir) else {
            ok = false;
            continue;
        };
        if let Some(first) = tasks.iter().position(|other| other.id() == task.id()) {
            context.error(
                item.loc,
                &path,
                "each task once",
                format!("`{}` again (first at {})", task.id(), paths[first]),
            );
            ok = false;
            continue;
        }
        tasks.push(task);
        paths.push(path);
    }
    ok.then_some(tasks)
}

fn task_file(
    context: &mut Context,
    node: &Node,
    path: &str,
    text: &str,
    base_dir: Option<&Path>,
) -> Option<std::path::PathBuf> {
    let resolved = resolve(text, base_dir);
    if base_dir.is_some() && context.checks_paths() && !resolved.is_file() {
        context.error(
            node.loc,
            path,
            "an existing JSONL file",
            format!("no file at {}", resolved.display()),
        );
        return None;
    }
    Some(resolved)
}

fn read_task(
    context: &mut Context,
    node: &Node,
    path: &str,
    base_dir: Option<&Path>,
) -> Option<TaskRef> {
    let expected = format!(
        "a task: {}, a .jsonl file, or {{path: FILE.jsonl, metric: {}}}",
        NamedTask::names_list(),
        Metric::USER
            .iter()
            .map(|metric| metric.name())
            .collect::<Vec<_>>()
            .join("|")
    );
    match &node.value {
        Value::Str(text) => {
            if let Some(task) = NamedTask::from_name(text) {
                return Some(TaskRef::Named { task });
            }
            if !text.ends_with(".jsonl") {
                let names: Vec<&str> = NamedTask::ALL.iter().map(|task| task.name()).collect();
                let hint = match raw::suggestion(text, &names) {
                    Some(close) => format!(" (did you mean `{close}`?)"),
                    None => String::new(),
                };
                context.error(
                    node.loc,
                    path,
                    expected,
                    format!("{}{hint}", raw::describe(node)),
                );
                return None;
            }
            let file = task_file(context, node, path, text, base_dir)?;
            Some(TaskRef::Jsonl {
                path: file,
                metric: Metric::Loss,
            })
        }
        Value::Map(_) => {
            let entries = raw::mapping(context, node, path, &expected, &["path", "metric"])?;
            let file_entry = required(context, node, entries, "path", "the task's JSONL file");
            let file = file_entry.and_then(|entry| {
                let entry_path = key_path(path, "path");
                let text = raw::string(context, &entry.value, &entry_path, "a .jsonl file path")?;
                if !text.ends_with(".jsonl") {
                    context.error(
                        entry.value.loc,
                        &entry_path,
                        "a .jsonl file path",
                        raw::describe(&entry.value),
                    );
                    return None;
                }
                task_file(context, &entry.value, &entry_path, text, base_dir)
            });
            let metric = match find(entries, "metric") {
                Some(entry) => {
                    let entry_path = key_path(path, "metric");
                    let what = format!("a metric: one of {}", Metric::user_names_list());
                    let text = raw::string(context, &entry.value, &entry_path, &what)?;
                    match Metric::parse_user(text) {
                        Ok(metric) => Some(metric),
                        Err(_) => {
                            context.error(
                                entry.value.loc,
                                &entry_path,
                                what,
                                raw::describe(&entry.value),
                            );
                            None
                        }
                    }
                }
                None => Some(Metric::Loss),
            };
            Some(TaskRef::Jsonl {
                path: file?,
                metric: metric?,
            })
        }
        Value::Invalid => None,
        _ => {
            context.error(node.loc, path, expected, raw::describe(node));
            None
        }
    }
}

fn read_probe(
    context: &mut Context,
    node: &Node,
    fixed: &mut HashMap<Field, Origin>,
) -> Option<ProbeSettings> {
    let mut allowed: Vec<&str> = ProbeField::ALL.iter().map(|field| field.name()).collect();
    allowed.extend(["seeds", "always"]);
    let entries = raw::mapping(
        context,
        node,
        "probe",
        "a mapping of probe settings",
        &allowed,
    )?;
    let mut probe = ProbeSettings::default();
    let mut ok = true;
    for entry in entries {
        let path = key_path("probe", &entry.key);
        match entry.key.as_str() {
            "seeds" => match read_seeds(context, &entry.value, &path) {
                Some(seeds) => probe.seeds = seeds,
                None => ok = false,
            },
            "always" => match raw::boolean(context, &entry.value, &path) {
                Some(always) => probe.always = always,
                None => ok = false,
            },
            key => {
                let Some(field) = ProbeField::from_name(key) else {
                    ok = false; // reported as an unknown key
                    continue;
                };
                match read_value(context, &entry.value, &path, field.kind()) {
                    Some(value) => {
                        field.set(&mut probe, &value);
                        fixed.insert(
                            Field::Probe(field),
                            Origin {
                                loc: entry.value.loc,
                                path,
                            },
                        );
                    }
                    None => ok = false,
                }
            }
        }
    }
    ok.then_some(probe)
}

fn read_seeds(context: &mut Context, node: &Node, path: &str) -> Option<Vec<u64>> {
    let items = raw::list(context, node, path, "list of probe seeds", true)?;
    let mut seeds: Vec<u64> = Vec::new();
    let mut ok = true;
    for (index, item) in items.iter().enumerate() {
        let item_path = index_path(path, index);
        let Some(seed) = raw::integer(context, item, &item_path, 0, i64::MAX as u64) else {
            ok = false;
            continue;
        };
        if let Some(first) = seeds.iter().position(|other| *other == seed) {
            context.error(
                item.loc,
                &item_path,
                "distinct seeds",
                format!("{seed} again (first at {})", index_path(path, first)),
            );
            ok = false;
            continue;
        }
        seeds.push(seed);
    }
    ok.then_some(seeds)
}

fn read_train(
    context: &mut Context,
    node: &Node,
    fixed: &mut HashMap<Field, Origin>,
) -> Option<TrainSettings> {
    let allowed: Vec<&str> = TrainField::ALL.iter().map(|field| field.name()).collect();
    let entries = raw::mapping(
        context,
        node,
        "train",
        "a mapping of train settings",
        &allowed,
    )?;
    let mut train = TrainSettings::default();
    let mut ok = true;
    for entry in entries {
        let Some(field) = TrainField::from_name(&entry.key) else {
            ok = false; // reported as an unknown key
            continue;
        };
        let path = key_path("train", &entry.key);
        match read_value(context, &entry.value, &path, field.kind()) {
            Some(value) => {
                field.set(&mut train, &value);
                fixed.insert(
                    Field::Train(field),
                    Origin {
                        loc: entry.value.loc,
                        path,
                    },
                );
            }
            None => ok = false,
        }
    }
    ok.then_some(train)
}

/// Reads a mapping of whole-number settings: `(key, min, max, slot)`.
fn read_integers(
    context: &mut Context,
    node: &Node,
    section: &str,
    what: &str,
    fields: &mut [(&str, u64, u64, &mut u32)],
) -> bool {
    let allowed: Vec<&str> = fields.iter().map(|(key, ..)| *key).collect();
    let Some(entries) = raw::mapping(context, node, section, what, &allowed) else {
        return false;
    };
    let mut ok = entries
        .iter()
        .all(|entry| allowed.contains(&entry.key.as_str()));
    for (key, min, max, slot) in fields.iter_mut() {
        if let Some(entry) = find(entries, key) {
            match raw::integer(context, &entry.value, &key_path(section, key), *min, *max) {
                Some(value) => **slot = u32::try_from(value).unwrap_or(u32::MAX),
                None => ok = false,
            }
        }
    }
    ok
}

fn read_eval(context: &mut Context, node: &Node) -> Option<EvalSettings> {
    let mut eval = EvalSettings::default();
    let ok = read_integers(
        context,
        node,
        "eval",
        "a mapping of eval settings",
        &mut [
            ("limit", 1, 1_000_000, &mut eval.limit),
            ("max_new_tokens", 1, 32_768, &mut eval.max_new_tokens),
            ("batch_size", 1, 4_096, &mut eval.batch_size),
        ],
    );
    ok.then_some(eval)
}

fn read_resources(context: &mut Context, node: &Node) -> Option<Resources> {
    let mut resources = Resources::default();
    let ok = read_integers(
        context,
        node,
        "resources",
        "a mapping of resource settings",
        &mut [
            ("gpus_per_job", 1, 64, &mut resources.gpus_per_job),
            ("max_attempts", 1, 100, &mut resources.max_attempts),
        ],
    );
    ok.then_some(resources)
}
