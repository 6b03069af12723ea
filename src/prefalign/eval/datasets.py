"""Prompt datasets for evaluation: JSON, JSONL or CSV files of prompts.

A dataset file holds one record per prompt. The prompt is read from the first of
:data:`PROMPT_FIELDS` that the records have (or the field given with ``field=``); the
prompt's id from ``index`` or ``id`` when present, otherwise from the row number. The
files in the project's ``shared/data/`` work as they are::

    amulet/*.json              [{"index": 0, "question": "..."}, ...]
    psoups/koala_eval_50.json  [{"id": "0", "prompt": "..."}, ...]
    truthfulqa/TruthfulQA.csv  Type,Category,Question,Best Answer,...

Subsampling (``limit``) is deterministic and *nested*: the prompts kept with a given
``seed`` are a prefix of one fixed random permutation, so raising ``limit`` later keeps
every prompt chosen before (and a resumed run reuses their rows).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PrefalignError
from .results import parse_json

log = logging.getLogger(__name__)

#: Field names searched for the prompt, in order (then the same names case-insensitively).
PROMPT_FIELDS: tuple[str, ...] = ("question", "prompt", "instruction", "Question")
#: Field names searched for the prompt's id, in order; absent → the row number.
ID_FIELDS: tuple[str, ...] = ("index", "id")
#: Keys under which a JSON object may hold its list of records.
_CONTAINER_KEYS: tuple[str, ...] = ("data", "rows", "examples", "prompts", "items")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a dataset: its id (a string, unique in the dataset) and text."""

    id: str
    prompt: str


@dataclass(frozen=True)
class Dataset:
    """Prompts loaded from one file. ``name`` labels rows and report tables."""

    name: str
    path: str
    field: str
    items: tuple[PromptItem, ...]
    #: Prompts in the file before subsampling (after dropping empty ones).
    total: int

    def __len__(self) -> int:
        return len(self.items)


def _read_records(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f))
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise PrefalignError(f"cannot read dataset {path}: {exc}", field="dataset") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PrefalignError(f"dataset {path} is not a readable CSV file: {exc}", field="dataset") from exc
    if suffix == ".jsonl" or (suffix != ".json" and text.lstrip()[:1] == "{" and "\n{" in text):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PrefalignError(f"{path}, line {lineno}: not a JSON object ({exc.msg})", field="dataset") from exc
        return records
    data = parse_json(text, path, field="dataset",
                      hint=lambda msg: " (one JSON object per line? name the file .jsonl)" if "Extra data" in msg else "")
    if isinstance(data, Mapping):
        # {"data": [...]}-style wrappers, common in exported datasets.
        for key in _CONTAINER_KEYS:
            if isinstance(data.get(key), list):
                return data[key]
        raise PrefalignError(
            f"{path} holds a JSON object; expected a list of records (or an object with one of "
            f"{', '.join(_CONTAINER_KEYS)} holding the list)",
            field="dataset",
        )
    if not isinstance(data, list):
        raise PrefalignError(f"{path} must hold a list of records, got {type(data).__name__}", field="dataset")
    return data


def detect_field(records: Sequence[Any], field: str | None = None, *, source: str = "dataset") -> str:
    """The name of the prompt field of ``records`` (``field`` when given and present).

    Records that are plain strings use the pseudo-field ``""`` (the string itself).
    """
    dicts = [r for r in records if isinstance(r, Mapping)]
    if not dicts:
        if records and all(isinstance(r, str) for r in records):
            if field:
                raise PrefalignError(f"{source} is a list of strings; it has no field {field!r}", field="field")
            return ""
        raise PrefalignError(f"{source} has no records (expected objects with a prompt field)", field="dataset")
    keys: dict[str, None] = {}
    for r in dicts[:50]:
        keys.update(dict.fromkeys(str(k) for k in r))
    if field:
        if field not in keys:
            raise PrefalignError(
                f"{source} has no field {field!r}; its fields: {', '.join(keys) or 'none'}", field="field"
            )
        return field
    for name in PROMPT_FIELDS:
        if name in keys:
            return name
    lowered = {k.lower(): k for k in keys}
    for name in PROMPT_FIELDS:
        if name.lower() in lowered:
            return lowered[name.lower()]
    raise PrefalignError(
        f"{source}: cannot find the prompt field among {', '.join(PROMPT_FIELDS)}; its fields are "
        f"{', '.join(keys) or 'none'}. Name it with field= (CLI: --field NAME)",
        field="field",
    )


def _record_id(record: Any, row: int) -> str:
    if isinstance(record, Mapping):
        for key in ID_FIELDS:
            value = record.get(key)
            if value is not None and str(value).strip() != "":
                return str(value).strip()
    return str(row)


def subsample(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """Indices (sorted) of a deterministic subsample of ``limit`` out of ``n`` items.

    The kept indices are the first ``limit`` of a permutation fixed by ``seed``, so a
    larger ``limit`` keeps every index a smaller one kept. ``None`` keeps everything.
    """
    if limit is None or limit >= n:
        return list(range(n))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise PrefalignError(f"limit must be an integer ≥ 1, got {limit!r}", field="limit")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:limit])


def load_dataset(
    path: str | Path,
    *,
    field: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """Load prompts from a JSON, JSONL or CSV file.

    ``field`` names the prompt field (default: detected, see :data:`PROMPT_FIELDS`);
    ``limit``/``seed`` subsample deterministically (see :func:`subsample`); ``name``
    labels the dataset (default: the file name without extension). Records with an
    empty prompt are skipped with a warning; duplicate ids are made unique with a
    ``#n`` suffix so that every row of a results file has its own key.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise PrefalignError(f"dataset file not found: {p}", field="dataset")
    records = _read_records(p)
    key = detect_field(records, field, source=str(p))
    items: list[PromptItem] = []
    seen: dict[str, int] = {}
    skipped = 0
    for row, record in enumerate(records):
        value = record if key == "" else (record.get(key) if isinstance(record, Mapping) else None)
        if not isinstance(value, str) or not value.strip():
            skipped += 1
            continue
        rid = _record_id(record, row)
        if rid in seen:
            seen[rid] += 1
            rid = f"{rid}#{seen[rid]}"
        else:
            seen[rid] = 0
        items.append(PromptItem(rid, value))
    if skipped:
        log.warning("%s: skipped %d record(s) without a non-empty %r", p, skipped, key or "text")
    if not items:
        raise PrefalignError(f"{p} has no non-empty prompts in field {key!r}", field="dataset")
    keep = subsample(len(items), limit, seed)
    return Dataset(
        name=name or p.stem,
        path=str(p),
        field=key,
        items=tuple(items[i] for i in keep),
        total=len(items),
    )


def load_datasets(
    paths: Iterable[str | Path], *, field: str | None = None, limit: int | None = None, seed: int = 0
) -> list[Dataset]:
    """Load several datasets; ``limit`` applies to each. Names are made unique.

    Two files with the same stem (``a/test.json``, ``b/test.json``) are named after
    their parent folder too (``a/test``, ``b/test``).
    """
    paths = [Path(p).expanduser() for p in paths]
    if not paths:
        raise PrefalignError("no dataset given (CLI: --dataset PATH)", field="dataset")
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    if len(set(names)) != len(names):
        raise PrefalignError("the same dataset file is given twice", field="dataset")
    return [load_dataset(p, field=field, limit=limit, seed=seed, name=n) for p, n in zip(paths, names)]
