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

from ..cluster import RAY_ADDRESS_HELP
from ..errors import PrefalignError

_err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    _err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


_JUDGE_HELP = (
    "Judge: proxy (the offline judges; always on), rm:PATH_OR_ID\\[@HEAD] "
    "(a reward model or classifier) or llm:BASE_URL (a pairwise LLM judge, "
    "key from $OPENAI_API_KEY). Repeatable; see docs/judges.md."
)
_JUDGE_MODEL_HELP = "Model name of the llm: judges (one for all, or one per llm: judge)."
_TRUST_HELP = "Let rm: judges run code shipped with the model (ArmoRM needs it)."
_PROTOCOL_HELP = "A paper's setting: amulet or pad (datasets, preferences, methods, template, judges)."


def eval_command(
    dataset: list[str] = typer.Option([], "--dataset", "-d", help="Prompt file: JSON, JSONL or CSV (repeatable)."),
    preferences: list[str] = typer.Option(
        [], "--preferences", "-p",
        help="Comma-separated preset names (concise,formal; amulet:* for all of a paper's), or one free-text "
        "preference per option (repeatable).",
    ),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods: base, pref, beam, la, amulet, pad."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Prompts per dataset (deterministic, nested subsample)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Default 128."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt subsample."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory (re-running the same command resumes)."),
    field: Optional[str] = typer.Option(None, "--field", help="Prompt field of the dataset records (default: detected)."),
    sweep: list[str] = typer.Option([], "--sweep", help="Parameter sweep METHOD.PARAM=V1,V2,... e.g. amulet.alpha=0.5,1,2,4 (repeatable)."),
    executor: str = typer.Option("local", "--executor", help="local, or ray (shard batches over a Ray cluster)."),
    backend: str = typer.Option("transformers", "--backend", help="transformers, or llamacpp (a GGUF in llama.cpp; no pad)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together (beam: × width rows)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: local dir, .gguf file or hub id (default: embedded SmolLM2-135M)."),
    template: Optional[str] = typer.Option(None, "--template", help="default, amulet, pad or plain (default: each method's own)."),
    prm: Optional[str] = typer.Option(None, "--prm", help="PAD: personalised reward model directory."),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="CPU fast path (oneDNN prepacked weights)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per process (1 is robust on a shared CPU)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="Ray actors (default: cluster CPUs / threads)."),
    judge_backend: str = typer.Option("auto", "--judge-backend", help="Similarity judges: auto, embedding or keywords."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with ETA."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.md and plots at the end."),
    judge: list[str] = typer.Option([], "--judge", help=_JUDGE_HELP),
    judge_model: list[str] = typer.Option([], "--judge-model", help=_JUDGE_MODEL_HELP),
    judge_trust_remote_code: bool = typer.Option(False, "--judge-trust-remote-code", help=_TRUST_HELP),
    protocol: Optional[str] = typer.Option(None, "--protocol", help=_PROTOCOL_HELP),
) -> None:
    """Evaluate methods × preferences × datasets; rows go to OUT/results.jsonl, the report to OUT/report.md."""
    from .judging import check_judge_specs
    from .protocols import resolve_protocol
    from .runner import EvalConfig, run_eval

    try:
        plan = resolve_protocol(
            protocol, datasets=dataset, preferences=preferences,
            methods=[m.strip() for m in (methods or "").split(",") if m.strip()], template=template,
            max_new_tokens=max_new_tokens, judges=judge, judge_models=judge_model,
        )
        if not plan.datasets:
            raise PrefalignError("no prompts: give --dataset PATH (repeatable) or --protocol amulet|pad", field="dataset")
        if not plan.preferences:
            raise PrefalignError("no preferences: give --preferences (e.g. concise,formal) or --protocol", field="preferences")
        external = [j for j in plan.judges if j.strip().lower() != "proxy"]
        # Judges are checked before any decoding: a bad path, key or URL fails in seconds.
        check_judge_specs(external, models=plan.judge_models, trust_remote_code=judge_trust_remote_code)
        config = EvalConfig(
            datasets=plan.datasets,
            preferences=plan.preferences,
            methods=plan.methods,
            sweeps=list(sweep),
            limit=limit,
            seed=seed,
            max_new_tokens=plan.max_new_tokens,
            prompt_field=field,
            template=plan.template,
            batch_size=batch_size,
            model=model,
            prm=prm,
            fast="auto" if fast else False,
            threads=threads,
            executor=executor,  # type: ignore[arg-type]
            model_backend=backend,
            ray_address=ray_address,
            ray_workers=ray_workers,
            judge_backend=judge_backend,  # type: ignore[arg-type]
        )
        summary = run_eval(config, out, progress=progress, report=report and not external,
                           argv=["prefalign", *sys.argv[1:]])
        if external:
            _judge_and_report(out, external, plan.judge_models, judge_trust_remote_code, progress, report, False)
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


def _judge_and_report(out: Path, specs: list[str], models: list[str], trust: bool, progress: bool,
                      report: bool, as_json: bool) -> None:
    import json

    from .judging import build_judges, judge_run

    judges = build_judges(specs, models=models, trust_remote_code=trust)
    try:
        summaries = judge_run(out, judges, progress=progress)
    except KeyboardInterrupt:
        _err.print(f"\n[yellow]interrupted[/]: verdicts so far are saved in {out}; run the same command to resume.")
        raise typer.Exit(code=130)
    if as_json:
        print(json.dumps([{**vars(s), "per_minute": s.per_minute} for s in summaries], indent=2))
    else:
        for s in summaries:
            unit = "answers" if s.kind == "rm" else "pairs"
            _err.print(f"{s.name}", soft_wrap=True)
            _err.print(f"  {s.judged} {unit} judged, {s.cached} already done, {s.items} in all; "
                       f"{s.seconds:.0f} s" + (f", {s.calls} calls" if s.kind == "llm" else "")
                       + (f", {s.malformed} malformed, {s.errors} failed" if s.malformed or s.errors else ""))
    if report:
        from .report import write_report

        _err.print(f"report: {write_report(out)}")


def judge_command(
    directory: Path = typer.Argument(..., help="A results directory written by `prefalign eval`."),
    judge: list[str] = typer.Option(..., "--judge", help=_JUDGE_HELP),
    judge_model: list[str] = typer.Option([], "--judge-model", help=_JUDGE_MODEL_HELP),
    judge_trust_remote_code: bool = typer.Option(False, "--judge-trust-remote-code", help=_TRUST_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    report: bool = typer.Option(True, "--report/--no-report", help="Re-render report.md at the end."),
    as_json: bool = typer.Option(False, "--json", help="Print what each judge did as JSON."),
) -> None:
    """Judge a finished run again with other judges, without regenerating; resumable."""
    from .judging import check_judge_specs

    specs = [j for j in judge if j.strip().lower() != "proxy"]
    try:
        if not (directory / "results.jsonl").is_file():
            raise PrefalignError(f"{directory} has no results.jsonl; run `prefalign eval --out {directory}` first",
                                 field="dir")
        if not specs:
            raise PrefalignError("every row already has the proxy judges; add --judge rm:... or llm:...", field="judge")
        check_judge_specs(specs, models=judge_model, trust_remote_code=judge_trust_remote_code)
        _judge_and_report(directory, specs, judge_model, judge_trust_remote_code, progress, report, as_json)
    except PrefalignError as exc:
        _fail(exc)


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
