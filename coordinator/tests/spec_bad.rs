//! Bad sweep files: each fixture under `tests/fixtures/sweeps/bad/` must be rejected with
//! errors naming the exact `file:line:column`, the field path, and what was expected and
//! found. Line and column are 1-based, as editors show them.

use std::path::PathBuf;

use lorasweep_coordinator::spec::{LoadError, SpecError, Sweep};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sweeps/bad")
        .join(format!("{name}.yaml"))
}

fn errors_of(name: &str) -> Vec<SpecError> {
    let path = fixture(name);
    match Sweep::from_file(&path) {
        Ok(sweep) => panic!("{name}: accepted as sweep {}", sweep.name),
        Err(LoadError::Read { source, .. }) => panic!("{name}: could not read: {source}"),
        Err(LoadError::Invalid(errors)) => {
            assert!(!errors.0.is_empty(), "{name}: no errors");
            errors.0
        }
    }
}

/// One expected error: where, which field, and pieces of the expected/found texts.
struct Expect {
    line: usize,
    column: usize,
    path: &'static str,
    expected: &'static str,
    found: &'static str,
}

fn check(name: &str, expectations: &[Expect]) {
    let errors = errors_of(name);
    let file = fixture(name).display().to_string();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors.len(),
        expectations.len(),
        "{name}: wrong number of errors:\n{}",
        shown.join("\n")
    );
    for (error, expect) in errors.iter().zip(expectations) {
        let message = error.to_string();
        let prefix = format!(
            "{file}:{}:{}: {}: expected ",
            expect.line, expect.column, expect.path
        );
        assert!(
            message.starts_with(&prefix),
            "{name}: wanted prefix\n  {prefix}\ngot\n  {message}"
        );
        assert!(
            error.expected.contains(expect.expected),
            "{name}: expected-part `{}` not in `{}`",
            expect.expected,
            error.expected
        );
        assert!(
            error.found.contains(expect.found),
            "{name}: found-part `{}` not in `{}`",
            expect.found,
            error.found
        );
        assert_eq!(error.file, file);
    }
}

macro_rules! bad_file {
    ($name:ident, $( ($line:expr, $column:expr, $path:expr, $expected:expr, $found:expr) ),+ $(,)?) => {
        #[test]
        fn $name() {
            check(
                stringify!($name),
                &[$(Expect { line: $line, column: $column, path: $path, expected: $expected, found: $found }),+],
            );
        }
    };
}

bad_file!(
    syntax_error,
    (
        4,
        6,
        "(yaml)",
        "well-formed YAML",
        "illegal placement of ':' indicator"
    )
);

bad_file!(
    duplicate_key,
    (5, 1, "(yaml)", "well-formed YAML", "duplicated key")
);

bad_file!(
    unknown_top_key,
    (
        3,
        1,
        "modles",
        "one of the keys version, name, models",
        "unknown key `modles` (did you mean `models`?)"
    ),
    (1, 1, "models", "a `models` key", "no such key"),
);

bad_file!(
    unknown_train_key,
    (
        7,
        3,
        "train.rnak",
        "one of the keys steps, batch_size",
        "unknown key `rnak` (did you mean `rank`?)"
    )
);

bad_file!(
    wrong_type,
    (
        5,
        16,
        "train.steps",
        "an integer from 1 to 10000000",
        "string \"300\""
    )
);

bad_file!(
    out_of_range,
    (
        6,
        17,
        "train.warmup_ratio",
        "a number ≥ 0 and < 1",
        "number 1.5"
    )
);

bad_file!(
    unknown_model,
    (
        4,
        5,
        "models[0]",
        "a model: smollm2-135m, qwen2.5-coder-0.5b, a .gguf file",
        "string \"smollm2\" (did you mean `smollm2-135m`?)"
    )
);

bad_file!(
    unknown_task,
    (
        4,
        15,
        "tasks[1]",
        "a task: math, code, instruct, chat",
        "string \"maths\" (did you mean `math`?)"
    )
);

bad_file!(
    bad_placement,
    (
        7,
        22,
        "sweep.grid.placement[1]",
        "a module count ≥ 1 after `top_k:`",
        "string \"top_k:0\""
    )
);

bad_file!(
    unknown_rule,
    (
        5,
        29,
        "train.placement",
        "a placement rule after `@` (page, grad, grad-rank, act, kappa, random), not `fisher`",
        "string \"top_k:4@fisher\""
    )
);

bad_file!(
    rule_without_probe,
    (
        7,
        44,
        "sweep.grid.placement[2]",
        "`@RULE` only after a placement that reads a probe",
        "string \"random:2@act\""
    )
);

bad_file!(
    explicit_layer_missing,
    (
        6,
        14,
        "train.placement",
        "a layer index below 30 (smollm2-135m has 30 layers)",
        "layers.30.mlp.down_proj"
    )
);

bad_file!(
    rank_too_large,
    (
        8,
        15,
        "sweep.grid.rank[1]",
        "a rank ≤ 192 for placement `all` on smollm2-135m (k_proj is 576 → 192)",
        "rank 256"
    )
);

bad_file!(
    zip_unequal,
    (
        8,
        12,
        "sweep.zip.alpha",
        "2 values, as many as sweep.zip.rank",
        "3 values"
    )
);

// The orchestrator issue's example as printed there: `alpha` is fixed in `train` and also a
// zip axis, which is ambiguous, so it is refused (experiments/domlora-vs-lora.yaml drops
// the fixed value).
bad_file!(
    axis_also_fixed,
    (
        16,
        5,
        "sweep.zip.alpha",
        "not also fixed (remove train.alpha or this axis)",
        "`alpha` also set at train.alpha (line 7, column 54)"
    )
);

bad_file!(
    duplicate_axis,
    (
        9,
        5,
        "sweep.zip.train.rank",
        "each field in at most one axis",
        "`rank` again (first at sweep.grid.rank (line 7, column 5))"
    )
);

bad_file!(
    empty_list,
    (
        7,
        14,
        "sweep.grid.variant",
        "a non-empty list of values",
        "an empty list"
    )
);

bad_file!(
    bad_version,
    (
        1,
        10,
        "version",
        "1 (the sweep file version this build reads)",
        "integer 2"
    )
);

bad_file!(missing_name, (1, 1, "name", "a `name` key", "no such key"));

bad_file!(
    bad_variant,
    (
        7,
        21,
        "sweep.grid.variant[1]",
        "a LoRA variant: one of lora, rslora, dora, pissa, loraplus, milora",
        "string \"qlora\""
    )
);

bad_file!(
    baseline_not_in_sweep,
    (
        9,
        25,
        "report.baseline.placement",
        "one of the values the sweep gives `placement`: all, dominant",
        "dominant:q_proj"
    )
);

bad_file!(
    probe_seeds_axis,
    (
        7,
        5,
        "sweep.grid.probe.seeds",
        "a train or probe field",
        "`probe.seeds`, which is a list already"
    )
);

bad_file!(
    duplicate_grid_value,
    (
        7,
        18,
        "sweep.grid.seed[2]",
        "distinct values in a grid axis",
        "0 again (first at sweep.grid.seed[0])"
    )
);

bad_file!(
    missing_model_file,
    (3, 24, "models[1]", "an existing GGUF file", "nowhere.gguf")
);

bad_file!(
    many_errors,
    (
        5,
        16,
        "train.steps",
        "an integer from 1 to 10000000",
        "integer 0"
    ),
    (
        6,
        15,
        "eval.limit",
        "an integer from 1 to 1000000",
        "integer 0"
    ),
    (
        7,
        44,
        "resources.max_attempts",
        "an integer from 1 to 100",
        "integer 0"
    ),
);

bad_file!(
    not_a_mapping,
    (1, 1, "(root)", "a mapping of sweep settings", "a list of 2")
);

bad_file!(
    empty,
    (
        1,
        1,
        "(root)",
        "a mapping of sweep settings",
        "an empty document"
    )
);

bad_file!(
    probe_rank_too_large,
    (
        6,
        9,
        "probe.rank",
        "a probe rank ≤ 128, the smallest module of qwen2.5-coder-0.5b (k_proj is 896 → 128)",
        "rank 160"
    )
);

bad_file!(
    top_k_too_many,
    (
        7,
        28,
        "sweep.grid.placement[1]",
        "at most 210 modules (smollm2-135m has 30 layers × 7 kinds)",
        "top_k:211"
    )
);

bad_file!(
    explicit_wrong_block,
    (
        5,
        20,
        "train.placement",
        "`mlp` in the module name of a down_proj (layers.3.mlp.down_proj)",
        "string \"explicit:layers.3.self_attn.down_proj\""
    )
);

bad_file!(
    zip_repeats,
    (
        7,
        11,
        "sweep.zip",
        "distinct combinations of zipped values",
        "entry 2 repeats entry 0 (rank 8, alpha 16)"
    )
);

bad_file!(
    bad_task_metric,
    (
        6,
        38,
        "tasks[1].metric",
        "a metric: one of exact, contains, loss",
        "string \"bleu\""
    )
);

bad_file!(
    unknown_axis,
    (
        7,
        5,
        "sweep.grid.learning_rate",
        "a train or probe field: steps, batch_size",
        "unknown field `learning_rate`"
    )
);

bad_file!(bad_tag, (6, 10, "train.steps", "a value", "a bad tag"));

/// Every fixture in the folder has a test above (so none is silently skipped).
#[test]
fn every_bad_fixture_is_tested() {
    let source: String = include_str!("spec_bad.rs")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sweeps/bad");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        assert!(
            source.contains(&format!("bad_file!({stem},")),
            "fixture {stem}.yaml has no test"
        );
        count += 1;
    }
    assert!(count >= 15, "only {count} bad fixtures");
}

/// Text handed over without a file (as a coordinator receives it) is labelled as given, and
/// paths are not checked on disk.
#[test]
fn text_without_a_folder_keeps_paths_unchecked() {
    let text = "version: 1\nname: remote\nmodels: [weights/model.gguf]\ntasks: [data/x.jsonl]\n";
    let sweep = Sweep::from_yaml_str(text, "<submitted>", None).unwrap();
    assert_eq!(sweep.models[0].id(), "weights/model.gguf");
    assert_eq!(sweep.tasks[0].id(), "data/x.jsonl");
    let errors = Sweep::from_yaml_str("version: 1\nname: x\n", "<submitted>", None).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "<submitted>:1:1: models: expected a `models` key (a list of models), found no such key\n\
         <submitted>:1:1: tasks: expected a `tasks` key (a list of tasks), found no such key"
    );
}

bad_file!(
    validity_panel_too_big,
    (
        9,
        21,
        "report.validity.panel",
        "at most the 210 modules of smollm2-135m",
        "211"
    )
);

bad_file!(
    validity_bad_rules,
    (
        9,
        25,
        "report.baseline.placement",
        "one of the values the sweep gives `placement`: all, dominant",
        "dominant:q_proj"
    ),
    (
        12,
        19,
        "report.validity.rules[1]",
        "a placement rule (page, grad, grad-rank, act, kappa, random)",
        "`grads` (did you mean `grad`?)"
    ),
    (
        12,
        26,
        "report.validity.rules[2]",
        "each rule once",
        "page again"
    )
);

bad_file!(
    validity_no_panel,
    (
        6,
        29,
        "report.validity.panels",
        "one of the keys panel, rules",
        "unknown key `panels` (did you mean `panel`?)"
    ),
    (
        6,
        13,
        "report.validity.panel",
        "`panel`: how many modules",
        "no `panel`"
    )
);
