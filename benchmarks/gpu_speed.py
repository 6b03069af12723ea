"""Decode speed on a GPU: the engine against transformers' static-cache compiled ``generate``.

Random weights in a model's shape (default: Llama-3.1-8B's, 7.4 B parameters with the
embedded tokenizer's 49,152-token vocabulary), bf16 on CUDA, greedy, EOS ignored.
Per batch size it measures, in the same run (compare ratios: a machine's host CPU
moves every number):

* transformers ``generate`` with a static cache (compiled on CUDA: its first call
  compiles, and is not timed) and with the default dynamic cache, eager;
* prefalign's ``base``, ``amulet`` and ``pad`` (a second random model as the PRM);

and checks that greedy ``base`` gives transformers' tokens. Runs unchanged on a CPU with
a small shape (that is how the tests run it)::

    python benchmarks/gpu_speed.py                          # CUDA, 8B shape, batch 1 8 32
    python benchmarks/gpu_speed.py --shape tiny --device cpu --batch 1 --tokens 8

Writes benchmarks/results/gpu_speed.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, int]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
PROMPTS = [
    "Why is the sky blue?", "How do I boil an egg?", "Give me three tips for a job interview.",
    "What is a hash table?", "Explain photosynthesis.", "What should I pack for a weekend hike?",
    "Write a haiku about rain.", "What causes inflation?",
]
METHODS = ("base", "amulet", "pad")
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_speed.json"


def random_llama(shape: str, vocab: int, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A Llama with random weights in ``shape``, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, **SHAPES[shape],
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, device: torch.device, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(shape: str, batches: list[int], tokens: int, repeats: int, device: torch.device, dtype: torch.dtype,
            methods: tuple[str, ...]) -> dict[str, Any]:
    from transformers import GenerationConfig

    from prefalign import Aligner
    from prefalign.methods import PRM
    from prefalign.models import load_tokenizer
    from prefalign.prompts import encode_context, to_chat
    from prefalign.runners.kv_cache import left_pad

    tokenizer = load_tokenizer()
    model = random_llama(shape, len(tokenizer), device, dtype, 0)
    al = Aligner(model, tokenizer)
    if "pad" in methods:
        al.add_model(PRM, random_llama(shape, len(tokenizer), device, dtype, 1))
    common = dict(max_new_tokens=tokens, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    static = GenerationConfig(cache_implementation="static", **common)
    dynamic = GenerationConfig(**common)
    compiled = device.type == "cuda"  # transformers compiles a static-cache generate on accelerators only
    rows = []
    for batch in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        ids, mask = left_pad([encode_context(tokenizer, to_chat(p), None, "default") for p in prompts], tokenizer.pad_token_id, device)

        def hf(config: GenerationConfig):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:].tolist()

        row: dict[str, Any] = {"batch": batch}
        start = time.perf_counter()
        hf(static)  # warm-up: compiles on CUDA
        row["static_first_call_s"] = time.perf_counter() - start
        seconds, static_tokens = _timed(lambda: hf(static), device, repeats)
        row["transformers_static_ms"] = seconds / tokens * 1e3
        seconds, _ = _timed(lambda: hf(dynamic), device, repeats)
        row["transformers_dynamic_ms"] = seconds / tokens * 1e3
        for method in methods:
            preference = None if method == "base" else "concise"

            def ours(method: str = method, preference: str | None = preference):
                return [r.token_ids for r in al.generate(prompts, preference=preference, method=method, max_new_tokens=tokens, ignore_eos=True)]

            ours()  # warm-up
            seconds, out = _timed(ours, device, repeats)
            row[f"{method}_ms"] = seconds / tokens * 1e3
            if method == "base":
                row["base_equals_transformers"] = sum(a == b for a, b in zip(out, static_tokens))
        rows.append(row)
        print(_line(row, methods), flush=True)
    return {"rows": rows, "static_compiled": compiled, "shape": shape, "tokens": tokens, "repeats": repeats}


def _line(row: dict[str, Any], methods: tuple[str, ...]) -> str:
    """One batch size: ms per step, then base / static and each method / base (≤ 80 columns)."""
    cells = [f"{row['batch']:>5}", f"{row['transformers_static_ms']:>7.2f}", f"{row['transformers_dynamic_ms']:>7.2f}"]
    base = row.get("base_ms")
    for method in methods:
        ms = row[f"{method}_ms"]
        ratio = ms / (row["transformers_static_ms"] if method == "base" else base) if base else float("nan")
        cells.append(f"{ms:>7.2f} {ratio:4.2f}×")
    if "base_equals_transformers" in row:
        cells.append(f"{row['base_equals_transformers']}/{row['batch']}")
    return " ".join(cells)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 8 32)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--method", action="append", choices=METHODS, help="methods (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from prefalign.models import resolve_device, resolve_dtype

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    methods = tuple(args.method or METHODS)
    print(f"{args.shape} shape, {dtype} on {device}; ms per step and ratio: base to transformers'")
    print(f"static-cache generate ({'compiled' if device.type == 'cuda' else 'eager: no compile on a CPU'}), the others to base")
    print(f"{'batch':>5} {'static':>7} {'dynamic':>7} " + " ".join(f"{m:>13}" for m in methods) + " base=hf")
    result = measure(args.shape, args.batch or [1, 8, 32], args.tokens, args.repeats, device, dtype, methods)
    result.update(
        device=str(device), dtype=str(dtype), torch=torch.__version__, machine=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
