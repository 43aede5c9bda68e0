"""Side-by-side table of a device run (bench/device_run.sh): lorasweep vs PyTorch+PEFT.

Reads results.jsonl (one object per run, named ours_*/peft_*/agree_*) and prints Markdown:
the ratio lorasweep / PEFT for tokens/s (higher is better) and peak memory (lower is better),
then the CPU-vs-CUDA agreement of losses and probe scores.
"""

import json
import sys


def spearman(a, b):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    m = (n - 1) / 2
    cov = sum((x - m) * (y - m) for x, y in zip(ra, rb))
    var = sum((x - m) ** 2 for x in ra)
    return cov / var if var else float("nan")


def anchors(runs):
    """The training step against every anchor of the same configuration: eager PEFT, PEFT with
    Liger's fused kernels, PEFT under torch.compile (runs named liger_train_*/compile_train_*)."""
    tags = sorted(n[len("ours_train_"):] for n in runs if n.startswith("ours_train_"))
    tags = [t for t in tags if f"liger_train_{t}" in runs or f"compile_train_{t}" in runs]
    if not tags:
        return
    print("Training step against the anchors (tokens/s; peak allocated GiB):")
    print()
    print("| config | lorasweep | eager PEFT | PEFT + Liger | PEFT + compile (compile s) | ours / eager | ours / best anchor | memory ours / eager / Liger / compile |")
    print("|---|---|---|---|---|---|---|---|")
    for tag in tags:
        row = {who: runs.get(f"{who}_train_{tag}", {}) for who in ("ours", "peft", "liger", "compile")}
        def tps(d):
            return d.get("tokens_per_s") if not d.get("failed") else None
        def cell(d):
            v = tps(d)
            return "failed" if d.get("failed") else ("n/a" if v is None else f"{v / 1e3:.1f} k")
        def mem(d):
            v = d.get("peak_alloc_gib") or d.get("peak_mem_gib")
            return "n/a" if v is None else f"{v:.2f}"
        ours = tps(row["ours"])
        eager = tps(row["peft"])
        best = max([v for v in (tps(row["liger"]), tps(row["compile"])) if v], default=None)
        compile_s = row["compile"].get("compile_s")
        compile_cell = cell(row["compile"]) + (f" ({compile_s:.0f} s)" if isinstance(compile_s, (int, float)) else "")
        r1 = f"{ours / eager:.2f}x" if ours and eager else "n/a"
        r2 = f"{ours / best:.2f}x" if ours and best else "n/a"
        mems = " / ".join(mem(row[w]) for w in ("ours", "peft", "liger", "compile"))
        print(f"| {tag} | {cell(row['ours'])} | {cell(row['peft'])} | {cell(row['liger'])} | {compile_cell} | {r1} | {r2} | {mems} |")
    print()


def main(path):
    runs = {}
    for line in open(path):
        line = line.strip()
        if line:
            d = json.loads(line)
            runs[d["name"]] = d
    # Memory like for like: our peak of live allocations (the CUDA pool's high-water mark)
    # against PyTorch's max_memory_allocated; the device-reported figure (cached blocks and
    # library workspaces included) is shown beside it.
    print("| run | lorasweep step ms | PEFT step ms | lorasweep tok/s | PEFT tok/s | tok/s ratio | lorasweep peak GiB live (used) | PEFT peak GiB | memory ratio | lorasweep TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ours in sorted(runs.items()):
        if not name.startswith("ours_"):
            continue
        peft = runs.get("peft_" + name[len("ours_"):], {})
        if ours.get("failed"):
            print(f"| {name[5:]} | failed | | | | | | | | |")
            continue
        def g(d, k, fmt="{:.1f}"):
            v = d.get(k)
            return fmt.format(v) if isinstance(v, (int, float)) else "n/a"
        ratio = ours["tokens_per_s"] / peft["tokens_per_s"] if peft.get("tokens_per_s") else None
        ours_mem = ours.get("peak_alloc_gib") or ours.get("peak_mem_gib")
        mem = ours_mem / peft["peak_mem_gib"] if ours_mem and peft.get("peak_mem_gib") else None
        print(
            f"| {name[5:]} | {g(ours, 'step_ms_median')} | {g(peft, 'step_ms_median')} | {ours['tokens_per_s']/1e3:.1f} k | "
            f"{(peft.get('tokens_per_s') or 0)/1e3:.1f} k | {'n/a' if ratio is None else f'{ratio:.2f}x'} | "
            f"{g(ours, 'peak_alloc_gib')} ({g(ours, 'peak_mem_gib')}) | "
            f"{g(peft, 'peak_mem_gib')} | {'n/a' if mem is None else f'{mem:.2f}x'} | {g(ours, 'tflops', '{:.2f}')} |"
        )
    print()
    anchors(runs)
    profiled = [(n, d) for n, d in sorted(runs.items()) if n.startswith("profile_ours_") and d.get("phases_ms")]
    if profiled:
        print("Phases of one training step, median ms (synchronised between phases):")
        print()
        print("| config | framework | forward | head + loss | backward | optimizer |")
        print("|---|---|---|---|---|---|")
        for name, ours in profiled:
            tag = name[len("profile_ours_"):]
            for framework, d in (("lorasweep", ours), ("PEFT", runs.get("profile_peft_" + tag, {}))):
                p = d.get("phases_ms") or {}
                cells = " | ".join(f"{p[k]:.1f}" if k in p else "n/a" for k in ("forward", "head_loss", "backward", "optimizer"))
                print(f"| {tag} | {framework} | {cells} |")
        print()
    for mode in ("train", "probe"):
        cpu, cuda = runs.get(f"agree_{mode}_cpu"), runs.get(f"agree_{mode}_cuda")
        if not cpu or not cuda or cpu.get("failed") or cuda.get("failed"):
            print(f"agreement {mode}: missing or failed")
            continue
        rel = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(cpu["losses"], cuda["losses"]))
        line = f"agreement {mode} (tiny geometry, f32 CPU vs bf16 CUDA): losses CPU {['%.4f' % x for x in cpu['losses']]} CUDA {['%.4f' % x for x in cuda['losses']]}; max relative difference {rel:.2e}"
        if mode == "probe":
            a, b = cpu["probe_scores"], cuda["probe_scores"]
            worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
            argmax_cpu = max(range(len(a)), key=lambda i: a[i])
            argmax_cuda = max(range(len(b)), key=lambda i: b[i])
            line += f"; probe scores Spearman {spearman(a, b):.4f}, max relative difference {worst:.2e}, argmax CPU {argmax_cpu} CUDA {argmax_cuda}"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
