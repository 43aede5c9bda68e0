//! The lorasweep engine: models, adapters, the PAGE probe, training, generation and evaluation.
//!
//! This crate knows nothing of gRPC: the coordinator and the worker agent call into it.
#![warn(missing_docs)]

pub mod chat;
pub mod data;
pub mod tokenizer;
