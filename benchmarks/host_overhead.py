"""Host overhead of the engine's step: a tiny model, so that Python work, not the model, sets the speed.

A random Llama (hidden 64, 2 layers) with the embedded tokenizer's 49,152-token
vocabulary; 64 new tokens, EOS ignored, 1 torch thread, best of ``--repeats``.
prefalign's ``generate`` (base, amulet, la, pad with a second random model as its PRM)
is compared with transformers' greedy ``generate`` on the same left-padded prompts,
measured in the same run (the machine is shared: compare ratios, not milliseconds).

    python benchmarks/host_overhead.py                 # batch 1, 8, 32, 64
    python benchmarks/host_overhead.py --batch 1 --batch 8 --repeats 1

Prints a table (ms per step = wall time / new tokens, prefill included on both sides)
and writes benchmarks/results/host_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

PROMPTS = [
    "Why is the sky blue?", "How do I boil an egg?", "Give me three tips for a job interview.",
    "What is a hash table?", "Explain photosynthesis.", "What should I pack for a weekend hike?",
    "Write a haiku about rain.", "What causes inflation?",
]
METHODS = ("base", "amulet", "la", "pad", "amulet0", "la0")
#: amulet0 / la0: the papers' rules (``kl_budget=0``): the engine's cost without the
#: safeguard's search (which, per token, costs 7 softmaxes over the vocabulary per row).
VARIANTS = {"amulet0": ("amulet", {"kl_budget": 0.0}), "la0": ("la", {"kl_budget": 0.0})}
RESULTS = Path(__file__).resolve().parent / "results" / "host_overhead.json"


def tiny_llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(batches: list[int], tokens: int, repeats: int, methods: tuple[str, ...]) -> dict:
    from transformers import GenerationConfig

    from prefalign import Aligner
    from prefalign.methods import PRM
    from prefalign.models import load_tokenizer
    from prefalign.prompts import encode_context, to_chat
    from prefalign.runners.kv_cache import left_pad

    tokenizer = load_tokenizer()
    model = tiny_llama(len(tokenizer), 0)
    al = Aligner(model, tokenizer)
    if "pad" in methods:
        al.add_model(PRM, tiny_llama(len(tokenizer), 1))
    config = GenerationConfig(
        max_new_tokens=tokens, min_new_tokens=0, do_sample=False, eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    rows = []
    for batch in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        ids, mask = left_pad([encode_context(tokenizer, to_chat(p), None, "default") for p in prompts], tokenizer.pad_token_id)

        def hf() -> None:
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, generation_config=config)
            assert out.shape[1] == ids.shape[1] + tokens

        def ours(variant: str) -> None:
            method, params = VARIANTS.get(variant, (variant, {}))
            preference = None if method == "base" else "concise"
            out = al.generate(prompts, preference=preference, method=method, max_new_tokens=tokens, ignore_eos=True, **params)
            assert all(len(r.token_ids) == tokens for r in out)

        runs = {"transformers": hf, **{m: (lambda m=m: ours(m)) for m in methods}}
        best = {name: float("inf") for name in runs}
        # Interleaved repeats: a burst of load from other processes hits every variant alike.
        for _ in range(repeats):
            for name, run in runs.items():
                best[name] = min(best[name], timed(run))
        row = {"batch": batch, **{f"{name}_ms": seconds / tokens * 1e3 for name, seconds in best.items()}}
        rows.append(row)
        print(_line(row, methods), flush=True)
    return {"rows": rows, "tokens": tokens, "repeats": repeats}


def _line(row: dict, methods: tuple[str, ...]) -> str:
    """One batch size's ms per step (≤ 80 columns for the default seven columns)."""
    return f"{row['batch']:>5} {row['transformers_ms']:>8.1f}" + "".join(f" {row[f'{m}_ms']:>8.1f}" for m in methods)


def _ratios(row: dict, methods: tuple[str, ...]) -> str:
    """base / transformers, the others / base."""
    base = row.get("base_ms")
    cells = []
    for method in methods:
        reference = row["transformers_ms"] if method == "base" else base
        cells.append(f" {row[f'{method}_ms'] / reference:>7.2f}×" if reference else f" {'-':>8}")
    return f"{row['batch']:>5} {'':>8}" + "".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 8 32 64)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", action="append", choices=METHODS, help="methods to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = tuple(args.method or METHODS)
    header = f"{'batch':>5} {'hf':>8}" + "".join(f" {m:>8}" for m in methods)
    print("ms per step (hf: transformers generate; amulet0, la0: kl_budget=0)")
    print(header)
    result = measure(args.batch or [1, 8, 32, 64], args.tokens, args.repeats, methods)
    print("ratios: base to transformers generate, the others to base")
    print(header)
    for row in result["rows"]:
        print(_ratios(row, methods))
    result.update(machine=platform.processor() or platform.machine(), torch=torch.__version__, threads=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
