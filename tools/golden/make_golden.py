#!/usr/bin/env python3
"""Golden reference values for lorasweep's engine, from an independent implementation.

What this produces
------------------
For each of the two packaged models (see engine/src/assets, or the project's
`lorasweep assets fetch`), two JSON fixtures under engine/tests/fixtures/golden/:

* `<model>_logits.json`: two short prompts (one plain text, one chat conversation rendered
  with the model's own chat template), their input token ids, and float32 logits of one full
  forward pass (no KV cache, causal attention) at the last position and three earlier ones
  (top-20 ids and values, plus the values at 32 fixed "probe" ids spread over the vocabulary,
  plus mean / std / logsumexp of the full row); per-layer hidden-state statistics (mean L2
  norm over positions of the residual stream after each decoder layer, and the first 8 values
  at the last position) so that a mismatch can be localised to a layer; and the greedy next
  16 tokens (each step a fresh full forward pass, no early stop at EOS) with the decoded text
  and the top-1/top-2 logit margin of every step.
* `<model>_text.json`: 12 varied strings with the token ids the reference tokenizer gives
  (add_special_tokens=False; special tokens written inline in the text are recognised), and
  3 conversations rendered with the chat template (add_generation_prompt false and true)
  together with the token ids of each rendering.

`<model>` is `smollm2` (SmolLM2-135M-Instruct, Q4_1 GGUF, llama architecture) or `qwen2`
(Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, qwen2 architecture).

The reference is Hugging Face transformers + PyTorch on CPU in float32. transformers reads the
GGUF itself: it dequantizes every tensor to float32 and, for the llama architecture, undoes the
row permutation the GGUF converter applies to attn_q / attn_k. The script cross-checks every
model parameter against an independent dequantization by the `gguf` package before using it.

Tokenizer note: the SmolLM2 GGUF says `tokenizer.ggml.pre = "smollm"`, which transformers does
not know; it silently falls back to the plain GPT-2 byte-level split. The model's original
tokenizer (and llama.cpp for "smollm") first isolates every digit and only then applies the
GPT-2 split. The two disagree on whitespace runs before a digit ("x =  42"). The fixtures use
the model's own split (digits isolated); where the stock transformers-from-GGUF tokenizer
differs, the text fixture records its ids too, under `ids_transformers_gguf_default`.

Versions used for the committed fixtures (see README.md next to this file): Python 3.11.7,
torch 2.15.0 (CPU execution), transformers 5.24.0, gguf 0.19.0, tokenizers 0.23.3,
accelerate 1.15.0 (transformers requires it to load GGUF), numpy 2.4.6, jinja2 3.1.6.

How to re-run
-------------
    python3 -m venv /work/venv-ref
    /work/venv-ref/bin/pip install torch==2.15.0 transformers==5.24.0 gguf==0.19.0 \
        accelerate==1.15.0 numpy
    /work/venv-ref/bin/python tools/golden/make_golden.py \
        --models-dir /work/models --out engine/tests/fixtures/golden

It expects `smollm2-135m.gguf` and `qwen2.5-coder-0.5b.gguf` in --models-dir. It takes about
five minutes on two CPU cores (mostly dequantizing the GGUF files) and writes files of a few tens of KB each.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

MODELS = {
    "smollm2": {"file": "smollm2-135m.gguf", "arch": "llama"},
    "qwen2": {"file": "qwen2.5-coder-0.5b.gguf", "arch": "qwen2"},
}

TOP_K = 20
N_PROBES = 32
N_GREEDY = 16
N_FIRST_VALUES = 8

PLAIN_PROMPT = "The printing press was invented around 1440, when Johannes Gutenberg"
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]

# Twelve tokenizer samples, each aimed at one part of a byte-level BPE tokenizer.
TEXT_SAMPLES = [
    ("ascii", "Hello, world! This is a simple sentence."),
    ("digits", "12345 678"),
    ("numbers_spacing", "Pi is 3.14159; 2024-11-29 was a Friday. x =  42,\t7 and 1000000."),
    (
        "code",
        'def add(a, b):\n    """Return the sum."""\n    return a + b\n\n\n'
        "for i in range(10):\n\tprint(add(i, 1))  # done\n",
    ),
    ("accents", "Café, naïve, Zürich, São Paulo, crème brûlée, Ångström."),
    ("cjk", "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다."),
    ("emoji", "Emoji test: 😀👍🏽🚀 and a family 👨\u200d👩\u200d👧!"),
    ("special_chatml", "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"),
    ("special_mid_text", "before<|endoftext|>after <|im_end|> end"),
    ("whitespace", "   leading and trailing   \n\n\t tabs\r\nCRLF line\n\n\n    indented"),
    ("contractions_case", "Don't you're we'll I'M THEY'LL it's IT'S"),
    ("scripts", "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. नमस्ते दुनिया"),
]

# Model-specific tokens that should also be matched whole when written inline.
EXTRA_SPECIAL_SAMPLE = {
    "smollm2": ("special_other", "<file_sep>main.py<filename> x <jupyter_code>"),
    "qwen2": ("special_other", "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|><tool_call>x</tool_call>"),
}

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "Write a haiku about the sea."}],
    "multi_turn_system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. What do you need?"},
        {"role": "user", "content": "Name three prime numbers."},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3? Answer in one word, s'il vous plaît."},
    ],
}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict:
    """Versions of everything that can change the numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ["torch", "transformers", "gguf", "tokenizers", "accelerate", "numpy", "jinja2"]:
        out[name] = md.version(name)
    out["torch_threads"] = torch.get_num_threads()
    return out


def load_tokenizer(models_dir: Path, file: str):
    """The reference tokenizer and the stock transformers-from-GGUF one.

    They are the same except for SmolLM2 (`tokenizer.ggml.pre == "smollm"`), where the
    reference isolates each digit before the byte-level GPT-2 split, like the model's original
    tokenizer does.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    stock = AutoTokenizer.from_pretrained(str(models_dir), gguf_file=file)
    pre = gguf_metadata(models_dir / file)["tokenizer.ggml.pre"]
    reference = copy.deepcopy(stock)
    if pre == "smollm":
        reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre != "qwen2":
        raise SystemExit(f"unexpected tokenizer.ggml.pre {pre!r} in {file}")
    return reference, stock


_META_CACHE: dict = {}


def gguf_metadata(path: Path) -> dict:
    """Scalar and string metadata of a GGUF file (large arrays left out)."""
    import gguf

    if path in _META_CACHE:
        return _META_CACHE[path]
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key[len("tokenizer.ggml.") :] in (
            "tokens",
            "merges",
            "token_type",
            "scores",
        ):
            continue
        meta[key] = field.contents()
    _META_CACHE[path] = meta
    return meta


def reverse_llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the GGUF converter's attn_q / attn_k row permutation.

    The converter turns each head's rows [first half | second half] (rotate-half RoPE layout)
    into interleaved pairs; this puts them back.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def verify_weights(model, path: Path, arch: str) -> float:
    """Compare every model parameter with the `gguf` package's own dequantization.

    Returns the largest absolute difference; raises if any tensor is missing or differs.
    """
    import gguf

    cfg = model.config
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    params = dict(model.named_parameters())
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if "output.weight" in tensors:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if arch == "qwen2":
        per_layer.update(
            {
                "self_attn.q_proj.bias": "attn_q.bias",
                "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias",
            }
        )
    for layer in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{layer}.{hf}"] = f"blk.{layer}.{gg}"
    worst = 0.0
    for hf, gg in names.items():
        tensor = tensors[gg]
        ref = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if arch == "llama" and gg.endswith("attn_q.weight"):
            ref = reverse_llama_permute(ref, cfg.num_attention_heads)
        elif arch == "llama" and gg.endswith("attn_k.weight"):
            ref = reverse_llama_permute(ref, cfg.num_key_value_heads)
        got = params[hf].detach().numpy()
        if got.shape != ref.shape:
            raise SystemExit(f"{hf}: shape {got.shape} vs gguf {gg} {ref.shape}")
        diff = float(np.abs(got - ref).max())
        if diff > 0.0:
            raise SystemExit(f"{hf}: differs from gguf {gg} by {diff}")
        worst = max(worst, diff)
    counted = set(names) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing = set(params) - counted
    if missing:
        raise SystemExit(f"parameters not checked against the gguf: {sorted(missing)}")
    return worst


def load_model(models_dir: Path, file: str):
    """transformers model in float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(models_dir), gguf_file=file, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def f(x) -> float:
    """A float32 value as a JSON number (the exact f32 value, written as a double)."""
    return float(np.float32(x))


def row_summary(row: torch.Tensor, probe_ids: list[int], position: int) -> dict:
    """Top-k, probe values and moments of one logits row."""
    values, ids = torch.topk(row, TOP_K)
    return {
        "position": position,
        "top_ids": [int(i) for i in ids],
        "top_values": [f(v) for v in values],
        "probe_values": [f(row[i]) for i in probe_ids],
        "mean": f(row.mean()),
        "std": f(row.std(unbiased=False)),
        "logsumexp": f(torch.logsumexp(row.double(), dim=0)),
    }


def forward_with_layers(model, ids: list[int]):
    """One full forward pass; returns logits [L, V] and per-layer residual-stream outputs."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [model.model.embed_tokens.register_forward_hook(keep("embed"))]
    for index, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(keep(f"layer{index}")))
    handles.append(model.model.norm.register_forward_hook(keep("final_norm")))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    layers = [captured[f"layer{i}"][0] for i in range(len(model.model.layers))]
    return out.logits[0].float(), captured["embed"][0], layers, captured["final_norm"][0]


def hidden_stats(hidden: torch.Tensor) -> dict:
    """Mean L2 norm over positions, and the first values at the last position."""
    return {
        "mean_l2_norm": f(hidden.norm(dim=-1).mean()),
        "last_position_first_values": [f(v) for v in hidden[-1, :N_FIRST_VALUES]],
    }


def greedy(model, tokenizer, ids: list[int], eos_ids: set[int]) -> dict:
    """N_GREEDY greedy steps, each a full forward pass over the whole sequence (no cache)."""
    seq = list(ids)
    new, margins = [], []
    for _ in range(N_GREEDY):
        with torch.no_grad():
            row = model(torch.tensor([seq]), use_cache=False).logits[0, -1].float()
        top2 = torch.topk(row, 2)
        token = int(top2.indices[0])
        new.append(token)
        margins.append(f(top2.values[0] - top2.values[1]))
        seq.append(token)
    first_eos = next((i for i, t in enumerate(new) if t in eos_ids), None)
    return {
        "ids": new,
        "text": tokenizer.decode(new, skip_special_tokens=False),
        "top1_top2_margins": margins,
        "first_eos_index": first_eos,
        "text_until_eos": tokenizer.decode(new[:first_eos] if first_eos is not None else new),
    }


def earlier_positions(length: int) -> list[int]:
    """Three positions before the last one: the first, and about one and two thirds in."""
    picks = sorted({0, length // 3, (2 * length) // 3} - {length - 1})
    if len(picks) != 3:
        raise SystemExit(f"prompt of {length} tokens is too short for three earlier positions")
    return picks


def logits_fixture(key: str, models_dir: Path, provenance: dict) -> dict:
    """Everything for `<model>_logits.json`."""
    spec = MODELS[key]
    path = models_dir / spec["file"]
    tokenizer, _ = load_tokenizer(models_dir, spec["file"])
    model = load_model(models_dir, spec["file"])
    worst = verify_weights(model, path, spec["arch"])
    cfg = model.config
    vocab = cfg.vocab_size
    probe_ids = [int(round(i * (vocab - 1) / (N_PROBES - 1))) for i in range(N_PROBES)]
    eos_ids = {cfg.eos_token_id} if isinstance(cfg.eos_token_id, int) else set(cfg.eos_token_id)
    eos_ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    eos_ids.add(tokenizer.convert_tokens_to_ids("<|endoftext|>"))

    chat_text = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    prompts = [
        {"name": "plain", "text": PLAIN_PROMPT, "messages": None},
        {"name": "chat", "text": chat_text, "messages": CHAT_PROMPT},
    ]
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt["text"], add_special_tokens=False)["input_ids"]
        logits, embed, layers, final = forward_with_layers(model, ids)
        if not torch.isfinite(logits).all():
            raise SystemExit(f"{key}/{prompt['name']}: non-finite logits")
        last = len(ids) - 1
        entry = {
            "name": prompt["name"],
            "messages": prompt["messages"],
            "text": prompt["text"],
            "input_ids": ids,
            "last": row_summary(logits[last], probe_ids, last),
            "earlier": [row_summary(logits[p], probe_ids, p) for p in earlier_positions(len(ids))],
            "hidden": {
                "embedding": hidden_stats(embed),
                "layers": [hidden_stats(h) for h in layers],
                "final_norm": hidden_stats(final),
            },
            "greedy": greedy(model, tokenizer, ids, eos_ids),
        }
        results.append(entry)
    # Sanity check of the reference itself: both models answer this question correctly.
    answer = results[1]["greedy"]["text_until_eos"]
    if "Paris" not in answer:
        raise SystemExit(f"{key}: chat prompt answered {answer!r}, expected it to mention Paris")
    return {
        "model": key,
        "gguf_file": spec["file"],
        "gguf_sha256": sha256_file(path),
        "architecture": spec["arch"],
        "config": {
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "vocab_size": vocab,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_parameters["rope_theta"],
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        },
        "dtype": "float32",
        "attention": "causal, full forward pass, no kv cache, eager",
        "weights_max_abs_diff_vs_gguf_package": worst,
        "eos_ids": sorted(eos_ids),
        "top_k": TOP_K,
        "probe_ids": probe_ids,
        "hidden_note": (
            "embedding = token embeddings; layers[i] = residual stream after decoder layer i "
            "(before the final norm); final_norm = after the output RMSNorm. mean_l2_norm is the "
            "mean over positions of the L2 norm over the hidden dimension."
        ),
        "greedy_note": (
            f"{N_GREEDY} greedy tokens, each step a full forward pass, no stop at EOS; compare "
            "tokens only where top1_top2_margins is comfortably above the tolerance"
        ),
        "prompts": results,
        "provenance": provenance,
    }


def text_fixture(key: str, models_dir: Path, provenance: dict) -> dict:
    """Everything for `<model>_text.json`."""
    spec = MODELS[key]
    path = models_dir / spec["file"]
    reference, stock = load_tokenizer(models_dir, spec["file"])
    meta = gguf_metadata(path)
    samples = []
    for name, text in TEXT_SAMPLES + [EXTRA_SPECIAL_SAMPLE[key]]:
        ids = reference(text, add_special_tokens=False)["input_ids"]
        if reference.decode(ids, skip_special_tokens=False) != text:
            raise SystemExit(f"{key}/{name}: decode(encode(text)) != text")
        entry = {
            "name": name,
            "text": text,
            "ids": ids,
            "tokens": reference.convert_ids_to_tokens(ids),
        }
        stock_ids = stock(text, add_special_tokens=False)["input_ids"]
        if stock_ids != ids:
            entry["ids_transformers_gguf_default"] = stock_ids
        literal = reference(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if literal != ids:
            entry["ids_special_as_text"] = literal
        samples.append(entry)
    conversations = []
    for name, messages in CONVERSATIONS.items():
        rendered = {}
        for generation in (False, True):
            text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            rendered["with_generation_prompt" if generation else "without_generation_prompt"] = {
                "text": text,
                "ids": reference(text, add_special_tokens=False)["input_ids"],
            }
        conversations.append({"name": name, "messages": messages, **rendered})
    with_specials = reference("hi", add_special_tokens=True)["input_ids"]
    without = reference("hi", add_special_tokens=False)["input_ids"]
    return {
        "model": key,
        "gguf_file": spec["file"],
        "tokenizer": {
            "ggml_model": meta["tokenizer.ggml.model"],
            "ggml_pre": meta["tokenizer.ggml.pre"],
            "pre_tokenizer_used": str(reference.backend_tokenizer.pre_tokenizer),
            "add_bos_token_metadata": meta.get("tokenizer.ggml.add_bos_token"),
            "add_special_tokens_adds_anything": with_specials != without,
            "bos_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_id": meta.get("tokenizer.ggml.padding_token_id"),
            "unk_id": meta.get("tokenizer.ggml.unknown_token_id"),
            "special_tokens_parsed_inline": True,
        },
        "chat_template_engine": "jinja2, trim_blocks=True, lstrip_blocks=True (transformers apply_chat_template)",
        "samples": samples,
        "conversations": conversations,
        "provenance": provenance,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("/work/models"))
    parser.add_argument("--out", type=Path, default=Path("engine/tests/fixtures/golden"))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = {
        "generator": "tools/golden/make_golden.py",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
        "versions": versions(),
        "device": "cpu",
    }
    for key in args.models:
        for kind, build in (("text", text_fixture), ("logits", logits_fixture)):
            data = build(key, args.models_dir, provenance)
            target = args.out / f"{key}_{kind}.json"
            target.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            print(f"wrote {target} ({target.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main()
