"""Which safeguard keeps `la` and `amulet` fluent without losing their effect? A small measurement.

Answers a few development prompts (one source: Amulet's HelpSteer_train, positions
60+, prompts of at most 300 characters; positions ≥ 100 trained the PRM and the first
rows were used in docs/results) under a few preferences, greedy, with `pref`, the papers'
rules, the plausibility cut and several KL budgets, and counts per variant:

- collapsed answers (prefalign.eval.guards: repeated 4-grams, non-dictionary words, and
  perplexity > 5x that of `base`'s answer to the same prompt, all under the same model,
  after the default template's base context), and
- wins / ties / losses against `pref` on the preference's offline judge (a length judge
  ties when both answers stopped at the token budget).

    OMP_NUM_THREADS=1 python benchmarks/safeguard.py                     # embedded model, ~15 min here
    OMP_NUM_THREADS=1 python benchmarks/safeguard.py --model qwen2.5-1.5b --prompts 4 --variants pref,amulet,amulet:kl_budget=0.5

Writes ``benchmarks/results/safeguard[-<model>].json`` (atomically; the answers included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amulet" / "HelpSteer_train.json"

DEFAULT_VARIANTS = [
    "pref",
    "amulet:kl_budget=0",
    "amulet:kl_budget=0,plausibility=0.3",
    "amulet:kl_budget=0.1",
    "amulet:kl_budget=0.25",
    "amulet:kl_budget=0.5",
    "amulet:kl_budget=1",
    "amulet:kl_budget=2",
    "amulet:kl_budget=0.5,plausibility=0.1",
    "la:kl_budget=0",
    "la:kl_budget=0,plausibility=0.3",
    "la:kl_budget=0.25",
    "la:kl_budget=0.5",
    "la:kl_budget=1",
]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"amulet:kl_budget=0.5,plausibility=0.1"`` → ``("amulet", {"kl_budget": 0.5, "plausibility": 0.1})``."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key] = float(value)
    return name, params


def dev_prompts(n: int, *, start: int = 60, max_chars: int = 300) -> list[dict[str, Any]]:
    rows = json.loads(DATA.read_text())
    picked = [r for r in rows[start:100] if len(r["question"]) <= max_chars][:n]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} development prompts of ≤ {max_chars} characters in positions {start}-99")
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--preferences", default="concise,verbose,pleasant,formal")
    parser.add_argument("--variants", default=";".join(DEFAULT_VARIANTS), help="';'-separated method[:k=v,...] (pref is always run)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", default="auto", help="auto | off | bf16 (off: half the memory of the fp32 fast path)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from prefalign import Aligner
    from prefalign.bench import _atomic_write
    from prefalign.eval.guards import guard_report, perplexity
    from prefalign.eval.judges import judge_for

    out = args.out or RESULTS / ("safeguard.json" if args.model == "embedded" else f"safeguard-{args.model}.json")
    prompts = dev_prompts(args.prompts)
    texts = [r["question"] for r in prompts]
    preferences = [p.strip() for p in args.preferences.split(",") if p.strip()]
    variants = [v.strip() for v in args.variants.replace(";", "\n").splitlines() if v.strip()]
    if "pref" not in variants:
        variants.insert(0, "pref")

    t_load = time.monotonic()
    al = Aligner.from_pretrained(args.model, threads=args.threads, fast={"off": False}.get(args.fast, args.fast))
    load_s = time.monotonic() - t_load
    base_ctx = [al.encode_context(t, None, template="default") for t in texts]

    def run(name: str, params: dict[str, Any], preference: str | None) -> list[dict[str, Any]]:
        t0 = time.monotonic()
        results = al.generate(texts, preference=preference, method=name, max_new_tokens=args.tokens, template="default", **params)
        elapsed = time.monotonic() - t0
        ppl = perplexity(al.model, al.tokenizer, [(c, r.token_ids) for c, r in zip(base_ctx, results)])
        return [
            {"text": r.text, "finish_reason": r.finish_reason, "tokens": len(r.token_ids), "perplexity": p, "seconds": elapsed / len(texts)}
            for r, p in zip(results, ppl)
        ]

    started = time.monotonic()
    base = run("base", {}, None)
    answers: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for variant in variants:
        name, params = parse_variant(variant)
        answers[variant] = {}
        for preference in preferences:
            answers[variant][preference] = run(name, params, preference)
        print(f"{variant}: done after {time.monotonic() - started:.0f} s", flush=True)

    summary: dict[str, Any] = {}
    for variant in variants:
        s = {"collapsed": 0, "wins": 0, "ties": 0, "losses": 0, "n": 0, "per_preference": {}}
        for preference in preferences:
            judge = judge_for(preference)
            per = {"collapsed": 0, "wins": 0, "ties": 0, "losses": 0, "words": []}
            for i, (a, ref, b) in enumerate(zip(answers[variant][preference], answers["pref"][preference], base)):
                g = guard_report(a["text"], finish_reason=a["finish_reason"], perplexity=a["perplexity"], reference_perplexity=b["perplexity"])
                a["collapsed"] = g.collapsed
                a["reasons"] = list(g.reasons)
                per["collapsed"] += g.collapsed
                per["words"].append(g.words)
                if variant == "pref":
                    continue
                mine, theirs = judge.aligned_score(a["text"], prompt=texts[i]), judge.aligned_score(ref["text"], prompt=texts[i])
                both_cut = judge.name == "length_words" and a["finish_reason"] == ref["finish_reason"] == "length"
                key = "ties" if both_cut or mine == theirs else ("wins" if mine > theirs else "losses")
                per[key] += 1
            per["mean_words"] = statistics.mean(per.pop("words"))
            s["per_preference"][preference] = per
            for k in ("collapsed", "wins", "ties", "losses"):
                s[k] += per[k]
            s["n"] += len(texts)
        ppls = [a["perplexity"] for p in preferences for a in answers[variant][p]]
        s["median_perplexity"] = statistics.median(ppls)
        s["seconds_per_answer"] = statistics.mean(a["seconds"] for p in preferences for a in answers[variant][p])
        summary[variant] = s

    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/safeguard.py " + " ".join(
            f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items() if k != "out" and v is not None
        ),
        "model": args.model,
        "model_load_seconds": load_s,
        "prompts": [{"index": r["index"], "question": r["question"]} for r in prompts],
        "preferences": preferences,
        "tokens": args.tokens,
        "base_median_perplexity": statistics.median(b["perplexity"] for b in base),
        "summary": summary,
        "base": base,
        "answers": answers,
        "total_seconds": time.monotonic() - started,
    }
    _atomic_write(out, json.dumps(result, indent=1, ensure_ascii=False))
    print(f"{'variant':42} collapsed  wins ties losses  median ppl")
    for variant, s in summary.items():
        print(f"{variant:42} {s['collapsed']:3}/{s['n']:<3}  {s['wins']:4} {s['ties']:4} {s['losses']:5}  {s['median_perplexity']:8.2f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
