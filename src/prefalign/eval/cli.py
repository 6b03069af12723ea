"""``prefalign eval`` and ``prefalign report``: typer command functions.

The main CLI (:mod:`prefalign.cli`) registers them; they can also be mounted on any
typer app (the tests do).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import PrefalignError

_err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    _err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def eval_command(
    dataset: list[str] = typer.Option(..., "--dataset", "-d", help="Prompt file: JSON, JSONL or CSV (repeatable)."),
    preferences: list[str] = typer.Option(
        ..., "--preferences", "-p",
        help="Comma-separated preset names (concise,formal; amulet:* for all of a paper's), or one free-text "
        "preference per option (repeatable).",
    ),
    methods: str = typer.Option("base,pref,la,amulet", "--methods", help="Comma-separated methods: base, pref, beam, la, amulet, pad."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Prompts per dataset (deterministic, nested subsample)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt subsample."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory (re-running the same command resumes)."),
    field: Optional[str] = typer.Option(None, "--field", help="Prompt field of the dataset records (default: detected)."),
    sweep: list[str] = typer.Option([], "--sweep", help="Parameter sweep METHOD.PARAM=V1,V2,... e.g. amulet.alpha=0.5,1,2,4 (repeatable)."),
    backend: str = typer.Option("local", "--backend", help="local, or ray (shard batches over a Ray cluster)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together (beam: × width rows)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: local dir, .gguf file or hub id (default: embedded SmolLM2-135M)."),
    template: Optional[str] = typer.Option(None, "--template", help="default, amulet, pad or plain (default: each method's own)."),
    prm: Optional[str] = typer.Option(None, "--prm", help="PAD: personalised reward model directory."),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="CPU fast path (oneDNN prepacked weights)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per process (1 is robust on a shared CPU)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: start Ray locally)."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="Ray actors (default: cluster CPUs / threads)."),
    judge_backend: str = typer.Option("auto", "--judge-backend", help="Similarity judges: auto, embedding or keywords."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with ETA."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.md and plots at the end."),
) -> None:
    """Evaluate methods × preferences × datasets; rows go to OUT/results.jsonl, the report to OUT/report.md."""
    from .runner import EvalConfig, run_eval

    try:
        config = EvalConfig(
            datasets=list(dataset),
            preferences=list(preferences),
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            sweeps=list(sweep),
            limit=limit,
            seed=seed,
            max_new_tokens=max_new_tokens,
            prompt_field=field,
            template=template,
            batch_size=batch_size,
            model=model,
            prm=prm,
            fast="auto" if fast else False,
            threads=threads,
            backend=backend,  # type: ignore[arg-type]
            ray_address=ray_address,
            ray_workers=ray_workers,
            judge_backend=judge_backend,  # type: ignore[arg-type]
        )
        summary = run_eval(config, out, progress=progress, report=report, argv=["prefalign", *sys.argv[1:]])
    except PrefalignError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _err.print(f"\n[yellow]interrupted[/]: finished rows are saved in {out / 'results.jsonl'}; run the same command again to resume.")
        raise typer.Exit(code=130)
    _err.print(
        f"{summary.rows_written} rows written, {summary.rows_skipped} already done "
        f"({summary.rows_done}/{summary.rows_total}) in {summary.seconds:.0f} s → {summary.out / 'results.jsonl'}"
    )
    if summary.report is not None:
        _err.print(f"report: {summary.report}")


def report_command(
    directory: Path = typer.Argument(..., help="A results directory written by `prefalign eval`."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Also draw PNG plots next to the report."),
) -> None:
    """Write DIR/report.md (tables, win rates with intervals, fluency, speed) and plots from DIR/results.jsonl."""
    from .report import write_report

    try:
        path = write_report(directory, plots=plots)
    except PrefalignError as exc:
        _fail(exc)
    print(path)
