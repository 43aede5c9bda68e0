#!/usr/bin/env bash
# The study's probe panel (experiments/domlora-study.yaml leaves the probe's A init and
# estimator out of the training grid): one PAGE probe per model x task x A init x estimator,
# each written as the probe JSON, then the concentration and task-stability tables.
#
#   deploy/cuda/run-on-device.sh bash bench/study_probes.sh       # on the GPU machine
#   bash bench/study_probes.sh                                     # anywhere lorasweep is on PATH
#
# Environment: OUT (default /tmp/study-probes), MODELS (default smollm2-135m), TASKS (default
# math code instruct chat), BATCHES / BATCH_SIZE / MAX_LEN (default 8 / 8 / 256, the study's).
set -euo pipefail
out="${OUT:-/tmp/study-probes}"
mkdir -p "$out"
for model in ${MODELS:-smollm2-135m}; do
    for task in ${TASKS:-math code instruct chat}; do
        for a_init in kaiming gaussian; do
            for estimator in sample expected; do
                file="$out/${model}_${task}_${a_init}_${estimator}.json"
                [[ -s $file ]] && continue
                echo "== probe $model $task $a_init $estimator" >&2
                lorasweep probe --model "$model" --task "$task" --a-init "$a_init" \
                    --estimator "$estimator" --batches "${BATCHES:-8}" \
                    --probe-batch-size "${BATCH_SIZE:-8}" --probe-max-len "${MAX_LEN:-256}" \
                    --rank 16 --alpha 32 --out "$file"
            done
        done
    done
done
python3 "$(dirname "${BASH_SOURCE[0]}")/probe_summary.py" "$out"/*.json | tee "$out/probes.md"
