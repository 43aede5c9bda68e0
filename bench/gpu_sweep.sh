#!/usr/bin/env bash
# A real sweep on one GPU from an asset bundle, in one command, on a machine without network:
# install the bundled models and data, run the sweep (probe, train, generate, score, report),
# then measure batched generation against Hugging Face `generate` + PEFT on the same prompts.
#
#   deploy/cuda/run-on-device.sh bash bench/gpu_sweep.sh BUNDLE_DIR...
#
# BUNDLE_DIR... are what `lorasweep assets bundle smollm2-135m humaneval ... --out DIR` wrote
# (parts and manifest.json; parts may sit in several directories). Environment:
#   OUT            where everything goes (default /tmp/gpu-sweep); the tables land in $OUT/*.md
#   LORASWEEP_HOME the asset cache to install into (default /tmp/lorasweep-home)
#   SWEEPS         sweep files to run in turn (default experiments/gpu-all-tasks.yaml)
#   MODELS         models of the generation benchmark (default smollm2-135m)
#   GEN_LIMIT, GEN_BATCH, GEN_TOKENS  its prompts (math eval split), batch and new tokens
#                  (default 256, 64, 256)
#   STAGES         any of: install generate agree sweep (default: all four, in that order)
#   SWEEP_TIMEOUT  seconds each sweep may run (default 3600); a stopped sweep resumes when run
#                  again with the same OUT
#   RUN_ARGS       how `lorasweep run` places workers (default: --gpus 0; e.g.
#                  "--gpus 0 --workers 4 --workers-per-gpu 4" to run four jobs at once)
set -uo pipefail
out="${OUT:-/tmp/gpu-sweep}"
export LORASWEEP_HOME="${LORASWEEP_HOME:-/tmp/lorasweep-home}"
stages="${STAGES:-install generate agree sweep}"
want() { [[ " $stages " == *" $1 "* ]]; }
log() { echo "== $(date +%T) $*" >&2; }
mkdir -p "$out"
failed=0
step() { # name, command...: runs it, timing it, and remembers a failure without stopping
    local name="$1" started status
    shift
    log "$name"
    started=$(date +%s%N)
    "$@"
    status=$?
    local ms=$((($(date +%s%N) - started) / 1000000))
    printf '%s\t%s\t%d.%03d\n' "$name" "$status" $((ms / 1000)) $((ms % 1000)) >>"$out/steps.tsv"
    [[ $status -eq 0 ]] || { log "$name FAILED ($status)"; failed=1; }
    return $status
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
lorasweep --version >&2

if want install; then
    [[ $# -gt 0 ]] || { echo "gpu_sweep: give the bundle directories" >&2; exit 2; }
    step install lorasweep assets install "$@" || exit 1
fi

# Batched generation, ours against HF generate + PEFT: one adapter on every module trained
# for a few steps, the math eval split's first GEN_LIMIT prompts, greedy, bf16, same batches.
gen_limit="${GEN_LIMIT:-256}" gen_batch="${GEN_BATCH:-64}" gen_tokens="${GEN_TOKENS:-256}"
if want generate; then
    for model in ${MODELS:-smollm2-135m}; do
        dir="$out/gen_$model"
        mkdir -p "$dir"
        [[ -d $dir/hf ]] || step "export_$model" lorasweep assets export-hf "$model" --out "$dir/hf" --dtype bf16
        [[ -f $dir/adapter/adapter_config.json ]] || step "adapter_$model" lorasweep train --model "$model" --task math \
            --placement all --rank 16 --alpha 32 --steps 30 --batch-size 16 --max-len 512 --lr 2e-4 --out "$dir/adapter" 2>"$dir/train.log"
        step "ours_generate_$model" lorasweep eval --model "$model" --adapter "$dir/adapter" --task math --limit "$gen_limit" \
            --batch-size "$gen_batch" --max-new-tokens "$gen_tokens" --out "$dir/ours.json" --dump-generations "$dir/ours.jsonl" 2>"$dir/ours.log"
        step "hf_generate_$model" python3 bench/hf_generate.py --model-dir "$dir/hf" --adapter "$dir/adapter" \
            --dump "$dir/ours.jsonl" --json "$dir/hf.json" --completions "$dir/hf.jsonl"
    done
fi

# Greedy outputs of the same adapter, ours against transformers, both in f32 on the CPU.
if want agree; then
    for model in ${MODELS:-smollm2-135m}; do
        dir="$out/gen_$model"
        [[ -d $dir/hf32 ]] || step "export32_$model" lorasweep assets export-hf "$model" --out "$dir/hf32" --dtype f32
        step "ours_cpu_f32_$model" env CUDA_VISIBLE_DEVICES= lorasweep eval --model "$model" --adapter "$dir/adapter" --task math \
            --limit 16 --batch-size 8 --max-new-tokens 96 --out "$dir/ours_cpu.json" --dump-generations "$dir/ours_cpu.jsonl" 2>"$dir/ours_cpu.log"
        step "hf_cpu_f32_$model" python3 bench/hf_generate.py --model-dir "$dir/hf32" --adapter "$dir/adapter" \
            --dump "$dir/ours_cpu.jsonl" --dtype f32 --device cpu --json "$dir/hf_cpu.json"
    done
fi

# The sweeps, each timed as a whole, with the per-phase table from its results.
if want sweep; then
    for sweep in ${SWEEPS:-experiments/gpu-all-tasks.yaml}; do
        name="$(basename "$sweep" .yaml)"
        step "sweep_$name" timeout -k 30 "${SWEEP_TIMEOUT:-3600}" lorasweep run "$sweep" ${RUN_ARGS:---gpus 0} --out "$out/$name" 2>"$out/$name.log"
        tail -n 40 "$out/$name.log" >&2
        if [[ -f $out/$name/report/results.csv ]]; then
            python3 bench/sweep_phases.py "$out/$name/report/results.csv" | tee "$out/phases_$name.md" >&2
            cp "$out/$name/report/report.md" "$out/report_$name.md"
        fi
    done
fi

python3 bench/gen_table.py "$out" | tee "$out/generation.md" >&2
cat "$out/steps.tsv" >&2
exit $failed
