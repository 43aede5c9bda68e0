//! User tasks from JSONL: deterministic, disjoint splits and clear errors on bad input.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use lorasweep_engine::assets::Cache;
use lorasweep_engine::data::Conversation;
use lorasweep_engine::tasks::{self, EvalItem, FetchPolicy, Metric, TaskError};

fn line(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]})
    .to_string()
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The conversation each eval item was made from, as JSON, for comparing with train.
fn eval_conversation(item: &EvalItem) -> Conversation {
    match item {
        EvalItem::Conversation(item) => item.conversation.clone(),
        EvalItem::Reference(item) => {
            let mut messages = item.prompt.clone();
            messages.push(lorasweep_engine::data::Message {
                role: lorasweep_engine::data::Role::Assistant,
                content: item.reference.clone(),
            });
            Conversation { messages }
        }
        other => panic!("unexpected eval item for a user task: {other:?}"),
    }
}

fn load(path: &Path, metric: Option<Metric>) -> Result<tasks::Task, TaskError> {
    let cache = Cache::new(path.parent().unwrap().join("cache"));
    tasks::load_in(
        &cache,
        path.to_str().unwrap(),
        metric,
        FetchPolicy::CachedOnly,
    )
}

#[test]
fn splits_are_deterministic_disjoint_and_ignore_line_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (0..50)
        .map(|i| line(&format!("what is {i} + {i}?"), &format!("{}", 2 * i)))
        .collect();
    lines.push(lines[3].clone());
    lines.insert(10, String::new());
    let path = write(dir.path(), "arith.jsonl", &lines);

    let task = load(&path, None).unwrap();
    assert_eq!(task.metric(), Metric::Loss);
    assert_eq!(task.train().len() + task.eval_items().len(), 50);
    assert_eq!(task.eval_items().len(), 5);
    assert!(task.notes().iter().any(|note| note.contains("1 duplicate")));

    let train: HashSet<String> = task
        .train()
        .iter()
        .map(|c| serde_json::to_string(c).unwrap())
        .collect();
    for item in task.eval_items() {
        let json = serde_json::to_string(&eval_conversation(item)).unwrap();
        assert!(
            !train.contains(&json),
            "eval item {} is also in train",
            item.id()
        );
    }

    // Same file, same split.
    let again = load(&path, None).unwrap();
    assert_eq!(again.train(), task.train());
    let ids = |task: &tasks::Task| -> Vec<String> {
        task.eval_items()
            .iter()
            .map(|i| i.id().to_string())
            .collect()
    };
    assert_eq!(ids(&again), ids(&task));

    // Reordered lines: the same conversations are held out.
    let mut reversed = lines.clone();
    reversed.reverse();
    let reversed_path = write(dir.path(), "reversed.jsonl", &reversed);
    let reordered = load(&reversed_path, None).unwrap();
    let held = |task: &tasks::Task| -> HashSet<String> {
        task.eval_items()
            .iter()
            .map(|item| serde_json::to_string(&eval_conversation(item)).unwrap())
            .collect()
    };
    assert_eq!(held(&reordered), held(&task));
}

#[test]
fn exact_and_contains_hold_out_the_last_assistant_turn_as_reference() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..12)
        .map(|i| line(&format!("capital number {i}?"), &format!("city {i}")))
        .collect();
    let path = write(dir.path(), "capitals.jsonl", &lines);
    let task = load(&path, Some(Metric::Exact)).unwrap();
    assert_eq!(task.metric(), Metric::Exact);
    assert_eq!(task.eval_items().len(), 2);
    for item in task.eval_items() {
        let EvalItem::Reference(item) = item else {
            panic!("expected a reference item, got {item:?}");
        };
        assert!(item.id.starts_with("line-"));
        assert_eq!(item.prompt.len(), 1);
        let number = item.prompt[0]
            .content
            .trim_start_matches("capital number ")
            .trim_end_matches('?');
        assert_eq!(item.reference, format!("city {number}"));
    }
    let contains = load(&path, Some(Metric::Contains)).unwrap();
    assert_eq!(contains.metric(), Metric::Contains);
}

#[test]
fn a_reference_metric_needs_the_last_turn_to_be_the_assistant() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (0..5).map(|i| line(&format!("q{i}"), "a")).collect();
    lines.push(
        serde_json::json!({"messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "and then?"},
        ]})
        .to_string(),
    );
    let path = write(dir.path(), "trailing.jsonl", &lines);
    let error = load(&path, Some(Metric::Exact)).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("trailing.jsonl:6:"), "{message}");
    assert!(message.contains("assistant"), "{message}");
    // The same file is fine for loss.
    assert!(load(&path, Some(Metric::Loss)).is_ok());
}

#[test]
fn bad_user_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();

    let single = write(
        dir.path(),
        "single.jsonl",
        &[line("q", "a"), line("q", "a")],
    );
    let message = load(&single, None).unwrap_err().to_string();
    assert!(
        message.contains("at least 2 distinct conversations"),
        "{message}"
    );

    let no_messages = write(
        dir.path(),
        "nomsg.jsonl",
        &[line("q", "a"), "{\"text\": \"hi\"}".into()],
    );
    let message = load(&no_messages, None).unwrap_err().to_string();
    assert!(message.contains("nomsg.jsonl:2"), "{message}");
    assert!(message.contains("messages"), "{message}");

    let missing = dir.path().join("absent.jsonl");
    let message = load(&missing, None).unwrap_err().to_string();
    assert!(message.contains("absent.jsonl"), "{message}");

    let error = lorasweep_engine::tasks::user_metric("f1")
        .unwrap_err()
        .to_string();
    assert!(error.contains("exact, contains or loss"), "{error}");
}

#[test]
fn unknown_task_names_list_the_named_tasks() {
    let cache = Cache::new(tempfile::tempdir().unwrap().path().join("cache"));
    let message = tasks::load_in(&cache, "mathh", None, FetchPolicy::CachedOnly)
        .unwrap_err()
        .to_string();
    assert!(message.contains("unknown task `mathh`"), "{message}");
    for name in ["math", "code", "instruct", "chat", ".jsonl"] {
        assert!(message.contains(name), "{message}");
    }
}
