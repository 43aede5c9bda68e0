//! The lorasweep coordinator.
#![warn(missing_docs)]
