#!/usr/bin/env python3
"""PyTorch + PEFT baseline for `lorasweep bench train` and `lorasweep bench probe`.

Builds a causal LM of a named geometry with random-normal weights (no checkpoint needed:
throughput does not depend on weight values), wraps it with PEFT LoRA adapters, and times
eager training steps (forward, backward, AdamW step) or probe batches (one forward/backward
with adapters everywhere, collecting every adapter's squared gradient norm ||dL/dB||^2).

It writes one JSON object (--json FILE) with the same fields as the Rust bench, and prints one
summary line. Examples:

    python3 bench/peft_baseline.py --geometry smollm2-135m --placement all --json out.json
    python3 bench/peft_baseline.py --geometry qwen2.5-0.5b --placement one:2.down_proj
    python3 bench/peft_baseline.py --geometry smollm2-135m --mode probe
    python3 bench/peft_baseline.py --geometry tiny --batch 2 --seq-len 32 --steps 3 --warmup 1
    python3 bench/peft_baseline.py --geometry smollm2-135m --kernels liger    # stronger anchors
    python3 bench/peft_baseline.py --geometry smollm2-135m --kernels compile

--kernels picks the anchor: `eager` (PEFT as it comes), `liger` (the same model with
liger_kernel's fused RMSNorm, SwiGLU, RoPE and fused linear cross-entropy patched in before the
model is built; needs the `liger_kernel` package) or `compile` (the PEFT model under
`torch.compile`, default mode; the compile happens in the warm-up steps and its time is
reported as `compile_s`, the wall time of the first step).

Weights: every linear and embedding weight (and bias) is N(0, 0.02); every RMSNorm weight is
1 + N(0, 0.02). LoRA adapters keep PEFT's own initialisation (A Kaiming-uniform, B zero).
Batches are uniform random token ids, labels = inputs (the model shifts them); four batches
are made on the device up front and used in turn, so no host-to-device copy is timed.

Timing: each step is bracketed by device synchronisations and timed with the host clock, so
launch overhead and the optimizer step are included. Median, p10 and p90 over --steps steps
after --warmup untimed ones. Peak memory is torch.cuda.max_memory_allocated() over warm-up and
timed steps (model weights included), null on the CPU.

FLOP count ("tflops" = flops_per_step / median step time; the same formula in the Rust bench).
T = batch*seq_len tokens, S = seq_len, H = hidden, V = vocab, L = layers, heads n_h, head dim d,
P = linear weights of one decoder layer (q, k, v, o, gate, up, down), l0 = the shallowest
adapted layer, each adapter in->out of rank r costs F_a = 2*r*(in+out) per token forward:
    forward  = T * (L * (2*P + 2*S*n_h*d) + 2*H*V) + T * sum(F_a)
    backward = T * ((L - l0) * (2*P + 4*S*n_h*d) + 2*H*V) + 2 * T * sum(F_a)
Matmuls count 2 FLOPs per multiply-add; causal attention counts half of the S x S scores
(QK^T and AV: 2*S*n_h*d per token forward, twice that backward); frozen weights get no weight
gradient, so backward counts only input gradients, from the head down to layer l0; elementwise
work, norms, softmax and the optimizer are not counted. A probe counts like a train step.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Geometry:
    """Shape of a decoder-only model, mirroring the fields of its HF config.json."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    rms_eps: float
    max_positions: int
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kind_shape(self, kind: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection kind."""
        d, h, i = self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (h, self.heads * d),
            "k_proj": (h, self.kv_heads * d),
            "v_proj": (h, self.kv_heads * d),
            "o_proj": (self.heads * d, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[kind]

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in (self.kind_shape(k) for k in KINDS))


GEOMETRIES = {
    # SmolLM2-135M: llama architecture.
    "smollm2-135m": Geometry("llama", 30, 576, 1536, 9, 3, 49152, 100000.0, 1e-5, 8192),
    # Qwen2.5-0.5B: qwen2 architecture (q/k/v carry biases).
    "qwen2.5-0.5b": Geometry("qwen2", 24, 896, 4864, 14, 2, 151936, 1000000.0, 1e-6, 32768),
    # A toy for CPU smoke tests.
    "tiny": Geometry("llama", 2, 64, 128, 4, 2, 512, 10000.0, 1e-5, 2048),
}


class BenchError(Exception):
    """A bad flag or a failed run; printed as one line, exit status 2."""


def parse_placement(text: str, geometry: Geometry) -> list[tuple[int, str]]:
    """`all` -> every kind in every layer; `one:L.KIND` -> that single projection."""
    if text == "all":
        return [(layer, kind) for layer in range(geometry.layers) for kind in KINDS]
    if text.startswith("one:"):
        spec = text[len("one:") :]
        layer_text, _, kind = spec.partition(".")
        try:
            layer = int(layer_text)
        except ValueError:
            raise BenchError(f"--placement {text!r}: layer {layer_text!r} is not an integer") from None
        if not 0 <= layer < geometry.layers:
            raise BenchError(
                f"--placement {text!r}: layer {layer} out of range 0..{geometry.layers - 1}"
            )
        if kind not in KINDS:
            raise BenchError(f"--placement {text!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        return [(layer, kind)]
    raise BenchError(f"--placement {text!r}: expected 'all' or 'one:LAYER.KIND' (e.g. one:2.down_proj)")


def flops_per_step(geometry: Geometry, placement: list[tuple[int, str]], batch: int, seq: int, rank: int) -> float:
    """Model FLOPs of one training step or probe batch; see the module docstring."""
    tokens = batch * seq
    g = geometry
    linear = g.layer_linear_params()
    attn_fwd = 2 * seq * g.heads * g.head_dim
    head = 2 * g.hidden * g.vocab
    lora_fwd = sum(2 * rank * sum(g.kind_shape(kind)) for _, kind in placement)
    shallowest = min(layer for layer, _ in placement)
    forward = tokens * (g.layers * (2 * linear + attn_fwd) + head) + tokens * lora_fwd
    backward = tokens * ((g.layers - shallowest) * (2 * linear + 2 * attn_fwd) + head) + 2 * tokens * lora_fwd
    return float(forward + backward)


def build_config(geometry: Geometry, seq: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=geometry.vocab,
        hidden_size=geometry.hidden,
        intermediate_size=geometry.intermediate,
        num_hidden_layers=geometry.layers,
        num_attention_heads=geometry.heads,
        num_key_value_heads=geometry.kv_heads,
        hidden_act="silu",
        max_position_embeddings=max(geometry.max_positions, seq),
        rms_norm_eps=geometry.rms_eps,
        rope_theta=geometry.rope_theta,
        tie_word_embeddings=geometry.tied,
        attention_dropout=0.0,
        use_cache=False,
    )
    if geometry.model_type == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    if geometry.model_type == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise BenchError(f"unknown model type {geometry.model_type!r}")


def apply_liger(geometry: Geometry) -> str:
    """Patches transformers' llama or qwen2 modules with liger_kernel's fused ones; returns the
    liger_kernel version. Must run before the model is built."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2
    except ImportError as error:
        raise BenchError(f"--kernels liger needs the liger_kernel package ({error})") from None
    patch = {"llama": apply_liger_kernel_to_llama, "qwen2": apply_liger_kernel_to_qwen2}[geometry.model_type]
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    from importlib.metadata import version

    return version("liger_kernel")


def build_model(geometry: Geometry, seq: int, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(geometry, seq)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.02, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
            if not torch.isfinite(param).all() or param.abs().max() == 0:
                raise BenchError(f"random init of {name} produced zeros or non-finite values")
    if geometry.tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise BenchError("output embeddings are not tied to input embeddings")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn != "sdpa":
        raise BenchError(f"attention implementation is {attn!r}, expected 'sdpa'")
    return model


def add_adapters(model, placement: list[tuple[int, str]], text: str, rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    if text == "all":
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(KINDS))
    else:
        (layer, kind) = placement[0]
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=[kind],
            layers_to_transform=[layer],
            layers_pattern="layers",
        )
    model = get_peft_model(model, config)
    b_params = [(name, p) for name, p in model.named_parameters() if "lora_B" in name]
    if len(b_params) != len(placement):
        raise BenchError(f"peft made {len(b_params)} adapters, expected {len(placement)} for {text!r}")
    return model, b_params


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def run(args: argparse.Namespace) -> dict:
    import peft
    import torch
    import transformers

    if args.geometry not in GEOMETRIES:
        raise BenchError(f"--geometry {args.geometry!r}: expected one of {', '.join(GEOMETRIES)}")
    geometry = GEOMETRIES[args.geometry]
    if args.mode == "probe" and args.placement != "all":
        raise BenchError(f"--mode probe puts adapters everywhere; --placement {args.placement!r} is not 'all'")
    placement = parse_placement(args.placement, geometry)
    for flag in ("batch", "seq_len", "rank", "steps"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise BenchError("--warmup must be at least 0")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)

    liger_version = apply_liger(geometry) if args.kernels == "liger" else None
    model = build_model(geometry, args.seq_len, dtype, device)
    model, b_params = add_adapters(model, placement, args.placement, args.rank, args.alpha)
    if args.mode == "probe":
        # Only dL/dB is wanted: freeze A so autograd does not compute its gradient.
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr) if args.mode == "train" else None
    peft_model = model
    if args.kernels == "compile":
        if args.profile:
            raise BenchError("--profile times the eager modules one by one; it does not combine with --kernels compile")
        model = torch.compile(model)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = [
        torch.randint(0, geometry.vocab, (args.batch, args.seq_len), device=device, generator=gen)
        for _ in range(4)
    ]

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    losses: list[float] = []
    probe_sums: list[float] = []

    def train_step(ids):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss

    def probe_step(ids):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        missing = [name for name, p in b_params if p.grad is None]
        if missing:
            raise BenchError(f"no gradient reached {missing[0]} ({len(missing)} adapters in all)")
        norms = torch.stack([p.grad.float().pow(2).sum() for _, p in b_params]).cpu()
        for _, p in b_params:
            p.grad = None
        return out.loss, norms

    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    times_ms: list[float] = []
    first_step_s = None
    for i in range(args.warmup + args.steps):
        ids = batches[i % len(batches)]
        sync()
        start = time.perf_counter()
        if args.mode == "train":
            loss = train_step(ids)
        else:
            loss, norms = probe_step(ids)
        sync()
        elapsed = (time.perf_counter() - start) * 1e3
        if first_step_s is None:
            first_step_s = elapsed / 1e3
        if i >= args.warmup:
            times_ms.append(elapsed)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise BenchError(f"step {i}: loss is {loss_value}")
        losses.append(loss_value)
        if args.mode == "probe":
            if not torch.isfinite(norms).all():
                raise BenchError(f"step {i}: a gradient norm is not finite")
            if float(norms.sum()) <= 0.0:
                raise BenchError(f"step {i}: every ||dL/dB||^2 is zero: adapters are not in the graph")
            probe_sums.append(float(norms.sum()))

    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None

    # The phases of a training step, timed apart with a synchronisation between them (the
    # same split as `lorasweep bench --profile`): the decoder, the LM head with the loss,
    # backward, and the optimizer.
    phases_ms: dict[str, float] = {}
    if args.profile and args.mode == "train":
        base = peft_model.get_base_model()
        laps: dict[str, list[float]] = {}
        for i in range(args.steps):
            ids = batches[i % len(batches)]
            sync()
            marks = [time.perf_counter()]
            hidden = base.model(input_ids=ids, use_cache=False).last_hidden_state
            sync()
            marks.append(time.perf_counter())
            logits = base.lm_head(hidden)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            sync()
            marks.append(time.perf_counter())
            loss.backward()
            sync()
            marks.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            marks.append(time.perf_counter())
            for name, start, end in zip(("forward", "head_loss", "backward", "optimizer"), marks, marks[1:]):
                laps.setdefault(name, []).append((end - start) * 1e3)
        phases_ms = {name: statistics.median(values) for name, values in laps.items()}
    ordered = sorted(times_ms)
    median = statistics.median(ordered)
    tokens = args.batch * args.seq_len
    flops = flops_per_step(geometry, placement, args.batch, args.seq_len, args.rank)
    result = {
        "geometry": args.geometry,
        "mode": args.mode,
        "placement": args.placement,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "alpha": args.alpha,
        "dtype": args.dtype,
        "step_ms_median": median,
        "step_ms_p10": percentile(ordered, 0.10),
        "step_ms_p90": percentile(ordered, 0.90),
        "tokens_per_s": tokens / (median / 1e3),
        "peak_mem_gib": peak_gib,
        "tflops": flops / (median / 1e3) / 1e12,
        "steps": args.steps,
        "warmup": args.warmup,
        "framework": {"eager": "peft", "liger": "peft+liger", "compile": "peft+compile"}[args.kernels],
        "kernels": args.kernels,
        "compile_s": first_step_s if args.kernels == "compile" else None,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "liger_kernel": liger_version,
        },
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "flops_per_step": flops,
        "adapters": len(placement),
        "trainable_params": sum(p.numel() for p in trainable),
        "lr": args.lr if args.mode == "train" else None,
        "step_ms_all": times_ms,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "phases_ms": phases_ms,
    }
    if args.mode == "probe":
        result["probe_grad_sq_sum_last"] = probe_sums[-1]
    return result


def summary_line(r: dict) -> str:
    peak = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "peak n/a"
    return (
        f"{r['framework']} {r['geometry']} {r['mode']} {r['placement']} {r['batch']}x{r['seq_len']} "
        f"r={r['rank']} a={r['alpha']:g} {r['dtype']}: step {r['step_ms_median']:.2f} ms "
        f"(p10 {r['step_ms_p10']:.2f}, p90 {r['step_ms_p90']:.2f}), "
        f"{r['tokens_per_s'] / 1e3:.1f} k tok/s, {peak}, {r['tflops']:.2f} TFLOP/s on {r['device']}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", default="smollm2-135m", help=f"one of {', '.join(GEOMETRIES)}")
    p.add_argument("--mode", choices=("train", "probe"), default="train")
    p.add_argument("--placement", default="all", help="'all' or 'one:LAYER.KIND', e.g. one:2.down_proj")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="FILE", help="write the result object here")
    p.add_argument("--profile", action="store_true", help="also time each phase of a training step")
    p.add_argument(
        "--kernels",
        choices=("eager", "liger", "compile"),
        default="eager",
        help="eager PEFT, PEFT with liger_kernel's fused kernels, or PEFT under torch.compile",
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Deprecation chatter between peft and newer transformers releases; not ours to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    try:
        result = run(args)
    except BenchError as err:
        print(f"peft_baseline: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
