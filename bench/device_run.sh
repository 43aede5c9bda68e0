#!/usr/bin/env bash
# One device call: lorasweep and PyTorch+PEFT side by side on the H200, plus the CPU-vs-CUDA
# agreement check. Run on the GPU machine from the repository root, with the CUDA build carried:
#   deploy/cuda/run-on-device.sh bash bench/device_run.sh
# Writes $OUT/results.jsonl (one JSON object per run) and $OUT/table.md.
set -uo pipefail
out="${OUT:-/tmp/lorasweep-bench}"
mkdir -p "$out/runs"
steps="${STEPS:-10}"
warmup="${WARMUP:-3}"
log() { echo "== $*" >&2; }
# Which parts to run (a device call has 10 minutes): any of
# kernels agree compare anchors scaling fusedcheck profile ncu nsys generic.
sections="${SECTIONS:-kernels agree compare anchors scaling fusedcheck profile ncu generic}"
want() { [[ " $sections " == *" $1 "* ]]; }
# Which model geometries the compare, anchors, scaling and profile sections cover.
geometries="${GEOMETRIES:-smollm2-135m qwen2.5-0.5b}"
run() { # name, command...
    local name="$1"; shift
    log "$name"
    if timeout "${RUN_TIMEOUT:-150}" "$@" --json "$out/runs/$name.json"; then :; else echo "{\"name\": \"$name\", \"failed\": true}" > "$out/runs/$name.json"; fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2

# Every fused kernel on the GPU against candle's composed ops on the CPU, forward and backward.
if want kernels; then
    log "kernels"
    lorasweep bench kernels --device cuda --json "$out/kernels.json" | tee "$out/kernels.txt" >&2 || log "kernel check FAILED"
fi

# CPU vs CUDA on a small geometry: same seeded weights and batches, f32 on the CPU, bf16 on CUDA.
want agree && for mode in train probe; do
    for device in cpu cuda; do
        run "agree_${mode}_${device}" lorasweep bench "$mode" --geometry tiny --device "$device" --batch 4 --seq-len 64 --steps 8 --warmup 0 --lr 1e-3
    done
done

# The four configurations of GPU.md plus the probe, ours then PEFT's, batch 16 x 512, r=16, a=32.
want compare && for geometry in $geometries; do
    for placement in all one:2.down_proj; do
        tag="${geometry}_${placement//[:.]/_}"
        run "ours_train_$tag" lorasweep bench train --geometry "$geometry" --placement "$placement" --steps "$steps" --warmup "$warmup"
        run "peft_train_$tag" python3 bench/peft_baseline.py --mode train --geometry "$geometry" --placement "$placement" --steps "$steps" --warmup "$warmup"
    done
    run "ours_probe_$geometry" lorasweep bench probe --geometry "$geometry" --steps "$steps" --warmup "$warmup"
    run "peft_probe_$geometry" python3 bench/peft_baseline.py --mode probe --geometry "$geometry" --steps "$steps" --warmup "$warmup"
done
# The stronger anchors, same four configurations: PEFT with Liger's fused kernels (its wheel
# carried in .whl/ and installed into /tmp/site when python3 lacks it) and PEFT under
# torch.compile (the compile happens in the warm-up steps; its time is reported apart).
if want anchors; then
    if ! python3 -c 'import liger_kernel' 2>/dev/null && compgen -G ".whl/liger_kernel-*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/liger_kernel-*.whl >&2 \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    for geometry in $geometries; do
        for placement in all one:2.down_proj; do
            tag="${geometry}_${placement//[:.]/_}"
            run "liger_train_$tag" python3 bench/peft_baseline.py --kernels liger --mode train --geometry "$geometry" --placement "$placement" --steps "$steps" --warmup "$warmup"
            RUN_TIMEOUT="${COMPILE_TIMEOUT:-240}" run "compile_train_$tag" python3 bench/peft_baseline.py --kernels compile --mode train --geometry "$geometry" --placement "$placement" --steps "$steps" --warmup "$warmup"
        done
    done
fi
# Bound by the host or by the device? The single-adapter steps again with a quarter of the
# tokens (batch 4): a device-bound step takes about a quarter of the time, a host-bound one
# about the same.
want scaling && for geometry in $geometries; do
    tag="${geometry}_one_2_down_proj"
    run "ours_b4_train_$tag" lorasweep bench train --geometry "$geometry" --placement one:2.down_proj --batch 4 --steps "$steps" --warmup "$warmup"
    run "peft_b4_train_$tag" python3 bench/peft_baseline.py --mode train --geometry "$geometry" --placement one:2.down_proj --batch 4 --steps "$steps" --warmup "$warmup"
done

# Where the time goes: each phase of a step timed apart, ours and PEFT's (issue 7's profile).
want profile && for geometry in $geometries; do
    for placement in all one:2.down_proj; do
        tag="${geometry}_${placement//[:.]/_}"
        run "profile_ours_$tag" lorasweep bench train --geometry "$geometry" --placement "$placement" --steps 5 --warmup 2 --profile
        run "profile_peft_$tag" python3 bench/peft_baseline.py --mode train --geometry "$geometry" --placement "$placement" --steps 5 --warmup 2 --profile
    done
done
# The training step the profilers run: SmolLM2 with one down_proj adapter, ours or PEFT's,
# with the given timed and warm-up steps; sets the array `cmd`.
profiled_step_cmd() { # who steps warmup
    local args=(--geometry smollm2-135m --placement one:2.down_proj --steps "$2" --warmup "$3")
    if [[ $1 == ours ]]; then
        cmd=(lorasweep bench train "${args[@]}")
    else
        cmd=(python3 bench/peft_baseline.py --mode train "${args[@]}")
    fi
}

# Kernel time of one step under Nsight Compute (duration only, clocks left alone): is the step
# bound by the kernels or by the host? Compared with the step's wall time measured above.
if want ncu && command -v ncu >/dev/null; then
    for who in ours peft; do
        tag=smollm2-135m_one_2_down_proj
        profiled_step_cmd "$who" 1 0
        log "ncu $who $tag"
        timeout "${NCU_TIMEOUT:-240}" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
            --log-file "$out/ncu_${who}_$tag.csv" "${cmd[@]}" >"$out/ncu_${who}_$tag.log" 2>&1 || log "ncu $who failed or timed out"
        wall_var="WALL_MS_$who"
        wall=${!wall_var:-}
        [[ -n $wall ]] || wall=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("step_ms_median", ""))' "$out/runs/${who}_train_$tag.json" 2>/dev/null || true)
        python3 bench/ncu_summary.py "$out/ncu_${who}_$tag.csv" "$who $tag" "$wall" > "$out/ncu_${who}_$tag.md" 2>&1
    done
fi

# 50-step loss curves, fused kernels vs candle's composed ops (training must not change).
if want fusedcheck; then
    log "fusedcheck"
    OUT="$out/fused-check" bash bench/fused_check.sh | tee "$out/fused_check.txt" >&2 || log "fused check failed"
fi

# Where the kernel time goes in one step, from Nsight Systems (if the machine has it).
if want nsys && command -v nsys >/dev/null; then
    for who in ours peft; do
        tag=smollm2-135m_one_2_down_proj
        profiled_step_cmd "$who" 3 2
        log "nsys $who $tag"
        timeout "${NSYS_TIMEOUT:-200}" nsys profile --trace=cuda --sample=none --cpuctxsw=none -o "$out/nsys_${who}" --force-overwrite true "${cmd[@]}" >"$out/nsys_${who}.log" 2>&1 || log "nsys $who failed"
        nsys stats --report cuda_gpu_kern_sum,cuda_api_sum --format csv --output "$out/nsys_${who}" "$out/nsys_${who}.nsys-rep" >>"$out/nsys_${who}.log" 2>&1 || log "nsys stats $who failed"
        rm -f "$out/nsys_${who}.nsys-rep" "$out/nsys_${who}.sqlite"
    done
fi

# The waste frozen_linear avoids: candle's generic matmul computes every frozen weight gradient.
want generic && run "ours_generic_matmul_smollm2-135m_one_2_down_proj" lorasweep bench train --geometry smollm2-135m --placement one:2.down_proj --generic-matmul --steps "$steps" --warmup "$warmup"

for f in "$out"/runs/*.json; do python3 -c 'import json,sys,os; d=json.load(open(sys.argv[1])); d["name"]=os.path.basename(sys.argv[1])[:-5]; print(json.dumps(d))' "$f"; done > "$out/results.jsonl"
python3 bench/compare.py "$out/results.jsonl" | tee "$out/table.md"
cat "$out"/ncu_*.md 2>/dev/null | tee -a "$out/table.md"
