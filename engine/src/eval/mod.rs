//! Evaluation scoring that needs no model: the code sandbox, HumanEval pass@k, GSM-style
//! answer matching, IFBench instruction verifiers, and the eval report format.
//!
//! - [`sandbox`]: run untrusted Python confined (limits, namespaces, timeouts).
//! - [`code`]: HumanEval problems and completions, pass@k through the sandbox.
//! - [`math`]: final-number extraction and exact match.
//! - [`instruct`]: IFBench instruction verifiers, prompt- and instruction-level accuracy.
//! - [`metrics`]: scores, perplexity, and the [`metrics::EvalReport`] JSON.

pub mod code;
pub mod instruct;
pub mod math;
pub mod metrics;
pub mod sandbox;
