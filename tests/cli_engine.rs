//! `lorasweep generate | probe | train` through the real binary: bad input exits non-zero
//! with a message naming the file, line or field; probe → train → generate works on a tiny
//! Hugging Face directory and, when `LORASWEEP_SMOLLM2_GGUF` is set, on the real SmolLM2.

#[path = "../engine/tests/common/files.rs"]
mod files;
#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};

use process::{fails, succeeds};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("engine/tests/fixtures/engine")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn tiny_model(dir: &Path, arch: &'static str) -> String {
    files::write_hf_dir(dir, &files::hf_spec(arch, 7));
    dir.to_str().unwrap().to_string()
}

#[test]
fn missing_and_corrupt_model_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.gguf");
    let err = fails(&[
        "generate",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(
        err.contains("absent.gguf") && err.contains("no packaged model, file or directory"),
        "{err}"
    );

    let mut rng = files::SplitMix::new(3);
    let random = dir.path().join("random.gguf");
    std::fs::write(
        &random,
        (0..2048).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = dir.path().join("page.json");
    let err = fails(&[
        "probe",
        "--model",
        random.to_str().unwrap(),
        "--data",
        &fixture("chat.jsonl"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("random.gguf") && err.contains("not GGUF"),
        "{err}"
    );
    assert!(!out.exists(), "a failed probe left {}", out.display());

    let gpt2 = dir.path().join("gpt2.gguf");
    files::write_gguf_header(&gpt2, &[("general.architecture", "gpt2")]);
    let err = fails(&[
        "generate",
        "--model",
        gpt2.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(
        err.contains("gpt2.gguf") && err.contains("unsupported architecture \"gpt2\""),
        "{err}"
    );
}

#[test]
fn an_unknown_architecture_in_config_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "llama");
    let mut config = files::hf_spec("llama", 7).config_json();
    config["model_type"] = "gpt2".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = fails(&["generate", "--model", &model, "--prompt", "hi"]);
    assert!(
        err.contains("config.json") && err.contains("unsupported architecture \"gpt2\""),
        "{err}"
    );
}

#[test]
fn bad_data_and_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"), "qwen2");
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            &model,
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            out_s,
        ];
        args.extend_from_slice(extra);
        fails(&args)
    };
    let err = train(&["--data", &fixture("malformed.jsonl")]);
    assert!(
        err.contains("malformed.jsonl:3:") && err.contains("invalid json"),
        "{err}"
    );
    let err = train(&["--data", &fixture("empty.jsonl")]);
    assert!(
        err.contains("empty.jsonl") && err.contains("no conversations"),
        "{err}"
    );
    let chat = fixture("chat.jsonl");
    let err = train(&["--data", &chat, "--max-len", "6"]);
    assert!(
        err.contains("none of the 12 conversations") && err.contains("max_len 6"),
        "{err}"
    );
    let err = train(&[
        "--data",
        &chat,
        "--placement",
        "explicit:layers.99.mlp.down_proj",
    ]);
    assert!(
        err.contains("layers.99.mlp.down_proj") && err.contains("has 2 layers"),
        "{err}"
    );
    let err = train(&["--data", &chat, "--placement", "everywhere"]);
    assert!(err.contains("invalid placement \"everywhere\""), "{err}");
    let err = train(&["--data", &chat, "--rank", "0"]);
    assert!(err.contains("--rank must be at least 1"), "{err}");
    let err = train(&[
        "--data",
        &chat,
        "--placement",
        "kind:down_proj",
        "--rank",
        "33",
    ]);
    assert!(
        err.contains("rank 33 is invalid for layers.0.mlp.down_proj (32×48)"),
        "{err}"
    );
    let err = train(&["--data", &chat, "--variant", "qlora"]);
    assert!(err.contains("qlora"), "{err}");
    let missing_probe = dir.path().join("no-page.json");
    let err = train(&[
        "--data",
        &chat,
        "--placement",
        "dominant",
        "--probe",
        missing_probe.to_str().unwrap(),
    ]);
    assert!(err.contains("no-page.json"), "{err}");
    // Nothing that looks like a finished adapter is left behind.
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(!out.join("metrics.json").exists());
    let err = fails(&[
        "probe", "--model", &model, "--data", &chat, "--rank", "40", "--out", out_s,
    ]);
    assert!(err.contains("rank 40 is invalid"), "{err}");
}

/// probe → train (dominant, from the probe file) → generate with the adapter, unmerged and
/// merged. Returns the two generations.
fn probe_train_generate(model: &str, data: &str, work: &Path, max_len: &str) -> (String, String) {
    let page = work.join("page.json");
    let run = work.join("run");
    let stdout = succeeds(&[
        "probe",
        "--model",
        model,
        "--data",
        data,
        "--batches",
        "2",
        "--probe-batch-size",
        "2",
        "--probe-max-len",
        max_len,
        "--out",
        page.to_str().unwrap(),
    ]);
    assert!(stdout.contains("dominant module: layers."), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&page).unwrap()).unwrap();
    let dominant = json["dominant"].as_str().unwrap().to_string();
    let stdout = succeeds(&[
        "train",
        "--model",
        model,
        "--data",
        data,
        "--placement",
        "dominant",
        "--probe",
        page.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--max-len",
        max_len,
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(
        stdout.contains(&format!("PAGE dominant module: {dominant}")),
        "{stdout}"
    );
    let tensors = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(tensors[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&tensors[8..8 + header_len]).unwrap();
    let a = format!("base_model.model.model.{dominant}.lora_A.weight");
    assert!(header.get(&a).is_some(), "{a} not in {header}");
    let run_s = run.to_str().unwrap();
    let prompt = "What is the capital of France?";
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        succeeds(&args)
    };
    let unmerged = generate(&["--adapter", run_s]);
    let merged = generate(&["--adapter", run_s, "--merge"]);
    (unmerged, merged)
}

#[test]
fn probe_train_generate_on_a_tiny_hugging_face_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"), "llama");
    let (unmerged, merged) = probe_train_generate(&model, &fixture("chat.jsonl"), dir.path(), "64");
    assert_eq!(
        unmerged, merged,
        "merging the adapter changed the generation"
    );
}

/// `probe --rule RULE` writes PAGE's file with the rule's scores; `train --placement
/// dominant@RULE` reads it and refuses another rule's file; unknown rules are named.
#[test]
fn probe_and_train_by_another_rule() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"), "qwen2");
    let chat = fixture("chat.jsonl");
    let probe = |rule: &str| {
        let out = dir.path().join(format!("{rule}.json"));
        let stdout = succeeds(&[
            "probe",
            "--model",
            &model,
            "--data",
            &chat,
            "--batches",
            "2",
            "--probe-batch-size",
            "2",
            "--probe-max-len",
            "64",
            "--rule",
            rule,
            "--out",
            out.to_str().unwrap(),
        ]);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        (out, stdout, json)
    };
    let (act, stdout, json) = probe("act");
    assert!(
        stdout.contains("dominant module by act: layers."),
        "{stdout}"
    );
    assert_eq!(json["settings"]["rule"], "act");
    assert_eq!(json["modules"].as_array().unwrap().len(), 2 * 7);
    let (page, _, page_json) = probe("page");
    assert!(page_json["settings"].get("rule").is_none());
    let train = |placement: &str, probe: &Path, extra: &[&str]| {
        let run = dir.path().join("run");
        let mut args = vec![
            "train",
            "--model",
            &model,
            "--data",
            &chat,
            "--placement",
            placement,
            "--probe",
            probe.to_str().unwrap(),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--max-len",
            "64",
            "--out",
            run.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<String>>()
    };
    let args = train("dominant@act", &act, &[]);
    let stdout = succeeds(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let dominant = json["dominant"].as_str().unwrap();
    assert!(
        stdout.contains(&format!("act dominant module: {dominant}")),
        "{stdout}"
    );
    let args = train("dominant@grad", &page, &[]);
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains(
            "placement dominant@grad reads a grad probe, but was given a page probe result"
        ),
        "{err}"
    );
    let args = train("dominant@fisher", &page, &[]);
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("not `fisher`"), "{err}");
    let args = train("dominant", &page, &["--rule", "kappa"]);
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("reads the rule after `@`"), "{err}");
    let err = fails(&[
        "probe", "--model", &model, "--data", &chat, "--rule", "fisher",
    ]);
    assert!(err.contains("fisher"), "{err}");
}

fn real_model(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set; CI must run the real-model tests")
        }
        None => {
            eprintln!("skipped: set {var} to the packaged model file to run this test");
            None
        }
    }
}

#[test]
fn probe_train_generate_on_real_smollm2() {
    let Some(model) = real_model("LORASWEEP_SMOLLM2_GGUF") else {
        return;
    };
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let model = model.to_str().unwrap();
    let (unmerged, merged) = probe_train_generate(model, &fixture("chat.jsonl"), dir.path(), "96");
    assert_eq!(
        unmerged, merged,
        "merging the adapter changed the generation"
    );
    assert!(!unmerged.trim().is_empty());
    eprintln!(
        "smollm2 probe → train → generate: {:.1} s; reply: {}",
        started.elapsed().as_secs_f64(),
        unmerged.trim()
    );
}

/// `lorasweep tasks batches` on the tiny model and the fixture chat: the JSONL lines as a
/// baseline reads them.
fn batches_file(model: &str, work: &Path, name: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = work.join(name);
    let data = fixture("chat.jsonl");
    let mut args = vec!["tasks", "batches", "--model", model, "--data", &data];
    args.extend_from_slice(&["--max-len", "48", "--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    succeeds(&args);
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn rows(line: &serde_json::Value, field: &str) -> Vec<Vec<u64>> {
    serde_json::from_value(line[field].clone()).unwrap()
}

#[test]
fn tasks_batches_writes_the_steps_a_train_job_and_a_probe_take() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"), "llama");
    let train = ["--steps", "3", "--batch-size", "2", "--grad-accum", "2"];
    let lines = batches_file(&model, dir.path(), "train.jsonl", &train);
    // One line per micro-batch, in order.
    let order: Vec<(u64, u64)> = lines
        .iter()
        .map(|line| {
            (
                line["step"].as_u64().unwrap(),
                line["micro"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(order, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
    for line in &lines {
        let (ids, targets, mask) = (rows(line, "ids"), rows(line, "targets"), rows(line, "mask"));
        assert_eq!(ids.len(), 2, "{line}");
        for ((ids, targets), mask) in ids.iter().zip(&targets).zip(&mask) {
            assert!(ids.len() <= 48 && ids.len() == targets.len() && ids.len() == mask.len());
            // Prompt tokens are not counted, response tokens are, and each counted target is
            // the next input token.
            assert!(mask.contains(&0) && mask.contains(&1), "{mask:?}");
            for t in 0..ids.len() - 1 {
                if mask[t] == 1 {
                    assert_eq!(targets[t], ids[t + 1], "position {t}");
                }
            }
        }
    }
    // The order is the seed's: the same seed writes the same file, another seed another order.
    assert_eq!(
        lines,
        batches_file(&model, dir.path(), "again.jsonl", &train)
    );
    let reseeded = [&train[..], &["--seed", "5"]].concat();
    assert_ne!(
        lines,
        batches_file(&model, dir.path(), "seed5.jsonl", &reseeded)
    );
    // The probe's batches: one line per batch.
    let probe = batches_file(
        &model,
        dir.path(),
        "probe.jsonl",
        &["--probe", "--batches", "3", "--batch-size", "2"],
    );
    assert_eq!(probe.len(), 3);
    assert!(probe.iter().all(|line| line["micro"] == 0));
    let data = fixture("chat.jsonl");
    let out = dir.path().join("bad.jsonl");
    let err = fails(&[
        "tasks",
        "batches",
        "--model",
        &model,
        "--data",
        &data,
        "--steps",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("--steps must be at least 1"), "{err}");
    assert!(!out.exists(), "nothing written on an error");
}
