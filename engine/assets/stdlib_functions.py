"""Extract documented module-level functions from a CPython standard library.

Run by lorasweep (`lorasweep assets fetch stdlib-code`) with the interpreter whose library is
read. Writes one JSON object per line to --out:

    {"module": "json.decoder", "name": "py_scanstring", "prompt": "...", "body": "..."}

`prompt` is the function's source from its `def` line through the end of its docstring,
`body` the rest of the function, still indented, so `prompt + body` is the whole function
(the shape of a HumanEval problem: a signature and docstring to continue). Prints a JSON
summary of what was read, kept and skipped on stdout.

Deterministic: files are visited in sorted order and functions in source order.
"""

import argparse
import ast
import json
import os
import sys
import warnings

# Directories that hold tests, vendored packages or tooling rather than library code.
SKIPPED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "venv",
}

MAX_BODY_LINES = 40
MAX_FUNCTION_CHARS = 4000


def python_files(stdlib):
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                yield os.path.join(root, name)


def module_name(stdlib, path):
    relative = os.path.relpath(path, stdlib)[: -len(".py")]
    parts = relative.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def trivial(body_nodes):
    """A body that only passes, raises NotImplementedError or is an ellipsis teaches nothing."""
    if len(body_nodes) != 1:
        return False
    node = body_nodes[0]
    if isinstance(node, ast.Pass):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True
    if isinstance(node, ast.Raise):
        exc = node.exc
        if isinstance(exc, ast.Call):
            exc = exc.func
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def extract(path, stdlib, counts):
    try:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        counts["files_unparsable"] += 1
        return
    counts["files_read"] += 1
    lines = source.splitlines(keepends=True)
    module = module_name(stdlib, path)
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        counts["functions_seen"] += 1
        docstring = ast.get_docstring(node, clean=False)
        if not docstring or len(node.body) < 2:
            counts["skipped_no_docstring_or_body"] += 1
            continue
        body_nodes = node.body[1:]
        if trivial(body_nodes):
            counts["skipped_trivial_body"] += 1
            continue
        doc_node = node.body[0]
        # The prompt runs from the `def` line (decorators excluded) through the line that
        # closes the docstring; the body from the next line to the function's last line.
        start = node.lineno - 1
        doc_end = doc_node.end_lineno
        end = node.end_lineno
        if node.body[1].lineno <= doc_end:
            # Something follows the docstring on its closing line (`"""doc"""; x = 1`).
            counts["skipped_irregular_layout"] += 1
            continue
        prompt = "".join(lines[start:doc_end])
        body = "".join(lines[doc_end:end])
        body_lines = [line for line in body.splitlines() if line.strip()]
        if not body_lines or len(body_lines) > MAX_BODY_LINES:
            counts["skipped_long_body"] += 1
            continue
        if len(prompt) + len(body) > MAX_FUNCTION_CHARS:
            counts["skipped_long_body"] += 1
            continue
        if "\t" in prompt + body:
            counts["skipped_irregular_layout"] += 1
            continue
        if not body.endswith("\n"):
            body += "\n"
        counts["functions_kept"] += 1
        yield {"module": module, "name": node.name, "prompt": prompt, "body": body}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stdlib", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    counts = {
        "files_read": 0,
        "files_unparsable": 0,
        "functions_seen": 0,
        "skipped_no_docstring_or_body": 0,
        "skipped_trivial_body": 0,
        "skipped_long_body": 0,
        "skipped_irregular_layout": 0,
        "functions_kept": 0,
    }
    with open(args.out, "w", encoding="utf-8") as out:
        for path in python_files(args.stdlib):
            for record in extract(path, args.stdlib, counts):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    counts["python_version"] = sys.version.split()[0]
    counts["stdlib"] = args.stdlib
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
