"""Summarise an Nsight Compute CSV of one training step: device time per kernel.

Usage: python3 bench/ncu_summary.py NCU.csv [LABEL] [WALL_MS]

The CSV comes from `ncu --metrics gpu__time_duration.sum --csv --log-file NCU.csv CMD`. Prints
the kernel count, the summed kernel time, and the kernels that take the most of it (grouped by
name). With WALL_MS (the step's measured wall time without ncu), also the share of the wall
time the GPU spent in kernels: a small share means the step is bound by the host (launches,
allocations, synchronisation), not by the kernels.
"""

import csv
import re
import sys
from collections import defaultdict

UNITS = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}


def short(name: str) -> str:
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name.strip()[:70]


def main(path: str, label: str = "", wall_ms: str = "") -> None:
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        print(f"{path}: no ncu CSV table found")
        return
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            value = float(row["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        per_kernel[short(row["Kernel Name"])].append(value * UNITS.get(row["Metric Unit"], 1e-6))
    total = sum(sum(v) for v in per_kernel.values())
    count = sum(len(v) for v in per_kernel.values())
    print(f"### {label or path}: {count} kernels, {total:.1f} ms of kernel time")
    if wall_ms:
        wall = float(wall_ms)
        print(f"wall time of the step without ncu: {wall:.1f} ms; kernels busy {100 * total / wall:.0f}% of it")
    print()
    print("| kernel | launches | ms | share |")
    print("|---|---|---|---|")
    ranked = sorted(per_kernel.items(), key=lambda item: -sum(item[1]))
    for name, values in ranked[:15]:
        print(f"| `{name}` | {len(values)} | {sum(values):.2f} | {100 * sum(values) / max(total, 1e-9):.1f}% |")
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
