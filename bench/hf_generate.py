#!/usr/bin/env python3
"""Hugging Face `generate` (+ PEFT adapter) on exactly the prompts lorasweep generated for.

The anchor for lorasweep's batched generation. lorasweep writes its generations with
`lorasweep eval ... --dump-generations ours.jsonl` (each prompt's token ids, the batch it ran
in, max new tokens, stop strings, and the ids it generated); the model as a Hugging Face
directory comes from `lorasweep assets export-hf MODEL --out DIR` (the very weights lorasweep
computes with). This script runs `model.generate` on the same token ids, in the same batches
(left-padded, with an attention mask), greedy, with the same max new tokens and end-of-turn
ids, in bf16 on the GPU by default, and reports generated tokens per second with the peak of
allocated memory. It also compares the generated ids with lorasweep's, row by row.

    python3 bench/hf_generate.py --model-dir hf/ --adapter adapter/ --dump ours.jsonl \
        --json hf.json [--completions hf.jsonl] [--dtype bf16|f32] [--device cuda|cpu]

Counting: a row's generated tokens are the new tokens before its first end-of-turn id (the
end-of-turn token itself is not counted, as lorasweep does not count it); rows that stopped on
a stop string count up to the token that completed it. Timing covers the `generate` calls
only (no tokenizing: the ids are given), each bracketed by device synchronisations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict


class BenchError(Exception):
    """A bad input or a failed run; printed as one line, exit status 2."""


def read_dump(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchError(f"{path}:{number}: not JSON ({error})") from None
            for field in ("index", "batch", "prompt_ids", "max_new_tokens", "stop", "output_ids"):
                if field not in row:
                    raise BenchError(f"{path}:{number}: missing field {field!r}")
            rows.append(row)
    if not rows:
        raise BenchError(f"{path}: no generations")
    return rows


def end_ids(model_dir: str) -> tuple[list[int], int]:
    with open(f"{model_dir}/generation_config.json", encoding="utf-8") as f:
        config = json.load(f)
    eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    pad = config.get("pad_token_id")
    if pad is None:
        pad = eos[0]
    return [int(e) for e in eos], int(pad)


def count_generated(new_ids: list[int], eos: list[int]) -> int:
    for position, token in enumerate(new_ids):
        if token in eos:
            return position
    return len(new_ids)


def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    rows = read_dump(args.dump)
    eos, pad = end_ids(args.model_dir)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    if on_cuda and args.dtype == "f32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    load_started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if args.adapter:
        import peft
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
        versions["peft"] = peft.__version__
    model = model.to(device).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{args.model_dir}/tokenizer.json")
    load_s = time.perf_counter() - load_started

    batches: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        batches[row["batch"]].append(row)

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = 0.0
    generated = 0
    identical = 0
    first_divergence: list[int] = []
    completions = []
    for batch_index in sorted(batches):
        batch = batches[batch_index]
        longest = max(len(r["prompt_ids"]) for r in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["prompt_ids"])
            ids[i, longest - n :] = torch.tensor(r["prompt_ids"], dtype=torch.long)
            mask[i, longest - n :] = 1
        ids, mask = ids.to(device), mask.to(device)
        settings = {r["max_new_tokens"] for r in batch}
        stops = {tuple(r["stop"]) for r in batch}
        if len(settings) != 1 or len(stops) != 1:
            raise BenchError(f"batch {batch_index} mixes generation settings")
        extra = {}
        stop = list(stops.pop())
        if stop:
            extra = {"stop_strings": stop, "tokenizer": tokenizer}
        sync()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=settings.pop(),
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=pad,
                **extra,
            )
        sync()
        seconds += time.perf_counter() - started
        new = out[:, longest:].tolist()
        for r, new_ids in zip(batch, new):
            n = count_generated(new_ids, eos)
            mine = new_ids[:n]
            generated += n
            theirs = r["output_ids"]
            if mine == theirs:
                identical += 1
            else:
                diverge = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
                first_divergence.append(diverge)
            text = tokenizer.decode(mine, skip_special_tokens=False)
            completions.append({"index": r["index"], "batch": batch_index, "output_ids": mine, "text": text})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None
    if args.completions:
        with open(args.completions, "w", encoding="utf-8") as f:
            for c in sorted(completions, key=lambda c: c["index"]):
                f.write(json.dumps(c) + "\n")
    return {
        "framework": "hf-generate" + ("+peft" if args.adapter else ""),
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "prompts": len(rows),
        "batches": len(batches),
        "generated_tokens": generated,
        "generation_s": seconds,
        "generated_tokens_per_s": generated / max(seconds, 1e-9),
        "load_s": load_s,
        "peak_mem_gib": peak,
        "identical_rows": identical,
        "first_divergence": sorted(first_divergence),
        "versions": versions,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="the model as `lorasweep assets export-hf` wrote it")
    p.add_argument("--adapter", help="a PEFT adapter directory (lorasweep's train output)")
    p.add_argument("--dump", required=True, help="lorasweep's --dump-generations JSONL")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="FILE", help="write the result object here")
    p.add_argument("--completions", metavar="FILE", help="write the generated texts here (JSONL)")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except BenchError as error:
        print(f"hf_generate: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(
        f"{result['framework']} {result['dtype']} on {result['device']}: {result['prompts']} prompts in "
        f"{result['batches']} batches, {result['generated_tokens']} tokens in {result['generation_s']:.2f} s = "
        f"{result['generated_tokens_per_s']:.0f} tok/s; identical to lorasweep: {result['identical_rows']}/{result['prompts']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
