"""Cost of the KL-budget safeguard per decoding step: ``combine`` alone, paper rule vs safeguarded.

    OMP_NUM_THREADS=1 python benchmarks/safeguard_cost.py

Times ``Amulet().combine`` on random log-probs (scale 3, so the budget binds on every row:
the worst case, a full bisection) for the vocabularies of the embedded model (49,152) and
of Qwen2.5 (151,936), batch 1 and 8, one thread; the best of 5 repetitions of 50 calls.
Writes ``benchmarks/results/safeguard_cost.json`` atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "safeguard_cost.json"


def main() -> None:
    torch.set_num_threads(1)
    from prefalign.bench import _atomic_write
    from prefalign.methods import Amulet

    rows = []
    for vocab in (49_152, 151_936):
        for batch in (1, 8):
            g = torch.Generator().manual_seed(0)
            lp = torch.log_softmax(torch.randn(batch, 2, vocab, generator=g) * 3, dim=-1)
            w = torch.ones(1)
            for label, method in (("paper (kl_budget=0)", Amulet(kl_budget=0)), (f"safeguard (kl_budget={Amulet().kl_budget:g})", Amulet())):
                method.score(lp, w)
                best = float("inf")
                for _ in range(5):
                    t = time.perf_counter()
                    for _ in range(50):
                        method.score(lp, w)
                    best = min(best, (time.perf_counter() - t) / 50)
                rows.append({"vocab": vocab, "batch": batch, "rule": label, "ms_per_step": best * 1e3})
                print(f"V={vocab:>7} batch={batch} {label:28} {best * 1e3:7.3f} ms/step", flush=True)
    _atomic_write(OUT, json.dumps({"rows": rows, "threads": 1}, indent=1))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
