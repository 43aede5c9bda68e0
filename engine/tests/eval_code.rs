//! HumanEval reading and pass@1 scoring through the sandbox, on synthetic problems and (when
//! the data is at hand) on the canonical solutions of all 164 problems.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use lorasweep_engine::assets;
use lorasweep_engine::eval::code::{self, Completion, Problem};
use lorasweep_engine::eval::sandbox::{Limits, Sandbox, SandboxConfig};

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        Sandbox::new(SandboxConfig {
            limits: Limits {
                wall: Duration::from_secs(5),
                cpu_seconds: 5,
                ..Limits::default()
            },
            ..SandboxConfig::default()
        })
        .expect("a sandbox can be built on this machine")
    })
}

fn problem(id: &str, entry_point: &str, prompt: &str, test: &str) -> Problem {
    Problem {
        task_id: id.into(),
        prompt: prompt.into(),
        canonical_solution: String::new(),
        test: test.into(),
        entry_point: entry_point.into(),
    }
}

fn problems() -> Vec<Problem> {
    vec![
        problem(
            "T/0",
            "add",
            "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
            "\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        ),
        problem(
            "T/1",
            "double",
            "def double(x):\n",
            "\ndef check(candidate):\n    assert candidate(4) == 8\n",
        ),
    ]
}

fn completion(task_id: &str, text: &str) -> Completion {
    Completion {
        task_id: task_id.into(),
        completion: text.into(),
    }
}

#[test]
fn correct_wrong_and_hostile_completions() {
    let problems = problems();
    let completions = vec![
        completion("T/0", "    return a + b\n"),
        completion("T/0", "    return a - b\n"),
        completion("T/0", "    import sys\n    sys.exit(0)\n"),
        completion("T/0", "    while True:\n        pass\n"),
        completion("T/1", "    return x * 2\n"),
        completion("T/1", "    return x +\n"),
    ];
    let scored = code::score_completions(sandbox(), &problems, &completions).unwrap();
    let passed: Vec<bool> = scored.results.iter().map(|r| r.passed).collect();
    assert_eq!(passed, [true, false, false, false, true, false]);
    // exit(0) inside the function ends the solution process before `check` finishes: not a
    // pass, whatever its exit status.
    let note = scored.results[2].note.as_deref().unwrap_or("");
    assert!(
        note.contains("the solution process ended during a call"),
        "{note}"
    );
    // T/0: 1 of 4 samples passed; T/1: 1 of 2. pass@1 = (0.25 + 0.5) / 2.
    assert!(
        (scored.pass_at_1 - 0.375).abs() < 1e-12,
        "{}",
        scored.pass_at_1
    );
    assert_eq!(scored.problems, 2);
    assert_eq!(scored.samples, 6);
    assert_eq!(scored.passed_samples, 2);
}

#[test]
fn raw_model_output_is_cleaned_before_scoring() {
    let raw = "    return a + b\n\n\ndef test():\n    assert False\n\nprint(add(1, 2))\n";
    let fenced = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\n";
    let completions = vec![
        completion("T/0", &code::clean_completion(raw)),
        completion("T/0", &code::clean_completion(fenced)),
    ];
    let scored = code::score_completions(sandbox(), &problems(), &completions).unwrap();
    assert!(
        scored.results.iter().all(|r| r.passed),
        "{:?}",
        scored.results
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn problem_line(problem: &Problem) -> String {
    serde_json::to_string(problem).unwrap()
}

#[test]
fn problems_read_from_plain_and_gzipped_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = problems().iter().map(|p| problem_line(p) + "\n").collect();
    let plain = write(dir.path(), "problems.jsonl", &text);
    assert_eq!(code::read_problems(&plain).unwrap(), problems());

    let gz_path = dir.path().join("problems.jsonl.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz_path).unwrap(),
        flate2::Compression::default(),
    );
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap();
    assert_eq!(code::read_problems(&gz_path).unwrap(), problems());
}

#[test]
fn bad_problem_files_name_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = problem_line(&problems()[0]);
    let path = write(
        dir.path(),
        "p.jsonl",
        &format!("{good}\n{{\"task_id\": \"T/9\", \"prompt\": \"x\"}}\n"),
    );
    let message = code::read_problems(&path).unwrap_err().to_string();
    assert!(message.contains("p.jsonl:2"), "{message}");
    assert!(message.contains("canonical_solution"), "{message}");

    let path = write(dir.path(), "q.jsonl", &format!("{good}\nnot json\n"));
    let message = code::read_problems(&path).unwrap_err().to_string();
    assert!(message.contains("q.jsonl:2: not valid JSON"), "{message}");

    let path = write(dir.path(), "r.jsonl", &format!("{good}\n{good}\n"));
    let message = code::read_problems(&path).unwrap_err().to_string();
    assert!(
        message.contains("r.jsonl:2: duplicate task_id"),
        "{message}"
    );

    let path = write(dir.path(), "empty.jsonl", "\n\n");
    let message = code::read_problems(&path).unwrap_err().to_string();
    assert!(message.contains("no records"), "{message}");

    let message = code::read_problems(&dir.path().join("missing.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("missing.jsonl"), "{message}");
}

#[test]
fn completions_for_unknown_tasks_are_refused_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "samples.jsonl",
        "{\"task_id\": \"T/0\", \"completion\": \"    return a + b\\n\"}\n\
         {\"task_id\": \"HumanEval/999\", \"completion\": \"\"}\n\
         \n\
         {\"task_id\": \"Nope\", \"completion\": \"\", \"extra\": 1}\n",
    );
    let message = code::read_completions(&path, &problems())
        .unwrap_err()
        .to_string();
    assert!(message.contains("2 completion(s)"), "{message}");
    assert!(message.contains("\"HumanEval/999\" (line 2)"), "{message}");
    assert!(message.contains("\"Nope\" (line 4)"), "{message}");

    let path = write(dir.path(), "bad.jsonl", "{\"task_id\": \"T/0\"}\n");
    let message = code::read_completions(&path, &problems())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("bad.jsonl:1: missing field \"completion\""),
        "{message}"
    );

    let path = write(
        dir.path(),
        "ok.jsonl",
        "{\"task_id\": \"T/1\", \"completion\": \"    return 2 * x\\n\", \"prompt\": \"ignored\"}\n",
    );
    let read = code::read_completions(&path, &problems()).unwrap();
    assert_eq!(read, [completion("T/1", "    return 2 * x\n")]);
}

/// The real HumanEval file: fetched when `LORASWEEP_DATA_TESTS` is set, else used when it is
/// already in the asset cache. Under CI (`CI` set) a missing file fails the test.
fn humaneval() -> Option<PathBuf> {
    if std::env::var_os("LORASWEEP_DATA_TESTS").is_some() {
        return Some(assets::fetch("humaneval").expect("fetching the humaneval asset"));
    }
    let cached = assets::cached("humaneval");
    if cached.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "asset humaneval is not cached in $LORASWEEP_HOME (else ~/.cache/lorasweep), and CI is set: \
             fetch it with `lorasweep assets fetch humaneval` (scripts/test.sh does) or set \
             LORASWEEP_DATA_TESTS=1"
        );
        eprintln!("skipped: humaneval is not cached (set LORASWEEP_DATA_TESTS=1 to fetch it)");
    }
    cached
}

#[test]
fn canonical_solutions_pass_every_problem() {
    let Some(path) = humaneval() else {
        return;
    };
    let problems = code::read_problems(&path).unwrap();
    assert_eq!(problems.len(), 164);
    let completions: Vec<Completion> = problems
        .iter()
        .map(|p| completion(&p.task_id, &p.canonical_solution))
        .collect();
    let scored = code::score_completions(sandbox(), &problems, &completions).unwrap();
    let failed: Vec<_> = scored
        .results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| (&r.task_id, &r.outcome))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(scored.pass_at_1, 1.0);
    assert_eq!(scored.problems, 164);

    // And an empty body fails them (the tests really run).
    let empty: Vec<Completion> = problems
        .iter()
        .take(20)
        .map(|p| completion(&p.task_id, "    pass\n"))
        .collect();
    let scored = code::score_completions(sandbox(), &problems, &empty).unwrap();
    assert_eq!(scored.passed_samples, 0);
}
