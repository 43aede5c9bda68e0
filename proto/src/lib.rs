//! The lorasweep gRPC contract.
#![warn(missing_docs)]
