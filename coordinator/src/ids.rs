//! Identifier newtypes, so a sweep id is never passed where a job id is expected.

use std::fmt;
use std::str::FromStr;

/// A sweep, numbered by the store from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SweepId(pub u64);

/// A job, numbered by the store from 1 across all sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// A worker, named by the worker itself when it registers (`host-pid-random`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(String);

/// The most characters a worker id may have.
pub const MAX_WORKER_ID_LEN: usize = 128;

/// Why a text is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A sweep or job id that is not a positive integer.
    #[error("invalid {what} id {text:?}: expected a positive integer")]
    NotANumber {
        /// `sweep` or `job`.
        what: &'static str,
        /// The text given.
        text: String,
    },
    /// A worker id that is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error(
        "invalid worker id {0:?}: expected 1 to 128 characters from letters, digits, '.', '_' and '-'"
    )]
    BadWorkerId(String),
}

impl SweepId {
    /// The number as stored.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl JobId {
    /// The number as stored.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl WorkerId {
    /// Checks and wraps a worker id.
    pub fn new(text: impl Into<String>) -> Result<WorkerId, IdError> {
        let text = text.into();
        let valid_characters = text
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "._-".contains(character));
        if text.is_empty() || text.len() > MAX_WORKER_ID_LEN || !valid_characters {
            return Err(IdError::BadWorkerId(text));
        }
        Ok(WorkerId(text))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn parse_positive(what: &'static str, text: &str) -> Result<u64, IdError> {
    match text.trim().parse::<u64>() {
        Ok(value) if value > 0 => Ok(value),
        _ => Err(IdError::NotANumber {
            what,
            text: text.to_string(),
        }),
    }
}

impl FromStr for SweepId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<SweepId, IdError> {
        parse_positive("sweep", text).map(SweepId)
    }
}

impl FromStr for JobId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<JobId, IdError> {
        parse_positive("job", text).map(JobId)
    }
}

impl FromStr for WorkerId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<WorkerId, IdError> {
        WorkerId::new(text)
    }
}

impl fmt::Display for SweepId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_ids_parse_positive_integers_only() {
        assert_eq!("12".parse::<SweepId>().unwrap(), SweepId(12));
        assert!("0".parse::<SweepId>().is_err());
        assert!("-3".parse::<SweepId>().is_err());
        assert!("abc".parse::<JobId>().is_err());
    }

    #[test]
    fn worker_ids_reject_odd_characters() {
        assert!(WorkerId::new("gpu-box.3_a").is_ok());
        assert!(WorkerId::new("").is_err());
        assert!(WorkerId::new("a b").is_err());
        assert!(WorkerId::new("x".repeat(MAX_WORKER_ID_LEN + 1)).is_err());
    }
}
