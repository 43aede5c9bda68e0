//! `experiments/placement-rules.yaml` end to end on the CPU at a reduced budget: its
//! placements (one per rule, `all` and the `random:1` control) and its train seeds, on the
//! tiny model and the fixture chat file instead of SmolLM2 and the four tasks, through
//! `lorasweep run` with its own coordinator and workers. Every rule's probe runs as a job, and
//! every `dominant@RULE` adapter sits on the argmax of that rule's probe. With a validity
//! panel of 3, every `ranked:K@RULE` adapter sits on its rule's K-th module and the report
//! has the validity table and plot.

#[path = "../engine/tests/common/files.rs"]
mod files;
#[path = "common/process.rs"]
mod process;
#[path = "common/sweep.rs"]
mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use lorasweep_coordinator::graph::JobGraph;
use lorasweep_coordinator::spec::Sweep;
use lorasweep_engine::probe::ProbeResult;
use serde_json::Value;

fn experiment() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/placement-rules.yaml")
}

/// The experiment's placements and train seeds, in sweep order.
fn placements_and_seeds() -> (Vec<String>, Vec<u64>) {
    let sweep = Sweep::from_file(&experiment()).unwrap();
    let mut placements = Vec::new();
    let mut seeds = Vec::new();
    for point in sweep.points() {
        let placement = point.train.placement.to_string();
        if !placements.contains(&placement) {
            placements.push(placement);
        }
        if !seeds.contains(&point.train.seed) {
            seeds.push(point.train.seed);
        }
    }
    (placements, seeds)
}

#[test]
fn the_placement_rules_experiment_validates() {
    let out = process::succeeds(&["validate", experiment().to_str().unwrap()]);
    assert!(
        out.contains("sweep placement-rules: 1 model(s) × 4 task(s) × 16 point(s)"),
        "{out}"
    );
}

#[test]
fn a_reduced_placement_rules_sweep_runs_end_to_end() {
    let (placements, seeds) = placements_and_seeds();
    let rules: BTreeSet<&str> = placements
        .iter()
        .filter_map(|placement| placement.split_once('@').map(|(_, rule)| rule))
        .collect();
    assert_eq!(
        rules,
        BTreeSet::from(["act", "grad", "grad-rank", "kappa", "random"]),
        "the experiment places by every rule (PAGE as plain `dominant`)"
    );
    assert!(placements.iter().any(|p| p == "dominant"));
    let list: Vec<String> = placements.iter().map(|p| format!("\"{p}\"")).collect();
    let seed_list: Vec<String> = seeds.iter().map(u64::to_string).collect();
    let dir = sweep::folder("");
    let text = format!(
        "version: 1\n\
         name: placement-rules-reduced\n\
         models: [model]\n\
         tasks: [chat.jsonl]\n\
         probe: {{batches: 2, batch_size: 2, max_len: 64, rank: 4}}\n\
         train: {{steps: 2, batch_size: 2, max_len: 64, rank: 4, checkpoint_every: 2}}\n\
         eval: {{limit: 2, max_new_tokens: 4, batch_size: 2}}\n\
         sweep:\n  grid:\n    placement: [{}]\n    seed: [{}]\n\
         resources: {{max_attempts: 2}}\n\
         report: {{baseline: {{placement: all}}, validity: {{panel: 3}}}}\n",
        list.join(", "),
        seed_list.join(", ")
    );
    let file = dir.path().join("sweep.yaml");
    std::fs::write(&file, text).unwrap();
    let out = dir.path().join("run");
    let run = process::bin()
        .env("RUST_LOG", "warn")
        .arg("run")
        .arg(&file)
        .args(["--workers", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");

    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report/results.json")).unwrap())
            .unwrap();
    let rows = results.as_array().expect("one row per job");
    for row in rows {
        assert_eq!(row["state"], "succeeded", "{row:#}");
    }
    let rule_of = |row: &Value| row["probe.rule"].as_str().unwrap_or("page").to_string();
    let probes: BTreeMap<String, &Value> = rows
        .iter()
        .filter(|row| row["kind"] == "probe")
        .map(|row| (rule_of(row), row))
        .collect();
    let probe_count = rows.iter().filter(|row| row["kind"] == "probe").count();
    assert_eq!(probe_count, 6, "one probe per rule: {probes:#?}");
    let trains: Vec<&Value> = rows.iter().filter(|row| row["kind"] == "train").collect();
    // The sweep's points and the validity panel (6 rules × 3 modules × each seed, the
    // `dominant@RULE` ones shared with the sweep's).
    let planned = JobGraph::plan(&Sweep::from_file(&file).unwrap()).counts();
    assert_eq!(
        planned.train,
        placements.len() * seeds.len() + 6 * 2 * seeds.len()
    );
    assert_eq!(trains.len(), planned.train);
    for train in trains {
        let placement = train["train.placement"].as_str().unwrap();
        let rule = match placement.split_once('@') {
            Some((_, rule)) => rule,
            None if placement == "dominant" || placement.starts_with("ranked:") => "page",
            None => {
                assert!(train["dominant"].is_null(), "{train:#}");
                continue;
            }
        };
        assert_eq!(train["adapter_modules"], 1, "{train:#}");
        assert_eq!(
            train["dominant"], probes[rule]["dominant"],
            "{placement} did not read its rule's probe"
        );
    }
    assert_eq!(
        rows.iter().filter(|row| row["kind"] == "eval").count(),
        planned.train + 1
    );
    panel_adapters_sit_where_their_rule_ranks(&out.join("report/data"));

    // The validity table: a row per (task, rule), the plot, and no panel rows among the
    // configurations.
    let markdown = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    let section = markdown
        .split("## Does the ranking predict the gain?")
        .nth(1)
        .unwrap_or_else(|| panic!("no validity section:\n{markdown}"));
    for rule in ["page", "grad", "grad-rank", "act", "kappa", "random"] {
        let row = section
            .lines()
            .find(|line| line.contains(&format!(" | {rule} | ")))
            .unwrap_or_else(|| panic!("no validity row for {rule}:\n{section}"));
        // 14 modules of the tiny model; every rule's panel modules compared (at least its 3).
        let cells: Vec<&str> = row.split(" | ").collect();
        assert_eq!(cells[2], "1", "probe seeds: {row}");
        let compared: usize = cells[3].parse().unwrap();
        assert!((3..=14).contains(&compared), "{row}");
        assert_ne!(cells[4], "–", "τ-b: {row}");
        assert!(
            cells[8] == "0/2" || cells[8] == "1/2" || cells[8] == "2/2",
            "{row}"
        );
    }
    assert!(
        !markdown.contains("ranked:"),
        "panel rows in the configuration tables"
    );
    let plot_path = std::fs::read_dir(out.join("report"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("validity_") && name.ends_with(".svg")
        })
        .expect("the validity plot");
    assert!(section.contains(&*plot_path.file_name().unwrap().to_string_lossy()));
    let plot = std::fs::read_to_string(&plot_path).unwrap();
    assert!(
        plot.contains("<svg") && plot.contains("grad-rank"),
        "{plot}"
    );
}

/// Every panel train job's one module is the module its rule's probe ranks where the
/// placement says (`dominant@RULE` first, `ranked:K@RULE` K-th), read from the report's data.
fn panel_adapters_sit_where_their_rule_ranks(data: &std::path::Path) {
    let stored: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("sweep.json")).unwrap()).unwrap();
    let mut checked = 0;
    for job in stored["jobs"].as_array().unwrap() {
        let placement = job["params"]["placement"].as_str().unwrap_or_default();
        let position = match placement.split('@').next().unwrap() {
            "dominant" => 1,
            body => match body.strip_prefix("ranked:") {
                Some(k) => k.parse::<usize>().unwrap(),
                None => continue,
            },
        };
        let probe_id = job["deps"][0].as_u64().unwrap();
        let probe: ProbeResult = serde_json::from_str(
            &std::fs::read_to_string(data.join(format!("probes/job-{probe_id}.json"))).unwrap(),
        )
        .unwrap();
        let module = job["result"]["modules"][0]["name"].as_str().unwrap();
        assert_eq!(
            probe.ranking()[position - 1].to_string(),
            module,
            "{placement}: not the module its rule ranks {position}"
        );
        checked += 1;
    }
    assert!(checked >= 6 * 3 * 2, "only {checked} panel jobs checked");
}
