#!/usr/bin/env bash
# Runs (or resumes) a sweep for at most SECONDS, and if it has not ended by then writes the
# report of the jobs finished so far before stopping it. A sweep bigger than one device call
# goes on in the next call with the same OUT (`lorasweep run` resumes from its state.db).
#
#   deploy/cuda/run-on-device.sh bash bench/study_run.sh SWEEP OUT SECONDS [lorasweep run args...]
#   e.g. ... study_run.sh experiments/domlora-study-smollm2.yaml /tmp/study 540 \
#            --gpus 0 --workers 4 --workers-per-gpu 4
#
# Leaves OUT/report (the sweep ended) or OUT/partial-report (it was stopped), OUT/status.txt,
# OUT/run.log, and OUT/phases.md (per-phase times of the finished jobs).
set -uo pipefail
[[ $# -ge 3 ]] || { echo "usage: study_run.sh SWEEP OUT SECONDS [run args...]" >&2; exit 2; }
sweep="$1" out="$2" seconds="$3"
shift 3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$out"
deadline=$((SECONDS + seconds))
lorasweep run "$sweep" --out "$out" "$@" >>"$out/run.log" 2>&1 &
pid=$!
# Leave ~40 s to write the partial report and stop cleanly.
while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline - 40)); do sleep 3; done
if kill -0 "$pid" 2>/dev/null; then
    url="http://$(cat "$out/coordinator.addr")"
    connect=(--coordinator "$url" --token-file "$out/token")
    if id="$(lorasweep submit --resume "$sweep" "${connect[@]}")"; then
        lorasweep status "$id" "${connect[@]}" >"$out/status.txt" 2>&1
        rm -rf "$out/partial-report"
        lorasweep report "$id" "${connect[@]}" --out "$out/partial-report" >"$out/partial.txt" 2>&1 \
            || echo "study_run: no partial report (see $out/partial.txt)" >&2
    fi
    kill -TERM "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$pid" 2>/dev/null
fi
wait "$pid"
status=$?
tail -n 30 "$out/run.log" >&2
for report in "$out/report" "$out/partial-report"; do
    if [[ -f $report/results.csv ]]; then
        python3 "$here/sweep_phases.py" "$report/results.csv" >"$out/phases.md" && cat "$out/phases.md" >&2
    fi
done
exit $status
