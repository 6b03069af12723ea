"""Load time, memory and decode speed of an opt-in local model (default: qwen2.5-1.5b), 1 thread.

    OMP_NUM_THREADS=1 python benchmarks/local_model_speed.py                 # fp32 (fast="auto")
    OMP_NUM_THREADS=1 python benchmarks/local_model_speed.py --fast bf16     # the opt-in bf16 path

Loads ``Aligner.from_pretrained(model, fast=...)`` (the model must be installed and
converted: ``python -m prefalign.local_models install qwen2.5-1.5b``), reports the load's
wall time and the process's peak RSS, then decodes ``--tokens`` forced greedy tokens at
batch 1 per method (base, pref, la and amulet with the papers' rules and with the
safeguard at its default). Writes ``benchmarks/results/local_model_speed-<model>-<fast>.json``
atomically.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROMPT = "Explain how vaccines train the immune system."


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--fast", default="auto")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="base;pref;la:kl_budget=0;la;amulet:kl_budget=0;amulet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from prefalign import Aligner
    from prefalign.bench import _atomic_write

    rss_before = _rss_gib()
    t0 = time.monotonic()
    al = Aligner.from_pretrained(args.model, fast=args.fast if args.fast in ("auto", "bf16") else args.fast == "on", threads=args.threads)
    load_s = time.monotonic() - t0
    rss_loaded = _rss_gib()
    rows = []
    for spec in args.methods.split(";"):
        name, _, rest = spec.partition(":")
        params = {k: float(v) for k, v in (item.split("=") for item in filter(None, rest.split(",")))}
        preference = None if name == "base" else "concise"
        al.generate(PROMPT, preference=preference, method=name, max_new_tokens=4, ignore_eos=True, **params)  # warm-up
        t = time.monotonic()
        out = al.generate(PROMPT, preference=preference, method=name, max_new_tokens=args.tokens, ignore_eos=True, **params)[0]
        elapsed = time.monotonic() - t
        rows.append({"method": spec, "tokens": len(out.token_ids), "seconds": elapsed, "tokens_per_s": len(out.token_ids) / elapsed, "text": out.text})
        print(f"{spec:24} {rows[-1]['tokens_per_s']:6.2f} tokens/s", flush=True)
    result = {
        "model": args.model,
        "fast": args.fast,
        "threads": args.threads,
        "load_seconds": load_s,
        "peak_rss_gib_before_load": rss_before,
        "peak_rss_gib_after_load": rss_loaded,
        "peak_rss_gib_end": _rss_gib(),
        "parameters": sum(p.numel() for p in al.model.parameters()),
        "model_class": type(al.model).__name__,
        "rows": rows,
    }
    out_path = RESULTS / f"local_model_speed-{args.model}-{args.fast}.json"
    _atomic_write(out_path, json.dumps(result, indent=1, ensure_ascii=False))
    print(f"load {load_s:.1f} s, peak RSS {result['peak_rss_gib_end']:.2f} GiB; written to {out_path}")


if __name__ == "__main__":
    main()
