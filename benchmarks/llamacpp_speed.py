"""Decode speed on the llama.cpp backend vs plain llama.cpp vs the transformers path.

One run, one thread, the embedded GGUF, ``--tokens`` forced tokens (``ignore_eos``),
best of ``--repeats``:

* plain llama.cpp: ``llama_cpp.Llama`` evaluating one token at a time (greedy), batch 1;
* prefalign ``base`` / ``pref`` / ``la`` / ``amulet`` on the llama.cpp backend, batch 1 and 8;
* prefalign ``base`` / ``amulet`` on the transformers backend (fp32 fast path), batch 1 and 8.

Targets (issue 16): llama.cpp ``base`` ≥ 0.9× plain llama.cpp; ``amulet`` ≤ 1.2× its
base's time at batch 1; batch 8 throughput ≥ 4× batch 1.

    python benchmarks/llamacpp_speed.py [--tokens 128] [--quick]

Writes ``benchmarks/results/llamacpp_speed.json`` atomically and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from prefalign import Aligner
from prefalign.bench import _atomic_write, _prompts
from prefalign.models import embedded_gguf_path

RESULTS = Path(__file__).resolve().parent / "results" / "llamacpp_speed.json"


def best_of(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def plain_llamacpp(gguf: Path, prompt_ids: list[int], tokens: int, repeats: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)

    def run() -> None:
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True)):
            if i + 1 >= tokens:
                break

    return best_of(run, repeats)


def raw_decode_ms(model: object, rows: int, steps: int = 32) -> float:
    """llama.cpp alone: ms per ``llama_decode`` of one token for each of ``rows`` sequences
    (after a 32-token prompt each); how the kernels scale with the batch, without prefalign."""
    lib = model.lib  # type: ignore[attr-defined]
    lib.llama_memory_clear(model.memory, True)  # type: ignore[attr-defined]
    prompt = 32
    model.decode_batch([1] * prompt * rows, [p for _ in range(rows) for p in range(prompt)],  # type: ignore[attr-defined]
                       [r for r in range(rows) for _ in range(prompt)], [False] * (prompt * rows - 1) + [True])
    start = time.perf_counter()
    for step in range(steps):
        model.decode_batch([2] * rows, [prompt + step] * rows, list(range(rows)), [True] * rows)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    lib.llama_memory_clear(model.memory, True)  # type: ignore[attr-defined]
    return 1000 * elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 16, 1
    torch.set_num_threads(1)
    gguf = embedded_gguf_path()
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict[str, Any]] = []

    def record(engine: str, method: str, batch: int, seconds: float) -> None:
        tps = batch * args.tokens / seconds
        rows.append({"engine": engine, "method": method, "batch": batch, "seconds": round(seconds, 3), "tokens_per_s": round(tps, 1)})
        print(f"{engine:<22} {method:<7} batch {batch:<2} {tps:8.1f} tokens/s", flush=True)

    backends = {
        "prefalign llama.cpp": Aligner.from_pretrained(str(gguf), backend="llamacpp", threads=1),
        "prefalign transformers": Aligner.from_pretrained(fast="auto", threads=1),
    }
    first = backends["prefalign llama.cpp"].build_request(_prompts(1)[0], None, "base").contexts[0][1]
    raw = {rows: round(raw_decode_ms(backends["prefalign llama.cpp"].model, rows), 2) for rows in (1, 2, 8, 16)}
    print("llama_decode alone, ms per step by rows:", raw, flush=True)
    record("plain llama.cpp", "base", 1, plain_llamacpp(gguf, list(first), args.tokens, args.repeats))
    for engine, al in backends.items():
        methods = ["base", "pref", "la", "amulet"] if "llama" in engine else ["base", "amulet"]
        for batch in batches:
            prompts = _prompts(batch)
            for method in methods:
                pref = None if method == "base" else "concise"
                seconds = best_of(lambda: al.generate(prompts, preference=pref, method=method, max_new_tokens=args.tokens, ignore_eos=True), args.repeats)
                record(engine, method, batch, seconds)

    def tps(engine: str, method: str, batch: int) -> float:
        return next(r["tokens_per_s"] for r in rows if (r["engine"], r["method"], r["batch"]) == (engine, method, batch))

    llama = "prefalign llama.cpp"
    ratios = {
        "base_vs_plain_llamacpp": round(tps(llama, "base", 1) / tps("plain llama.cpp", "base", 1), 2),
        "amulet_time_vs_base_b1": round(tps(llama, "base", 1) / tps(llama, "amulet", 1), 2),
    }
    if 8 in batches and 1 in batches:
        ratios["base_b8_vs_b1_throughput"] = round(tps(llama, "base", 8) / tps(llama, "base", 1), 2)
        ratios["amulet_b8_vs_b1_throughput"] = round(tps(llama, "amulet", 8) / tps(llama, "amulet", 1), 2)
    report = {"raw_llama_decode_ms_by_rows": raw, "gguf": gguf.name, "tokens": args.tokens, "repeats": args.repeats, "threads": 1,
              "cpu": platform.processor() or platform.machine(), "results": rows, "ratios": ratios,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    _atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    print("\n| engine | method | batch | tokens/s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} |")
    print("\n" + ", ".join(f"{k} = {v}" for k, v in ratios.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
