//! `evaluate::run` plumbing on a tiny random model: user tasks scored by `exact`, `contains`
//! and `loss` against answers computed independently, the option errors, and — when the
//! task assets are in the cache (`LORASWEEP_HOME`) — the math, code, instruct and chat paths.

mod evaluate_common;

use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};
use evaluate_common::{cached_task, tiny_model};
use lorasweep_engine::data::{self, Conversation, Message, Role};
use lorasweep_engine::eval::math;
use lorasweep_engine::eval::metrics::EvalReport;
use lorasweep_engine::evaluate::{self, CodePrompt, EvalError, EvalJob, EvalOptions};
use lorasweep_engine::generate::{self, GenerationSettings};
use lorasweep_engine::loader::LoadedModel;
use lorasweep_engine::tasks::{self, EvalItem, Metric, Task, TaskError};

fn message(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
    }
}

fn write_jsonl(path: &Path, conversations: &[Conversation]) {
    let mut file = std::fs::File::create(path).unwrap();
    for conversation in conversations {
        writeln!(file, "{}", serde_json::to_string(conversation).unwrap()).unwrap();
    }
}

fn options(max_new_tokens: usize, batch_size: usize) -> EvalOptions {
    EvalOptions {
        max_new_tokens: Some(max_new_tokens),
        batch_size,
        ..EvalOptions::default()
    }
}

/// Twenty distinct questions and the tiny model's own greedy reply to each (made one at a
/// time with `generate::chat`, independently of the evaluator's batching).
fn questions_and_replies(model: &LoadedModel) -> Vec<(String, String)> {
    let settings = GenerationSettings {
        max_new_tokens: 8,
        ..GenerationSettings::default()
    };
    (0..20)
        .map(|i| {
            let question = format!("hello {i} world {}", "hi ".repeat(i % 5));
            let reply = generate::chat(
                &model.transformer,
                &model.tokenizer,
                &model.chat_template,
                &[message(Role::User, &question)],
                &settings,
            )
            .unwrap()
            .text;
            (question, reply)
        })
        .collect()
}

fn reference_task(dir: &Path, name: &str, pairs: &[(String, String)], metric: Metric) -> Task {
    let conversations: Vec<Conversation> = pairs
        .iter()
        .map(|(question, reference)| Conversation {
            messages: vec![
                message(Role::User, question),
                message(Role::Assistant, reference),
            ],
        })
        .collect();
    let path = dir.join(name);
    write_jsonl(&path, &conversations);
    tasks::load(path.to_str().unwrap(), Some(metric)).unwrap()
}

#[test]
fn exact_and_contains_score_known_answers() {
    let model = tiny_model(5);
    let dir = tempfile::tempdir().unwrap();
    let pairs = questions_and_replies(&model);
    for (question, reply) in &pairs {
        assert!(
            reply.trim().chars().count() >= 2,
            "{question:?}: reply {reply:?} too short for this test"
        );
    }

    // The references are the model's own replies: exact match everywhere.
    let task = reference_task(dir.path(), "own.jsonl", &pairs, Metric::Exact);
    let report = evaluate::run(&model, &task, &options(8, 3)).unwrap();
    assert_eq!(report.n, task.eval_items().len());
    assert_eq!(report.n, 2, "20 distinct conversations hold out 2");
    assert_eq!(report.score, 1.0, "{:#?}", report.records);
    assert_eq!(report.metrics["exact"], 1.0);
    assert_eq!(report.records.len(), 2);
    for record in &report.records {
        let reply = &pairs
            .iter()
            .find(|(q, _)| record.prompt.contains(q.as_str()))
            .unwrap()
            .1;
        assert_eq!(&record.output, reply);
        assert_eq!(record.verdict["correct"], true);
    }

    // A reference with more text is neither equal to nor contained in the reply.
    let longer: Vec<(String, String)> = pairs
        .iter()
        .map(|(q, r)| (q.clone(), format!("{r} and more")))
        .collect();
    let task = reference_task(dir.path(), "longer.jsonl", &longer, Metric::Exact);
    assert_eq!(
        evaluate::run(&model, &task, &options(8, 3)).unwrap().score,
        0.0
    );
    let task = reference_task(
        dir.path(),
        "longer-contains.jsonl",
        &longer,
        Metric::Contains,
    );
    assert_eq!(
        evaluate::run(&model, &task, &options(8, 3)).unwrap().score,
        0.0
    );

    // A proper prefix of the reply: contained, not equal.
    let prefixes: Vec<(String, String)> = pairs
        .iter()
        .map(|(q, r)| {
            let trimmed = r.trim();
            let half: String = trimmed.chars().take(trimmed.chars().count() / 2).collect();
            (q.clone(), half)
        })
        .collect();
    let task = reference_task(dir.path(), "prefix.jsonl", &prefixes, Metric::Contains);
    let report = evaluate::run(&model, &task, &options(8, 2)).unwrap();
    assert_eq!(report.score, 1.0, "{:#?}", report.records);
    assert_eq!(report.metrics["contains"], 1.0);
    let task = reference_task(dir.path(), "prefix-exact.jsonl", &prefixes, Metric::Exact);
    assert_eq!(
        evaluate::run(&model, &task, &options(8, 2)).unwrap().score,
        0.0
    );
}

/// Multi-turn conversations of varied lengths.
fn chats() -> Vec<Conversation> {
    (0..30)
        .map(|i| {
            let mut messages = Vec::new();
            if i % 3 == 0 {
                messages.push(message(Role::System, "hi"));
            }
            for turn in 0..(1 + i % 3) {
                messages.push(message(Role::User, &format!("hello {i} {turn} world")));
                messages.push(message(
                    Role::Assistant,
                    &format!("hi {}", "world 12 ".repeat(1 + (i + turn) % 4)),
                ));
            }
            Conversation { messages }
        })
        .collect()
}

#[test]
fn loss_is_the_token_weighted_response_loss() {
    let model = tiny_model(4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chats.jsonl");
    write_jsonl(&path, &chats());
    let task = tasks::load(path.to_str().unwrap(), Some(Metric::Loss)).unwrap();
    assert_eq!(task.eval_items().len(), 3);

    // Independently: Transformer::loss on each conversation alone, weighted by its tokens.
    let mut weighted = 0.0;
    let mut tokens = 0.0;
    for item in task.eval_items() {
        let EvalItem::Conversation(item) = item else {
            panic!("a loss task holds conversations")
        };
        let example = data::encode_conversation(
            &model.tokenizer,
            &model.chat_template,
            &item.conversation,
            1024,
        )
        .unwrap();
        let batch = data::collate(&[example], model.tokenizer.pad_token_id());
        let shape = (batch.batch, batch.seq_len);
        let ids = Tensor::from_vec(batch.ids.clone(), shape, &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(batch.targets.clone(), shape, &Device::Cpu).unwrap();
        let weights = Tensor::from_vec(batch.weights.clone(), shape, &Device::Cpu).unwrap();
        let loss = model
            .transformer
            .loss(&ids, &targets, &weights)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let count: f32 = batch.weights.iter().sum();
        weighted += loss * count as f64;
        tokens += count as f64;
    }
    let expected = weighted / tokens;

    for batch_size in [1, 2, 8] {
        let report = evaluate::run(&model, &task, &options(0, batch_size)).unwrap();
        assert_eq!(report.n, 3);
        assert!(
            (report.score - expected).abs() < 1e-4 * expected.max(1.0),
            "batch {batch_size}: {} vs {expected}",
            report.score
        );
        assert_eq!(report.metrics["loss"], report.score);
        assert!((report.metrics["perplexity"] - expected.exp()).abs() < 1e-3 * expected.exp());
        assert_eq!(report.metrics["tokens"], tokens);
        assert_eq!(report.records.len(), 3);
        let record_tokens: f64 = report
            .records
            .iter()
            .map(|r| r.verdict["tokens"].as_f64().unwrap())
            .sum();
        assert_eq!(record_tokens, tokens);
    }
}

#[test]
fn response_nll_of_a_padded_batch_matches_transformer_loss() {
    let model = tiny_model(4);
    let examples: Vec<_> = chats()
        .iter()
        .take(5)
        .map(|c| {
            data::encode_conversation(&model.tokenizer, &model.chat_template, c, 1024).unwrap()
        })
        .collect();
    let batch = data::collate(&examples, model.tokenizer.pad_token_id());
    let shape = (batch.batch, batch.seq_len);
    let loss = model
        .transformer
        .loss(
            &Tensor::from_vec(batch.ids.clone(), shape, &Device::Cpu).unwrap(),
            &Tensor::from_vec(batch.targets.clone(), shape, &Device::Cpu).unwrap(),
            &Tensor::from_vec(batch.weights.clone(), shape, &Device::Cpu).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let rows = evaluate::response_nll(&model.transformer, &batch).unwrap();
    assert_eq!(rows.len(), 5);
    let nll: f64 = rows.iter().map(|(sum, _)| sum).sum();
    let count: usize = rows.iter().map(|(_, n)| n).sum();
    assert_eq!(count as f32, batch.weights.iter().sum::<f32>());
    assert!(
        (nll / count as f64 - loss).abs() < 1e-4,
        "{} vs {loss}",
        nll / count as f64
    );
}

#[test]
fn loss_over_max_len_cuts_and_counts() {
    let model = tiny_model(4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chats.jsonl");
    write_jsonl(&path, &chats());
    let task = tasks::load(path.to_str().unwrap(), Some(Metric::Loss)).unwrap();
    let full = evaluate::run(&model, &task, &options(0, 4)).unwrap();
    let cut = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            max_len: 40,
            ..options(0, 4)
        },
    )
    .unwrap();
    assert!(cut.metrics["tokens"] < full.metrics["tokens"]);
    assert!(cut.metrics["truncated_conversations"] >= 1.0);
    assert_eq!(full.metrics["truncated_conversations"], 0.0);
}

#[test]
fn bad_options_are_clear_errors() {
    let model = tiny_model(4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chats.jsonl");
    write_jsonl(&path, &chats());
    let task = tasks::load(path.to_str().unwrap(), Some(Metric::Loss)).unwrap();
    let error = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            limit: Some(0),
            ..EvalOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(error, EvalError::InvalidOption(_)));
    assert!(
        error.to_string().contains("--limit must be at least 1"),
        "{error}"
    );
    let error = evaluate::run(&model, &task, &options(8, 0)).unwrap_err();
    assert!(error.to_string().contains("--batch-size"), "{error}");

    // The limit takes the first items of the split.
    let report = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            limit: Some(2),
            ..options(0, 4)
        },
    )
    .unwrap();
    assert_eq!(report.n, 2);
    let ids: Vec<&str> = task.eval_items()[..2].iter().map(EvalItem::id).collect();
    let got: Vec<&str> = report.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(got, ids);
}

#[test]
fn an_unknown_task_fails_before_the_model_is_loaded() {
    let job = EvalJob {
        model: "/no/such/model.gguf".into(),
        adapter: None,
        merge: false,
        task: "poetry".into(),
        metric: None,
        options: EvalOptions::default(),
    };
    let error = evaluate::eval_job(&job, &Device::Cpu).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, EvalError::Task(TaskError::UnknownTask { .. })),
        "{message}"
    );
    for known in ["math", "code", "instruct", "chat"] {
        assert!(message.contains(known), "{message}");
    }
    let error = evaluate::eval_job(
        &EvalJob {
            merge: true,
            task: "math".into(),
            ..job
        },
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("--merge needs an adapter"),
        "{error}"
    );
}

#[test]
fn report_names_model_and_adapter_and_round_trips() {
    let model = tiny_model(5);
    let dir = tempfile::tempdir().unwrap();
    let pairs = questions_and_replies(&model);
    let task = reference_task(dir.path(), "own.jsonl", &pairs, Metric::Exact);
    let report = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            model_label: Some("tiny".into()),
            adapter: Some("adapters/x@sha256:00".into()),
            ..options(8, 4)
        },
    )
    .unwrap();
    assert_eq!(report.model, "tiny@sha256:tiny-random-5");
    assert_eq!(report.adapter.as_deref(), Some("adapters/x@sha256:00"));
    assert_eq!(report.split, "eval");
    assert!(report.metrics["generated_tokens"] > 0.0);
    assert!(report.metrics["generated_tokens_per_s"] > 0.0);
    let path = dir.path().join("eval.json");
    report.write_json(&path).unwrap();
    let read = EvalReport::read_json(&path).unwrap();
    assert_eq!(
        (read.n, read.score, &read.model),
        (report.n, report.score, &report.model)
    );
    assert_eq!(read.records.len(), report.records.len());
    for (read, written) in read.records.iter().zip(&report.records) {
        assert_eq!((&read.id, &read.output), (&written.id, &written.output));
    }
}

#[test]
fn math_records_hold_the_extracted_and_gold_numbers() {
    let Some(task) = cached_task("math") else {
        return;
    };
    let model = tiny_model(6);
    let report = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            limit: Some(3),
            ..options(12, 3)
        },
    )
    .unwrap();
    assert_eq!(report.n, 3);
    let mut correct = 0;
    for (record, item) in report.records.iter().zip(task.eval_items()) {
        let EvalItem::Math(item) = item else {
            panic!("math items")
        };
        assert_eq!(record.id, item.id);
        assert!(record.prompt.contains(&item.question));
        assert_eq!(record.verdict["gold"], item.gold.as_str());
        let predicted = math::final_answer(&record.output);
        assert_eq!(record.verdict["predicted"], serde_json::json!(predicted));
        correct += usize::from(record.verdict["correct"] == true);
    }
    assert_eq!(report.score, correct as f64 / 3.0);
    assert_eq!(report.metrics["number_match"], report.score);
}

#[test]
fn code_completions_run_in_the_sandbox() {
    let Some(task) = cached_task("code") else {
        return;
    };
    let model = tiny_model(6);
    for code_prompt in [CodePrompt::Completion, CodePrompt::Chat] {
        let report = evaluate::run(
            &model,
            &task,
            &EvalOptions {
                limit: Some(2),
                code_prompt,
                ..options(16, 2)
            },
        )
        .unwrap();
        assert_eq!(report.n, 2);
        let passed = report
            .records
            .iter()
            .filter(|r| r.verdict["passed"] == true)
            .count();
        assert_eq!(report.score, passed as f64 / 2.0);
        for record in &report.records {
            assert!(record.id.starts_with("HumanEval/"));
            assert!(
                record.verdict["outcome"]["status"].is_string(),
                "{}",
                record.verdict
            );
            match code_prompt {
                CodePrompt::Completion => assert!(
                    record.prompt.starts_with("from")
                        || record.prompt.starts_with("def")
                        || record.prompt.starts_with("import")
                ),
                CodePrompt::Chat => assert!(record.prompt.contains("```python")),
            }
        }
    }
}

#[test]
fn instruct_counts_prompt_and_instruction_levels() {
    let Some(task) = cached_task("instruct") else {
        return;
    };
    let model = tiny_model(6);
    let report = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            limit: Some(6),
            ..options(12, 3)
        },
    )
    .unwrap();
    assert_eq!(report.records.len(), 6);
    let unverifiable = report.metrics["unverifiable_prompts"] as usize;
    assert_eq!(report.n + unverifiable, 6);
    assert_eq!(report.score, report.metrics["prompt_level_strict"]);
    let instructions: usize = report
        .records
        .iter()
        .filter(|r| !r.verdict["followed_all"].is_null())
        .map(|r| r.verdict["instructions"].as_array().unwrap().len())
        .sum();
    assert_eq!(report.metrics["instructions"] as usize, instructions);
}

#[test]
fn chat_loss_over_held_out_conversations() {
    let Some(task) = cached_task("chat") else {
        return;
    };
    let model = tiny_model(6);
    let report = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            limit: Some(3),
            max_len: 2048,
            ..options(0, 3)
        },
    )
    .unwrap();
    // The tiny tokenizer spends a token per byte: a long first user turn can push every
    // assistant token past max_len, and such a conversation is skipped and counted.
    assert!(report.n >= 1);
    assert_eq!(
        report.n + report.metrics["skipped_conversations"] as usize,
        3
    );
    assert_eq!(report.records.len(), 3);
    assert!(report.score > 0.0 && report.score.is_finite());
    // A random model over 274 tokens is close to uniform: loss near ln(274).
    assert!(report.score > 2.0, "{}", report.score);
    assert!((report.metrics["perplexity"] - report.score.exp()).abs() < 1e-6 * report.score.exp());
}

/// Attaches a random LoRA (non-zero B, so it changes the outputs) to every q and v
/// projection of the tiny model.
fn attach_random_lora(model: &mut LoadedModel, seed: u64) {
    use lorasweep_engine::adapter::{Adapter, Variant};
    use lorasweep_engine::model::ModuleKind;
    let modules: Vec<_> = model
        .config()
        .all_modules()
        .into_iter()
        .filter(|m| matches!(m.kind, ModuleKind::QProj | ModuleKind::VProj))
        .collect();
    for (index, module) in modules.into_iter().enumerate() {
        let (d_in, d_out) = model.config().module_dims(module.kind);
        let rank = 4;
        let a = random_matrix(seed + index as u64, (rank, d_in), 0.5);
        let b = random_matrix(seed + 100 + index as u64, (d_out, rank), 0.5);
        let adapter = Adapter::from_parts(Variant::Lora, 2.0, a, b, None).unwrap();
        model
            .transformer
            .projection_mut(module)
            .attach(adapter, None);
    }
}

fn random_matrix(seed: u64, shape: (usize, usize), std: f32) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, std).unwrap();
    let values: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| normal.sample(&mut rng))
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

#[test]
fn an_adapter_gives_the_same_outputs_merged_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(5);
    let pairs = questions_and_replies(&base);
    let task = reference_task(dir.path(), "own.jsonl", &pairs, Metric::Exact);
    let base_report = evaluate::run(&base, &task, &options(8, 4)).unwrap();
    assert_eq!(base_report.score, 1.0);

    let mut model = tiny_model(5);
    attach_random_lora(&mut model, 40);
    let unmerged = evaluate::run(&model, &task, &options(8, 4)).unwrap();
    model.transformer.merge_adapters().unwrap();
    assert!(model.transformer.adapters().is_empty());
    let merged = evaluate::run(&model, &task, &options(8, 4)).unwrap();
    let outputs = |report: &EvalReport| -> Vec<String> {
        report.records.iter().map(|r| r.output.clone()).collect()
    };
    assert_eq!(outputs(&unmerged), outputs(&merged));
    assert_ne!(
        outputs(&unmerged),
        outputs(&base_report),
        "the adapter must change the outputs for this test to mean anything"
    );
    assert!(unmerged.score < 1.0);
}
