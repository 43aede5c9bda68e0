//! The probe and train fields: their names, the values they take, and how a value is read
//! from YAML, applied to settings and read back. One table serves the fixed `probe:` and
//! `train:` mappings, the sweep axes and the report baseline, so they cannot disagree.

// Closed sets of names are defined with the job contract's macro, so every name set of a
// sweep file parses, prints and serializes the same way.
use lorasweep_contract::named_enum;
use std::fmt;

use super::placement::Placement;
use super::raw::{self, Context, FloatRange, Node};
use super::{AInit, Estimator, ProbeSettings, Schedule, SweepPoint, TrainSettings, Variant};

named_enum! {
    /// A field of the `train:` mapping.
    TrainField ("train field") {
        /// `steps`.
        Steps => "steps",
        /// `batch_size`.
        BatchSize => "batch_size",
        /// `grad_accum`.
        GradAccum => "grad_accum",
        /// `max_len`.
        MaxLen => "max_len",
        /// `lr`.
        Lr => "lr",
        /// `schedule`.
        Schedule => "schedule",
        /// `warmup_ratio`.
        WarmupRatio => "warmup_ratio",
        /// `weight_decay`.
        WeightDecay => "weight_decay",
        /// `max_grad_norm`.
        MaxGradNorm => "max_grad_norm",
        /// `alpha`.
        Alpha => "alpha",
        /// `rank`.
        Rank => "rank",
        /// `variant`.
        Variant => "variant",
        /// `placement`.
        Placement => "placement",
        /// `seed`.
        Seed => "seed",
        /// `loraplus_ratio`.
        LoraplusRatio => "loraplus_ratio",
        /// `checkpoint_every`.
        CheckpointEvery => "checkpoint_every",
    }
}

named_enum! {
    /// A field of the `probe:` mapping that may be a sweep axis (not `seeds` nor `always`).
    ProbeField ("probe field") {
        /// `batches`.
        Batches => "batches",
        /// `batch_size`.
        BatchSize => "batch_size",
        /// `max_len`.
        MaxLen => "max_len",
        /// `rank`.
        Rank => "rank",
        /// `alpha`.
        Alpha => "alpha",
        /// `estimator`.
        Estimator => "estimator",
        /// `a_init`.
        AInit => "a_init",
    }
}

/// A field a sweep axis may vary: any train field (named plainly, or `train.NAME`) or any
/// probe field but `seeds` and `always` (named `probe.NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// A train field.
    Train(TrainField),
    /// A probe field.
    Probe(ProbeField),
}

impl fmt::Display for Field {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Train(field) => write!(formatter, "{field}"),
            Field::Probe(field) => write!(formatter, "probe.{field}"),
        }
    }
}

impl serde::Serialize for Field {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Field {
    /// Parses an axis name: `rank`, `train.rank` or `probe.rank`.
    pub fn parse_axis_name(text: &str) -> Option<Field> {
        if let Some(name) = text.strip_prefix("probe.") {
            return ProbeField::from_name(name).map(Field::Probe);
        }
        let name = text.strip_prefix("train.").unwrap_or(text);
        TrainField::from_name(name).map(Field::Train)
    }

    /// Every axis name in its short form, for error messages.
    pub(crate) fn axis_names() -> Vec<String> {
        TrainField::ALL
            .iter()
            .map(|field| Field::Train(*field).to_string())
            .chain(
                ProbeField::ALL
                    .iter()
                    .map(|field| Field::Probe(*field).to_string()),
            )
            .collect()
    }

    /// The path of the fixed value this field has in the file (`train.rank`, `probe.rank`).
    pub fn fixed_path(&self) -> String {
        match self {
            Field::Train(field) => format!("train.{field}"),
            Field::Probe(field) => format!("probe.{field}"),
        }
    }

    pub(crate) fn kind(&self) -> ValueKind {
        match self {
            Field::Train(field) => field.kind(),
            Field::Probe(field) => field.kind(),
        }
    }

    /// Applies a value to a point.
    pub(crate) fn set(&self, point: &mut SweepPoint, value: &FieldValue) {
        match self {
            Field::Train(field) => field.set(&mut point.train, value),
            Field::Probe(field) => field.set(&mut point.probe, value),
        }
    }
}

/// A field's value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// A whole number (counts, sizes, seeds).
    Integer(u64),
    /// A real number (rates, ratios, alpha).
    Number(f64),
    /// A schedule.
    Schedule(Schedule),
    /// A LoRA variant.
    Variant(Variant),
    /// A placement.
    Placement(Placement),
    /// A probe estimator.
    Estimator(Estimator),
    /// A probe init of A.
    AInit(AInit),
}

impl fmt::Display for FieldValue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldValue::Integer(value) => write!(formatter, "{value}"),
            FieldValue::Number(value) => write!(formatter, "{value}"),
            FieldValue::Schedule(value) => write!(formatter, "{value}"),
            FieldValue::Variant(value) => write!(formatter, "{value}"),
            FieldValue::Placement(value) => write!(formatter, "{value}"),
            FieldValue::Estimator(value) => write!(formatter, "{value}"),
            FieldValue::AInit(value) => write!(formatter, "{value}"),
        }
    }
}

impl FieldValue {
    /// The value as JSON: numbers as numbers, names and placements as strings.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            FieldValue::Integer(value) => serde_json::Value::from(*value),
            FieldValue::Number(value) => serde_json::Value::from(*value),
            other => serde_json::Value::String(other.to_string()),
        }
    }
}

impl serde::Serialize for FieldValue {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            FieldValue::Integer(value) => serializer.serialize_u64(*value),
            FieldValue::Number(value) => serializer.serialize_f64(*value),
            other => serializer.collect_str(other),
        }
    }
}

/// What values a field takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ValueKind {
    Integer { min: u64, max: u64 },
    Number(FloatRange),
    Schedule,
    Variant,
    Placement,
    Estimator,
    AInit,
}

const fn integer(min: u64, max: u64) -> ValueKind {
    ValueKind::Integer { min, max }
}

const fn positive_up_to(max: f64) -> ValueKind {
    ValueKind::Number(FloatRange {
        min: 0.0,
        min_inclusive: false,
        max,
        max_inclusive: true,
    })
}

const fn from_zero(max: f64, max_inclusive: bool) -> ValueKind {
    ValueKind::Number(FloatRange {
        min: 0.0,
        min_inclusive: true,
        max,
        max_inclusive,
    })
}

const MAX_BATCH: u64 = 65_536;
const MAX_LEN: u64 = 131_072;
const MIN_LEN: u64 = 8;
const MAX_RANK: u64 = 65_536;
const MAX_STEPS: u64 = 10_000_000;
const MAX_SEED: u64 = i64::MAX as u64;

impl TrainField {
    pub(crate) fn kind(self) -> ValueKind {
        match self {
            TrainField::Steps | TrainField::CheckpointEvery => integer(1, MAX_STEPS),
            TrainField::BatchSize | TrainField::GradAccum => integer(1, MAX_BATCH),
            TrainField::MaxLen => integer(MIN_LEN, MAX_LEN),
            TrainField::Lr => positive_up_to(1.0),
            TrainField::Schedule => ValueKind::Schedule,
            TrainField::WarmupRatio => from_zero(1.0, false),
            TrainField::WeightDecay => from_zero(1.0, true),
            TrainField::MaxGradNorm | TrainField::Alpha => positive_up_to(1e6),
            TrainField::Rank => integer(1, MAX_RANK),
            TrainField::Variant => ValueKind::Variant,
            TrainField::Placement => ValueKind::Placement,
            TrainField::Seed => integer(0, MAX_SEED),
            TrainField::LoraplusRatio => positive_up_to(1e4),
        }
    }

    /// The field's value in train settings (alpha: the one in effect).
    pub fn get(self, train: &TrainSettings) -> FieldValue {
        match self {
            TrainField::Steps => FieldValue::Integer(train.steps.into()),
            TrainField::BatchSize => FieldValue::Integer(train.batch_size.into()),
            TrainField::GradAccum => FieldValue::Integer(train.grad_accum.into()),
            TrainField::MaxLen => FieldValue::Integer(train.max_len.into()),
            TrainField::Lr => FieldValue::Number(train.lr),
            TrainField::Schedule => FieldValue::Schedule(train.schedule),
            TrainField::WarmupRatio => FieldValue::Number(train.warmup_ratio),
            TrainField::WeightDecay => FieldValue::Number(train.weight_decay),
            TrainField::MaxGradNorm => FieldValue::Number(train.max_grad_norm),
            TrainField::Alpha => FieldValue::Number(train.effective_alpha()),
            TrainField::Rank => FieldValue::Integer(train.rank.into()),
            TrainField::Variant => FieldValue::Variant(train.variant),
            TrainField::Placement => FieldValue::Placement(train.placement.clone()),
            TrainField::Seed => FieldValue::Integer(train.seed),
            TrainField::LoraplusRatio => FieldValue::Number(train.loraplus_ratio),
            TrainField::CheckpointEvery => FieldValue::Integer(train.checkpoint_every.into()),
        }
    }

    /// Sets the field; a value of the wrong type (never produced by the validator) is ignored.
    pub(crate) fn set(self, train: &mut TrainSettings, value: &FieldValue) {
        match (self, value) {
            (TrainField::Steps, FieldValue::Integer(v)) => train.steps = to_u32(*v),
            (TrainField::BatchSize, FieldValue::Integer(v)) => train.batch_size = to_u32(*v),
            (TrainField::GradAccum, FieldValue::Integer(v)) => train.grad_accum = to_u32(*v),
            (TrainField::MaxLen, FieldValue::Integer(v)) => train.max_len = to_u32(*v),
            (TrainField::Lr, FieldValue::Number(v)) => train.lr = *v,
            (TrainField::Schedule, FieldValue::Schedule(v)) => train.schedule = *v,
            (TrainField::WarmupRatio, FieldValue::Number(v)) => train.warmup_ratio = *v,
            (TrainField::WeightDecay, FieldValue::Number(v)) => train.weight_decay = *v,
            (TrainField::MaxGradNorm, FieldValue::Number(v)) => train.max_grad_norm = *v,
            (TrainField::Alpha, FieldValue::Number(v)) => train.alpha = Some(*v),
            (TrainField::Rank, FieldValue::Integer(v)) => train.rank = to_u32(*v),
            (TrainField::Variant, FieldValue::Variant(v)) => train.variant = *v,
            (TrainField::Placement, FieldValue::Placement(v)) => train.placement = v.clone(),
            (TrainField::Seed, FieldValue::Integer(v)) => train.seed = *v,
            (TrainField::LoraplusRatio, FieldValue::Number(v)) => train.loraplus_ratio = *v,
            (TrainField::CheckpointEvery, FieldValue::Integer(v)) => {
                train.checkpoint_every = to_u32(*v)
            }
            (field, value) => debug_assert!(false, "{field} cannot take {value:?}"),
        }
    }
}

impl ProbeField {
    pub(crate) fn kind(self) -> ValueKind {
        match self {
            ProbeField::Batches => integer(1, 100_000),
            ProbeField::BatchSize => integer(1, MAX_BATCH),
            ProbeField::MaxLen => integer(MIN_LEN, MAX_LEN),
            ProbeField::Rank => integer(1, MAX_RANK),
            ProbeField::Alpha => positive_up_to(1e6),
            ProbeField::Estimator => ValueKind::Estimator,
            ProbeField::AInit => ValueKind::AInit,
        }
    }

    /// The field's value in probe settings (alpha: the one in effect).
    pub fn get(self, probe: &ProbeSettings) -> FieldValue {
        match self {
            ProbeField::Batches => FieldValue::Integer(probe.batches.into()),
            ProbeField::BatchSize => FieldValue::Integer(probe.batch_size.into()),
            ProbeField::MaxLen => FieldValue::Integer(probe.max_len.into()),
            ProbeField::Rank => FieldValue::Integer(probe.rank.into()),
            ProbeField::Alpha => FieldValue::Number(probe.effective_alpha()),
            ProbeField::Estimator => FieldValue::Estimator(probe.estimator),
            ProbeField::AInit => FieldValue::AInit(probe.a_init),
        }
    }

    /// Sets the field; a value of the wrong type (never produced by the validator) is ignored.
    pub(crate) fn set(self, probe: &mut ProbeSettings, value: &FieldValue) {
        match (self, value) {
            (ProbeField::Batches, FieldValue::Integer(v)) => probe.batches = to_u32(*v),
            (ProbeField::BatchSize, FieldValue::Integer(v)) => probe.batch_size = to_u32(*v),
            (ProbeField::MaxLen, FieldValue::Integer(v)) => probe.max_len = to_u32(*v),
            (ProbeField::Rank, FieldValue::Integer(v)) => probe.rank = to_u32(*v),
            (ProbeField::Alpha, FieldValue::Number(v)) => probe.alpha = Some(*v),
            (ProbeField::Estimator, FieldValue::Estimator(v)) => probe.estimator = *v,
            (ProbeField::AInit, FieldValue::AInit(v)) => probe.a_init = *v,
            (field, value) => debug_assert!(false, "probe.{field} cannot take {value:?}"),
        }
    }
}

fn to_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn named<T>(
    context: &mut Context,
    node: &Node,
    path: &str,
    what: &str,
    parse: fn(&str) -> Option<T>,
    names: String,
) -> Option<T> {
    let expected = format!("{what}: one of {names}");
    let text = raw::string(context, node, path, &expected)?;
    match parse(text) {
        Some(value) => Some(value),
        None => {
            context.error(node.loc, path, expected, raw::describe(node));
            None
        }
    }
}

/// Reads a value of the given kind; `None` after reporting an error.
pub(crate) fn read_value(
    context: &mut Context,
    node: &Node,
    path: &str,
    kind: ValueKind,
) -> Option<FieldValue> {
    match kind {
        ValueKind::Integer { min, max } => {
            raw::integer(context, node, path, min, max).map(FieldValue::Integer)
        }
        ValueKind::Number(range) => raw::number(context, node, path, range).map(FieldValue::Number),
        ValueKind::Schedule => named(
            context,
            node,
            path,
            "a schedule",
            Schedule::from_name,
            Schedule::names_list(),
        )
        .map(FieldValue::Schedule),
        ValueKind::Variant => named(
            context,
            node,
            path,
            "a LoRA variant",
            Variant::from_name,
            Variant::names_list(),
        )
        .map(FieldValue::Variant),
        ValueKind::Estimator => named(
            context,
            node,
            path,
            "a probe estimator",
            Estimator::from_name,
            Estimator::names_list(),
        )
        .map(FieldValue::Estimator),
        ValueKind::AInit => named(
            context,
            node,
            path,
            "an init of A",
            AInit::from_name,
            AInit::names_list(),
        )
        .map(FieldValue::AInit),
        ValueKind::Placement => {
            let text = raw::string(context, node, path, "a placement string, e.g. dominant")?;
            match Placement::parse(text) {
                Ok(placement) => Some(FieldValue::Placement(placement)),
                Err(expected) => {
                    context.error(node.loc, path, expected.to_string(), raw::describe(node));
                    None
                }
            }
        }
    }
}
