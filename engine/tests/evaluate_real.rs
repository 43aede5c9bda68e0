//! The whole evaluation path on the real SmolLM2-135M (`LORASWEEP_SMOLLM2_GGUF`) and the real
//! task data (cached under `LORASWEEP_HOME`): three items of each named task, and an adapter
//! saved in PEFT's layout, applied merged and unmerged. Skipped when either is missing; on a
//! loaded 2-core machine each test takes tens of seconds.

mod evaluate_common;

use std::io::Write;

use candle_core::Device;
use evaluate_common::{cached_task, smollm2, text_common};
use lorasweep_engine::adapter::{AInit, Adapter, AdapterSettings, Variant};
use lorasweep_engine::eval::math;
use lorasweep_engine::evaluate::{self, CodePrompt, EvalJob, EvalOptions};
use lorasweep_engine::model::ModuleKind;
use lorasweep_engine::peft::{self, AdapterRecord};
use lorasweep_engine::tasks::{EvalItem, Metric};

fn seeded_normal(seed: u64, shape: (usize, usize), std: f32) -> candle_core::Tensor {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, std).unwrap();
    let values: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| normal.sample(&mut rng))
        .collect();
    candle_core::Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn options(max_new_tokens: usize) -> EvalOptions {
    EvalOptions {
        limit: Some(3),
        max_new_tokens: Some(max_new_tokens),
        batch_size: 3,
        model_label: Some("smollm2-135m".into()),
        ..EvalOptions::default()
    }
}

#[test]
fn smollm2_math() {
    let Some(task) = cached_task("math") else {
        return;
    };
    let Some(model) = smollm2() else { return };
    let report = evaluate::run(&model, &task, &options(96)).unwrap();
    eprintln!("math: {:?} in {:.1} s", report.metrics, report.wall_s);
    assert_eq!(report.n, 3);
    assert!(report.model.starts_with("smollm2-135m@sha256:"));
    for (record, item) in report.records.iter().zip(task.eval_items()) {
        let EvalItem::Math(item) = item else {
            panic!("math items")
        };
        assert!(!record.output.trim().is_empty());
        assert_eq!(record.verdict["gold"], item.gold.as_str());
        assert_eq!(
            record.verdict["predicted"],
            serde_json::json!(math::final_answer(&record.output))
        );
    }
    assert!(report.metrics["generated_tokens_per_s"] > 0.0);
}

#[test]
fn smollm2_code() {
    let Some(task) = cached_task("code") else {
        return;
    };
    let Some(model) = smollm2() else { return };
    let report = evaluate::run(&model, &task, &options(160)).unwrap();
    eprintln!("code: {:?} in {:.1} s", report.metrics, report.wall_s);
    assert_eq!(report.n, 3);
    // The model answers with code, which ran in the sandbox.
    assert!(report
        .records
        .iter()
        .any(|r| r.verdict["completion"].as_str().unwrap().contains("return")));
    for record in &report.records {
        assert!(record.verdict["outcome"]["status"].is_string());
    }
    let completion = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            code_prompt: CodePrompt::Completion,
            ..options(128)
        },
    )
    .unwrap();
    eprintln!("code (completion): {:?}", completion.metrics);
    assert_eq!(completion.n, 3);
}

#[test]
fn smollm2_instruct() {
    let Some(task) = cached_task("instruct") else {
        return;
    };
    let Some(model) = smollm2() else { return };
    let report = evaluate::run(&model, &task, &options(64)).unwrap();
    eprintln!("instruct: {:?} in {:.1} s", report.metrics, report.wall_s);
    assert_eq!(report.records.len(), 3);
    assert_eq!(
        report.n + report.metrics["unverifiable_prompts"] as usize,
        3
    );
    assert!(report.records.iter().all(|r| !r.output.trim().is_empty()));
}

#[test]
fn smollm2_chat() {
    let Some(task) = cached_task("chat") else {
        return;
    };
    let Some(model) = smollm2() else { return };
    let report = evaluate::run(
        &model,
        &task,
        &EvalOptions {
            max_len: 1024,
            ..options(0)
        },
    )
    .unwrap();
    eprintln!("chat: {:?} in {:.1} s", report.metrics, report.wall_s);
    // A conversation whose first reply starts past max_len has nothing to score.
    assert!(report.n >= 1);
    assert_eq!(
        report.n + report.metrics["skipped_conversations"] as usize,
        3
    );
    // An instruction-tuned model on ShareGPT replies: well below uniform (ln 49152 ≈ 10.8).
    assert!(report.score > 0.3 && report.score < 5.0, "{}", report.score);
    assert!((report.metrics["perplexity"] - report.score.exp()).abs() < 1e-6 * report.score.exp());
}

#[test]
fn smollm2_adapter_merged_or_not_gives_the_same_outputs() {
    let Some(path) = text_common::real_model("LORASWEEP_SMOLLM2_GGUF") else {
        return;
    };
    let Some(mut model) = smollm2() else { return };
    // A LoRA on the v projections of layers 0-3 with B made non-zero, saved as PEFT would.
    let settings = AdapterSettings {
        variant: Variant::Lora,
        rank: 4,
        alpha: 8.0,
        a_init: AInit::Kaiming,
        seed: 3,
    };
    let modules: Vec<_> = model
        .config()
        .all_modules()
        .into_iter()
        .filter(|m| m.kind == ModuleKind::VProj && m.layer < 4)
        .collect();
    for &module in &modules {
        let weight = model.transformer.projection(module).weight().clone();
        let (adapter, _) = Adapter::init(module, &weight, settings.rank, &settings).unwrap();
        // Kaiming A as initialised; B (zero at init) drawn small but non-zero.
        let (_, d_out) = model.config().module_dims(module.kind);
        let b = seeded_normal(module.layer as u64, (d_out, settings.rank), 0.05);
        let adapter = Adapter::from_parts(
            Variant::Lora,
            settings.alpha / settings.rank as f64,
            adapter.a().as_tensor().clone(),
            b,
            None,
        )
        .unwrap();
        model
            .transformer
            .projection_mut(module)
            .attach(adapter, None);
    }
    let dir = tempfile::tempdir().unwrap();
    let adapter_dir = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter_dir).unwrap();
    let record = AdapterRecord {
        base_model: path.display().to_string(),
        variant: Variant::Lora,
        placement: "explicit".into(),
        modules: modules.iter().map(|m| (m.name(), 4)).collect(),
        alpha: settings.alpha,
        seed: 3,
        trainable_parameters: 0,
    };
    peft::save(
        &adapter_dir,
        &model.transformer,
        &Default::default(),
        &record,
    )
    .unwrap();

    let task_path = dir.path().join("task.jsonl");
    let mut file = std::fs::File::create(&task_path).unwrap();
    for i in 0..10 {
        writeln!(
            file,
            "{}",
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Name a fruit that starts with letter number {i} of the alphabet.")},
                {"role": "assistant", "content": "apple"}
            ]})
        )
        .unwrap();
    }
    let job = |merge: bool| EvalJob {
        model: path.display().to_string(),
        adapter: Some(adapter_dir.clone()),
        merge,
        task: task_path.display().to_string(),
        metric: Some(Metric::Contains),
        options: EvalOptions {
            max_new_tokens: Some(24),
            ..EvalOptions::default()
        },
    };
    let unmerged = evaluate::eval_job(&job(false), &Device::Cpu).unwrap();
    let merged = evaluate::eval_job(&job(true), &Device::Cpu).unwrap();
    let outputs = |report: &lorasweep_engine::eval::metrics::EvalReport| -> Vec<String> {
        report.records.iter().map(|r| r.output.clone()).collect()
    };
    assert_eq!(outputs(&unmerged), outputs(&merged));
    let adapter = unmerged.adapter.clone().unwrap();
    assert!(
        adapter.contains("@sha256:") && !adapter.ends_with("(merged)"),
        "{adapter}"
    );
    assert!(merged.adapter.unwrap().ends_with("(merged)"));
    eprintln!("adapter outputs: {:?}", outputs(&unmerged));
}
