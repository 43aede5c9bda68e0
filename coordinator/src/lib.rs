//! The lorasweep coordinator.

pub mod graph;
pub mod spec;

pub mod client;
pub mod convert;
pub mod domain;
pub mod faults;
pub mod ids;
pub mod scheduler;
pub mod service;
pub mod store;
