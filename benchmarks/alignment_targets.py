"""Issue #13's targets, read from an evaluation directory (``prefalign eval --out DIR``).

For each method variant against a reference (default ``pref``), on the same prompt and
preference:

- **decided-pair win rate**: wins / (wins + losses); a pair whose two answers both stop
  at the token budget under a length judge is a tie and left out, so is an exact tie and
  any pair with a collapsed answer; 95 % bootstrap interval over prompts;
- **collapse**: share of the variant's answers flagged by the guards, beside the reference's;
- **perplexity**: median answer perplexity over the reference's (``--ppl-reference`` can
  name another directory's variant, e.g. ``pref`` under PAD's template);
- **about its instructions**: answers flagged by ``instruction_leak``.

    python benchmarks/alignment_targets.py docs/results/qwen2.5-1.5b
    python benchmarks/alignment_targets.py docs/results/embedded \
        --ppl-reference docs/results/embedded-pad-template:pref

Prints a table (80 columns) and writes DIR/targets.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from prefalign.eval.report import _unique_generations, bootstrap_ci, both_cut_by_length, mark_collapse


def _rows(directory: Path) -> list[dict[str, Any]]:
    with (directory / "results.jsonl").open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    mark_collapse(rows)  # collapse (with the perplexity rule) and instruction leaks, in place
    return rows


def _median_ppl(rows: list[dict[str, Any]]) -> float:
    values = [r["guards"]["perplexity"] for r in _unique_generations(rows) if (r.get("guards") or {}).get("perplexity")]
    return statistics.median(values) if values else float("nan")


def targets(rows: list[dict[str, Any]], reference: str, ppl_reference: float | None = None) -> dict[str, Any]:
    """Per variant: decided-pair wins against ``reference`` (pooled and per preference), collapse, perplexity."""
    by_key = {(r["dataset"], r["prompt_id"], r["preference"], r["variant"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    ref_rows = [r for r in rows if r["variant"] == reference]
    ref_ppl = ppl_reference if ppl_reference is not None else _median_ppl(ref_rows)
    out: dict[str, Any] = {"reference": reference, "reference_collapsed": _share(ref_rows, "collapsed"),
                           "reference_perplexity": ref_ppl, "variants": {}}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        outcomes: list[float] = []
        clusters: list[Any] = []
        per_pref: dict[str, list[int]] = {}
        budget_ties = 0
        for r in mine:
            ref = by_key.get((r["dataset"], r["prompt_id"], r["preference"], reference))
            if v == reference or ref is None or r["collapsed"] or ref["collapsed"]:
                continue
            if r.get("score") is None or ref.get("score") is None:
                continue
            if both_cut_by_length(r, ref):
                budget_ties += 1
                continue
            a, b = r["direction"] * r["score"], ref["direction"] * ref["score"]
            if a == b:
                continue
            outcomes.append(1.0 if a > b else 0.0)
            clusters.append((r["dataset"], r["prompt_id"]))
            wl = per_pref.setdefault(r["preference"], [0, 0])
            wl[0 if a > b else 1] += 1
        rate = sum(outcomes) / len(outcomes) if outcomes else float("nan")
        low, high = bootstrap_ci(outcomes, clusters=clusters) if outcomes else (float("nan"), float("nan"))
        ppl = _median_ppl(mine)
        out["variants"][v] = {
            "decided": len(outcomes), "wins": int(sum(outcomes)), "win_rate": rate, "interval": [low, high],
            "budget_ties": budget_ties, "per_preference": per_pref,
            "collapsed": _share(mine, "collapsed"), "leaked": _share(mine, "instruction_leak"),
            "perplexity": ppl, "perplexity_vs_reference": ppl / ref_ppl if ref_ppl else float("nan"),
        }
    return out


def _share(rows: list[dict[str, Any]], key: str) -> float:
    seen = _unique_generations(rows)  # a base answer serves every preference: count it once
    return sum(1 for r in seen if r.get(key)) / len(seen) if seen else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--reference", default="pref")
    parser.add_argument("--ppl-reference", help="DIR:VARIANT whose median perplexity is the reference")
    args = parser.parse_args(argv)
    rows = _rows(args.dir)
    ppl_ref = None
    if args.ppl_reference:
        other, _, variant = args.ppl_reference.rpartition(":")
        ppl_ref = _median_ppl([r for r in _rows(Path(other)) if r["variant"] == variant])
    result = targets(rows, args.reference, ppl_ref)
    print(f"{args.dir}: against {result['reference']} (collapsed {result['reference_collapsed']:.0%}, "
          f"median perplexity {result['reference_perplexity']:.2f})")
    print(f"{'variant':<22}{'decided wins':>18}{'ties@budget':>12}{'collapsed':>10}{'instr.':>7}{'ppl×':>7}")
    for v, t in result["variants"].items():
        if v == args.reference:
            continue
        cell = (f"{t['win_rate']:.2f} [{t['interval'][0]:.2f},{t['interval'][1]:.2f}]" if t["decided"] else "—")
        print(f"{v[:21]:<22}{cell:>14}{t['decided']:>4}{t['budget_ties']:>12}{t['collapsed']:>10.0%}"
              f"{t['leaked']:>7.0%}{t['perplexity_vs_reference']:>7.2f}")
    for v, t in result["variants"].items():
        if t["per_preference"]:
            print(f"  {v[:20]}: " + ", ".join(f"{p[:12]} {w}-{lo}" for p, (w, lo) in t["per_preference"].items()))
    (args.dir / "targets.json").write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
