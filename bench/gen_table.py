#!/usr/bin/env python3
"""The generation table of bench/gpu_sweep.sh: lorasweep's batched generation against Hugging
Face `generate` + PEFT on the same prompts, and the f32 CPU agreement of greedy outputs.

    python3 bench/gen_table.py OUT    # reads OUT/gen_MODEL/{ours,hf,ours_cpu,hf_cpu}.json
"""

import glob
import json
import os
import sys


def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def main(out):
    print("| model | prompts | lorasweep tok/s | HF generate + PEFT tok/s | ratio | generated tokens ours / HF | HF peak GiB | identical rows (bf16 GPU) | identical rows (f32 CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sorted(glob.glob(os.path.join(out, "gen_*"))):
        model = os.path.basename(d)[4:]
        ours, hf = load(f"{d}/ours.json"), load(f"{d}/hf.json")
        cpu = load(f"{d}/hf_cpu.json")
        if not ours or not hf:
            print(f"| {model} | missing or failed | | | | | | | |")
            continue
        m = ours.get("metrics", {})
        ours_tps = m.get("generated_tokens_per_s")
        hf_tps = hf["generated_tokens_per_s"]
        ratio = f"{ours_tps / hf_tps:.2f}x" if ours_tps and hf_tps else "n/a"
        agree = f"{cpu['identical_rows']}/{cpu['prompts']}" if cpu else "n/a"
        peak = f"{hf['peak_mem_gib']:.2f}" if hf.get("peak_mem_gib") is not None else "n/a"
        print(
            f"| {model} | {hf['prompts']} in {hf['batches']} batches | {ours_tps:.0f} | {hf_tps:.0f} | {ratio} | "
            f"{int(m.get('generated_tokens', 0))} / {hf['generated_tokens']} | {peak} | "
            f"{hf['identical_rows']}/{hf['prompts']} | {agree} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
