#!/usr/bin/env python3
"""Concentration and task-stability tables from `lorasweep probe` JSON files.

    python3 bench/probe_summary.py PROBE.json...

Each file is one probe (its model, data and settings are read from the file). Prints, as
Markdown: per model x task x A init x estimator, the top module, its energy share, the share
of the top 4 and whether the top module is a down_proj in the first third of the layers; then,
per model x A init x estimator, the Kendall tau-b between the module rankings of every pair of
tasks and whether their argmax agrees.
"""
import itertools
import json
import sys
from collections import defaultdict


def kendall_tau_b(xs, ys):
    """Kendall's tau-b of two equally long score lists (ties handled, O(n^2))."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(xs)), 2):
        dx = (xs[i] > xs[j]) - (xs[i] < xs[j])
        dy = (ys[i] > ys[j]) - (ys[i] < ys[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx == dy:
            concordant += 1
        else:
            discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else float("nan")


def task_of(probe):
    data = probe["data"]
    return data.removeprefix("task:").split("/")[-1]


def main(paths):
    probes = [json.load(open(path)) for path in paths]
    if not probes:
        sys.exit("probe_summary: no probe files given")
    print("| model | task | A init | estimator | top module | share | top-4 share | shallow down_proj |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    groups = defaultdict(dict)
    for probe in probes:
        settings = probe["settings"]
        modules = sorted(probe["modules"], key=lambda m: -m["score"])
        layers = 1 + max(m["layer"] for m in modules)
        top = modules[0]
        shallow = top["kind"] == "down_proj" and top["layer"] < layers / 3
        top4 = sum(m["share"] for m in modules[:4])
        task = task_of(probe)
        print(f"| {probe['model']} | {task} | {settings['a_init']} | {settings['estimator']} "
              f"| {top['name']} | {top['share']:.3f} | {top4:.3f} | {'yes' if shallow else 'no'} |")
        key = (probe["model"], settings["a_init"], settings["estimator"])
        groups[key][task] = {m["name"]: m["score"] for m in probe["modules"]}
    print()
    print("| model | A init | estimator | tasks | Kendall tau-b | same argmax |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (model, a_init, estimator), by_task in sorted(groups.items()):
        for first, second in itertools.combinations(sorted(by_task), 2):
            names = sorted(by_task[first])
            xs = [by_task[first][n] for n in names]
            ys = [by_task[second].get(n, float("nan")) for n in names]
            tau = kendall_tau_b(xs, ys)
            same = max(by_task[first], key=by_task[first].get) == max(by_task[second], key=by_task[second].get)
            print(f"| {model} | {a_init} | {estimator} | {first} vs {second} | {tau:.3f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
