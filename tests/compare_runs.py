"""Compare two pipeline runs (two --out folders) file by file: did a refactor change any result?

    bash run_all.sh micro /tmp/before        (at the old commit, e.g. in a `git worktree`)
    bash run_all.sh micro /tmp/after         (at the new one)
    python tests/compare_runs.py /tmp/before /tmp/after

PNGs must be byte-identical; every tensor of every .safetensors file must agree to float rounding
(--atol); numbers in metrics.json (but times) must agree to --atol as well. Files only one run has
are listed. Exits 1 when anything differs, so it can gate a refactor.
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def numbers(obj, prefix=""):
    """Flatten the numbers of a JSON value into {"a.b.c": value}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k != "seconds":  # wall time differs from run to run
                out |= numbers(v, f"{prefix}{k}.")
        return out
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix.rstrip("."): float(obj)}
    return {}


def compare_file(rel, a, b, atol):
    """-> a one-line description of the difference, or None when the two files agree."""
    if rel.suffix == ".png":
        return None if a.read_bytes() == b.read_bytes() else "PNG bytes differ"
    if rel.suffix == ".safetensors":
        ta, tb = tensors(a), tensors(b)
        if ta.keys() != tb.keys():
            return f"tensor names differ: {sorted(ta.keys() ^ tb.keys())[:4]}"
        worst = max(((ta[k].double() - tb[k].double()).abs().max().item(), k) for k in ta)
        return None if worst[0] <= atol else f"max |difference| {worst[0]:.2e} in {worst[1]}"
    if rel.name == "metrics.json":
        na, nb = numbers(json.loads(a.read_text())), numbers(json.loads(b.read_text()))
        bad = [k for k in na.keys() | nb.keys() if abs(na.get(k, 1e9) - nb.get(k, -1e9)) > atol]
        return None if not bad else f"{len(bad)} numbers differ, e.g. {sorted(bad)[0]}"
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted absolute difference")
    args = p.parse_args()
    before, after = Path(args.before), Path(args.after)
    kinds = (".png", ".safetensors", ".json")
    files_a = {f.relative_to(before) for f in before.rglob("*") if f.suffix in kinds}
    files_b = {f.relative_to(after) for f in after.rglob("*") if f.suffix in kinds}
    problems = [f"{rel}: only in {before}" for rel in sorted(files_a - files_b)]
    problems += [f"{rel}: only in {after}" for rel in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        diff = compare_file(rel, before / rel, after / rel, args.atol)
        if diff:
            problems.append(f"{rel}: {diff}")
    print("\n".join(problems) or f"{len(files_a & files_b)} files agree")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
