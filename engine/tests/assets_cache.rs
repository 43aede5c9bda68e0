//! The asset cache without network: package files come from a wheelhouse of crafted wheels.
//! Checks verification, the completion marker, atomic placement and cleanup.

use std::io::Write;
use std::path::{Path, PathBuf};

use lorasweep_engine::assets::{
    self, AssetError, AssetKind, AssetSpec, Cache, ModelLocation, Package, Step, MARKER,
};
use sha2::{Digest, Sha256};

const WHEEL: &str = "toy_pkg-1.0-py3-none-any.whl";

/// Writes a wheel (a zip) with the given members into `dir` and returns its sha256.
fn write_wheel(dir: &Path, members: &[(&str, &[u8])]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(WHEEL);
    let file = std::fs::File::create(&path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    hex::encode(Sha256::digest(std::fs::read(&path).unwrap()))
}

fn toy_spec(sha256: &str, steps: Vec<Step>) -> AssetSpec {
    AssetSpec {
        name: "toy".into(),
        kind: AssetKind::Data,
        description: "a crafted asset".into(),
        packages: vec![Package {
            name: "toy-pkg".into(),
            version: "1.0".into(),
            filename: WHEEL.into(),
            sha256: sha256.into(),
        }],
        steps,
        main: "data.txt".into(),
        revision: 1,
    }
}

fn extract(member: &str, to: &str) -> Step {
    Step::Extract {
        package: 0,
        member: member.into(),
        to: to.into(),
    }
}

/// Entries of a directory (empty when it does not exist).
fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(read) => read.map(|entry| entry.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

struct Fixture {
    _root: tempfile::TempDir,
    wheelhouse: PathBuf,
    cache: Cache,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let wheelhouse = root.path().join("wheelhouse");
    // A python that cannot exist: any attempt to download fails loudly instead of reaching
    // the network.
    let cache = Cache::new(root.path().join("home"))
        .with_wheelhouse(&wheelhouse)
        .with_python(root.path().join("no-python-here"));
    Fixture {
        _root: root,
        wheelhouse,
        cache,
    }
}

#[test]
fn a_verified_wheel_is_extracted_marked_and_found_again() {
    let fx = fixture();
    let sha = write_wheel(
        &fx.wheelhouse,
        &[
            ("toy/data.txt", b"hello"),
            ("toy/rows.jsonl", b"{}\n{}\n{}\n"),
        ],
    );
    let spec = toy_spec(
        &sha,
        vec![
            extract("toy/data.txt", "data.txt"),
            extract("toy/rows.jsonl", "nested/rows.jsonl"),
        ],
    );
    assert_eq!(fx.cache.cached_spec(&spec), None);
    let path = fx.cache.fetch_spec(&spec).unwrap();
    assert_eq!(path, fx.cache.asset_dir("toy").join("data.txt"));
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    let rows = fx.cache.asset_dir("toy").join("nested/rows.jsonl");
    assert_eq!(std::fs::read(rows).unwrap(), b"{}\n{}\n{}\n");
    assert!(fx.cache.asset_dir("toy").join(MARKER).is_file());
    // The downloaded wheel is not kept, and no build directory is left behind.
    assert!(!fx.cache.asset_dir("toy").join(".downloads").exists());
    assert!(entries(&fx.cache.home().join("tmp")).is_empty());

    // A second fetch needs nothing: the wheelhouse is gone and there is no python.
    std::fs::remove_file(fx.wheelhouse.join(WHEEL)).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(fx.cache.fetch_spec(&spec).unwrap(), path);
    assert!(started.elapsed() < std::time::Duration::from_millis(500));
    assert_eq!(fx.cache.cached_spec(&spec), Some(path));
}

#[test]
fn a_checksum_mismatch_fails_and_caches_nothing() {
    let fx = fixture();
    write_wheel(&fx.wheelhouse, &[("toy/data.txt", b"tampered")]);
    let spec = toy_spec(&"0".repeat(64), vec![extract("toy/data.txt", "data.txt")]);
    let error = fx.cache.fetch_spec(&spec).unwrap_err();
    assert!(
        matches!(&error, AssetError::ChecksumMismatch { filename, .. } if filename == WHEEL),
        "{error}"
    );
    assert!(error.to_string().contains("sha256 mismatch"), "{error}");
    assert_eq!(fx.cache.cached_spec(&spec), None);
    assert!(!fx.cache.asset_dir("toy").exists());
    assert!(entries(&fx.cache.home().join("tmp")).is_empty());
}

#[test]
fn a_build_failing_midway_leaves_nothing_that_looks_complete() {
    let fx = fixture();
    let sha = write_wheel(&fx.wheelhouse, &[("toy/data.txt", b"hello")]);
    // The first step writes data.txt, the second fails.
    let spec = toy_spec(
        &sha,
        vec![
            extract("toy/data.txt", "data.txt"),
            extract("toy/missing.txt", "missing.txt"),
        ],
    );
    let error = fx.cache.fetch_spec(&spec).unwrap_err();
    assert!(matches!(error, AssetError::Archive { .. }), "{error}");
    assert!(error.to_string().contains("toy/missing.txt"), "{error}");
    assert_eq!(fx.cache.cached_spec(&spec), None);
    assert!(!fx.cache.asset_dir("toy").exists());
    assert!(entries(&fx.cache.home().join("tmp")).is_empty());
}

#[test]
fn leftovers_of_a_killed_fetch_are_ignored_and_replaced() {
    let fx = fixture();
    let sha = write_wheel(&fx.wheelhouse, &[("toy/data.txt", b"hello")]);
    let spec = toy_spec(&sha, vec![extract("toy/data.txt", "data.txt")]);

    // What a process killed mid-build leaves: a build directory under tmp/ (its pid no
    // longer runs) and, from some older run, an asset directory without a marker.
    let abandoned = fx.cache.home().join("tmp").join("toy.4000000000.1");
    std::fs::create_dir_all(&abandoned).unwrap();
    std::fs::write(abandoned.join("data.txt"), b"hel").unwrap();
    let unmarked = fx.cache.asset_dir("toy");
    std::fs::create_dir_all(&unmarked).unwrap();
    std::fs::write(unmarked.join("data.txt"), b"he").unwrap();
    assert_eq!(fx.cache.cached_spec(&spec), None);

    let path = fx.cache.fetch_spec(&spec).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"hello");
    assert!(!abandoned.exists());
}

#[test]
fn a_damaged_or_outdated_asset_is_rebuilt() {
    let fx = fixture();
    let sha = write_wheel(&fx.wheelhouse, &[("toy/data.txt", b"hello")]);
    let spec = toy_spec(&sha, vec![extract("toy/data.txt", "data.txt")]);
    let path = fx.cache.fetch_spec(&spec).unwrap();

    // A file whose size differs from the marker's record: not complete.
    std::fs::write(&path, b"hell").unwrap();
    assert_eq!(fx.cache.cached_spec(&spec), None);
    fx.cache.fetch_spec(&spec).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");

    // A new revision of the spec does not accept the old build.
    let mut newer = spec.clone();
    newer.revision += 1;
    assert_eq!(fx.cache.cached_spec(&newer), None);
    assert!(fx.cache.cached_spec(&spec).is_some());

    // Nor does a spec pinning another file.
    let mut repinned = spec.clone();
    repinned.packages[0].sha256 = "f".repeat(64);
    assert_eq!(fx.cache.cached_spec(&repinned), None);
}

#[test]
fn a_missing_python_is_a_clear_error() {
    let fx = fixture();
    // Nothing in the wheelhouse, so pip would be needed.
    let spec = toy_spec(&"0".repeat(64), vec![extract("toy/data.txt", "data.txt")]);
    let error = fx.cache.fetch_spec(&spec).unwrap_err();
    assert!(matches!(error, AssetError::PythonMissing { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("pip") && message.contains("LORASWEEP_PYTHON"),
        "{message}"
    );
    assert!(!fx.cache.asset_dir("toy").exists());
}

#[test]
fn unknown_asset_names_are_rejected_with_the_known_ones() {
    let fx = fixture();
    let error = fx.cache.fetch("gpt-5").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("unknown asset `gpt-5`"), "{message}");
    for spec in assets::list() {
        assert!(message.contains(&spec.name), "{message}");
    }
    assert!(message.contains("all"), "{message}");
    assert!(assets::expand_names(&["humaneval", "bogus"]).is_err());
    assert_eq!(fx.cache.cached("gpt-5"), None);
}

#[test]
fn every_packaged_asset_is_listed_with_pinned_wheels() {
    let names: Vec<&str> = assets::list().iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "smollm2-135m",
        "qwen2.5-coder-0.5b",
        "humaneval",
        "ifbench",
        "sharegpt",
        "gsm-symbolic",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let qwen = assets::spec("qwen2.5-coder-0.5b").unwrap();
    assert_eq!(qwen.packages.len(), 6);
    assert_eq!(qwen.kind, AssetKind::Model);
}

#[test]
fn model_arguments_resolve_to_files_and_directories_or_explain_themselves() {
    let root = tempfile::tempdir().unwrap();
    let gguf = root.path().join("tiny.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    assert_eq!(
        assets::resolve_model(gguf.to_str().unwrap()).unwrap(),
        ModelLocation::Gguf(gguf.clone())
    );

    let hf = root.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), b"{}").unwrap();
    assert_eq!(
        assets::resolve_model(hf.to_str().unwrap()).unwrap(),
        ModelLocation::HfDir(hf.clone())
    );

    let bare = root.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    let message = assets::resolve_model(bare.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(message.contains("no config.json"), "{message}");

    let not_gguf = root.path().join("weights.bin");
    std::fs::write(&not_gguf, b"PK\x03\x04....").unwrap();
    let message = assets::resolve_model(not_gguf.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(message.contains("not GGUF"), "{message}");

    let message = assets::resolve_model("smollm-9000")
        .unwrap_err()
        .to_string();
    assert!(message.contains("smollm2-135m") && message.contains("qwen2.5-coder-0.5b"));
    assert!(
        message.contains(".gguf") && message.contains("config.json"),
        "{message}"
    );

    let message = assets::resolve_model("humaneval").unwrap_err().to_string();
    assert!(message.contains("data, not a model"), "{message}");
}
