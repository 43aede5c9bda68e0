//! Whether trying a failed job again can help. Every engine error says so through
//! [`Classify`], so the worker reports a job that ran out of device memory, lost a
//! data-parallel rank or hit a device reset as retryable (the coordinator leases it again,
//! perhaps elsewhere), and a job with bad data or a bad setting as permanent (it would fail the
//! same way every time).

use crate::adapter::AdapterError;
use crate::evaluate::EvalError;
use crate::generate::GenerateError;
use crate::jobs::JobError;
use crate::parallel::ReduceError;
use crate::probe::ProbeError;
use crate::train::TrainError;

/// Whether a failed job may succeed when tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A passing condition: out of memory, a lost rank, a device reset, a failed write.
    Retryable,
    /// The job itself is wrong (data, settings, model): it would fail again.
    Permanent,
}

/// An engine error that knows whether trying again can help.
pub trait Classify {
    /// Whether the failed job may succeed when tried again.
    fn retry(&self) -> Retry;
}

/// Device conditions that pass, as the CUDA driver, cuBLAS, NCCL and candle's allocator name
/// them in their messages (candle carries them as text).
const PASSING_DEVICE_ERRORS: [&str; 9] = [
    "out of memory",
    "OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_SYSTEM_NOT_READY",
    "nccl",
];

/// A tensor error is retryable when it reports a passing device condition (out of memory, a
/// device reset, a failed collective); any other tensor error is a bug or bad input.
impl Classify for candle_core::Error {
    fn retry(&self) -> Retry {
        let text = self.to_string();
        let lowered = text.to_lowercase();
        let passing = PASSING_DEVICE_ERRORS
            .iter()
            .any(|needle| text.contains(needle) || lowered.contains(&needle.to_lowercase()));
        if passing {
            Retry::Retryable
        } else {
            Retry::Permanent
        }
    }
}

/// A collective that failed lost a rank (or timed out waiting for one): another attempt may
/// have them all; ranks that disagree about what they train would disagree again.
impl Classify for ReduceError {
    fn retry(&self) -> Retry {
        match self {
            ReduceError::Mismatch(_) => Retry::Permanent,
            ReduceError::Tensor(error) => error.retry(),
            _ => Retry::Retryable,
        }
    }
}

impl Classify for AdapterError {
    fn retry(&self) -> Retry {
        match self {
            AdapterError::Tensor(error) => error.retry(),
            _ => Retry::Permanent,
        }
    }
}

impl Classify for ProbeError {
    fn retry(&self) -> Retry {
        match self {
            ProbeError::Tensor(error) => error.retry(),
            ProbeError::Adapter(error) => error.retry(),
            ProbeError::NoData | ProbeError::NotFinite { .. } => Retry::Permanent,
        }
    }
}

impl Classify for TrainError {
    fn retry(&self) -> Retry {
        match self {
            TrainError::Tensor(error) => error.retry(),
            TrainError::Collective(error) => error.retry(),
            // A checkpoint that could not be written (a full or failing disk) may be written
            // on the next attempt, perhaps on another worker.
            TrainError::Checkpoint { .. } => Retry::Retryable,
            _ => Retry::Permanent,
        }
    }
}

impl Classify for GenerateError {
    fn retry(&self) -> Retry {
        match self {
            GenerateError::Tensor(error) => error.retry(),
            _ => Retry::Permanent,
        }
    }
}

impl Classify for JobError {
    fn retry(&self) -> Retry {
        match self {
            JobError::Probe(error) => error.retry(),
            JobError::Train(error) => error.retry(),
            JobError::Adapter(error) => error.retry(),
            JobError::Tensor(error) => error.retry(),
            // A rank that could not be set up or panicked: the group may form next time.
            JobError::Parallel(_) => Retry::Retryable,
            // A file of the job's own that could not be written or read back.
            JobError::File { .. } => Retry::Retryable,
            JobError::Model(_)
            | JobError::Asset(_)
            | JobError::DataFile(_)
            | JobError::Data(_)
            | JobError::Placement(_)
            | JobError::Peft(_) => Retry::Permanent,
        }
    }
}

impl Classify for EvalError {
    fn retry(&self) -> Retry {
        match self {
            EvalError::Job(error) => error.retry(),
            EvalError::Generate(error) => error.retry(),
            EvalError::Tensor(error) => error.retry(),
            _ => Retry::Permanent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_conditions_that_pass_are_retryable() {
        let oom = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".to_string(),
        );
        assert_eq!(oom.retry(), Retry::Retryable);
        assert_eq!(JobError::Tensor(oom).retry(), Retry::Retryable);
        let reset = candle_core::Error::Msg("CUDA_ERROR_ECC_UNCORRECTABLE".to_string());
        assert_eq!(
            TrainError::Tensor(reset).retry(),
            Retry::Retryable,
            "a device reset during training"
        );
        let lost = ReduceError::GroupFailed("rank 1 exited".to_string());
        assert_eq!(
            JobError::Train(TrainError::Collective(lost)).retry(),
            Retry::Retryable,
            "a lost rank"
        );
        assert_eq!(
            JobError::Parallel("rank 2 panicked".to_string()).retry(),
            Retry::Retryable
        );
    }

    #[test]
    fn bad_data_and_settings_are_permanent() {
        let shape = candle_core::Error::Msg("shape mismatch in matmul, lhs: [2, 3]".to_string());
        assert_eq!(shape.retry(), Retry::Permanent);
        assert_eq!(
            JobError::Data("no conversation has a response".to_string()).retry(),
            Retry::Permanent
        );
        assert_eq!(
            JobError::Train(TrainError::Settings("lr must be positive".to_string())).retry(),
            Retry::Permanent
        );
        assert_eq!(
            JobError::Train(TrainError::Collective(ReduceError::Mismatch(
                "ranks train different modules".to_string()
            )))
            .retry(),
            Retry::Permanent
        );
        assert_eq!(
            EvalError::InvalidOption("limit 0".to_string()).retry(),
            Retry::Permanent
        );
    }
}
