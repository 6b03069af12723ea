"""Behaviour frozen across a refactor: every method's tokens on the embedded model.

Writes, for 8 prompts × 2 preferences, the greedy tokens of base, pref, la, amulet (the
papers' rules: ``kl_budget=0``, so the comparison also holds against code from before the
safeguard), beam (width 4) and pad, and seeded sampled tokens of amulet, as JSON. Run it
in two checkouts and compare the files:

    python benchmarks/tokens_frozen.py --out /tmp/after.json
    (cd OTHER_CHECKOUT && PYTHONPATH=src python /path/to/tokens_frozen.py --out /tmp/before.json)
    python benchmarks/tokens_frozen.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PROMPTS = [
    "Why is the sky blue?", "How do I boil an egg?", "Give me three tips for a job interview.",
    "What is a hash table?", "Explain photosynthesis.", "What should I pack for a weekend hike?",
    "Write a haiku about rain.", "What causes inflation?",
]
PREFERENCES = ["concise", "psoups:elementary"]
TOKENS = 32


def dump(out: Path) -> None:
    from prefalign import Aligner

    torch.set_num_threads(1)
    al = Aligner.from_pretrained(fast=False)
    fields = {"amulet": {}, "la": {}}
    import dataclasses

    from prefalign.methods import METHODS

    for name in fields:
        if "kl_budget" in {f.name for f in dataclasses.fields(METHODS[name])}:
            fields[name] = {"kl_budget": 0}
    runs = {
        "base": dict(method="base"), "pref": dict(method="pref"), "la": dict(method="la", **fields["la"]),
        "amulet": dict(method="amulet", **fields["amulet"]), "beam": dict(method="beam", width=4), "pad": dict(method="pad"),
        "amulet-sampled": dict(method="amulet", temperature=0.8, seed=7, **fields["amulet"]),
    }
    result = {}
    for label, kwargs in runs.items():
        for pref in PREFERENCES:
            answers = al.generate(PROMPTS, preference=None if label == "base" else pref, max_new_tokens=TOKENS, **kwargs)
            result[f"{label}/{pref}"] = [a.token_ids for a in answers]
            print(label, pref, flush=True)
            if label == "base":
                break
    out.write_text(json.dumps(result))


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    same = 0
    for key in sorted(a):
        rows = sum(x == y for x, y in zip(a[key], b.get(key, [])))
        same += rows
        print(f"{key:<32} {rows}/{len(a[key])} answers identical")
    total = sum(len(v) for v in a.values())
    print(f"{same}/{total} answers identical")
    return 0 if same == total else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    dump(args.out)


if __name__ == "__main__":
    main()
