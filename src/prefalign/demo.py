"""``make demo`` / ``prefalign demo``: a few prompts under contrasting preferences, side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

#: Used when there is no shared data directory (e.g. an installed package).
BUILTIN_PROMPTS = [
    "What is the ozone layer, and how does it protect us from harmful radiation from the sun?",
    "How can I get better at remembering people's names?",
    "Why do cats purr?",
]
CONTRASTS = [("concise", "verbose"), ("elementary", "expert")]


def shared_data_dir() -> Path | None:
    """The shared data directory (:func:`prefalign.paths.data_dir`), or None."""
    from .paths import data_dir

    return data_dir()


def demo_prompts(limit: int) -> tuple[list[str], str]:
    """Prompts from the Amulet HelpSteer file if present, else the built-in ones."""
    data = shared_data_dir()
    path = data / "amulet" / "HelpSteer_train.json" if data else None
    if path and path.is_file():
        rows = json.loads(path.read_text())
        short = [r["question"] for r in rows if len(r["question"]) < 160]
        return short[:limit], str(path)
    return BUILTIN_PROMPTS[:limit], "built-in examples (no shared data: set $PREFALIGN_DATA)"


def _methods(aligner: Any) -> list[str]:
    """``pref`` and, where the shipped PRM can be used, ``pad``: the two methods that
    measurably follow a preference on the embedded model (docs/results, docs/prm.md)."""
    methods = ["pref"]
    try:
        if PRM_KEY not in aligner.engine.models:
            aligner.load_prm()
        methods.append("pad")
    except Exception:  # no PRM for this model (or no peft): PAD is left out of the demo
        pass
    return methods


PRM_KEY = "prm"


def clip_words(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, marked ``…``."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0]
    return cut + " …"


def run_demo(
    aligner: Any,
    *,
    limit: int = 3,
    max_new_tokens: int = 64,
    console: Console | None = None,
    full: bool = False,
) -> None:
    """Per prompt: the base answer once, then each preference's answer per method.

    Answers are shown at most three lines long (``full=True``: whole), cut at a word,
    with their length in words, so that the contrasts fit an 80-column terminal.
    """
    console = console or Console()
    prompts, source = demo_prompts(limit)
    methods = _methods(aligner)
    preferences = [p for pair in CONTRASTS for p in pair]
    console.print(f"[bold]prefalign demo[/] · {aligner.model.config.name_or_path}", highlight=False)
    console.print(f"[dim]prompts: {source}[/]", highlight=False)
    console.print(
        f"[dim]methods: {', '.join(methods)} · {max_new_tokens} new tokens, greedy · "
        "(amulet and la collapse on this 135M model at paper strength: docs/results)[/]\n",
        highlight=False,
    )
    answers: dict[tuple[str, str], list[str]] = {}
    speed: dict[str, tuple[int, float]] = {}
    runs = [("base", None)] + [(m, p) for m in methods for p in preferences]
    with console.status("generating…") as status:
        for n, (method, preference) in enumerate(runs, 1):
            status.update(f"generating {n}/{len(runs)}: {method} · {preference or 'no preference'}")
            start = time.perf_counter()
            results = aligner.generate(prompts, preference=preference, method=method, max_new_tokens=max_new_tokens)
            seconds = time.perf_counter() - start
            tokens = sum(r.usage.completion_tokens for r in results)
            done, spent = speed.get(method, (0, 0.0))
            speed[method] = (done + tokens, spent + seconds)
            answers[(method, preference or "")] = [r.text for r in results]
    width = min(console.width, 80)
    label_width = max(len(f"{p} · {m}") for p in preferences for m in methods) + 1
    clip = (width - label_width - 4) * 3 - 16  # three lines, "(NN words)" included
    for i, prompt in enumerate(prompts):
        console.rule(f"[bold]{i + 1}. {escape(clip_words(prompt, width - 12))}[/]", align="left", characters="─")
        table = Table(show_header=False, box=None, padding=(0, 1), width=width)
        table.add_column(no_wrap=True, width=label_width, style="magenta")
        table.add_column(overflow="fold")
        rows = [("no preference", "base")] + [(p, m) for p in preferences for m in methods]
        for preference, method in rows:
            text = answers[(method, "" if method == "base" else preference)][i]
            words = len(text.split())
            shown = text.strip() if full else clip_words(text, clip)
            label = "base" if method == "base" else f"{preference} · {method}"
            table.add_row(label, Text(f"{shown} ", style="") + Text(f"({words} words)", style="dim"))
        console.print(table)
    console.print(
        "[dim]tokens/s: " + " · ".join(f"{m} {t / s:.1f}" for m, (t, s) in speed.items()) + "[/]",
        highlight=False,
    )
