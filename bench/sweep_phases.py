#!/usr/bin/env python3
"""Where a sweep's time went, per job kind and phase, from its report's results.csv.

    python3 bench/sweep_phases.py runs/NAME/report/results.csv

Columns of results.csv used: kind, state, started_at_ms, finished_at_ms (the job as the
coordinator saw it, loading included), wall_s (the engine's own time for the job), and for eval
jobs metrics.generation_s (batched generation, prefill included). Phases: a probe job's time is
`probe`; a train job's wall_s is `train` and the rest of its run is `load + setup`; an eval
job's generation_s is `generate`, its wall_s minus that is `score`, the rest `load + setup`.
The sweep's wall time is the first start to the last finish.
"""

import csv
import statistics
import sys
from collections import defaultdict


def number(row, key):
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return float("nan")


def main(path):
    rows = [r for r in csv.DictReader(open(path, newline=""))]
    done = [r for r in rows if r.get("state") == "succeeded"]
    phases = defaultdict(list)
    for r in done:
        run_s = (number(r, "finished_at_ms") - number(r, "started_at_ms")) / 1e3
        wall = number(r, "wall_s")
        kind = r["kind"]
        if kind == "probe":
            phases["probe"].append(run_s)
        elif kind == "train":
            phases["train"].append(wall)
            phases["load + setup (train)"].append(run_s - wall)
        elif kind == "eval":
            gen = number(r, "metrics.generation_s")
            if gen == gen:
                phases["generate"].append(gen)
                phases["score"].append(wall - gen)
            else:
                phases["score (loss)"].append(wall)
            phases["load + setup (eval)"].append(run_s - wall)
    starts = [number(r, "started_at_ms") for r in done]
    ends = [number(r, "finished_at_ms") for r in done]
    print(f"{len(done)}/{len(rows)} jobs succeeded; sweep wall time {(max(ends) - min(starts)) / 1e3:.1f} s"
          if done else f"0/{len(rows)} jobs succeeded")
    print()
    print("| phase | jobs | median s | total s |")
    print("|---|---|---|---|")
    for name, values in phases.items():
        values = [v for v in values if v == v]
        if values:
            print(f"| {name} | {len(values)} | {statistics.median(values):.1f} | {sum(values):.1f} |")
    failed = [r for r in rows if r.get("state") != "succeeded"]
    for r in failed:
        print(f"\nnot succeeded: job {r.get('job_id')} {r.get('kind')} {r.get('task')} {r.get('state')}: {r.get('last_error', '')[:300]}")


if __name__ == "__main__":
    main(sys.argv[1])
