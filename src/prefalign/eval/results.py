"""A results directory's file names and readers, shared by the runner, the report and the judges.

Kept below :mod:`~prefalign.eval.runner` (which re-exports them) so that the report
can read a run without importing the runner that writes it (tests/test_imports.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PrefalignError

log = logging.getLogger("prefalign.eval.runner")

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl`` file (a directory is read as ``DIR/results.jsonl``).

    A last line cut short by a hard kill is ignored; other unreadable lines are
    skipped with a warning.
    """
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.is_file():
        return []
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    log.warning("%s:%d is not a JSON row; skipped", p, lineno)
    return rows


def parse_json(text: str, path: str | Path, *, field: str, hint: str | Callable[[str], str] = "") -> Any:
    """``json.loads(text)``, or an error naming the file, the line and ``hint`` (or
    ``hint(json's message)``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        said = hint(exc.msg) if callable(hint) else hint
        raise PrefalignError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}{said}", field=field) from exc


def _load_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return parse_json(path.read_text(encoding="utf-8"), path, field="out", hint="; fix or remove it")


def read_run(directory: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows and the config of a finished (or partial) run, or an error saying what is missing."""
    d = Path(directory).expanduser()
    if not (d / RESULTS_FILE).is_file():
        raise PrefalignError(f"{d} has no {RESULTS_FILE}; run `prefalign eval --out {d}` first", field="dir")
    rows = read_results(d)
    if not rows:
        raise PrefalignError(f"{d / RESULTS_FILE} has no rows yet", field="dir")
    return rows, _load_config(d / CONFIG_FILE)
