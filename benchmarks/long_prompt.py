"""What one long prompt does to everyone else's stream: the longest gap between two tokens.

Starts ``prefalign serve``'s app in a child process on 127.0.0.1 (nothing leaves the
machine), opens ``--streams`` streamed requests (Amulet, greedy, fixed length), and
once each has received a few tokens sends one prompt of ``--prompt-tokens`` tokens.
It records when every stream's chunks arrive and reports, per configuration of
``prefill_chunk`` (``none`` = the whole prompt in one step, as before chunked prefill):

* the streams' longest gap between two tokens, their median gap, and the ratio
  (target: at most 3× the median step);
* how long the long prompt waited for its first token.

    python benchmarks/long_prompt.py                      # embedded SmolLM2-135M
    python benchmarks/long_prompt.py --model tiny --prompt-tokens 1500   # seconds

Writes ``benchmarks/results/long_prompt.json`` (atomically) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import ServerProcess, stream_chunks  # noqa: E402

from prefalign.bench import _atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "long_prompt.json"
PROMPTS = ["How do I boil an egg?", "What should I pack for a weekend hike?", "Explain what a hash table is.", "Give me tips for a job interview."]


def stream(url: str, body: dict[str, Any], arrivals: list[float], started: threading.Event | None = None, after: int = 5) -> None:
    """Consume one SSE stream, appending the arrival time of every content chunk."""
    with httpx.Client(base_url=url, timeout=httpx.Timeout(900, connect=10)) as http:
        for chunk in stream_chunks(http, body):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
                if started is not None and len(arrivals) == after:
                    started.set()


def long_text(tokens: int) -> str:
    # "tea " is one token in SmolLM2's and most BPE vocabularies.
    return "Summarise this: " + "tea " * tokens


def run_config(args: argparse.Namespace, chunk: int | None) -> dict[str, Any]:
    extra = ["--max-prompt-tokens", str(args.prompt_tokens * 2 + 512)]
    if chunk is not None:
        extra += ["--prefill-chunk", str(chunk)]
    with ServerProcess(args, 16, extra=extra) as server:
        warm: list[float] = []
        stream(server.url, body(PROMPTS[0], "base", 4), warm)
        arrivals: list[list[float]] = [[] for _ in range(args.streams)]
        ready = [threading.Event() for _ in range(args.streams)]
        threads = [
            threading.Thread(target=stream, args=(server.url, body(PROMPTS[i % len(PROMPTS)], "amulet", args.max_tokens), arrivals[i], ready[i]))
            for i in range(args.streams)
        ]
        for t in threads:
            t.start()
        for event in ready:
            event.wait(300)
        sent = time.perf_counter()
        long_arrivals: list[float] = []
        stream(server.url, body(long_text(args.prompt_tokens), "base", 4), long_arrivals)
        for t in threads:
            t.join()
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    longest, median = max(gaps), statistics.median(gaps)
    return {
        "prefill_chunk": chunk,
        "streams": args.streams,
        "stream_tokens": [len(a) for a in arrivals],
        "longest_gap_s": round(longest, 3),
        "median_gap_s": round(median, 4),
        "longest_over_median": round(longest / median, 1),
        "long_prompt_first_token_s": round(long_arrivals[0] - sent, 2) if long_arrivals else None,
    }


def body(prompt: str, method: str, max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "prefalign", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                           "temperature": 0, "stream": True, "ignore_eos": True, "alignment": {"method": method}}
    if method != "base":
        out["preference"] = "concise"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', 'tiny' or a model path")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens per stream (long enough to outlast a chunked prefill)")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--chunks", default="none,256,64", help="prefill_chunk settings to compare ('none' = whole prompt)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-fast", action="store_true")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "llamacpp"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 1 <= args.streams <= 32 or args.max_tokens > 1024 or args.prompt_tokens > 7000:
        parser.error("keep it bounded: ≤ 32 streams, ≤ 1024 tokens each, a prompt ≤ 7000 tokens")
    rows = []
    for spec in args.chunks.split(","):
        chunk = None if spec == "none" else int(spec)
        row = run_config(args, chunk)
        rows.append(row)
        print(f"prefill_chunk={spec:>5}  longest gap {row['longest_gap_s']:7.2f} s  median {row['median_gap_s']:.3f} s  "
              f"ratio {row['longest_over_median']:6.1f}  long prompt's first token {row['long_prompt_first_token_s']} s", flush=True)
    report = {
        "model": args.model, "backend": args.backend, "streams": args.streams, "stream_max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
        "torch_threads": args.threads, "cpu": platform.processor() or platform.machine(), "results": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    print("\n| prefill_chunk | longest gap (s) | median gap (s) | longest / median | long prompt TTFT (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prefill_chunk'] or 'none'} | {r['longest_gap_s']:.2f} | {r['median_gap_s']:.3f} | {r['longest_over_median']:.1f} | {r['long_prompt_first_token_s']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
