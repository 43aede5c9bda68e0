//! The lorasweep engine: models, adapters, the PAGE probe and the other placement rules,
//! training, generation and evaluation.
//!
//! This crate knows nothing of gRPC: the coordinator and the worker agent call into it.

pub mod adapter;
pub mod assets;
pub mod bench;
pub mod chat;
pub mod data;
pub mod error;
pub mod eval;
pub mod evaluate;
pub mod fused;
pub mod generate;
pub mod jobs;
pub mod loader;
pub mod memory;
pub mod model;
pub mod ops;
pub mod parallel;
mod param;
pub mod peft;
pub mod placement;
pub mod probe;
pub mod rules;
pub mod tasks;
pub mod tokenizer;
pub mod train;
