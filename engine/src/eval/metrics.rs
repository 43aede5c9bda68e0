//! Scores and the eval report: what `lorasweep eval` and `lorasweep score` write, with every
//! per-sample record so a result can be audited.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One named metric over `n` samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The metric's name, e.g. `"pass@1"`, `"exact_match"`, `"perplexity"`.
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// How many samples it was computed over.
    pub n: usize,
}

impl Score {
    /// The fraction of `n` samples that were correct; `None` when `n` is zero (no samples
    /// means no score, not a score of zero).
    pub fn accuracy(metric: impl Into<String>, correct: usize, n: usize) -> Option<Score> {
        debug_assert!(correct <= n, "more correct samples than samples");
        (n > 0).then(|| Score {
            metric: metric.into(),
            value: correct as f64 / n as f64,
            n,
        })
    }
}

/// One evaluated sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The sample's id in its data set (e.g. `"HumanEval/0"`, an IFBench key).
    pub id: String,
    /// What the model was given.
    pub prompt: String,
    /// What the model produced (or the completion that was scored).
    pub output: String,
    /// The task's verdict on it (its structure depends on the task).
    pub verdict: serde_json::Value,
}

/// The result of evaluating one model (and adapter) on one task split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The task name (`math`, `code`, `instruct`, `chat`, or a user task's path).
    pub task: String,
    /// The split evaluated (`eval`, `train`, ...).
    pub split: String,
    /// Every metric computed, by name.
    pub metrics: BTreeMap<String, f64>,
    /// The task's headline metric (also present in `metrics`).
    pub score: f64,
    /// Samples evaluated.
    pub n: usize,
    /// The model's identity (name or path).
    pub model: String,
    /// The adapter's identity, if one was applied.
    pub adapter: Option<String>,
    /// Per-sample records.
    pub records: Vec<EvalRecord>,
    /// Wall-clock seconds the evaluation took.
    pub wall_s: f64,
    /// The sandbox confinement the programs ran under (code evaluation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<lorasweep_contract::Isolation>,
}

/// Reading or writing a report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file could not be read or written.
    #[error("{action} {path}")]
    Io {
        /// `"reading"` or `"writing"`.
        action: &'static str,
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid report.
    #[error("{path}: not a valid eval report")]
    Json {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

impl EvalReport {
    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let text = serde_json::to_string_pretty(self).map_err(|source| ReportError::Json {
            path: path.display().to_string(),
            source,
        })?;
        std::fs::write(path, text + "\n").map_err(|source| ReportError::Io {
            action: "writing",
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a report written by [`write_json`](EvalReport::write_json).
    pub fn read_json(path: &Path) -> Result<EvalReport, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
            action: "reading",
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ReportError::Json {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Accumulates the loss of response tokens over many sequences, for the chat metric:
/// the mean negative log-likelihood per response token and its perplexity.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TokenLoss {
    /// Sum of per-token negative log-likelihoods (natural log).
    pub total_nll: f64,
    /// Number of tokens summed.
    pub tokens: usize,
}

impl TokenLoss {
    /// Adds a sequence whose `tokens` response tokens have a summed NLL of `total_nll`.
    pub fn add_sum(&mut self, total_nll: f64, tokens: usize) {
        self.total_nll += total_nll;
        self.tokens += tokens;
    }

    /// Adds a sequence given its mean per-token NLL over `tokens` tokens.
    pub fn add_mean(&mut self, mean_nll: f64, tokens: usize) {
        self.add_sum(mean_nll * tokens as f64, tokens);
    }

    /// Mean NLL per token, weighting every token equally; `None` before any token.
    pub fn mean(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.total_nll / self.tokens as f64)
    }

    /// `exp(mean NLL)`; `None` before any token.
    pub fn perplexity(&self) -> Option<f64> {
        self.mean().map(perplexity)
    }
}

/// Perplexity of a mean per-token negative log-likelihood (natural log): `exp(loss)`.
pub fn perplexity(mean_nll: f64) -> f64 {
    mean_nll.exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_of_no_samples_is_none() {
        assert_eq!(Score::accuracy("exact_match", 0, 0), None);
        let score = Score::accuracy("exact_match", 3, 4).unwrap();
        assert_eq!(score.value, 0.75);
        assert_eq!(score.n, 4);
    }

    #[test]
    fn perplexity_is_exp_of_mean_token_loss() {
        assert_eq!(perplexity(0.0), 1.0);
        // A uniform guess over 4 tokens has loss ln 4 and perplexity 4.
        assert!((perplexity(4f64.ln()) - 4.0).abs() < 1e-12);
    }

    #[test]
    fn token_loss_weights_tokens_not_sequences() {
        let mut loss = TokenLoss::default();
        assert_eq!(loss.mean(), None);
        assert_eq!(loss.perplexity(), None);
        loss.add_mean(1.0, 1);
        loss.add_mean(2.0, 3);
        // (1 * 1 + 2 * 3) / 4 = 1.75, not the mean of sequence means (1.5).
        assert!((loss.mean().unwrap() - 1.75).abs() < 1e-12);
        assert!((loss.perplexity().unwrap() - 1.75f64.exp()).abs() < 1e-9);
    }

    #[test]
    fn report_round_trips_through_json() {
        let report = EvalReport {
            task: "code".into(),
            split: "eval".into(),
            metrics: BTreeMap::from([("pass@1".to_string(), 0.5)]),
            score: 0.5,
            n: 2,
            model: "smollm2-135m".into(),
            adapter: Some("adapters/m1".into()),
            records: vec![EvalRecord {
                id: "HumanEval/0".into(),
                prompt: "def f():".into(),
                output: "    return 1".into(),
                verdict: serde_json::json!({"passed": true}),
            }],
            wall_s: 1.25,
            sandbox: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eval.json");
        report.write_json(&path).unwrap();
        assert_eq!(EvalReport::read_json(&path).unwrap(), report);
    }

    #[test]
    fn reading_a_bad_report_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "{\"task\": 3}").unwrap();
        let error = EvalReport::read_json(&path).unwrap_err();
        assert!(error.to_string().contains("bad.json"), "{error}");
    }
}
