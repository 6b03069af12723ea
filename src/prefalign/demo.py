"""``make demo`` / ``prefalign demo``: a few prompts under contrasting preferences, side by side."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: Used when ../shared/data is not beside the checkout (e.g. an installed package).
BUILTIN_PROMPTS = [
    "What is the ozone layer, and how does it protect us from harmful radiation from the sun?",
    "How can I get better at remembering people's names?",
    "Why do cats purr?",
]
CONTRASTS = [("concise", "verbose"), ("elementary", "expert")]


def shared_data_dir() -> Path | None:
    """``$PREFALIGN_DATA``, else ``../shared/data`` beside the working directory or the checkout."""
    candidates = []
    if os.environ.get("PREFALIGN_DATA"):
        candidates.append(Path(os.environ["PREFALIGN_DATA"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def demo_prompts(limit: int) -> tuple[list[str], str]:
    """Prompts from the Amulet HelpSteer file if present, else the built-in ones."""
    data = shared_data_dir()
    path = data / "amulet" / "HelpSteer_train.json" if data else None
    if path and path.is_file():
        rows = json.loads(path.read_text())
        short = [r["question"] for r in rows if len(r["question"]) < 160]
        return short[:limit], str(path)
    return BUILTIN_PROMPTS[:limit], "built-in examples (../shared/data not found)"


def _methods(aligner: Any) -> list[str]:
    methods = ["base", "pref", "amulet"]
    try:
        from .prm import default_prm_path

        default_prm_path()
        methods.append("pad")
    except Exception:  # no shipped PRM yet: PAD is left out of the demo
        pass
    return methods


def run_demo(aligner: Any, *, limit: int = 3, max_new_tokens: int = 96, console: Console | None = None) -> None:
    """Print, per prompt, one table: preferences as rows, methods as columns."""
    console = console or Console()
    prompts, source = demo_prompts(limit)
    methods = _methods(aligner)
    preferences = [p for pair in CONTRASTS for p in pair]
    console.print(f"[bold]prefalign demo[/] · model [cyan]{aligner.model.config.name_or_path}[/] · prompts from {source}")
    console.print(f"methods: {', '.join(methods)} · preferences: {', '.join(preferences)} · {max_new_tokens} new tokens, greedy\n")
    answers: dict[tuple[str, str], list[str]] = {}
    speed: dict[str, tuple[int, float]] = {}
    for method in methods:
        for preference in preferences if method != "base" else [None]:
            start = time.perf_counter()
            results = aligner.generate(prompts, preference=preference, method=method, max_new_tokens=max_new_tokens)
            seconds = time.perf_counter() - start
            tokens = sum(r.usage.completion_tokens for r in results)
            done, spent = speed.get(method, (0, 0.0))
            speed[method] = (done + tokens, spent + seconds)
            answers[(method, preference or "")] = [r.text for r in results]
            console.print(f"[dim]{method:>6} · {preference or '(no preference)':<10} {tokens / seconds:6.1f} tokens/s[/]")
    for i, prompt in enumerate(prompts):
        table = Table(title=f"[bold]{prompt}[/]", show_lines=True, expand=True)
        table.add_column("preference", style="magenta", no_wrap=True)
        for method in methods:
            table.add_column(method, ratio=1)
        for preference in preferences:
            table.add_row(preference, *[answers[(m, "" if m == "base" else preference)][i] for m in methods])
        console.print(table)
    summary = Table(title="throughput (batch of prompts, all contexts of a method in one forward)")
    summary.add_column("method")
    summary.add_column("tokens/s", justify="right")
    for method, (tokens, seconds) in speed.items():
        summary.add_row(method, f"{tokens / seconds:.1f}")
    console.print(summary)
