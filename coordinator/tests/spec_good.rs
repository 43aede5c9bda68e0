//! Good sweep files: the examples in `experiments/` and the fixtures under
//! `tests/fixtures/sweeps/good/` validate, with exact job counts worked out by hand.

use std::path::{Path, PathBuf};

use lorasweep_coordinator::graph::{JobCounts, JobGraph};
use lorasweep_coordinator::spec::{
    AInit, Estimator, FieldValue, LoadError, Metric, ModelRef, ModuleKind, ModuleName,
    PackagedModel, Placement, Schedule, Sweep, TaskRef, TrainField, Variant,
};

fn repo_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn good_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sweeps/good")
        .join(format!("{name}.yaml"))
}

fn load(path: &Path) -> Sweep {
    match Sweep::from_file(path) {
        Ok(sweep) => sweep,
        Err(error) => panic!("{} rejected:\n{error}", path.display()),
    }
}

fn counts(probe: usize, train: usize, eval: usize) -> JobCounts {
    JobCounts { probe, train, eval }
}

#[test]
fn issue_example_counts() {
    // 1 model × 2 tasks (math, chat). Grid: 3 placements × 3 variants × 3 seeds = 27,
    // crossed with the zip of 2 (rank, alpha) pairs = 54 points per task.
    // train: 54 × 2 tasks = 108. eval: one per train (108) + one base eval per task (2) = 110.
    // probe: seeds [0], one per (model, task) = 2 (the `dominant` points share it, and
    // probe.always defaults to true anyway). Total 2 + 108 + 110 = 220.
    let sweep = load(&repo_file("experiments/domlora-vs-lora.yaml"));
    assert_eq!(sweep.name, "domlora-vs-lora");
    assert_eq!(sweep.point_count(), 54);
    let graph = JobGraph::plan(&sweep);
    assert_eq!(graph.counts(), counts(2, 108, 110));
    assert_eq!(graph.counts().total(), 220);
    assert_eq!(graph.jobs().len(), 220);
}

#[test]
fn quickstart_counts_and_settings() {
    // 1 model × 1 task × 2 placements: 1 probe (dominant needs it), 2 trains,
    // 2 adapter evals + 1 base eval.
    let sweep = load(&repo_file("experiments/quickstart.yaml"));
    assert_eq!(JobGraph::plan(&sweep).counts(), counts(1, 2, 3));
    assert_eq!(
        sweep.models,
        vec![ModelRef::Packaged {
            model: PackagedModel::SmolLm2
        }]
    );
    assert_eq!(sweep.train.steps, 12);
    assert_eq!(sweep.train.batch_size, 4);
    assert_eq!(sweep.train.max_len, 192);
    assert_eq!(sweep.eval.limit, 12);
    assert_eq!(sweep.eval.max_new_tokens, 64);
    let baseline = sweep.report.baseline.as_ref().unwrap();
    assert_eq!(
        baseline.fields,
        vec![(TrainField::Placement, FieldValue::Placement(Placement::All))]
    );
}

#[test]
fn omitted_fields_take_the_documented_defaults() {
    // 1 point: 1 probe (probe.always), 1 train, 1 adapter eval + 1 base eval.
    let sweep = load(&good_fixture("defaults"));
    assert_eq!(JobGraph::plan(&sweep).counts(), counts(1, 1, 2));
    let probe = &sweep.probe;
    assert_eq!(
        (probe.batches, probe.batch_size, probe.max_len, probe.rank),
        (8, 8, 256, 16)
    );
    assert_eq!(probe.effective_alpha(), 32.0);
    assert_eq!(probe.estimator, Estimator::Sample);
    assert_eq!(probe.a_init, AInit::Kaiming);
    assert_eq!(probe.seeds, vec![0]);
    assert!(probe.always);
    let train = &sweep.train;
    assert_eq!(
        (
            train.steps,
            train.batch_size,
            train.grad_accum,
            train.max_len
        ),
        (300, 16, 1, 512)
    );
    assert_eq!(train.lr, 2.0e-4);
    assert_eq!(train.schedule, Schedule::Cosine);
    assert_eq!(
        (train.warmup_ratio, train.weight_decay, train.max_grad_norm),
        (0.03, 0.0, 1.0)
    );
    assert_eq!((train.rank, train.effective_alpha()), (16, 32.0));
    assert_eq!(train.variant, Variant::Lora);
    assert_eq!(train.placement, Placement::All);
    assert_eq!(
        (train.seed, train.loraplus_ratio, train.checkpoint_every),
        (0, 16.0, 50)
    );
    assert_eq!(
        (
            sweep.eval.limit,
            sweep.eval.max_new_tokens,
            sweep.eval.batch_size
        ),
        (200, 256, 8)
    );
    assert_eq!(
        (sweep.resources.gpus_per_job, sweep.resources.max_attempts),
        (1, 3)
    );
    // The default baseline is vanilla LoRA on every module, which this sweep has.
    let baseline = sweep.report.baseline.as_ref().unwrap();
    assert!(baseline.matches(train));
}

#[test]
fn no_probe_when_nothing_reads_page() {
    // 2 models × 2 tasks × 4 placements = 16 trains, 16 + 4 base evals = 20 evals, no
    // probe (always: false and no PAGE placement).
    let sweep = load(&good_fixture("no_probe"));
    assert_eq!(JobGraph::plan(&sweep).counts(), counts(0, 16, 20));
    // No `all` + `lora` point is missing here, so the default baseline is kept.
    assert!(sweep.report.baseline.is_some());
    let placements: Vec<String> = sweep
        .points()
        .iter()
        .map(|point| point.train.placement.to_string())
        .collect();
    assert_eq!(
        placements,
        [
            "all",
            "kind:down_proj",
            "random:2",
            "explicit:layers.1.mlp.down_proj"
        ]
    );
    assert_eq!(
        sweep.points()[3].train.placement,
        Placement::Explicit(vec![ModuleName {
            layer: 1,
            kind: ModuleKind::DownProj
        }])
    );
}

#[test]
fn probe_axes_share_identical_train_jobs() {
    // Per (model, task): 4 points (2 placements × 2 a_init). Probes: 2 settings × 2 seeds
    // = 4. Trains: the two `all` points differ only in probe settings, which `all` does not
    // read, so they are one job; the two `dominant` points are two: 3. Evals: 3 + 1 base.
    // 2 models × 1 task: 8 probes, 6 trains, 8 evals.
    let sweep = load(&good_fixture("probe_axes"));
    let graph = JobGraph::plan(&sweep);
    assert_eq!(graph.counts(), counts(8, 6, 8));
    for job in graph.jobs() {
        let expected_gpus = match job.kind {
            lorasweep_coordinator::graph::JobKind::Train => 2,
            _ => 1,
        };
        assert_eq!(job.gpus, expected_gpus, "{}", job.key);
        if job.kind == lorasweep_coordinator::graph::JobKind::Train {
            let dominant = job.params["placement"] == "dominant";
            assert_eq!(job.deps.len(), if dominant { 2 } else { 0 }, "{}", job.key);
            if dominant {
                assert_eq!(job.params["probe"]["seeds"], serde_json::json!([0, 1]));
                assert_eq!(job.params["probe"]["estimator"], "expected");
            }
        }
    }
}

#[test]
fn jsonl_tasks_keep_their_metric() {
    // Per task: 2 zipped points, top_k needs PAGE → 1 probe (seed 0), 2 trains, 2 + 1
    // evals. 2 tasks: 2 probes, 4 trains, 6 evals.
    let sweep = load(&good_fixture("jsonl_task"));
    let graph = JobGraph::plan(&sweep);
    assert_eq!(graph.counts(), counts(2, 4, 6));
    let TaskRef::Jsonl { path, metric } = &sweep.tasks[1] else {
        panic!("not a jsonl task: {:?}", sweep.tasks[1]);
    };
    assert_eq!(*metric, Metric::Exact);
    assert!(path.ends_with("data/train.jsonl"));
    let user_task = sweep.tasks[1].id();
    for job in graph.jobs() {
        match job.kind {
            lorasweep_coordinator::graph::JobKind::Eval => {
                let metric = job.params.get("metric");
                if job.task == user_task {
                    assert_eq!(metric, Some(&serde_json::json!("exact")));
                } else {
                    assert_eq!(metric, None);
                }
            }
            lorasweep_coordinator::graph::JobKind::Train => {
                let loraplus = job.params["variant"] == "loraplus";
                assert_eq!(job.params.get("loraplus_ratio").is_some(), loraplus);
                assert_eq!(job.params["lr"], if loraplus { 1.0e-4 } else { 2.0e-4 });
                assert_eq!(job.params["alpha"], 8.0);
            }
            lorasweep_coordinator::graph::JobKind::Probe => {}
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A local Hugging Face directory: its config.json gives the geometry the checks use.
#[test]
fn hf_directory_geometry_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("tiny/config.json"),
        r#"{"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
    );
    let sweep_path = dir.path().join("sweep.yaml");
    write(
        &sweep_path,
        "version: 1\nname: tiny\nmodels: [./tiny]\ntasks: [chat]\n\
         train: {rank: 32, placement: \"explicit:layers.3.mlp.down_proj,layers.0.self_attn.k_proj\"}\n",
    );
    let sweep = load(&sweep_path);
    let geometry = sweep.models[0].geometry().unwrap();
    assert_eq!((geometry.layers, geometry.kv_dim), (4, 32));

    write(
        &sweep_path,
        "version: 1\nname: tiny\nmodels: [./tiny]\ntasks: [chat]\n\
         train: {rank: 48, placement: \"explicit:layers.4.mlp.down_proj,layers.0.self_attn.k_proj\"}\n",
    );
    let Err(LoadError::Invalid(errors)) = Sweep::from_file(&sweep_path) else {
        panic!("accepted a layer the model does not have");
    };
    let file = sweep_path.display().to_string();
    let model = dir.path().join("tiny").display().to_string();
    let shown: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        vec![
            format!(
                "{file}:5:30: train.placement: expected a layer index below 4 ({model} has 4 \
                 layers), found layers.4.mlp.down_proj"
            ),
            format!(
                "{file}:5:15: train.rank: expected a rank ≤ 32 for placement \
                 `explicit:layers.4.mlp.down_proj,layers.0.self_attn.k_proj` on {model} \
                 (k_proj is 64 → 32), found rank 48"
            ),
        ]
    );

    write(
        &dir.path().join("notllama/config.json"),
        r#"{"model_type": "gpt2"}"#,
    );
    write(
        &sweep_path,
        "version: 1\nname: tiny\nmodels: [smollm2-135m, notllama]\ntasks: [chat]\n",
    );
    let Err(LoadError::Invalid(errors)) = Sweep::from_file(&sweep_path) else {
        panic!("accepted a bad config.json");
    };
    assert_eq!(errors.0.len(), 1);
    assert_eq!((errors.0[0].line, errors.0[0].column), (3, 24));
    assert_eq!(errors.0[0].path, "models[1]");
}

#[test]
fn submitted_text_takes_relative_paths_from_the_submitter_s_folder_without_looking() {
    let text = "version: 1\nname: remote\nmodels: [my-model, ./other/model.gguf]\n\
                tasks: [data/chat.jsonl]\n";
    let folder = Path::new("/shared/sweeps");
    let sweep = Sweep::from_submitted(text, "remote.yaml", Some(folder))
        .unwrap_or_else(|errors| panic!("{errors}"));
    match &sweep.models[..] {
        [ModelRef::HfDir { path: first, .. }, ModelRef::Gguf { path: second }] => {
            assert_eq!(first, &folder.join("my-model"));
            assert_eq!(second, &folder.join("other/model.gguf"));
        }
        other => panic!("unexpected models {other:?}"),
    }
    match &sweep.tasks[..] {
        [TaskRef::Jsonl { path, .. }] => assert_eq!(path, &folder.join("data/chat.jsonl")),
        other => panic!("unexpected tasks {other:?}"),
    }
    // The same text checked on this machine finds nothing there.
    let errors = Sweep::from_yaml_str(text, "remote.yaml", Some(folder))
        .expect_err("missing paths are errors locally");
    assert!(
        errors
            .to_string()
            .contains("no file at /shared/sweeps/data/chat.jsonl"),
        "{errors}"
    );
}
