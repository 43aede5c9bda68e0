//! The typed job contract between the coordinator and its workers, defined once.
//!
//! The coordinator compiles a sweep into [`JobParams`] (one of [`ProbeParams`],
//! [`TrainParams`], [`EvalParams`]); the wire carries them as versioned JSON
//! ([`JobParams::to_wire`]: a `schema` number and the parameters, unknown fields rejected);
//! the worker reads them back once ([`JobParams::from_wire`]) and hands the typed values to the
//! engine. Results come back the same way ([`ProbeSummary`], [`TrainSummary`],
//! [`EvalSummary`], which records the sandbox [`Isolation`] a code evaluation ran under).
//!
//! Every name of the vocabulary (variants, placements, placement rules, schedules, estimators,
//! A inits, task names, metrics, module kinds) is written here and only here: each type has one
//! [`std::str::FromStr`] and one [`std::fmt::Display`], and serializes as that name.
//!
//! This crate depends on neither candle nor tonic.

#[macro_use]
mod named;
mod isolation;
mod job;
mod placement;
mod probe;
mod result;
mod vocab;

pub use isolation::{Identity, Isolation};
pub use job::{
    from_wire, wire, EvalParams, JobKey, JobKind, JobParams, ProbeInputs, ProbeParams, TrainParams,
    WireError, SCHEMA,
};
pub use named::UnknownName;
pub use placement::{Placement, PlacementSyntaxError};
pub use probe::{ModuleScore, ProbeResult, ProbeSettings};
pub use result::{EvalSummary, ModuleRank, ProbeSummary, TrainSummary};
pub use vocab::{
    AInit, Estimator, Metric, ModuleId, ModuleKind, NamedTask, Rule, Schedule, Variant,
};
