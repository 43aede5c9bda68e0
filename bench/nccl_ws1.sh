#!/usr/bin/env bash
# Issue 6's single-GPU NCCL check, on the GPU machine with the CUDA build carried:
#   deploy/cuda/run-on-device.sh bash bench/nccl_ws1.sh MODEL_DIR
# Trains the same 50 steps twice on CUDA device 0 — the plain path, then the data-parallel path
# with NCCL and world size 1 (`--data-parallel 1`) — and compares the loss curves step by step.
set -euo pipefail
model="${1:?usage: nccl_ws1.sh MODEL_DIR}"
data=engine/tests/fixtures/engine/chat.jsonl
out="${OUT:-/tmp/nccl-ws1}"
mkdir -p "$out"
common=(train --model "$model" --data "$data" --steps 50 --batch-size 4 --max-len 64 --rank 8 --lr 1e-3 --seed 0)
lorasweep "${common[@]}" --out "$out/plain" >"$out/plain.log" 2>&1
lorasweep "${common[@]}" --data-parallel 1 --out "$out/nccl1" >"$out/nccl1.log" 2>&1
tail -3 "$out/nccl1.log"
python3 - "$out/plain/metrics.json" "$out/nccl1/metrics.json" <<'PY'
import json, sys
def losses(path):
    d = json.load(open(path))
    steps = d.get("steps", d)
    return [s["loss"] for s in steps], d
a, da = losses(sys.argv[1])
b, db = losses(sys.argv[2])
assert len(a) == len(b) == 50, (len(a), len(b))
worst = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(a, b))
print(f"plain    first {a[0]:.5f} last {a[-1]:.5f} tokens/s {da.get('tokens_per_s')}")
print(f"nccl ws1 first {b[0]:.5f} last {b[-1]:.5f} tokens/s {db.get('tokens_per_s')}")
print(f"max relative loss difference over 50 steps: {worst:.2e}")
PY
