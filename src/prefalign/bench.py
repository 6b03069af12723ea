"""Decode-speed benchmark (``prefalign bench``, ``benchmarks/decode_speed.py``).

Everything is measured in one run on the embedded model, so ratios compare like with
like on a noisy machine: plain ``model.generate`` (the transformers baseline), the
engine without and with the CPU fast path for every method, and the papers' uncached
two-context loop (:mod:`prefalign.reference`). Tokens are forced (``ignore_eos``) so
every configuration decodes the same number of steps.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .demo import BUILTIN_PROMPTS, demo_prompts

MARK_START = "<!-- decode_speed:start -->"
MARK_END = "<!-- decode_speed:end -->"


def _prompts(n: int) -> list[str]:
    prompts, _ = demo_prompts(max(n, 8) * 3)
    prompts = prompts or BUILTIN_PROMPTS
    return [prompts[i % len(prompts)] for i in range(n)]


def _time(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run_decode_benchmark(
    *,
    max_new_tokens: int = 128,
    batch_sizes: list[int] | None = None,
    quick: bool = False,
    out: str | None = None,
    markdown: str | None = None,
    threads: int = 1,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print a table, write JSON (and a markdown table); return the results."""
    from .aligner import Aligner
    from .models import load_model

    console = console or Console()
    torch.set_num_threads(threads)
    batch_sizes = batch_sizes or [1, 8]
    if quick:
        max_new_tokens = min(max_new_tokens, 16)
    repeats = 1 if quick else 2
    preference = "concise"
    plain_model, tokenizer = load_model()
    plain = Aligner(plain_model, tokenizer)
    fast = Aligner.from_pretrained(fast="auto")
    fast_active = bool(getattr(fast.fast_path, "active", False))
    # Opt-in bf16 weights: faster, but greedy tokens may differ at near-ties.
    bf16 = Aligner.from_pretrained(fast="bf16") if fast_active else None
    rows: list[dict[str, Any]] = []
    identical: dict[int, str] = {}

    def record(config: str, method: str, batch: int, seconds: float, steps: int) -> None:
        tokens = batch * steps
        rows.append({
            "config": config, "method": method, "batch": batch, "seconds": round(seconds, 4), "steps": steps,
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2), "ms_per_step": round(1000 * seconds / steps, 2),
        })
        console.print(f"[dim]{config:<22} {method:<14} batch {batch}: {tokens / seconds:7.1f} tokens/s[/]")

    for batch in batch_sizes:
        prompts = _prompts(batch)
        # Warm up kernels and allocator for this batch shape.
        fast.generate(prompts, preference=preference, method="amulet", max_new_tokens=4, ignore_eos=True)
        plain.generate(prompts, method="base", max_new_tokens=4, ignore_eos=True)
        # transformers baseline: plain fp32 model.generate, greedy, left-padded batch.
        texts = [plain.tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}],
            tokenize=False, add_generation_prompt=True) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True)

        def hf_generate() -> Any:
            with torch.inference_mode():
                return plain_model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                            do_sample=False, pad_token_id=tokenizer.pad_token_id)

        seconds, _ = _time(hf_generate, repeats)
        record("transformers generate", "base", batch, seconds, max_new_tokens)
        seconds, plain_out = _time(lambda: plain.generate(prompts, method="base", max_new_tokens=max_new_tokens, ignore_eos=True), repeats)
        record("engine fp32", "base", batch, seconds, max_new_tokens)
        for method, params in [("base", {}), ("pref", {}), ("la", {}), ("amulet", {}), ("amulet", {"exact": True})]:
            label = method + (" (exact)" if params else "")
            seconds, result = _time(lambda: fast.generate(prompts, preference=preference, method=method,
                                                          max_new_tokens=max_new_tokens, ignore_eos=True, **params), repeats)
            record("engine" + (" fast" if fast_active else " fp32"), label, batch, seconds, max_new_tokens)
            if method == "base" and not params:
                same = sum(a.token_ids == b.token_ids for a, b in zip(plain_out, result))
                identical[f"fp32 fast path, batch {batch}"] = f"{same}/{batch}"
        if bf16 is not None:
            bf16.generate(prompts, preference=preference, method="amulet", max_new_tokens=4, ignore_eos=True)
            for method in ("base", "amulet"):
                seconds, result = _time(lambda: bf16.generate(prompts, preference=preference, method=method,
                                                              max_new_tokens=max_new_tokens, ignore_eos=True), repeats)
                record("engine fast bf16 (opt-in)", method, batch, seconds, max_new_tokens)
                if method == "base":
                    same = sum(a.token_ids == b.token_ids for a, b in zip(plain_out, result))
                    identical[f"bf16 fast path, batch {batch}"] = f"{same}/{batch}"
        # The papers' loop: no KV cache, both contexts re-encoded every step.
        from .reference import reference_generate

        # Its step cost grows with length; beyond batch 1 it runs 32 steps only (which flatters it).
        steps = max_new_tokens if batch == 1 else min(32, max_new_tokens)
        requests = [fast.build_request(p, preference, "amulet", max_new_tokens=steps, ignore_eos=True) for p in prompts]
        seconds, _ = _time(lambda: reference_generate(fast.engine.models, requests, [], tokenizer.pad_token_id), 1)
        record("uncached reference", "amulet", batch, seconds, steps)

    def tps(config: str, method: str, batch: int) -> float:
        return next(r["tokens_per_s"] for r in rows if r["config"] == config and r["method"] == method and r["batch"] == batch)

    engine_config = "engine fast" if fast_active else "engine fp32"
    b1 = batch_sizes[0]
    ratios = {
        "amulet_time_over_base_b1": round(tps(engine_config, "base", b1) / tps(engine_config, "amulet", b1), 3),
        "base_speedup_over_transformers_b1": round(tps(engine_config, "base", b1) / tps("transformers generate", "base", b1), 3),
        "amulet_exact_time_over_closed_b1": round(tps(engine_config, "amulet", b1) / tps(engine_config, "amulet (exact)", b1), 3),
        "amulet_speedup_over_uncached_b1": round(tps(engine_config, "amulet", b1) / tps("uncached reference", "amulet", b1), 3),
    }
    if bf16 is not None:
        ratios["bf16_base_speedup_over_transformers_b1"] = round(
            tps("engine fast bf16 (opt-in)", "base", b1) / tps("transformers generate", "base", b1), 3)
        ratios["bf16_amulet_time_over_base_b1"] = round(
            tps("engine fast bf16 (opt-in)", "base", b1) / tps("engine fast bf16 (opt-in)", "amulet", b1), 3)
    if len(batch_sizes) > 1:
        bn = batch_sizes[-1]
        ratios[f"amulet_speedup_over_uncached_b{bn}"] = round(
            tps(engine_config, "amulet", bn) / tps("uncached reference", "amulet", bn), 3)
        ratios[f"amulet_throughput_b{bn}_over_b1"] = round(tps(engine_config, "amulet", bn) / tps(engine_config, "amulet", b1), 3)
        ratios[f"base_throughput_b{bn}_over_b1"] = round(tps(engine_config, "base", bn) / tps(engine_config, "base", b1), 3)
    results = {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "fast_path": str(fast.fast_path),
        "greedy_tokens_identical_fast_vs_fp32": identical,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
        "ratios": ratios,
        "quick": quick,
    }
    table = _table(rows)
    console.print(table)
    for key, value in ratios.items():
        console.print(f"{key}: [bold]{value}[/]")
    console.print(f"greedy tokens identical to plain fp32: {identical}")
    out_path = Path(out or "benchmarks/results/decode_speed.json")
    _atomic_write(out_path, json.dumps(results, indent=2))
    console.print(f"results written to {out_path}")
    if markdown:
        _write_markdown(Path(markdown), results)
        console.print(f"table written to {markdown}")
    return results


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="decode speed (tokens/s; forced tokens, greedy)")
    for column in ("config", "method", "batch", "tokens/s", "ms/step"):
        table.add_column(column, justify="right" if column in ("batch", "tokens/s", "ms/step") else "left")
    for r in rows:
        table.add_row(r["config"], r["method"], str(r["batch"]), f"{r['tokens_per_s']:.1f}", f"{r['ms_per_step']:.1f}")
    return table


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown section (table, ratios, token identity)."""
    lines = [
        f"Embedded model, {results['max_new_tokens']} forced new tokens, greedy, {results['threads']} thread(s); "
        f"fast path: `{results['fast_path']}`.",
        "",
        "| configuration | method | batch | steps | tokens/s | ms/step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['config']} | {r['method']} | {r['batch']} | {r['steps']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in results["ratios"].items()]
    same = ", ".join(f"{k}: {v}" for k, v in results["greedy_tokens_identical_fast_vs_fp32"].items())
    lines += ["", f"Greedy tokens identical to the plain fp32 engine ({results['max_new_tokens']} tokens per prompt): {same}."]
    return "\n".join(lines)


def _write_markdown(path: Path, results: dict[str, Any]) -> None:
    section = f"{MARK_START}\n{markdown_table(results)}\n{MARK_END}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n## Decode speed\n\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    _atomic_write(path, text)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
