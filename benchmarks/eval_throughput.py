"""Evaluation throughput: rows/min of `prefalign eval` at batch 1 vs batched.

Runs the same small grid (N prompts of an Amulet dataset × one preference × methods
pref and amulet, greedy) through :func:`prefalign.eval.runner.run_eval` on the embedded
model, once per batch size, end to end: decoding, judges, guards (perplexity) and the
results file. The model is loaded once, outside the timings; the batch sizes run in
turn on the same (shared, noisy) CPU, so compare them within one run.

    python benchmarks/eval_throughput.py                 # N=8, 128 tokens, batch 1 and 8
    python benchmarks/eval_throughput.py --n 4 --max-new-tokens 32   # smoke run

Prints a table and writes benchmarks/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "amulet" / "HelpSteer_train.json"
OUT = ROOT / "benchmarks" / "results" / "eval_throughput.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="prompts (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 and 8)")
    parser.add_argument("--methods", default="pref,amulet")
    parser.add_argument("--preference", default="concise")
    parser.add_argument("--dataset", default=str(DATA))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)  # a shared CPU: more threads only contend
    from prefalign import Aligner
    from prefalign.eval.report import analyse
    from prefalign.eval.runner import EvalConfig, package_versions, read_results, run_eval

    t0 = time.perf_counter()
    aligner = Aligner.from_pretrained(threads=args.threads)
    load_s = time.perf_counter() - t0
    methods = [m.strip() for m in args.methods.split(",")]
    results = []
    texts: dict[int, dict[str, str]] = {}
    for bs in args.batch or [1, 8]:
        config = EvalConfig(
            datasets=[args.dataset], preferences=[args.preference], methods=methods, limit=args.n,
            max_new_tokens=args.max_new_tokens, batch_size=bs, template="amulet", threads=args.threads,
        )
        with tempfile.TemporaryDirectory() as tmp:
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            summary = run_eval(config, tmp, aligner=aligner, progress=False, report=False)
            wall = time.perf_counter() - start
            rows = read_results(tmp)
            a = analyse(rows)
        tokens = sum(r["completion_tokens"] for r in rows)
        texts[bs] = {f"{r['method']}|{r['prompt_id']}": r["text"] for r in rows}
        results.append({
            "batch_size": bs,
            "rows": summary.rows_written,
            "seconds": round(wall, 1),
            "rows_per_min": round(60 * summary.rows_written / wall, 2),
            "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1),
            "decode_tokens_per_s": {v: round(s["tokens_per_s"], 1) for v, s in a.speed.items()},
            "load_average_before": round(load_before, 2),
        })
    sizes = [r["batch_size"] for r in results]
    same = None
    if len(sizes) > 1:
        a_, b_ = texts[sizes[0]], texts[sizes[-1]]
        same = sum(a_[k] == b_.get(k) for k in a_) / len(a_)
    report = {
        "benchmark": "eval_throughput",
        "grid": {"dataset": Path(args.dataset).name, "prompts": args.n, "preference": args.preference,
                 "methods": methods, "max_new_tokens": args.max_new_tokens, "template": "amulet"},
        "model": str(aligner.model.config.name_or_path),
        "fast_path": str(aligner.fast_path),
        "threads": args.threads,
        "model_load_seconds": round(load_s, 1),
        "results": results,
        "identical_answers_batch_1_vs_batched": same,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "note": "CPU shared with other processes"},
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    print(f"eval throughput: {args.n} prompts × {args.preference} × {','.join(methods)}, {args.max_new_tokens} tokens, "
          f"{args.threads} thread(s)")
    print(f"{'batch':>5} {'rows':>5} {'seconds':>8} {'rows/min':>9} {'tokens/s':>9}")
    for r in results:
        print(f"{r['batch_size']:>5} {r['rows']:>5} {r['seconds']:>8} {r['rows_per_min']:>9} {r['tokens_per_s']:>9}")
    if len(results) > 1:
        print(f"speed-up batch {sizes[-1]} vs {sizes[0]}: {results[-1]['rows_per_min'] / results[0]['rows_per_min']:.2f}x")
    if same is not None:
        print(f"identical answers batch {sizes[0]} vs {sizes[-1]}: {same:.0%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
