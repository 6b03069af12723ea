"""Does the prompt an answer is scored after change the perplexity comparison?

The evaluation scores each answer's perplexity after the *base* context (no preference)
of the template the answer continues: `pref`'s answers after the default template's
system prompt, PAD's (pad template) after the bare question. This re-scores every
distinct answer of a results directory after each named template's base context, so
that all methods are compared after the same prompt, and prints the median per method.

    python benchmarks/perplexity_context.py docs/results/pad      # ~15 min here, 1 thread

Answers are re-tokenised from their text (results rows keep no token ids); the
``stored`` column is the runner's own measurement, for comparison. Writes
``benchmarks/results/perplexity_context.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results" / "perplexity_context.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="an evaluation directory (with results.jsonl)")
    parser.add_argument("--templates", default="default,pad", help="base contexts to score after (comma-separated)")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="answers per progress step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from prefalign import Aligner
    from prefalign.bench import _atomic_write
    from prefalign.eval.guards import perplexity
    from prefalign.eval.runner import read_results

    rows = read_results(args.directory)
    answers: dict[str, dict] = {}
    for r in rows:  # a base answer serves every preference: score it once
        answers.setdefault(r["generation"], r)
    templates = [t.strip() for t in args.templates.split(",") if t.strip()]
    al = Aligner.from_pretrained(args.model)
    items = []
    for r in answers.values():
        ids = al.tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        items += [(al.encode_context(r["prompt"], None, template=t), ids) for t in templates]
    t0 = time.monotonic()
    scores: list[float] = []
    for i in tqdm(range(0, len(items), args.batch), desc="perplexity", unit="batch"):
        scores += perplexity(al.model, al.tokenizer, items[i : i + args.batch])

    by_variant: dict[str, dict[str, list[float]]] = {}
    per_answer = zip(*[iter(scores)] * len(templates))  # items were laid out answer by answer
    for r, answer_scores in zip(answers.values(), per_answer):
        cell = by_variant.setdefault(r["variant"], {t: [] for t in [*templates, "stored"]})
        for t, score in zip(templates, answer_scores):
            cell[t].append(score)
        stored = (r.get("guards") or {}).get("perplexity")
        if stored is not None:
            cell["stored"].append(stored)
    medians = {
        v: {"answers": len(c[templates[0]]), **{t: statistics.median(xs) if xs else None for t, xs in c.items()}}
        for v, c in by_variant.items()
    }
    width = max(len(v) for v in medians)
    print(f"{'method':{width}}  answers  " + "  ".join(f"{t + ' ctx':>12}" for t in templates) + "       stored")
    for v, m in medians.items():
        cells = "  ".join(f"{m[t]:12.2f}" for t in templates)
        stored = f"{m['stored']:12.2f}" if m["stored"] is not None else f"{'–':>12}"
        print(f"{v:{width}}  {m['answers']:7d}  {cells} {stored}")
    result = {"directory": str(args.directory), "model": args.model, "templates": templates,
              "median_perplexity": medians, "seconds": round(time.monotonic() - t0, 1)}
    _atomic_write(args.out, json.dumps(result, indent=1) + "\n")  # a half-written file never replaces a good one
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
