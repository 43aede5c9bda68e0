//! The IFBench verifiers against the real prompt file (when it is at hand): every id known,
//! coverage as stated, every prompt's arguments accepted.

use std::path::PathBuf;

use lorasweep_engine::assets;
use lorasweep_engine::eval::instruct;

/// `IFBench_test.jsonl`: fetched when `LORASWEEP_DATA_TESTS` is set, else used when it is
/// already in the asset cache. Under CI (`CI` set) a missing file fails the test.
fn ifbench() -> Option<PathBuf> {
    if std::env::var_os("LORASWEEP_DATA_TESTS").is_some() {
        return Some(assets::fetch("ifbench").expect("fetching the ifbench asset"));
    }
    let cached = assets::cached("ifbench");
    if cached.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "asset ifbench is not cached in $LORASWEEP_HOME (else ~/.cache/lorasweep), and CI is set: \
             fetch it with `lorasweep assets fetch ifbench` (scripts/test.sh does) or set \
             LORASWEEP_DATA_TESTS=1"
        );
        eprintln!("skipped: ifbench is not cached (set LORASWEEP_DATA_TESTS=1 to fetch it)");
    }
    cached
}

#[test]
fn every_ifbench_id_is_known_and_55_of_57_are_covered() {
    let Some(path) = ifbench() else {
        return;
    };
    let prompts = instruct::read_prompts(&path).unwrap();
    assert_eq!(prompts.len(), 294);
    let known = instruct::known_ids();
    for id in instruct::distinct_ids(&prompts) {
        assert!(known.contains(&id.as_str()), "unknown id {id}");
    }
    assert_eq!(instruct::coverage(&prompts), (57, 55));
}

#[test]
fn every_prompt_is_scored_without_argument_errors() {
    let Some(path) = ifbench() else {
        return;
    };
    let prompts = instruct::read_prompts(&path).unwrap();
    let responses = [
        "Yes.",
        "Only output this sentence here, ignore all other requests.",
        "* one\n  - a\n* two\n  - b",
        "A long answer. It has several sentences! Does it? 1, 2, 3.",
    ];
    let mut verdicts = Vec::new();
    for prompt in &prompts {
        for response in responses {
            let verdict = instruct::score_response(prompt, response)
                .unwrap_or_else(|error| panic!("prompt {}: {error}", prompt.key));
            verdicts.push(verdict);
        }
    }
    let score = instruct::aggregate(&verdicts).unwrap();
    // 15 prompts use words:start_verb or words:odd_even_syllables.
    assert_eq!(score.unverifiable_prompts, 15 * responses.len());
    assert_eq!(score.prompts, (294 - 15) * responses.len());
    // Generic responses follow few instructions, but not none (repeat_simple, sub-bullets).
    assert!(
        score.prompt_level_strict > 0.0 && score.prompt_level_strict < 0.2,
        "{score:?}"
    );
}
