"""Generate the math task's train and eval splits from reasoning-gym's gsm_symbolic generators.

Run by lorasweep (`lorasweep assets fetch gsm-symbolic`) inside a virtual environment that has
reasoning-gym installed. Writes, in --out-dir:

- eval.jsonl: --eval-size problems drawn with --eval-seed,
- train.jsonl: --train-size problems drawn with --train-seed, none of whose questions occurs
  in eval.jsonl,

one JSON object per line:

    {"id": "gsm-train-00000", "generator": 17, "question": "...", "answer": "288",
     "messages": [{"role": "user", "content": question},
                  {"role": "assistant", "content": step-by-step solution ending "#### 288"}]}

Questions are unique within and across the splits. An item whose worked solution does not end
in `#### N` with N equal to the generator's answer is skipped and counted. Prints a JSON
summary on stdout. Same seeds and sizes give the same files.
"""

import argparse
import importlib.metadata
import json
import os
import re

import reasoning_gym

FINAL_LINE = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*$")


def normalize_number(text):
    """'1,234.50' -> '1234.5'; '12.0' -> '12'; '-3' -> '-3'."""
    text = text.strip().replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def draw(seed, wanted, excluded, split, counts):
    """Items of the split, in the generator's order, skipping excluded or repeated questions."""
    items = []
    seen = set()
    # The dataset is procedural: ask for more than needed, then take what is usable.
    size = wanted * 2 + 100
    dataset = reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=size)
    for index in range(size):
        if len(items) == wanted:
            break
        example = dataset[index]
        question = example["question"].strip()
        if question in excluded or question in seen:
            counts[f"{split}_duplicates_skipped"] += 1
            continue
        solution = example["metadata"]["answer_cot"].strip()
        match = FINAL_LINE.search(solution)
        answer = normalize_number(str(example["answer"]))
        if match is None or normalize_number(match.group(1)) != answer:
            counts[f"{split}_inconsistent_skipped"] += 1
            continue
        seen.add(question)
        items.append(
            {
                "id": f"gsm-{split}-{len(items):05d}",
                "generator": dataset.task_indices[index],
                "question": question,
                "answer": answer,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": solution},
                ],
            }
        )
    if len(items) < wanted:
        raise SystemExit(f"only {len(items)} usable {split} problems out of {size} generated")
    return items


def write(path, items):
    with open(path, "w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--train-size", type=int, required=True)
    parser.add_argument("--eval-size", type=int, required=True)
    parser.add_argument("--train-seed", type=int, required=True)
    parser.add_argument("--eval-seed", type=int, required=True)
    args = parser.parse_args()
    if args.train_seed == args.eval_seed:
        raise SystemExit("train and eval seeds must differ")
    counts = {
        "eval_duplicates_skipped": 0,
        "eval_inconsistent_skipped": 0,
        "train_duplicates_skipped": 0,
        "train_inconsistent_skipped": 0,
    }
    eval_items = draw(args.eval_seed, args.eval_size, set(), "eval", counts)
    eval_questions = {item["question"] for item in eval_items}
    train_items = draw(args.train_seed, args.train_size, eval_questions, "train", counts)
    write(os.path.join(args.out_dir, "eval.jsonl"), eval_items)
    write(os.path.join(args.out_dir, "train.jsonl"), train_items)
    counts.update(
        {
            "train": len(train_items),
            "eval": len(eval_items),
            "train_seed": args.train_seed,
            "eval_seed": args.eval_seed,
            "reasoning_gym_version": importlib.metadata.version("reasoning-gym"),
        }
    )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
