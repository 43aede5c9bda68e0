//! The job graph: deterministic content-hash keys, dependencies, shared probes and the
//! parameters each job carries.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use lorasweep_coordinator::graph::{JobGraph, JobKey, JobKind, PlannedJob};
use lorasweep_coordinator::spec::{Sweep, Variant};

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../experiments/domlora-vs-lora.yaml")
}

fn example() -> Sweep {
    Sweep::from_file(&example_path()).unwrap()
}

fn keys(graph: &JobGraph) -> Vec<JobKey> {
    graph.jobs().iter().map(|job| job.key.clone()).collect()
}

/// The same sweep written differently: block style, other key order, other comments.
const REWRITTEN: &str = r#"
version: 1
name: domlora-vs-lora
report:
  baseline:
    variant: lora
    placement: all
resources:
  max_attempts: 3
  gpus_per_job: 1
sweep:
  zip:
    rank: [8, 16]
    alpha: [16.0, 32.0]
  grid:
    placement: [all, dominant, random:1]
    variant: [lora, dora, pissa]
    seed: [0, 1, 2]
eval:
  max_new_tokens: 256
  limit: 200
train:
  checkpoint_every: 50
  warmup_ratio: 0.03
  schedule: cosine
  lr: 0.0002
  max_len: 512
  grad_accum: 1
  batch_size: 16
  steps: 300
probe:
  seeds: [0]
  estimator: sample
  rank: 16
  max_len: 256
  batch_size: 8
  batches: 8
tasks: [math, chat]
models: [smollm2-135m]
"#;

#[test]
fn the_same_sweep_gives_the_same_keys() {
    let first = JobGraph::plan(&example());
    let second = JobGraph::plan(&example());
    assert_eq!(keys(&first), keys(&second));
    assert_eq!(first, second);
}

#[test]
fn formatting_and_key_order_do_not_change_keys() {
    let original: BTreeSet<JobKey> = keys(&JobGraph::plan(&example())).into_iter().collect();
    let rewritten_sweep = Sweep::from_yaml_str(REWRITTEN, "rewritten.yaml", None).unwrap();
    let rewritten: BTreeSet<JobKey> = keys(&JobGraph::plan(&rewritten_sweep))
        .into_iter()
        .collect();
    assert_eq!(original.len(), 220);
    assert_eq!(original, rewritten);
}

#[test]
fn keys_are_unique_and_deps_come_first() {
    let graph = JobGraph::plan(&example());
    let mut position: HashMap<&JobKey, usize> = HashMap::new();
    for (index, job) in graph.jobs().iter().enumerate() {
        assert!(
            position.insert(&job.key, index).is_none(),
            "duplicate {}",
            job.key
        );
        assert_eq!(graph.get(&job.key), Some(job));
        assert!(
            job.key.0.starts_with(&format!("{}-", job.kind)),
            "{}",
            job.key
        );
        for dep in &job.deps {
            let dep_index = position.get(dep).unwrap_or_else(|| {
                panic!("{} depends on {dep}, not earlier in the graph", job.key)
            });
            assert!(*dep_index < index);
        }
    }
}

fn by_kind(graph: &JobGraph, kind: JobKind) -> Vec<&PlannedJob> {
    graph.jobs().iter().filter(|job| job.kind == kind).collect()
}

#[test]
fn dependencies_follow_the_placement() {
    let graph = JobGraph::plan(&example());
    let probes = by_kind(&graph, JobKind::Probe);
    let probe_of_task: HashMap<&str, &JobKey> = probes
        .iter()
        .map(|probe| (probe.task.as_str(), &probe.key))
        .collect();
    assert_eq!(probe_of_task.len(), 2);
    for train in by_kind(&graph, JobKind::Train) {
        if train.params["placement"] == "dominant" {
            // Every dominant point of a task shares that task's single probe.
            assert_eq!(train.deps, vec![probe_of_task[train.task.as_str()].clone()]);
            assert_eq!(train.params["probe"]["rank"], 16);
        } else {
            assert!(train.deps.is_empty(), "{} has deps", train.key);
            assert!(train.params.get("probe").is_none());
        }
    }
    let trains: HashMap<&JobKey, &PlannedJob> = by_kind(&graph, JobKind::Train)
        .into_iter()
        .map(|job| (&job.key, job))
        .collect();
    let mut base_evals = 0;
    for eval in by_kind(&graph, JobKind::Eval) {
        if eval.params["adapter"].is_null() {
            base_evals += 1;
            assert!(eval.deps.is_empty());
        } else {
            assert_eq!(eval.deps.len(), 1);
            let train = trains[&eval.deps[0]];
            assert_eq!(eval.params["adapter"], train.key.0.as_str());
            assert_eq!((&eval.model, &eval.task), (&train.model, &train.task));
        }
        assert_eq!(eval.params["limit"], 200);
        assert_eq!(eval.params["max_new_tokens"], 256);
    }
    assert_eq!(base_evals, 2);
}

#[test]
fn train_params_hold_every_resolved_setting() {
    let graph = JobGraph::plan(&example());
    let train = by_kind(&graph, JobKind::Train)[0];
    let names: BTreeSet<&str> = train
        .params
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "steps",
        "batch_size",
        "grad_accum",
        "max_len",
        "lr",
        "schedule",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "alpha",
        "rank",
        "variant",
        "placement",
        "seed",
        "checkpoint_every",
    ]
    .into_iter()
    .collect();
    assert_eq!(names, expected);
    // The first point: grid axes slowest-first, zip fastest.
    assert_eq!(train.params["placement"], "all");
    assert_eq!(train.params["variant"], "lora");
    assert_eq!(train.params["seed"], 0);
    assert_eq!(train.params["rank"], 8);
    assert_eq!(train.params["alpha"], 16.0);
    assert_eq!(train.params["lr"], 2.0e-4);
    assert_eq!(train.model, "smollm2-135m");
    assert_eq!(train.task, "math");

    let probe = by_kind(&graph, JobKind::Probe)[0];
    assert_eq!(
        probe.params,
        serde_json::json!({
            "batches": 8, "batch_size": 8, "max_len": 256, "rank": 16, "alpha": 32.0,
            "estimator": "sample", "a_init": "kaiming", "seed": 0
        })
    );
}

#[test]
fn point_order_is_grid_slowest_first_then_zip() {
    let sweep = example();
    let points = sweep.points();
    assert_eq!(points.len(), 54);
    let describe = |index: usize| {
        let train = &points[index].train;
        (
            train.placement.to_string(),
            train.variant,
            train.seed,
            train.rank,
        )
    };
    assert_eq!(describe(0), ("all".to_string(), Variant::Lora, 0, 8));
    assert_eq!(describe(1), ("all".to_string(), Variant::Lora, 0, 16));
    assert_eq!(describe(2), ("all".to_string(), Variant::Lora, 1, 8));
    assert_eq!(describe(6), ("all".to_string(), Variant::Dora, 0, 8));
    assert_eq!(
        describe(53),
        ("random:1".to_string(), Variant::Pissa, 2, 16)
    );
}

#[test]
fn a_changed_setting_changes_only_the_jobs_it_reaches() {
    let before = JobGraph::plan(&example());
    let mut changed = example();
    changed.train.lr = 1.0e-4;
    let after = JobGraph::plan(&changed);
    let kinds_of = |graph: &JobGraph, kind: JobKind| -> BTreeSet<JobKey> {
        by_kind(graph, kind)
            .into_iter()
            .map(|job| job.key.clone())
            .collect()
    };
    // Probes do not read lr.
    assert_eq!(
        kinds_of(&before, JobKind::Probe),
        kinds_of(&after, JobKind::Probe)
    );
    // Every train job changes, and so does every eval of an adapter...
    assert!(kinds_of(&before, JobKind::Train).is_disjoint(&kinds_of(&after, JobKind::Train)));
    let before_evals = kinds_of(&before, JobKind::Eval);
    let after_evals = kinds_of(&after, JobKind::Eval);
    // ...but the base-model evals stay the same.
    assert_eq!(before_evals.intersection(&after_evals).count(), 2);
}

#[test]
fn every_rule_gets_its_own_probe_keeping_only_what_it_reads() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../experiments/placement-rules.yaml");
    let sweep = Sweep::from_file(&path).unwrap();
    let graph = JobGraph::plan(&sweep);
    let probes: HashMap<&JobKey, &PlannedJob> = by_kind(&graph, JobKind::Probe)
        .into_iter()
        .map(|job| (&job.key, job))
        .collect();
    let rule_of = |probe: &PlannedJob| {
        probe
            .params
            .get("rule")
            .map_or("page".to_string(), |r| r.as_str().unwrap().to_string())
    };
    // Per task: page (probe.always and `dominant`), grad, grad-rank, act, kappa, random.
    assert_eq!(probes.len(), 4 * 6, "{:#?}", probes.values());
    let trains = by_kind(&graph, JobKind::Train);
    // 16 sweep points and the validity panel's 6 rules × 8 modules × 2 seeds, 12 of which are
    // the sweep's own `dominant@RULE` points.
    assert_eq!(trains.len(), 4 * (8 * 2 + 6 * 8 * 2 - 12));
    for train in trains {
        let placement = train.params["placement"].as_str().unwrap();
        let wanted = match placement.split_once('@') {
            Some((_, rule)) => rule,
            None if placement == "dominant" || placement.starts_with("ranked:") => "page",
            None => {
                assert!(train.deps.is_empty() && train.params.get("probe").is_none());
                continue;
            }
        };
        assert_eq!(train.deps.len(), 1, "{placement}: one probe seed");
        let probe = probes[&train.deps[0]];
        assert_eq!(rule_of(probe), wanted, "{placement}");
        assert_eq!(probe.task, train.task);
        assert_eq!(
            train.params["probe"].get("rule").is_some(),
            wanted != "page"
        );
        let params = &probe.params;
        match wanted {
            // The PAGE probe is the one `probe.always` adds: the sweep's settings, as before.
            "page" => assert_eq!(params["alpha"], 32.0),
            // grad-rank's r is the train rank; the rules without an adapter keep the defaults.
            "grad-rank" => {
                assert_eq!(params["rank"], train.params["rank"]);
                assert_eq!(
                    (&params["batches"], &params["max_len"]),
                    (&8.into(), &256.into())
                );
            }
            "grad" | "act" | "random" => {
                assert_eq!(params["rank"], 16);
                assert_eq!(params["batch_size"], 8);
            }
            // kappa reads neither data nor seed: seed 0 and the default settings.
            "kappa" => {
                assert_eq!(params["seed"], 0);
                assert_eq!(params["batches"], 8);
            }
            other => panic!("unexpected rule {other}"),
        }
    }
    // grad-rank's r follows the train rank, not the probe's: two ranks, two probes.
    let text = "version: 1\nname: ranks\nmodels: [smollm2-135m]\ntasks: [math]\n\
                probe: {rank: 8, always: false}\n\
                sweep: {grid: {placement: [\"dominant@grad-rank\", \"top_k:2@act\"], rank: [4, 32]}}\n";
    let sweep = Sweep::from_yaml_str(text, "ranks.yaml", None).unwrap();
    let graph = JobGraph::plan(&sweep);
    let ranks: BTreeSet<(String, u64)> = by_kind(&graph, JobKind::Probe)
        .iter()
        .map(|probe| (rule_of(probe), probe.params["rank"].as_u64().unwrap()))
        .collect();
    let expected = [("act", 16), ("grad-rank", 4), ("grad-rank", 32)];
    let expected: BTreeSet<(String, u64)> = expected
        .iter()
        .map(|(rule, rank)| (rule.to_string(), *rank))
        .collect();
    assert_eq!(ranks, expected);
}

#[test]
fn the_validity_panel_adds_ranked_single_module_jobs() {
    let text = "version: 1\nname: panel\nmodels: [smollm2-135m]\ntasks: [math]\n\
                sweep: {grid: {placement: [all, \"dominant@grad\"], seed: [0, 1]}}\n\
                report: {validity: {panel: 3}}\n";
    let sweep = Sweep::from_yaml_str(text, "panel.yaml", None).unwrap();
    let validity = sweep.report.validity.as_ref().unwrap();
    let rules: Vec<&str> = validity.rules.iter().map(|rule| rule.name()).collect();
    assert_eq!(
        rules,
        ["page", "grad", "random"],
        "PAGE, the sweep's rules, random last"
    );
    let graph = JobGraph::plan(&sweep);
    let trains = by_kind(&graph, JobKind::Train);
    // 4 sweep points and 3 rules × 3 modules × 2 seeds, dominant@grad at seeds 0 and 1 shared.
    assert_eq!(trains.len(), 4 + 18 - 2);
    assert_eq!(by_kind(&graph, JobKind::Eval).len(), trains.len() + 1);
    // page (probe.always and the panel's), grad, random: one probe each.
    let probes = by_kind(&graph, JobKind::Probe);
    assert_eq!(probes.len(), 3, "{probes:#?}");
    let mut placements: BTreeSet<(String, u64)> = BTreeSet::new();
    for train in &trains {
        let placement = train.params["placement"].as_str().unwrap().to_string();
        let seed = train.params["seed"].as_u64().unwrap();
        assert!(
            placements.insert((placement.clone(), seed)),
            "{placement} twice"
        );
        if placement != "all" {
            assert_eq!(train.deps.len(), 1, "{placement} reads its rule's probe");
        }
    }
    for seed in [0, 1] {
        for placement in [
            "dominant",
            "ranked:2",
            "ranked:3",
            "dominant@grad",
            "ranked:2@grad",
            "ranked:3@grad",
            "dominant@random",
            "ranked:2@random",
            "ranked:3@random",
        ] {
            assert!(
                placements.contains(&(placement.to_string(), seed)),
                "{placement} at seed {seed} missing"
            );
        }
    }
    // Without `report.validity` the panel is not planned.
    let plain = text.replace("report: {validity: {panel: 3}}\n", "");
    let sweep = Sweep::from_yaml_str(&plain, "plain.yaml", None).unwrap();
    assert_eq!(by_kind(&JobGraph::plan(&sweep), JobKind::Train).len(), 4);
}
