"""CPU fast path speed: ms per cached greedy decode step, plain fp32 vs prefalign.fastpath.

Measures on the embedded model (prefalign.models.load_model()), in one run so that
ratios compare like with like on a shared, noisy CPU:

* configurations: plain fp32 transformers; fast path fp32 (the default: greedy tokens
  identical to fp32); fast path bf16 (opt-in: faster, changes greedy tokens);
* batch 1, 2 and 8 (B left-padded chat prompts, one KV-cached step per row);
* torch intra-op threads 1 and 2.

Within each batch size the configurations and thread counts are interleaved round by
round and the median per-step time is reported, so a burst of load from another
process hits all of them alike. Prints a table and writes
benchmarks/results/fastpath_speed.json.

Threads: with 2 threads, libgomp's workers spin-wait for each other; when another
process shares the CPU they lose their time slices and a step can take 10-40x longer
than with 1 thread. Run with ``OMP_WAIT_POLICY=PASSIVE`` in the environment to see the
2-thread numbers without that collapse. With 2 threads, CPU time includes spinning.

Options:
  --check-tokens N   also decode N greedy tokens on 8 chat prompts with plain fp32
                     and each fast-path dtype and count identical prompts (slow:
                     ~1-3 min per configuration on 2 cores).
  --contend          run one busy-looping process beside the benchmark, to see how
                     1 and 2 threads behave when the CPU is shared.
  --quick            fewer rounds (a smoke test).

Usage: .venv/bin/python benchmarks/fastpath_speed.py [--check-tokens 128] [--contend]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from prefalign import fastpath
from prefalign.compat import cache_kwargs, output_cache
from prefalign.fastpath import optimize_for_cpu

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fastpath_speed.json"
DATA = ROOT.parent / "shared" / "data" / "amulet" / "HelpSteer_train.json"
FALLBACK_QUESTIONS = [
    "What is the history of the bed?",
    "How does the ozone layer protect us from radiation from the sun?",
    "What are some tips for staying productive while working from home?",
    "Explain how a bill becomes a law in the United States.",
    "What is the most effective way to remove graffiti from brick walls?",
    "Write a short poem about the sea.",
    "What are the origins of ice cream?",
    "How do vaccines train the immune system?",
]
# Spread over the file: different topics and lengths.
PROMPT_INDICES = [0, 1, 6, 17, 150, 400, 777, 1200]

# "fast fp32" is optimize_for_cpu's default; "fast bf16" is opt-in (changes tokens).
CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain fp32": None,
    "fast fp32": {"dtype": torch.float32},
    "fast bf16": {"dtype": torch.bfloat16},
}


def questions() -> list[str]:
    if DATA.is_file():
        rows = json.loads(DATA.read_text())
        return [rows[i % len(rows)]["question"] for i in PROMPT_INDICES]
    return FALLBACK_QUESTIONS


def chat(tokenizer: Any, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def _spin() -> None:  # the --contend competitor
    while True:
        pass


def build_models(base: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    models, reports = {}, {}
    for name, kwargs in CONFIGS.items():
        if kwargs is None:
            models[name], reports[name] = base, "plain"
            continue
        model = copy.deepcopy(base)
        report = optimize_for_cpu(model, **kwargs)
        reports[name] = str(report)
        if report.active:
            models[name] = model
    return models, reports


def time_steps(
    models: dict[str, torch.nn.Module],
    tokenizer: Any,
    batch: int,
    threads: list[int],
    rounds: int,
    steps: int,
    deadline: float,
) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """(wall, CPU) ms per step for every (config, threads), interleaved round by round.

    CPU time is the process's (all threads'); with one thread it is the work done,
    which is far steadier than wall time when other processes share the CPU.
    """
    qs = questions()
    texts = [chat(tokenizer, qs[i % len(qs)]) for i in range(batch)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    states = {}
    cells = [(name, t) for t in threads for name in models]
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {cell: [] for cell in cells}
    with torch.inference_mode():
        for name, model in models.items():
            mask = enc.attention_mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(enc.input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
            states[name] = [output_cache(out), out.logits[:, -1:].argmax(-1), mask, positions[:, -1:]]

        def run(name: str, n: int) -> tuple[float, float]:
            cache, nxt, mask, pos = states[name]
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                pos = pos + 1
                out = models[name](nxt, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(models[name], cache))
                nxt = out.logits[:, -1:].argmax(-1)
            states[name] = [cache, nxt, mask, pos]
            return (time.perf_counter() - wall) / n * 1000, (time.process_time() - cpu) / n * 1000

        # Warm-up (oneDNN builds its primitives on first use), which also sizes each
        # cell's samples: a cell that has collapsed under load gets 1 step per sample
        # so that the run stays within budget.
        cell_steps = {}
        for name, t in cells:
            torch.set_num_threads(t)
            run(name, 1)
            wall_ms, _ = run(name, 1)
            cell_steps[(name, t)] = max(1, min(steps, int(400 / max(wall_ms, 1e-3))))
        for _ in range(rounds):
            for name, t in cells:
                torch.set_num_threads(t)
                samples[(name, t)].append(run(name, cell_steps[(name, t)]))
                # Stop early on a heavily loaded machine, once every cell has a sample.
                if time.perf_counter() > deadline and all(samples.values()):
                    break
            else:
                continue
            break
    torch.set_num_threads(1)
    return samples


def greedy_tokens(model: torch.nn.Module, tokenizer: Any, text: str, n: int) -> list[int]:
    ids = tokenizer(text, return_tensors="pt").input_ids
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache = output_cache(out)
        for _ in range(n):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
            out = model(nxt, use_cache=True, **cache_kwargs(model, cache))
    return tokens


def check_tokens(models: dict[str, torch.nn.Module], tokenizer: Any, n: int, console: Console) -> dict[str, Any]:
    """Greedy tokens of each fast configuration vs plain fp32 on 8 chat prompts."""
    texts = [chat(tokenizer, q) for q in questions()]
    reference = [greedy_tokens(models["plain fp32"], tokenizer, t, n) for t in texts]
    result: dict[str, Any] = {"new_tokens": n, "prompts": len(texts)}
    for name, model in models.items():
        if name == "plain fp32":
            continue
        first_diff = []
        for text, ref in zip(texts, reference):
            got = greedy_tokens(model, tokenizer, text, n)
            first_diff.append(next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None))
        same = sum(d is None for d in first_diff)
        result[name] = {"identical_prompts": same, "first_divergence": first_diff}
        console.print(f"greedy tokens, {name} vs plain fp32: {same}/{len(texts)} prompts identical over {n} tokens")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per timed sample")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the timing part")
    parser.add_argument("--check-tokens", type=int, default=0, metavar="N")
    parser.add_argument("--contend", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.budget = 2, 2, 30.0

    from prefalign.models import load_model

    console = Console(width=max(Console().width, 132))
    torch.set_num_threads(1)
    base, tokenizer = load_model()
    base.eval()
    tokenizer.padding_side = "left"
    models, reports = build_models(base)
    for name, report in reports.items():
        console.print(f"[bold]{name}[/]: {report}")

    competitor = None
    if args.contend:
        competitor = mp.get_context("spawn").Process(target=_spin, daemon=True)
        competitor.start()
    load_before = os.getloadavg()
    started = time.perf_counter()
    per_batch_budget = args.budget / len(args.batches)
    rows: list[dict[str, Any]] = []
    try:
        for batch in args.batches:
            deadline = time.perf_counter() + per_batch_budget
            times = time_steps(models, tokenizer, batch, args.threads, args.rounds, args.steps, deadline)
            for (name, threads), samples in times.items():
                rows.append(
                    {
                        "config": name,
                        "batch": batch,
                        "threads": threads,
                        "ms_per_step": statistics.median(w for w, _ in samples),
                        "ms_per_step_min": min(w for w, _ in samples),
                        "cpu_ms_per_step": statistics.median(c for _, c in samples),
                        "samples": len(samples),
                    }
                )
    finally:
        if competitor is not None:
            competitor.terminate()
            competitor.join()
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    ms = {(r["config"], r["batch"], r["threads"]): r["ms_per_step"] for r in rows}
    cpu = {(r["config"], r["batch"], r["threads"]): r["cpu_ms_per_step"] for r in rows}
    for r in rows:
        key, b, t = (r["config"], r["batch"], r["threads"]), r["batch"], r["threads"]
        plain = ("plain fp32", b, t)
        r["speedup_vs_plain"] = ms[plain] / ms[key] if plain in ms else None
        r["cpu_speedup_vs_plain"] = cpu[plain] / cpu[key] if plain in cpu else None
        r["step_cost_vs_batch1"] = ms[key] / ms[(r["config"], 1, t)] if (r["config"], 1, t) in ms else None
        r["cpu_step_cost_vs_batch1"] = cpu[key] / cpu[(r["config"], 1, t)] if (r["config"], 1, t) in cpu else None
        r["time_vs_1_thread"] = ms[key] / ms[(r["config"], b, 1)] if (r["config"], b, 1) in ms else None

    table = Table(
        title="ms per cached greedy decode step (median of interleaved samples), embedded SmolLM2-135M",
        caption="fast fp32 = optimize_for_cpu() default (tokens = fp32); fast bf16 = opt-in (changes tokens). "
        "ratios: wall time; 'CPU' columns: process CPU time",
    )
    columns = ("config", "batch", "thr", "ms/step", "min", "CPU ms", "vs plain", "CPU vs plain", "vs batch 1",
               "CPU vs batch 1", "vs 1 thr")
    for col in columns:
        table.add_column(col, justify="left" if col == "config" else "right", no_wrap=True)
    fmt = lambda v: "-" if v is None else f"{v:.2f}×"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["threads"], r["batch"], list(CONFIGS).index(r["config"]))):
        table.add_row(
            r["config"], str(r["batch"]), str(r["threads"]), f"{r['ms_per_step']:.1f}", f"{r['ms_per_step_min']:.1f}",
            f"{r['cpu_ms_per_step']:.1f}", fmt(r["speedup_vs_plain"]), fmt(r["cpu_speedup_vs_plain"]),
            fmt(r["step_cost_vs_batch1"]), fmt(r["cpu_step_cost_vs_batch1"]), fmt(r["time_vs_1_thread"]),
        )
    console.print(table)
    console.print(
        f"timing took {elapsed:.0f}s; load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs" + (" (with one busy-looping competitor)" if args.contend else "")
    )

    tokens = check_tokens(models, tokenizer, args.check_tokens, console) if args.check_tokens else None

    results = {
        "benchmark": "fastpath_speed",
        "model": "embedded SmolLM2-135M-Instruct",
        "torch": torch.__version__,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "onednn_bf16_supported": fastpath.is_supported(torch.bfloat16),
        "fast_path_reports": reports,
        "contend": args.contend,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before_after": [load_before[0], load_after[0]],
        "rows": rows,
        "greedy_tokens": tokens,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
