//! `lorasweep assets bundle` and `lorasweep assets install` through the real binary, between
//! two caches in temporary directories, without network: an asset placed in the source cache
//! by hand is bundled into parts, installed in two batches (the first lacking a part), and then
//! found by `assets fetch` in the target cache.

#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::Output;

use lorasweep_engine::assets::{self, MANIFEST, MARKER};

/// The binary with `home` as its cache, no wheelhouse, and a python that does not exist (so
/// nothing can reach the network).
fn run_in(home: &Path, args: &[&str]) -> Output {
    process::bin()
        .args(args)
        .env("LORASWEEP_HOME", home)
        .env("LORASWEEP_PYTHON", home.join("no-python-here"))
        .env_remove("LORASWEEP_WHEELHOUSE")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

fn succeeds_in(home: &Path, args: &[&str]) -> String {
    let out = run_in(home, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails_in(home: &Path, args: &[&str]) -> String {
    let out = run_in(home, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

/// Places a complete `ifbench` in the cache at `home` by hand: its file and the completion
/// marker a fetch writes (same asset, revision and pinned packages; every file with its size).
fn place_fake_ifbench(home: &Path) -> PathBuf {
    let spec = assets::spec("ifbench").unwrap();
    let dir = home.join("assets").join(&spec.name);
    std::fs::create_dir_all(&dir).unwrap();
    let lines: String = (0..400)
        .map(|i| format!("{{\"key\": {i}, \"prompt\": \"write {i} words\"}}\n"))
        .collect();
    std::fs::write(dir.join(&spec.main), &lines).unwrap();
    let marker = serde_json::json!({
        "asset": spec.name,
        "revision": spec.revision,
        "packages": spec.packages,
        "files": [[spec.main, lines.len()]],
        "stats": {},
        "build_seconds": 0.0,
    });
    std::fs::write(
        dir.join(MARKER),
        serde_json::to_vec_pretty(&marker).unwrap(),
    )
    .unwrap();
    dir.join(&spec.main)
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn bundle_and_install_carry_an_asset_between_caches() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("source-home");
    let target = root.path().join("target-home");
    let original = place_fake_ifbench(&source);
    let size = std::fs::metadata(&original).unwrap().len();
    assert!(
        size > 8 * 1024,
        "the fake file must split into at least 3 parts"
    );
    // The fake asset is complete: listing it needs no fetch.
    let listed = succeeds_in(&source, &["assets", "list"]);
    assert!(listed.contains(path_str(&original)), "{listed}");

    let bundle = root.path().join("bundle");
    let out = succeeds_in(
        &source,
        &[
            "assets",
            "bundle",
            "ifbench",
            "--out",
            path_str(&bundle),
            "--part-size",
            "4K",
        ],
    );
    assert!(out.contains(path_str(&bundle.join(MANIFEST))), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join(MANIFEST)).unwrap()).unwrap();
    let file = &manifest["assets"][0]["files"][0];
    assert_eq!(file["path"], "IFBench_test.jsonl");
    assert_eq!(file["size"], size);
    let parts: Vec<String> = file["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|part| part["name"].as_str().unwrap().to_string())
        .collect();
    assert!(parts.len() >= 3, "{parts:?}");

    // The first batch lacks the second part: named, nothing installed, non-zero exit.
    let later = root.path().join("later");
    std::fs::create_dir(&later).unwrap();
    std::fs::rename(bundle.join(&parts[1]), later.join(&parts[1])).unwrap();
    std::fs::copy(bundle.join(MANIFEST), later.join(MANIFEST)).unwrap();
    let err = fails_in(&target, &["assets", "install", path_str(&bundle)]);
    assert!(
        err.contains("asset `ifbench`")
            && err.contains("IFBench_test.jsonl")
            && err.contains(&format!("`{}` is missing", parts[1]))
            && err.contains(&format!("still needed: {}", parts[1])),
        "{err}"
    );
    assert!(!target.join("assets").join("ifbench").exists());

    // The later batch holds only that part (and the manifest): the install completes.
    let out = succeeds_in(&target, &["assets", "install", path_str(&later)]);
    assert!(out.contains("ifbench: installed"), "{out}");
    let installed = target.join("assets/ifbench/IFBench_test.jsonl");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&original).unwrap()
    );
    assert_eq!(
        std::fs::read(target.join("assets/ifbench").join(MARKER)).unwrap(),
        std::fs::read(source.join("assets/ifbench").join(MARKER)).unwrap()
    );
    // `fetch` finds it and does nothing (there is no python to download with).
    let out = succeeds_in(&target, &["assets", "fetch", "ifbench"]);
    assert_eq!(out.trim(), path_str(&installed));

    // A bad part size is refused before anything is written.
    let elsewhere = root.path().join("elsewhere");
    let err = fails_in(
        &source,
        &[
            "assets",
            "bundle",
            "ifbench",
            "--out",
            path_str(&elsewhere),
            "--part-size",
            "12X",
        ],
    );
    assert!(
        err.contains("invalid part size `12X`") && err.contains("--part-size"),
        "{err}"
    );
    assert!(!elsewhere.exists());
}
