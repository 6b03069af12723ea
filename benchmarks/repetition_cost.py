"""Cost of the repetition guard and the repetition controls per decoding step.

    OMP_NUM_THREADS=1 nice python benchmarks/repetition_cost.py            # the per-step pieces alone
    OMP_NUM_THREADS=1 nice python benchmarks/repetition_cost.py --engine   # end to end, embedded model

Without ``--engine``: times, on random log-probs of the embedded model's vocabulary
(49,152) at batch 1 and 8 with 128-token answers that repeat (the guard finds repeats on
every row), ``Amulet().score`` with the safeguard only (``repeat_ngram=0``) and with the
repetition guard (the default), and the post-score stage with every repetition control
on; best of 5 repetitions of 20 calls. Writes ``benchmarks/results/repetition_cost.json``.

With ``--engine``: decodes ``batch`` prompts for ``tokens`` forced tokens (``ignore_eos``) with each
configuration below, interleaved over ``rounds`` rounds (the best round of each counts,
so that a noisy, shared CPU hurts every configuration alike), and prints ms per step and
the ratio to ``base``'s step measured in the same run:

- ``base``, ``pref``: no contrast;
- ``amulet`` with the safeguard but no repetition guard (``repeat_ngram=0``), and the
  default (guard on);
- ``base`` and ``amulet`` with every repetition control on (the post-score stage).

Writes ``benchmarks/results/repetition_cost_engine.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "repetition_cost.json"
OUT_ENGINE = Path(__file__).parent / "results" / "repetition_cost_engine.json"
PROMPTS = [
    "Why is the sky blue?", "How do I boil an egg?", "Give me three tips for a job interview.",
    "What is a hash table?", "Explain photosynthesis.", "What should I pack for a weekend hike?",
    "Write a haiku about rain.", "What causes inflation?",
]
CONTROLS = dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2, no_repeat_ngram_size=3)
CONFIGS: list[tuple[str, str, dict]] = [
    ("base", "base", {}),
    ("pref", "pref", {}),
    ("amulet repeat_ngram=0", "amulet", {"repeat_ngram": 0}),
    ("amulet (default)", "amulet", {}),
    ("base + all controls", "base", CONTROLS),
    ("amulet + all controls", "amulet", CONTROLS),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", action="store_true", help="end to end on the embedded model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.engine:
        pieces()
        return
    from prefalign import Aligner
    from prefalign.bench import _atomic_write

    al = Aligner.from_pretrained()
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    best = {label: float("inf") for label, _, _ in CONFIGS}
    al.generate(prompts[:1], preference="concise", method="amulet", max_new_tokens=4)  # warm-up
    for r in range(args.rounds):
        for label, method, kwargs in CONFIGS:
            pref = None if method == "base" else "concise"
            t = time.perf_counter()
            al.generate(prompts, preference=pref, method=method, max_new_tokens=args.tokens, ignore_eos=True, **kwargs)
            ms = (time.perf_counter() - t) / args.tokens * 1e3
            best[label] = min(best[label], ms)
            print(f"round {r + 1}: {label:24} {ms:8.1f} ms/step", flush=True)
    rows = [{"config": label, "ms_per_step": best[label], "vs_base": best[label] / best["base"]} for label, _, _ in CONFIGS]
    print(f"\nbatch {args.batch}, {args.tokens} forced tokens, best of {args.rounds} rounds, 1 thread")
    print(f"{'configuration':26} {'ms/step':>9} {'× base':>8}")
    for row in rows:
        print(f"{row['config']:26} {row['ms_per_step']:9.1f} {row['vs_base']:8.2f}")
    _atomic_write(OUT_ENGINE, json.dumps({"batch": args.batch, "tokens": args.tokens, "rounds": args.rounds, "threads": 1, "rows": rows}, indent=1))
    print(f"written to {OUT}")


def _best(fn, repeats: int = 5, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e3


def pieces() -> None:
    from prefalign.bench import _atomic_write
    from prefalign.decoding import SamplingParams
    from prefalign.decoding.repetition import Histories, TokenHistory, apply_repetition_controls
    from prefalign.methods import Amulet

    vocab, rows = 49_152, []
    for batch in (1, 8):
        g = torch.Generator().manual_seed(0)
        lp = torch.log_softmax(torch.randn(batch, 2, vocab, generator=g) * 3, dim=-1)
        w = torch.ones(1)
        # 128-token answers made of a 40-token phrase said again: every row has repeats to guard.
        answers = [(torch.randint(0, vocab, (40,), generator=g).tolist() * 4)[:128] for _ in range(batch)]
        histories = [TokenHistory(list(range(100)), list(a)) for a in answers]
        guard = Histories(histories)
        settings = [SamplingParams(**CONTROLS)] * batch
        scores = lp[:, 1]
        cases = [
            ("amulet, safeguard only (repeat_ngram=0)", lambda: Amulet(repeat_ngram=0).score(lp, w)),
            ("amulet, default (repetition guard)", lambda: Amulet().score(lp, w, history=guard)),
            ("post-score stage, every control on", lambda: apply_repetition_controls(scores, settings, histories)),
        ]
        for label, fn in cases:
            ms = _best(fn)
            rows.append({"vocab": vocab, "batch": batch, "case": label, "ms_per_step": ms})
            print(f"batch={batch} {label:42} {ms:7.3f} ms/step", flush=True)
    _atomic_write(OUT, json.dumps({"rows": rows, "threads": 1}, indent=1))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
