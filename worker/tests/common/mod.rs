//! Helpers shared by the worker's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The real model file named by `var`, or `None` (with a skip line) when it is not set.
/// Under CI (`CI` set) a missing model is a failure: the suite must prove real behaviour there.
pub fn real_model(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "{var}={} is not a file", path.display());
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set; CI must fetch the packaged models first (see .ci/run)")
        }
        None => {
            eprintln!("skipped: set {var} to the packaged model file to run this test");
            None
        }
    }
}

/// Path of a fixture under `worker/tests/fixtures`.
pub fn fixture(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}
