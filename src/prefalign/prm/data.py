"""Preference pairs for PRM training: reading, validation, tokenisation and the split.

A row is ``{preference, prompt, chosen, rejected}`` (extra fields are kept but
ignored, except the optional booleans ``chosen_complete`` / ``rejected_complete``: an
answer that was cut off by a token limit gets no end-of-turn token). ``preference`` is
a preset name (``"concise"``) or a sentence; it is resolved exactly as
:class:`~prefalign.Aligner` resolves it, so the PRM is trained on the very text that
decoding will show it. The prompt ids are
``encode_context(tokenizer, to_chat(prompt), preference_text, "pad")`` (PAD's
guideline template inside the chat template); the answer's tokens follow.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PrefalignError
from ..prompts import encode_context, parse_preferences, to_chat

REQUIRED_FIELDS = ("preference", "prompt", "chosen", "rejected")


def load_pair_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a JSONL file, a JSON list, or a ``datasets`` dataset saved on disk."""
    path = Path(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError as exc:
            raise PrefalignError(
                f"{path} is a directory: reading a `datasets` dataset needs `pip install datasets` "
                "(or export it to JSONL)",
                field="data",
            ) from exc
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise PrefalignError(f"{path} holds splits {list(ds)}; expected a 'train' split", field="data")
            ds = ds["train"]
        rows = [dict(r) for r in ds]
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PrefalignError(f"{path}:{n}: not a JSON line ({exc})", field="data") from exc
    else:
        raise PrefalignError(f"pair data not found: {path}", field="data")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise PrefalignError(f"{path}: row {n} is not an object", field="data")
        for key in REQUIRED_FIELDS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise PrefalignError(f"{path}: row {n} needs a non-empty string {key!r}", field="data")
    if not rows:
        raise PrefalignError(f"{path} holds no pairs", field="data")
    return rows


@dataclass
class PairExample:
    """One tokenised pair."""

    index: int
    preference: str  # as given (a preset name or a sentence)
    preference_text: str  # what the PRM sees
    prompt: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def group(self) -> str:
        """Pairs of one prompt stay on one side of the train/held-out split."""
        return self.prompt.strip().lower()


def _answer_ids(tokenizer: Any, text: str, complete: bool, max_tokens: int, eos: int | None) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) > max_tokens:
        return ids[:max_tokens]
    if complete and eos is not None:
        ids.append(eos)
    return ids


def encode_pairs(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    template: str = "pad",
    max_prompt_tokens: int = 256,
    max_answer_tokens: int = 128,
) -> tuple[list[PairExample], dict[str, int]]:
    """Tokenise rows; returns the examples and counts of rows dropped (by reason)."""
    eos = tokenizer.eos_token_id
    out: list[PairExample] = []
    dropped: dict[str, int] = {}
    cache: dict[str, str] = {}
    for i, row in enumerate(rows):
        pref = row["preference"]
        if pref not in cache:
            parsed = parse_preferences(pref)
            if len(parsed) != 1:
                raise PrefalignError(f"row {i + 1}: give one preference per row, got {pref!r}", field="data")
            cache[pref] = parsed[0].text
        text = cache[pref]
        prompt_ids = encode_context(tokenizer, to_chat(row["prompt"]), text, template)
        if len(prompt_ids) > max_prompt_tokens:
            dropped["prompt_too_long"] = dropped.get("prompt_too_long", 0) + 1
            continue
        chosen = _answer_ids(tokenizer, row["chosen"], bool(row.get("chosen_complete", True)), max_answer_tokens, eos)
        rejected = _answer_ids(tokenizer, row["rejected"], bool(row.get("rejected_complete", True)), max_answer_tokens, eos)
        if chosen == rejected or not chosen or not rejected:
            dropped["identical_after_truncation"] = dropped.get("identical_after_truncation", 0) + 1
            continue
        out.append(PairExample(i, pref, text, row["prompt"], prompt_ids, chosen, rejected))
    if not out:
        raise PrefalignError(f"no usable pairs (dropped: {dropped})", field="data")
    return out, dropped


def split_pairs(examples: Sequence[PairExample], held_out: float, seed: int) -> tuple[list[PairExample], list[PairExample]]:
    """Split by prompt (all pairs of a prompt on one side), deterministically for ``seed``."""
    if not 0 <= held_out < 1:
        raise PrefalignError(f"held_out must be in [0, 1), got {held_out}", field="held_out")
    groups = sorted({e.group for e in examples})
    random.Random(seed).shuffle(groups)
    n_eval = round(len(groups) * held_out)
    if held_out > 0 and n_eval == 0 and len(groups) > 1:
        n_eval = 1
    eval_groups = set(groups[:n_eval])
    train = [e for e in examples if e.group not in eval_groups]
    evals = [e for e in examples if e.group in eval_groups]
    if not train:
        raise PrefalignError("no training pairs left after the held-out split; lower held_out", field="held_out")
    return train, evals


def examples_digest(examples: Sequence[PairExample]) -> str:
    """A hash of the tokenised pairs (checkpoints refuse to resume on other data)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.prompt_ids, e.chosen_ids, e.rejected_ids)).encode())
    return h.hexdigest()[:16]
