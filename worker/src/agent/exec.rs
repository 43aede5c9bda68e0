//! The contract between the agent and the executor that runs its jobs: [`JobExecutor`]
//! (implemented by the engine side, `crate::executor`), what a successful job hands back
//! ([`JobOutput`], [`OutputFile`]) and why one did not succeed ([`ExecError`]).
//!
//! It does not run anything: the agent loop is in `super`, and what a running job may ask
//! of the coordinator is [`JobContext`] (`super::context`).

use std::path::PathBuf;

use serde_json::Value;

use lorasweep_coordinator::domain::JobAssignment;

use super::context::{ContextError, JobContext};

/// Runs jobs. Implemented by the engine; called on a blocking thread, one call per job
/// (a gang's local ranks come in one call: see [`JobAssignment::local_ranks`]).
pub trait JobExecutor: Send + Sync + 'static {
    /// Runs one job to its end. Check [`JobContext::is_cancelled`] regularly and return
    /// [`ExecError::Cancelled`] when it turns true.
    fn run(&self, job: &JobAssignment, context: &JobContext) -> Result<JobOutput, ExecError>;
}

/// A file the job produced, uploaded before the job is reported done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The artifact name (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The local file.
    pub path: PathBuf,
}

/// What a successful job hands back.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    /// The result document (metrics, scores).
    pub result: Value,
    /// Files to upload as the job's outputs (only rank 0's are used).
    pub artifacts: Vec<OutputFile>,
    /// A content key under which this result may be reused by later jobs (probes).
    pub cache_key: Option<String>,
}

impl JobOutput {
    /// A result with no files and no cache key.
    pub fn new(result: Value) -> JobOutput {
        JobOutput {
            result,
            artifacts: Vec::new(),
            cache_key: None,
        }
    }
}

/// Why a job did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The job saw [`JobContext::is_cancelled`] and stopped.
    #[error("cancelled")]
    Cancelled,
    /// It may succeed on another attempt (out of memory, a lost peer rank, an IO error).
    #[error("{0}")]
    Retryable(String),
    /// Another attempt cannot help (bad parameters, missing model).
    #[error("{0}")]
    Permanent(String),
}

impl From<ContextError> for ExecError {
    fn from(error: ContextError) -> ExecError {
        match error {
            ContextError::Cancelled => ExecError::Cancelled,
            other => ExecError::Retryable(other.to_string()),
        }
    }
}
