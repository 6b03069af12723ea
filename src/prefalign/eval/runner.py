"""The evaluation grid runner: datasets × preferences × methods × parameter sweeps.

:func:`run_eval` answers every prompt of every dataset under every preference with
every method variant, scores each answer with the preference's offline judge and the
collapse guards, and appends one JSON row per prompt × preference × method variant to
``DIR/results.jsonl``. ``DIR/config.json`` records the commands, settings, versions
and model of every run into ``DIR``.

Work is planned as a deterministic list of *batches*. A batch holds generations of one
method variant; a generation is one engine request, shared by several rows when the
method ignores the preference (``base`` answers each prompt once and that answer gets a
row, scored by each preference's judge, per preference). Rows are written and flushed
as their generation finishes.

Resuming: re-running the same command skips rows already in ``results.jsonl``. A batch
that finished only in part is decoded again *whole* and only its missing rows are
written: batch composition changes floating-point rounding (padding, matmul shapes),
which can flip a greedy token on a near-tie, so decoding every row in the batch it was
planned in makes an interrupted-and-resumed run write exactly the rows of an
uninterrupted one. An interrupted run thus loses at most the batch in flight. When the
grid grows (a larger ``--limit``, more preferences), answers from the earlier, smaller
plan are kept and their generations are dropped from the new plan's batches, so growing
a run never decodes an answer twice.

Executors: ``local`` decodes in this process; ``ray`` ships batches to Ray actors (one
model per actor) and writes their rows here, in the same format.

The layers (docs/architecture.md): :mod:`~prefalign.eval.plan` (sweep grammar, grid,
batches, resume), :mod:`~prefalign.eval.execute` (decode and judge into rows),
:mod:`~prefalign.eval.ray_executor` (Ray actors), :mod:`~prefalign.eval.results`
(the directory's files), :mod:`~prefalign.eval.echo` (the command that reproduces a
run); this module runs them in order and owns the results directory while it writes.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PrefalignError
from ..prompts import parse_preferences
from .datasets import load_datasets
from .execute import BatchExecutor, ResultRow, _answer_template, _load_aligner, _model_name, _now  # noqa: F401 (re-exported)
from .plan import (  # noqa: F401 (re-exported: the runner's public names before the split)
    Batch,
    Cell,
    EvalConfig,
    Executor,
    Generation,
    MethodVariant,
    batches_to_run,
    expand_methods,
    expand_preferences,
    parse_sweep,
    plan_batches,
)
from .results import (  # noqa: F401 (re-exported)
    CONFIG_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    _dir_lock,
    _load_config,
    _repair_tail,
    _ResultsWriter,
    _write_json,
    key_of,
    package_versions,
    read_results,
    row_key,
)


@dataclass
class RunSummary:
    """What one :func:`run_eval` call did."""

    out: Path
    rows_total: int
    rows_skipped: int
    rows_written: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    report: Path | None = None

    @property
    def rows_done(self) -> int:
        return self.rows_skipped + self.rows_written


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # initial= shows resumed rows as done; the ETA only counts this run's rate.
    return tqdm(total=total, initial=initial, unit="row", desc="eval", dynamic_ncols=True, smoothing=0.1)


def run_eval(
    config: EvalConfig,
    out: str | Path,
    *,
    aligner: Any = None,
    progress: bool = True,
    report: bool = True,
    argv: Sequence[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Run (or resume) an evaluation grid into directory ``out``.

    ``aligner``: an :class:`~prefalign.Aligner` to decode with (local executor only);
    default: load ``config.model``. ``progress``: show a progress bar with ETA.
    ``report``: write ``report.md`` and plots when the grid is complete. ``argv``: the
    command line to record (the CLI passes its own). ``on_row`` is called after each
    row is written (tests interrupt runs with it).

    Ctrl-C stops cleanly: rows finished so far are on disk, config.json marks the run
    interrupted, and ``KeyboardInterrupt`` propagates. Re-running resumes.
    """
    started = time.perf_counter()
    variants = expand_methods(config.methods, config.sweeps)
    preferences = expand_preferences(config.preferences)
    _check_preferences(preferences, config.judge_backend)
    from ..rules import check_backend
    from ..spec import RequestSpec

    for variant in variants:  # the request spec every face builds: template, max_new_tokens, parameters
        RequestSpec.build(variant.method, preferences[0], template=config.template,
                          max_new_tokens=config.max_new_tokens, **dict(variant.overrides))
    if config.executor not in ("local", "ray"):
        raise PrefalignError(f"unknown executor {config.executor!r}; choose local or ray", field="executor")
    check_backend(config.model_backend)
    if config.executor == "ray" and aligner is not None:
        raise PrefalignError("the ray executor loads the model in each worker; pass model=, not aligner=", field="executor")
    datasets = load_datasets(config.datasets, field=config.prompt_field, limit=config.limit, seed=config.seed)
    batches = plan_batches(datasets, preferences, variants, config.batch_size)

    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _dir_lock(out_dir):
        config_path = out_dir / CONFIG_FILE
        saved = _load_config(config_path)
        settings = config.generation_settings()
        if aligner is not None:
            from ..models import EMBEDDED_DISPLAY_NAME

            # Same label as the CLI's default, so API and CLI runs can share a directory.
            name = _model_name(aligner)
            settings["model"] = "embedded" if name == EMBEDDED_DISPLAY_NAME else name
        if saved.get("settings") and saved["settings"] != settings:
            diff = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
            raise PrefalignError(
                f"{out_dir} holds results made with other generation settings ({diff}, as (saved, now)); "
                "use another --out directory",
                field="out",
            )
        results_path = out_dir / RESULTS_FILE
        _repair_tail(results_path)
        # key → the planned batch its row was decoded in (rows of older versions: their batch id)
        done = {key_of(r): (r.get("batch") or {}).get("plan") or (r.get("batch") or {}).get("id") or ""
                for r in read_results(results_path)}
        all_keys = [k for b in batches for k in b.keys]
        skipped = sum(1 for k in all_keys if k in done)
        todo = batches_to_run(batches, done)
        summary = RunSummary(out=out_dir, rows_total=len(all_keys), rows_skipped=skipped)

        run_record: dict[str, Any] = {
            "command": config.command(out),
            "argv": list(argv) if argv is not None else None,
            "config": dataclasses.asdict(config),
            "datasets": [{"name": d.name, "path": d.path, "field": d.field, "prompts": len(d), "total": d.total} for d in datasets],
            "preferences": preferences,
            "variants": [v.label for v in variants],
            "rows_planned": len(all_keys),
            "rows_already_done": skipped,
            "started": _now(),
            "status": "running",
            "versions": package_versions(),
            "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
        saved.setdefault("settings", settings)
        saved.setdefault("runs", []).append(run_record)
        _write_json(config_path, saved)

        bar = _progress_bar(len(all_keys), skipped, progress and bool(todo))
        writer = _ResultsWriter(results_path, done, bar, on_row)

        def persist() -> None:  # called once the model is known, and at the end
            _write_json(config_path, saved)

        try:
            if todo:
                if config.executor == "ray":
                    from .ray_executor import _run_ray  # Ray's code only when it is chosen

                    _run_ray(config, todo, writer, run_record, persist)
                else:
                    _run_local(config, todo, writer, run_record, aligner, persist)
            run_record["status"] = "finished"
        except KeyboardInterrupt:
            summary.interrupted = True
            run_record["status"] = "interrupted"
            raise
        except BaseException as exc:
            run_record["status"] = f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            writer.close()
            if bar is not None:
                bar.close()
            summary.rows_written = writer.written
            summary.seconds = time.perf_counter() - started
            run_record.update(finished=_now(), rows_written=writer.written, seconds=round(summary.seconds, 1))
            _write_json(config_path, saved)
    if report:
        from .report import write_report

        summary.report = write_report(out_dir)
    return summary


def _check_preferences(preferences: Sequence[str], judge_backend: str) -> None:
    """Fail before loading a model when a preference cannot be decoded or judged."""
    from .judges import judges_for

    for p in preferences:
        parse_preferences(p)
        judges_for(p, backend=judge_backend)  # type: ignore[arg-type]


def _run_local(config: EvalConfig, batches: Sequence[Batch], writer: _ResultsWriter, record: dict[str, Any],
               aligner: Any, persist: Callable[[], None]) -> None:
    if aligner is None:
        aligner = _load_aligner(config.model, fast=config.fast, prm=config.prm, threads=config.threads, backend=config.model_backend)
    elif config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    record["model"] = _model_name(aligner)
    record["fast_path"] = str(getattr(aligner, "fast_path", None))
    persist()
    executor = BatchExecutor(aligner, max_new_tokens=config.max_new_tokens, template=config.template, judge_backend=config.judge_backend)
    for batch in batches:
        if writer.progress is not None:
            writer.progress.set_postfix_str(batch.variant.label, refresh=False)
        executor.run(batch, lambda _gen, rows: writer.write(rows))
