//! The lorasweep worker process, apart from its command line: the agent loop that registers
//! with the coordinator, leases jobs and reports them ([`agent`]), and the executor that turns
//! a leased job into engine calls on the device of its slot ([`executor`]).
//!
//! The engine (`lorasweep-engine`) knows nothing of the coordinator; the coordinator knows
//! nothing of tensors. This crate is where the two meet.

pub mod agent;
pub mod executor;
