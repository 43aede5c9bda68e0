//! The sweep file: YAML in, a validated [`Sweep`] out.
//!
//! Parsing goes in two steps, like a compiler front end:
//!
//! 1. [`raw`] turns the YAML text into a tree whose every node knows its line and column
//!    (saphyr's marked nodes), rejecting syntax errors, duplicate keys, tags and
//!    multi-document files;
//! 2. [`validate`] walks that tree field by field, rejects unknown keys, checks types, ranges
//!    and names, fills in defaults, checks every sweep point against the models it will run on,
//!    and builds the domain types below.
//!
//! Errors are collected rather than stopping at the first: a [`SpecErrors`] holds every
//! [`SpecError`] found, each naming `file:line:column`, the field path, what was expected
//! and what was found. The reference of every field and its default is
//! `experiments/README.md`.

use std::fmt;
use std::path::{Path, PathBuf};

mod axes;
mod checks;
mod fields;
mod models;
mod placement;
mod raw;
mod report;
mod validate;

pub use fields::{Field, FieldValue, ProbeField, TrainField};
pub use lorasweep_contract::{AInit, Estimator, Metric, NamedTask, Rule, Schedule, Variant};
pub use models::{Architecture, ModelGeometry, ModelRef, PackagedModel, TaskRef};
pub use placement::{ModuleKind, ModuleName, Placement};

/// The only sweep file version this build reads.
pub const SPEC_VERSION: u64 = 1;

/// The most sweep points (per model and task) a sweep may expand to.
pub const MAX_POINTS: usize = 100_000;

/// One problem in a sweep file, at one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {path}: expected {expected}, found {found}")]
pub struct SpecError {
    /// The file as the user named it (or the label given to [`Sweep::from_yaml_str`]).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field path, e.g. `sweep.grid.rank[2]`; `(root)` for the document itself and
    /// `(yaml)` for a syntax error.
    pub path: String,
    /// What was expected there.
    pub expected: String,
    /// What was found instead.
    pub found: String,
}

/// Every problem found in one sweep file, in the order they were found (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(formatter)?;
            }
            write!(formatter, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Why a sweep file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read at all.
    #[error("cannot read sweep file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid sweep.
    #[error("{0}")]
    Invalid(#[from] SpecErrors),
}

/// Settings of the PAGE probe jobs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeSettings {
    /// Probe batches averaged.
    pub batches: u32,
    /// Conversations per probe batch.
    pub batch_size: u32,
    /// Tokens per conversation (longer ones are truncated).
    pub max_len: u32,
    /// Adapter rank assumed by the probe.
    pub rank: u32,
    /// Adapter alpha assumed by the probe; `None` means 2 × rank.
    pub alpha: Option<f64>,
    /// The estimator.
    pub estimator: Estimator,
    /// The init of A.
    pub a_init: AInit,
    /// One probe job per seed (per model and task).
    pub seeds: Vec<u64>,
    /// Probe every (model, task) even when no train point needs it, so PAGE tables exist.
    pub always: bool,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            batches: 8,
            batch_size: 8,
            max_len: 256,
            rank: 16,
            alpha: None,
            estimator: Estimator::Sample,
            a_init: AInit::Kaiming,
            seeds: vec![0],
            always: true,
        }
    }
}

impl ProbeSettings {
    /// The alpha in effect: the one set, or 2 × rank.
    pub fn effective_alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * f64::from(self.rank))
    }
}

/// Settings of one training run (after the sweep axes are applied, of one train job).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: u32,
    /// Conversations per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per optimizer step.
    pub grad_accum: u32,
    /// Tokens per conversation (longer ones are truncated).
    pub max_len: u32,
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// Share of the steps spent warming up linearly from zero.
    pub warmup_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// LoRA alpha; `None` means 2 × rank.
    pub alpha: Option<f64>,
    /// LoRA rank.
    pub rank: u32,
    /// The LoRA variant.
    pub variant: Variant,
    /// Which modules get an adapter.
    pub placement: Placement,
    /// Seed of the adapter init, data order and random placements.
    pub seed: u64,
    /// LoRA+ learning-rate ratio of B to A (used by `loraplus` only).
    pub loraplus_ratio: f64,
    /// Steps between checkpoints.
    pub checkpoint_every: u32,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            steps: 300,
            batch_size: 16,
            grad_accum: 1,
            max_len: 512,
            lr: 2.0e-4,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            alpha: None,
            rank: 16,
            variant: Variant::Lora,
            placement: Placement::All,
            seed: 0,
            loraplus_ratio: 16.0,
            checkpoint_every: 50,
        }
    }
}

impl TrainSettings {
    /// The alpha in effect: the one set, or 2 × rank.
    pub fn effective_alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * f64::from(self.rank))
    }
}

/// Settings of the evaluation jobs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EvalSettings {
    /// Evaluation samples per task.
    pub limit: u32,
    /// Generation budget per sample.
    pub max_new_tokens: u32,
    /// Samples generated together.
    pub batch_size: u32,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            limit: 200,
            max_new_tokens: 256,
            batch_size: 8,
        }
    }
}

/// What each job may use and how often it may be tried.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resources {
    /// GPUs of one train job (data parallel); probe and eval jobs use one.
    pub gpus_per_job: u32,
    /// Attempts of one job before it is marked failed.
    pub max_attempts: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            gpus_per_job: 1,
            max_attempts: 3,
        }
    }
}

/// Which train points the report compares the others against: those whose settings equal
/// every field given here.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Baseline {
    /// Train fields and their values, in file order.
    pub fields: Vec<(TrainField, FieldValue)>,
}

impl Baseline {
    /// Whether a train point belongs to the baseline.
    pub fn matches(&self, train: &TrainSettings) -> bool {
        self.fields
            .iter()
            .all(|(field, value)| field.get(train) == *value)
    }
}

/// Report settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReportSettings {
    /// The baseline rows; `None` when the sweep has none (no paired differences).
    pub baseline: Option<Baseline>,
    /// The validity panel (`report.validity`); `None` when the sweep asks for none.
    pub validity: Option<Validity>,
}

/// Does a rule's ranking predict the gain training realises? Single-module adapters on a
/// panel of modules (each rule's top `panel` and `panel` more drawn at random), trained with
/// the settings of the sweep's first point and each train seed of the sweep, so the report
/// can set every rule's scores against the gains (see [`crate::graph::validity_points`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Validity {
    /// Modules taken from the top of each rule's ranking (and drawn at random).
    pub panel: usize,
    /// The rules whose rankings fill the panel, in file order: `validity.rules`, or by default
    /// PAGE and every rule a placement of the sweep reads; `random` (the `panel` random
    /// modules) always comes last.
    pub rules: Vec<Rule>,
}

/// One sweep axis: a field and the values it takes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Axis {
    /// The field.
    pub field: Field,
    /// Its values, in file order (never empty, no repeats).
    pub values: Vec<FieldValue>,
}

/// The sweep axes: a cartesian grid, crossed with lists walked together.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct SweepAxes {
    /// Crossed with each other (the first axis varies slowest).
    pub grid: Vec<Axis>,
    /// Walked together (all the same length), crossed with the grid (varying fastest).
    pub zip: Vec<Axis>,
}

impl SweepAxes {
    /// Points the axes expand to: the product of the grid lengths times the zip length
    /// (saturating; 1 with no axes).
    pub fn point_count(&self) -> usize {
        let grid = self.grid.iter().fold(1usize, |product, axis| {
            product.saturating_mul(axis.values.len())
        });
        let zip = self.zip.first().map_or(1, |axis| axis.values.len());
        grid.saturating_mul(zip)
    }

    /// Calls `visit` once per point with the value index of every axis: grid axes first,
    /// then zip axes, in the order of [`SweepAxes::grid`] and [`SweepAxes::zip`].
    pub(crate) fn for_each_point(&self, mut visit: impl FnMut(&[usize])) {
        let grid_lengths: Vec<usize> = self.grid.iter().map(|axis| axis.values.len()).collect();
        let zip_length = self.zip.first().map_or(1, |axis| axis.values.len());
        if grid_lengths.contains(&0) || zip_length == 0 {
            return;
        }
        let mut grid_index = vec![0usize; grid_lengths.len()];
        let mut indices = vec![0usize; self.grid.len() + self.zip.len()];
        loop {
            for zip_index in 0..zip_length {
                indices[..grid_index.len()].copy_from_slice(&grid_index);
                for slot in indices[grid_index.len()..].iter_mut() {
                    *slot = zip_index;
                }
                visit(&indices);
            }
            // Odometer over the grid, last axis fastest.
            let mut position = grid_index.len();
            loop {
                if position == 0 {
                    return;
                }
                position -= 1;
                grid_index[position] += 1;
                if grid_index[position] < grid_lengths[position] {
                    break;
                }
                grid_index[position] = 0;
            }
        }
    }

    /// The axis at a position of the index slice given by [`SweepAxes::for_each_point`].
    pub(crate) fn axis_at(&self, position: usize) -> &Axis {
        if position < self.grid.len() {
            &self.grid[position]
        } else {
            &self.zip[position - self.grid.len()]
        }
    }
}

/// One point of the sweep: the probe and train settings with the axes applied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SweepPoint {
    /// Probe settings at this point.
    pub probe: ProbeSettings,
    /// Train settings at this point.
    pub train: TrainSettings,
}

/// A validated sweep (version 1).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sweep {
    /// The sweep's name.
    pub name: String,
    /// Models, crossed with everything else.
    pub models: Vec<ModelRef>,
    /// Tasks, crossed with everything else.
    pub tasks: Vec<TaskRef>,
    /// Probe settings before the axes are applied.
    pub probe: ProbeSettings,
    /// Train settings before the axes are applied.
    pub train: TrainSettings,
    /// Evaluation settings.
    pub eval: EvalSettings,
    /// The sweep axes.
    pub axes: SweepAxes,
    /// Resources per job.
    pub resources: Resources,
    /// Report settings.
    pub report: ReportSettings,
}

impl Sweep {
    /// Reads and validates a sweep file. Relative model and task paths are taken from the
    /// file's folder, and local models and data are checked on disk.
    pub fn from_file(path: &Path) -> Result<Sweep, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base_dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Sweep::from_yaml_str(
            &text,
            &path.display().to_string(),
            Some(&base_dir),
        )?)
    }

    /// Validates sweep YAML text. `file` names it in errors. With `base_dir`, relative paths
    /// are resolved from there and checked on disk; without it, paths are kept as written and
    /// not checked (for a coordinator that received the text from elsewhere).
    pub fn from_yaml_str(
        text: &str,
        file: &str,
        base_dir: Option<&Path>,
    ) -> Result<Sweep, SpecErrors> {
        Sweep::load(text, raw::Context::new(file), base_dir)
    }

    /// Validates sweep text submitted from another machine: relative paths are taken from
    /// `base_dir` (the file's folder there) but not looked for on this one.
    pub fn from_submitted(
        text: &str,
        file: &str,
        base_dir: Option<&Path>,
    ) -> Result<Sweep, SpecErrors> {
        Sweep::load(
            text,
            raw::Context::new(file).without_path_checks(),
            base_dir,
        )
    }

    fn load(
        text: &str,
        mut context: raw::Context,
        base_dir: Option<&Path>,
    ) -> Result<Sweep, SpecErrors> {
        let file = context.file().to_string();
        let sweep = raw::load(text, &mut context)
            .and_then(|root| validate::build(&root, &mut context, base_dir));
        let errors = context.into_errors();
        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        // `build` returns `None` only after reporting an error; keep a clear error anyway.
        sweep.ok_or_else(|| {
            SpecErrors(vec![SpecError {
                file,
                line: 1,
                column: 1,
                path: "(root)".to_string(),
                expected: "a valid sweep".to_string(),
                found: "a document that could not be read".to_string(),
            }])
        })
    }

    /// Points per (model, task).
    pub fn point_count(&self) -> usize {
        self.axes.point_count()
    }

    /// Every point: the base settings with each combination of axis values applied, grid
    /// axes varying slowest-first in file order, zip axes fastest.
    pub fn points(&self) -> Vec<SweepPoint> {
        let mut points = Vec::with_capacity(self.point_count().min(MAX_POINTS));
        self.axes.for_each_point(|indices| {
            let mut point = SweepPoint {
                probe: self.probe.clone(),
                train: self.train.clone(),
            };
            for (position, &value_index) in indices.iter().enumerate() {
                let axis = self.axes.axis_at(position);
                axis.field.set(&mut point, &axis.values[value_index]);
            }
            points.push(point);
        });
        points
    }
}
