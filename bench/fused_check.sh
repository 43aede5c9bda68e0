#!/usr/bin/env bash
# Issue 7's check that a fused kernel does not change training: the same 50 steps on the same
# seeded random SmolLM2-geometry model and batches, attention through the fused kernels and
# through candle's composed ops; prints both loss curves' ends and the largest relative difference.
# On the GPU machine with the CUDA build carried:
#   deploy/cuda/run-on-device.sh bash bench/fused_check.sh
set -euo pipefail
out="${OUT:-/tmp/fused-check}"
mkdir -p "$out"
common=(bench train --geometry smollm2-135m --placement all --batch 8 --seq-len 256 --steps 50 --warmup 0 --lr 1e-3)
lorasweep "${common[@]}" --json "$out/fused.json" | tail -1
lorasweep "${common[@]}" --composed-kernels --json "$out/composed.json" | tail -1
python3 - "$out/fused.json" "$out/composed.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))["losses"]
b = json.load(open(sys.argv[2]))["losses"]
worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
print(f"fused    losses: first {a[0]:.5f} step 25 {a[24]:.5f} last {a[-1]:.5f}")
print(f"composed losses: first {b[0]:.5f} step 25 {b[24]:.5f} last {b[-1]:.5f}")
print(f"50-step loss curves: max relative difference {worst:.2e} (bf16 tolerance: 1e-2)")
PY
