//! `lorasweep bench` through the real binary, on the CPU: the kernel check's verdict and JSON,
//! a short timed run's JSON, and bad arguments refused by name.

#[path = "common/process.rs"]
mod process;

use process::{fails, run as lorasweep};

fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("the JSON file was written");
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn the_kernel_check_compares_every_op_and_writes_each_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kernels.json");
    let out = lorasweep(&[
        "bench",
        "kernels",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = read_json(&json);
    let rows = rows.as_array().expect("an array of comparisons");
    assert!(
        stdout.contains(&format!(
            "all {} kernel comparisons within tolerance",
            rows.len()
        )),
        "{stdout}"
    );
    for op in [
        "causal_attention_probs",
        "rms_norm",
        "split_heads + rope",
        "merge_heads",
        "lora_branch",
        "swiglu",
        "cross_entropy",
        "add_bias",
        "adamw",
    ] {
        for dtype in ["f32", "bf16"] {
            assert!(
                rows.iter().any(|r| r["op"] == op && r["dtype"] == dtype),
                "no {op} comparison in {dtype}"
            );
        }
    }
    for row in rows {
        let (diff, tolerance) = (
            row["rel_diff"].as_f64().unwrap(),
            row["tolerance"].as_f64().unwrap(),
        );
        assert!(diff <= tolerance, "{row}");
    }
}

#[test]
fn a_short_cpu_training_bench_writes_its_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("train.json");
    let out = lorasweep(&[
        "bench",
        "train",
        "--geometry",
        "tiny",
        "--device",
        "cpu",
        "--placement",
        "one:1.down_proj",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = read_json(&json);
    assert!(result["step_ms_median"].as_f64().unwrap() > 0.0, "{result}");
    assert!(result["tokens_per_s"].as_f64().unwrap() > 0.0, "{result}");
    let losses = result["losses"].as_array().expect("losses");
    assert_eq!(losses.len(), 2, "{result}");
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
}

#[test]
fn every_rule_times_its_probe_and_reports_peak_memory() {
    let dir = tempfile::tempdir().unwrap();
    for rule in ["page", "grad", "grad-rank", "act", "kappa", "random"] {
        let json = dir.path().join(format!("{rule}.json"));
        let out = lorasweep(&[
            "bench",
            "probe",
            "--geometry",
            "tiny",
            "--device",
            "cpu",
            "--batch",
            "2",
            "--seq-len",
            "16",
            "--rank",
            "4",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--rule",
            rule,
            "--json",
            json.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{rule}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result = read_json(&json);
        assert_eq!(result["rule"], rule, "{result}");
        assert!(result["step_ms_median"].as_f64().unwrap() > 0.0, "{result}");
        assert!(result["peak_rss_gib"].as_f64().unwrap() > 0.0, "{result}");
        let scores = result["probe_scores"].as_array().expect("scores");
        assert_eq!(scores.len(), 2 * 7, "{rule}: one score per module");
        assert!(
            scores.iter().all(|s| s.as_f64().unwrap() >= 0.0),
            "{result}"
        );
        if rule != "page" {
            assert!(stdout.contains(&format!("probe@{rule}")), "{stdout}");
        }
    }
}

#[test]
fn bad_bench_arguments_are_refused_by_name() {
    for (args, expected) in [
        (
            vec!["bench", "train", "--geometry", "gpt-9", "--device", "cpu"],
            "unknown geometry \"gpt-9\"",
        ),
        (
            vec!["bench", "kernels", "--device", "tpu"],
            "--device \"tpu\"",
        ),
        (
            vec!["bench", "train", "--geometry", "tiny", "--steps", "0"],
            "--steps must be at least 1",
        ),
    ] {
        let stderr = fails(&args);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
