"""Memory of ``prefalign serve`` per component: resident set after each start-up step.

Runs the server's start-up in this process, step by step, as ``prefalign serve`` does
(imports, model and tokenizer, the CPU fast path, the app), then serves 1 and 16
concurrent streamed Amulet requests on 127.0.0.1 (uvicorn in a thread), and reports
the process's RSS (``/proc/self/status``) after each step, the bytes of the tensors each
part holds (weights, the fast path's packed copies), and the peak (``VmHWM``).

    python benchmarks/server_memory.py                  # embedded SmolLM2-135M, fast path
    python benchmarks/server_memory.py --no-fast        # plain fp32 transformers
    python benchmarks/server_memory.py --model DIR      # e.g. a private copy of the converted model

A file-mapped weight page counts in the RSS of every process that maps it, but the
fast path can hand it back only where no other process maps it (``MADV_PAGEOUT``
skips shared pages): on a machine where other processes run the embedded model, pass
a private copy of its converted directory to see what a lone server holds.

Writes ``benchmarks/results/server_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "server_memory.json"
MB = 1024 * 1024


def status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def trim() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise), so RSS shows what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tensor_bytes(model: Any) -> dict[str, int]:
    """Bytes of the model's parameters/buffers and of the fast path's packed copies."""
    from prefalign.fastpath import FusedLinearGroup, PackedLinear

    seen: set[int] = set()
    params = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.device.type == "cpu":
            seen.add(t.data_ptr())
            params += t.numel() * t.element_size()
    packed = 0
    groups: set[int] = set()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            for t in (module._packed, module._packed_bias):
                packed += t.numel() * t.element_size() if t is not None else 0
            group = module._group
            if isinstance(group, FusedLinearGroup) and id(group) not in groups:
                groups.add(id(group))
                for t in (group._packed, group._packed_bias):
                    packed += t.numel() * t.element_size() if t is not None else 0
    return {"parameters_and_buffers": params, "packed_copies": packed}


def file_mapped_bytes(model: Any) -> int:
    """Bytes of parameters that live in a file mapping (safetensors loaded by mmap), not on the heap."""
    from prefalign.fastpath import _file_mappings

    spans = _file_mappings()
    total = 0
    seen: set[int] = set()
    for t in model.parameters():
        ptr = t.data_ptr()
        if ptr not in seen and any(start <= ptr < end for start, end in spans):
            seen.add(ptr)
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--no-fast", action="store_true", help="without the CPU fast path")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    steps: list[dict[str, Any]] = []

    def record(step: str, **extra: Any) -> None:
        untrimmed = status("VmRSS")
        trim()
        row = {"step": step, "rss_mb": round(status("VmRSS") / MB, 1), "anon_mb": round(status("RssAnon") / MB, 1),
               "file_mb": round(status("RssFile") / MB, 1), "rss_before_trim_mb": round(untrimmed / MB, 1), **extra}
        steps.append(row)
        print(f"{step[:36]:<36} RSS {row['rss_mb']:7.1f} MB (anon {row['anon_mb']:6.1f}, files {row['file_mb']:6.1f})", flush=True)

    record("python")
    import torch

    torch.set_num_threads(1)
    record("import torch")
    import httpx
    import transformers  # noqa: F401
    import uvicorn

    from prefalign import Aligner
    from prefalign.server import create_app
    from prefalign.server.transport import uvicorn_settings

    record("import transformers, fastapi, uvicorn, prefalign")
    aligner = Aligner.from_pretrained(args.model, fast=False)
    sizes = tensor_bytes(aligner.model)
    record("model + tokenizer loaded (fp32)", weights_mb=round(sizes["parameters_and_buffers"] / MB, 1),
           weights_file_mapped_mb=round(file_mapped_bytes(aligner.model) / MB, 1))
    if not args.no_fast:
        from prefalign.aligner import _apply_fast_path

        aligner.fast_path = _apply_fast_path(aligner.model, "auto")
        sizes = tensor_bytes(aligner.model)
        record(f"fast path ({aligner.fast_path.summary()[:40]}…)", packed_mb=round(sizes["packed_copies"] / MB, 1))
    app = create_app(aligner, max_batch=16, max_queue=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **uvicorn_settings()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    record("app and server started")

    def ask(i: int) -> int:
        body = {"messages": [{"role": "user", "content": f"Tell me about tea, number {i}."}], "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "preference": ["concise", "formal", "verbose", "pleasant"][i % 4],
                "alignment": {"method": "amulet"}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
            return sum(1 for line in response.iter_lines() if line.startswith("data: "))

    ask(0)
    time.sleep(1.0)  # the scheduler trims the heap once the engine is idle
    record("after 1 request")
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(ask, range(args.clients)))
    time.sleep(1.0)
    record(f"after {args.clients} concurrent requests")
    peak = status("VmHWM")
    config = aligner.model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token_row = 2 * config.num_hidden_layers * heads * head_dim * 4  # keys and values, fp32
    server.should_exit = True
    thread.join(timeout=30)

    print(f"peak RSS (VmHWM): {peak / MB:.1f} MB; KV cache: {kv_per_token_row / 1024:.1f} KiB per token per row")
    payload = {
        "benchmark": "server_memory",
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "fast_path": not args.no_fast,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "steps": steps,
        "peak_rss_mb": round(peak / MB, 1),
        "kv_cache_bytes_per_token_per_row": kv_per_token_row,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "note": "RSS after gc and malloc_trim at each step (what is held, not what the allocator keeps)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
