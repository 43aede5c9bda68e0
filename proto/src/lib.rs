//! The lorasweep gRPC contract: the messages and services of `proto/lorasweep.proto`,
//! compiled at build time by `protox` and `tonic-prost-build` (no `protoc` needed).
//!
//! Only the coordinator's conversion module and its client use these types; everything
//! else speaks the coordinator's domain types.

/// The wire protocol version. Register and Heartbeat refuse a peer that speaks another one.
/// Bump it on any change that an older peer would misread.
pub const PROTOCOL_VERSION: u32 = 1;

/// Generated messages, clients and servers of package `lorasweep.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod v1 {
    tonic::include_proto!("lorasweep.v1");
}
