"""Load benchmark of ``prefalign serve``: throughput and latency under 1, 4 and 16 clients.

Starts the server in a child process on 127.0.0.1 (a free port; nothing leaves the
machine; a separate process so that the clients' JSON parsing does not share the
server's GIL), first with continuous batching (``max_batch=16``), then one request at
a time (``max_batch=1``), and for each concurrency level runs closed-loop clients: each sends
``--requests`` (at least ``--min-requests`` per level in total) streamed chat requests
one after another (fixed length: ``ignore_eos``,
greedy, Amulet with a preference that varies per client). Bounded in count
(clients × requests) and in time (``--budget`` seconds per configuration: clients
stop sending new requests after it).

Reports aggregate completion tokens/s, request latency p50/p95 and time to first
token, prints a Markdown table and writes ``benchmarks/results/server_load.json``.

``--replicas 1,2`` also serves through Ray Serve (``prefalign serve --replicas N``: a
local Ray in the child process, N engine replicas of ``--threads`` each, one CPU
reserved per replica) and reports the N-replica speedup at the most clients and the
Ray hop's cost at one client against the single-process server (results in
``server_load_replicas.json`` unless ``--out``).

    python benchmarks/server_load.py                    # embedded SmolLM2-135M
    python benchmarks/server_load.py --model tiny       # tiny random model, seconds
    python benchmarks/server_load.py --replicas 1,2 --modes continuous --clients 1,16
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from prefalign import Aligner
from prefalign.server import create_app

PROMPTS = [
    "How do I boil an egg?",
    "What should I pack for a weekend hike?",
    "Explain what a hash table is.",
    "Give me tips for a job interview.",
]
PREFERENCES = ["concise", "formal", "verbose", "pleasant", "psoups:expert", "psoups:friendly"]
RESULTS = Path(__file__).resolve().parent / "results" / "server_load.json"


def build_aligner(model: str, fast: bool, backend: str = "transformers", threads: int | None = None) -> Aligner:
    if model == "tiny":
        return tiny_aligner()
    name = None if model == "embedded" else model
    if backend == "llamacpp":
        return Aligner.from_pretrained(name, backend="llamacpp", threads=threads)
    return Aligner.from_pretrained(name, fast="auto" if fast else False)


def serve_replicas_child(args: argparse.Namespace) -> None:
    """The child process of a Ray mode: Ray Serve with ``--replica-count`` replicas on a
    free port, until the parent terminates it (SIGTERM: Ray stops with it)."""
    from prefalign.server.ray_serve import ReplicaOptions, serve_on_ray, wait_for_signal

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    load = dict(model=None if args.model == "embedded" else args.model, threads=args.threads, fast=False if args.no_fast else "auto")
    settings = dict(max_batch=args.max_batch, max_queue=256, model_id="prefalign", max_prompt_tokens=args.max_prompt_tokens)
    with serve_on_ray(load, settings, ReplicaOptions(replicas=args.replica_count, cpus=1), port=port, prefill_chunk=args.prefill_chunk) as live:
        print(json.dumps({"port": port, "model_id": str(getattr(live.spec.config, "name_or_path", "")), "fast_path": live.spec.fast_path,
                          "replica_load_s": live.spec.load_seconds, "replica_max_rss_mb": live.spec.max_rss_mb}), flush=True)
        wait_for_signal()


def serve_child(args: argparse.Namespace) -> None:
    """The child process: load the model, bind 127.0.0.1:0, print the port, serve."""
    if args.replica_count:
        serve_replicas_child(args)
        return
    torch.set_num_threads(args.threads)
    aligner = build_aligner(args.model, not args.no_fast, args.backend, args.threads)
    app = create_app(aligner, max_batch=args.max_batch, max_queue=256, model_id="prefalign",
                     prefill_chunk=args.prefill_chunk, max_prompt_tokens=args.max_prompt_tokens)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    info = {
        "port": sock.getsockname()[1],
        "model_id": str(getattr(aligner.model.config, "name_or_path", "")),
        "fast_path": str(aligner.fast_path) if aligner.fast_path else None,
    }
    print(json.dumps(info), flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[sock])


class ServerProcess:
    """``serve_child`` in a subprocess; terminated on exit whatever happens."""

    def __init__(self, args: argparse.Namespace, max_batch: int, extra: list[str] | None = None) -> None:
        command = [sys.executable, __file__, "--serve", "--model", args.model, "--threads", str(args.threads), "--max-batch", str(max_batch),
                   "--backend", args.backend]
        if args.no_fast:
            command.append("--no-fast")
        command += extra or []
        self.command = command
        self.info: dict[str, Any] = {}

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True)
        try:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if not line:
                raise RuntimeError("the server process exited before serving")
            self.info = json.loads(line)
            self.url = f"http://127.0.0.1:{self.info['port']}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the server did not come up")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)  # a Ray child stops its replicas and its local Ray first
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stream_chunks(http: httpx.Client, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """POST a streamed chat request and yield its SSE chunks (an HTTP or in-stream error raises)."""
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            yield chunk


def one_request(http: httpx.Client, body: dict[str, Any]) -> tuple[float, float, int]:
    """Send one streamed chat request; return (latency s, time to first token s, completion tokens)."""
    start = time.perf_counter()
    first = math.nan
    tokens = 0
    for chunk in stream_chunks(http, body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif math.isnan(first) and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
    return time.perf_counter() - start, first, tokens


def run_level(url: str, clients: int, requests: int, max_tokens: int, budget: float) -> dict[str, Any]:
    """``clients`` closed-loop clients, ``requests`` each, stopping new ones after ``budget`` s."""
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + budget

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(600, connect=10)) as http:
            for r in range(requests):
                if time.monotonic() > deadline:
                    return
                body = {
                    "model": "prefalign",
                    "messages": [{"role": "user", "content": PROMPTS[(index + r) % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "ignore_eos": True,
                    "preference": PREFERENCES[index % len(PREFERENCES)],
                    "alignment": {"method": "amulet"},
                }
                try:
                    latency, first, n = one_request(http, body)
                except Exception as exc:  # keep measuring; report the failure
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    latencies.append(latency)
                    ttfts.append(first)
                    tokens.append(n)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "completion_tokens": sum(tokens),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
    }


def engine_tokens_per_s(args: argparse.Namespace) -> float:
    """The engine alone (no server, this process) on the 1-client level's first request."""
    torch.set_num_threads(args.threads)
    aligner = build_aligner(args.model, not args.no_fast, args.backend, args.threads)
    prompt = [{"role": "user", "content": PROMPTS[0]}]
    kwargs = dict(preference=PREFERENCES[0], method="amulet", max_new_tokens=args.max_tokens, ignore_eos=True)
    aligner.generate(prompt, **{**kwargs, "max_new_tokens": 4})  # warm-up, as the server's
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        tokens = sum(r.usage.completion_tokens for r in aligner.generate(prompt, **kwargs))
        best = min(best, time.perf_counter() - start)
    del aligner
    return round(tokens / best, 2)


def paired_hop(args: argparse.Namespace, pairs: int) -> dict[str, Any]:
    """The Ray hop's cost at one client, robust to a shared machine: the single-process
    server and a 1-replica Ray Serve run side by side, and one client alternates between
    them (order swapped every pair), so both see the same background load."""
    body = {"model": "prefalign", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "preference": PREFERENCES[0], "alignment": {"method": "amulet"}}
    timings: dict[str, list[float]] = {"single": [], "ray": []}
    with ServerProcess(args, 16) as single, ServerProcess(args, 16, ["--replica-count", "1"]) as ray_one:
        servers = {"single": single.url, "ray": ray_one.url}
        clients = {name: httpx.Client(base_url=url, timeout=httpx.Timeout(600, connect=10)) for name, url in servers.items()}
        try:
            for name in servers:  # warm-up
                one_request(clients[name], {**body, "max_tokens": 4})
            for pair in range(pairs):
                for name in (("single", "ray") if pair % 2 == 0 else ("ray", "single")):
                    timings[name].append(one_request(clients[name], body)[0])
        finally:
            for client in clients.values():
                client.close()
    ratios = sorted(r / s for r, s in zip(timings["ray"], timings["single"]))
    return {
        "pairs": pairs,
        "single_latency_p50_s": round(percentile(timings["single"], 50), 3),
        "ray_latency_p50_s": round(percentile(timings["ray"], 50), 3),
        "ray_over_single_median_ratio": round(percentile(ratios, 50), 3),
    }


def replica_report(by: dict[tuple[str, int], dict[str, Any]], levels: list[int], replica_info: dict[str, Any],
                   paired: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Ray modes' ratios: 2 vs 1 replicas at the most clients, and the hop's cost at 1."""
    if not any(mode.startswith("ray-") for mode, _ in by):
        return {}
    most = max(levels)
    one, two = by.get(("ray-1", most)), by.get(("ray-2", most))
    speedup = round(two["tokens_per_s"] / one["tokens_per_s"], 2) if one and two and one["tokens_per_s"] else None
    alone, hop = by.get(("continuous", 1)), by.get(("ray-1", 1))
    overhead = round(hop["latency_p50_s"] / alone["latency_p50_s"] - 1, 3) if alone and hop and alone["latency_p50_s"] else None
    if paired:  # measured side by side: the number to trust on a shared machine
        overhead = round(paired["ray_over_single_median_ratio"] - 1, 3)
    return {
        "ray": "prefalign serve --replicas N in the child: a local Ray, one CPU and --threads torch threads per replica",
        **replica_info,
        "ray_speedup_2_vs_1_replicas": speedup,
        "ray_target_1_6x_met": speedup is not None and speedup >= 1.6,
        "ray_hop_latency_overhead_1_client": overhead,
        "ray_hop_paired": paired,
        "ray_hop_target_10pct_met": overhead is not None and overhead <= 0.10,
    }


def tiny_aligner() -> Aligner:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefalign.models import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )
    return Aligner(LlamaForCausalLM(config).eval(), tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', 'tiny' (random, for a quick check) or a model path")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=1, help="requests per client per level")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level (1 client: 4 in a row)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds per (mode, level) before clients stop sending")
    parser.add_argument("--modes", default="continuous,sequential", help="continuous (max_batch=16) and/or sequential (max_batch=1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark machine may be shared)")
    parser.add_argument("--no-fast", action="store_true", help="disable the CPU fast path")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "llamacpp"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--max-batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens prefilled per step (default: the engine's, whole prompts)")
    parser.add_argument("--max-prompt-tokens", type=int, default=8192, help=argparse.SUPPRESS)
    parser.add_argument("--replicas", default=None, help="also serve through Ray Serve with these replica counts, e.g. 1,2 (prefalign[cluster])")
    parser.add_argument("--replica-count", type=int, default=0, help=argparse.SUPPRESS)  # internal: the Ray child
    parser.add_argument("--hop-pairs", type=int, default=6, help="with --replicas: requests per server in the side-by-side 1-client hop measurement (0: skip)")
    args = parser.parse_args()
    if args.serve:
        serve_child(args)
        return
    if not 1 <= args.requests <= 100 or not 1 <= args.min_requests <= 100 or args.max_tokens > 512:
        parser.error("keep it bounded: 1 ≤ --requests, --min-requests ≤ 100 and --max-tokens ≤ 512")

    levels = [int(c) for c in args.clients.split(",")]
    if max(levels) > 64:
        parser.error("at most 64 clients")
    modes = {"continuous": max(16, max(levels)), "sequential": 1}
    results = []
    info: dict[str, Any] = {}
    engine_alone = engine_tokens_per_s(args)
    print(f"{'engine':>10}  one request, no server   {engine_alone:8.1f} tok/s", flush=True)
    runs = [(mode, modes[mode], []) for mode in args.modes.split(",")]
    if args.replicas:
        if args.model == "tiny":
            parser.error("--replicas loads the model in each replica: use the embedded model or a path")
        runs += [(f"ray-{n}", modes["continuous"], ["--replica-count", str(n)]) for n in (int(r) for r in args.replicas.split(","))]
        if args.out == RESULTS:
            args.out = RESULTS.with_name("server_load_replicas.json")
    replica_info: dict[str, Any] = {}
    for mode, max_batch, extra in runs:
        with ServerProcess(args, max_batch, extra) as server:
            if not extra or not info:  # the single-process server's, when it runs
                info = server.info
            if extra:
                replica_info = {k: v for k, v in server.info.items() if k.startswith("replica_")}
            run_level(server.url, 1, 1, 4, 60)  # warm-up: first-call allocations, kernels
            for clients in levels:
                per_client = max(args.requests, math.ceil(args.min_requests / clients))
                row = {"mode": mode, "max_batch": max_batch, **run_level(server.url, clients, per_client, args.max_tokens, args.budget)}
                results.append(row)
                print(
                    f"{mode:>10}  clients={clients:<3} {row['tokens_per_s']:8.1f} tok/s  "
                    f"p50 {row['latency_p50_s']:.2f}s  p95 {row['latency_p95_s']:.2f}s  ttft p50 {row['ttft_p50_s']:.2f}s"
                    + (f"  errors={row['errors']}" if row["errors"] else ""),
                    flush=True,
                )
    paired = paired_hop(args, args.hop_pairs) if args.replicas and args.hop_pairs else None
    by = {(r["mode"], r["clients"]): r for r in results}
    speedup = None
    if ("continuous", 1) in by and ("continuous", 16) in by:
        speedup = round(by[("continuous", 16)]["tokens_per_s"] / by[("continuous", 1)]["tokens_per_s"], 2)
    one_client = by.get(("continuous", 1), {}).get("tokens_per_s")
    report = {
        "engine_alone_tokens_per_s": engine_alone,
        "server_1_client_vs_engine": round(one_client / engine_alone, 3) if one_client else None,
        "model": args.model,
        "backend": args.backend,
        "model_id": info.get("model_id"),
        "fast_path": info.get("fast_path"),
        "torch_threads": args.threads,
        "server": "child process, uvicorn on 127.0.0.1, clients in the parent process",
        "cpu": platform.processor() or platform.machine(),
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "min_requests_per_level": args.min_requests,
        "method": "amulet",
        "results": results,
        "speedup_16_vs_1_clients": speedup,
        "target_4x_met": speedup is not None and speedup >= 4,
        **replica_report(by, levels, replica_info, paired),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print("| mode | max_batch | clients | requests | tokens/s | latency p50 (s) | latency p95 (s) | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mode']} | {r['max_batch']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
            f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} |"
        )
    if speedup is not None:
        print(f"\n16 clients vs 1 (continuous batching): {speedup}× aggregate tokens/s (target ≥ 4×)")
    if report.get("ray_speedup_2_vs_1_replicas") is not None:
        print(f"2 replicas vs 1 at {max(levels)} clients: {report['ray_speedup_2_vs_1_replicas']}× aggregate tokens/s (target ≥ 1.6×)")
    if report.get("ray_hop_latency_overhead_1_client") is not None:
        how = "side by side, median of paired requests" if paired else "p50 of the 1-client levels"
        print(f"one client through Ray Serve (1 replica) vs the single process: latency "
              f"{report['ray_hop_latency_overhead_1_client']:+.1%} ({how}; target ≤ +10%)")
    if report["server_1_client_vs_engine"] is not None:
        print(f"one client through the server: {report['server_1_client_vs_engine']}× the engine alone ({engine_alone} tok/s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
