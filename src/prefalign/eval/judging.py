"""Adding judges to a results directory: reward models and pairwise LLM judges.

:func:`judge_run` runs extra judges over the rows of ``DIR/results.jsonl`` (written by
``prefalign eval``) without regenerating anything, and stores what they said in each
row under ``row["judged"][JUDGE_NAME]``:

- a reward-model judge (``rm:...``): ``{"score": float}`` for every row it applies to;
- a pairwise LLM judge (``llm:...``): ``{"vs": {REF: {"outcome": 1|0.5|0|None,
  "status": ..., "verdicts": [...]}}}`` on every row whose prompt has an answer of the
  reference method ``REF`` (``pref`` and ``base`` by default) under the same preference;
  ``outcome`` is from this row's point of view.

Judges are told apart by their ``name`` (which includes the model, the output head and
every option that changes a score), so rows never mix two judges' numbers. Work is
logged as it happens to ``DIR/judges/<name>.jsonl`` (appended, fsynced): an interrupted
judge resumes where it stopped, and a rerun (or a grown grid) judges only what is new.
``DIR/config.json`` gets a ``judges`` record per judge: what it is, calls, malformed
verdicts, errors, token usage and throughput. API keys are never written.

Spec strings: ``proxy`` (the offline judges every row already has), ``rm:PATH_OR_ID
[@HEAD][,opts]`` (:mod:`prefalign.eval.reward_models`), ``llm:BASE_URL[,opts]``
(:mod:`prefalign.eval.llm_judge`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrefalignError
from .llm_judge import PairwiseLLMJudge, Verdict, parse_llm_spec
from .reward_models import RewardModelJudge, check_rm_spec, parse_rm_spec
from .results import CONFIG_FILE, RESULTS_FILE, _dir_lock, _write_json, key_of, read_run

__all__ = ["JUDGES_DIR", "JudgeSummary", "build_judges", "check_judge_specs", "judge_preference", "judge_run"]

JUDGES_DIR = "judges"
PROXY = "proxy"


@dataclass
class JudgeSummary:
    """What one judge did in one :func:`judge_run` call."""

    name: str
    kind: str
    items: int = 0  # rows (rm) or pairs (llm) it applies to
    cached: int = 0  # of which already judged before this call
    judged: int = 0  # judged now
    calls: int = 0  # llm: requests sent now
    malformed: int = 0
    errors: int = 0
    seconds: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def per_minute(self) -> float:
        """Answers (rm) or pairs (llm) judged per minute in this call."""
        return 60.0 * self.judged / self.seconds if self.seconds > 0 else float("nan")


def _split_spec(spec: str) -> tuple[str, str]:
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.lower()
    if spec.strip().lower() == PROXY:
        return PROXY, ""
    if not sep or kind not in ("rm", "llm"):
        raise PrefalignError(
            f"unknown judge {spec!r}; write proxy, rm:PATH_OR_ID[@HEAD] or llm:BASE_URL (with --judge-model NAME)",
            field="judge",
        )
    return kind, rest


def _llm_models(specs: Sequence[str], models: Sequence[str]) -> list[str | None]:
    """``--judge-model`` values for the ``llm:`` specs: one for all, or one each in order."""
    n = sum(1 for s in specs if _split_spec(s)[0] == "llm")
    if not models:
        return [None] * n
    if len(models) == 1:
        return list(models) * n
    if len(models) != n:
        raise PrefalignError(
            f"{len(models)} --judge-model values for {n} llm judges; give one for all, or one per llm judge in order",
            field="judge_model",
        )
    return list(models)


def check_judge_specs(specs: Sequence[str], *, models: Sequence[str] = (), trust_remote_code: bool = False,
                      reach: bool = True) -> None:
    """Validate judge specs in seconds, before any decoding or weights: syntax, model
    config (and the custom-code opt-in), API key and endpoint reachability."""
    llm_models = iter(_llm_models(specs, models))
    for spec in specs:
        kind, rest = _split_spec(spec)
        if kind == "rm":
            check_rm_spec(rest, trust_remote_code=trust_remote_code)
        elif kind == "llm":
            judge = PairwiseLLMJudge(parse_llm_spec(rest, model=next(llm_models)))
            judge.client()  # raises without a key for a non-loopback URL
            if reach:
                judge.check_reachable()


def build_judges(specs: Sequence[str], *, models: Sequence[str] = (), trust_remote_code: bool = False,
                 device: str | None = None) -> list[Any]:
    """Judge objects for specs (``proxy`` gives none: every row already carries it)."""
    llm_models = iter(_llm_models(specs, models))
    out: list[Any] = []
    for spec in specs:
        kind, rest = _split_spec(spec)
        if kind == "rm":
            out.append(RewardModelJudge(parse_rm_spec(rest), trust_remote_code=trust_remote_code, device=device))
        elif kind == "llm":
            out.append(PairwiseLLMJudge(parse_llm_spec(rest, model=next(llm_models))))
    names = [j.name for j in out]
    if len(set(names)) != len(names):
        raise PrefalignError(f"a judge is given twice: {names}", field="judge")
    return out


def judge_preference(row: dict[str, Any]) -> str:
    """The preference as the judges read it: the text the model was given."""
    text = row.get("preference_text")
    if isinstance(text, list):
        return "; ".join(str(t) for t in text)
    return str(text or row.get("preference", ""))


def _slug(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_")[:80]
    return f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class _Log:
    """An append-only, fsynced JSONL log (the judge's cache)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []
        if path.is_file():
            with path.open("rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):  # a write cut short by a hard kill
                data = data[: data.rfind(b"\n") + 1]
                path.write_bytes(data)
            for line in data.decode("utf-8").splitlines():
                if line.strip():
                    try:
                        self.entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
        self.handle = path.open("a", encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        self.handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc[:30], unit="item", dynamic_ncols=True)


# --- reward models -------------------------------------------------------------------------


def _run_rm(judge: RewardModelJudge, rows: list[dict[str, Any]], log: _Log, summary: JudgeSummary,
            progress: bool) -> None:
    cached = {e["row"]: e["score"] for e in log.entries if "row" in e}
    todo: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
    for row in rows:
        if not judge.applies_to(row["preference"]):
            continue
        summary.items += 1
        key = key_of(row)
        have = (row.get("judged") or {}).get(judge.name)
        if key in cached or have is not None:
            summary.cached += 1
            if have is None:
                row.setdefault("judged", {})[judge.name] = {"score": cached[key]}
            continue
        pref = judge_preference(row) if judge.spec.preference else None
        todo.setdefault((row["prompt"], row.get("text") or "", pref), []).append(row)
    items = list(todo)
    bar = _progress(len(items), judge.name, progress)
    chunk = max(judge.spec.batch_size * 4, 1)
    started = time.perf_counter()
    try:
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            scores = judge.score_many(part)
            for item, score in zip(part, scores):
                for row in todo[item]:
                    log.append({"row": key_of(row), "score": score})
                    row.setdefault("judged", {})[judge.name] = {"score": score}
                    summary.judged += 1
            if bar is not None:
                bar.update(len(part))
    finally:
        summary.seconds += time.perf_counter() - started
        if bar is not None:
            bar.close()


# --- pairwise LLM judges ----------------------------------------------------------------------


def _pairs(judge: PairwiseLLMJudge, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
    """(row, reference name, reference row) for every pair the judge decides."""
    by_ref: dict[str, dict[tuple[str, str, str], dict[str, Any]]] = {}
    for ref in judge.spec.vs:
        by_ref[ref] = {(r["preference"], r["dataset"], str(r["prompt_id"])): r for r in rows if r.get("variant") == ref}
    out = []
    for row in rows:
        if not judge.applies_to(row["preference"]):
            continue
        if judge.spec.methods and row.get("variant") not in judge.spec.methods:
            continue
        for ref, table in by_ref.items():
            if row.get("variant") == ref:
                continue
            other = table.get((row["preference"], row["dataset"], str(row["prompt_id"])))
            if other is not None:
                out.append((row, ref, other))
    return out


def _run_llm(judge: PairwiseLLMJudge, rows: list[dict[str, Any]], log: _Log, summary: JudgeSummary,
             progress: bool) -> None:
    final = {e["call"]: e for e in log.entries if e.get("status") in ("ok", "malformed")}
    pairs = _pairs(judge, rows)
    plans = []
    calls: dict[str, list[dict[str, str]]] = {}
    for row, ref, other in pairs:
        summary.items += 1
        have = (((row.get("judged") or {}).get(judge.name) or {}).get("vs") or {}).get(ref)
        first, second = row.get("text") or "", other.get("text") or ""
        if first == second:
            plans.append((row, ref, None))
            summary.cached += have is not None
            continue
        pc = judge.pair_calls(f"{key_of(row)}|{key_of(other)}", row["prompt"], judge_preference(row), first, second)
        plans.append((row, ref, pc))
        summary.cached += all(c in final for c, _, _ in pc)  # decided before this call
        for call, messages, _ in pc:
            if call not in final:
                calls.setdefault(call, messages)
    bar = _progress(len(calls), judge.name, progress)
    started = time.perf_counter()
    new: dict[str, Verdict] = {}

    def on_verdict(v: Verdict) -> None:
        new[v.call] = v
        summary.calls += v.attempts
        for k, n in v.usage.items():
            summary.usage[k] = summary.usage.get(k, 0) + n
        if v.status in ("ok", "malformed"):
            log.append(v.as_dict())
            final[v.call] = v.as_dict()
        if bar is not None:
            bar.update(1)

    try:
        if calls:
            judge.check_reachable()
            judge.run_calls(calls.items(), on_verdict)
    finally:
        summary.seconds += time.perf_counter() - started
        if bar is not None:
            bar.close()
        # attach whatever is known, also after an interruption
        for row, ref, pc in plans:
            if pc is None:
                entry: dict[str, Any] = {"outcome": 0.5, "status": "identical", "verdicts": []}
            else:
                got = []
                for call, _, first_is_1 in pc:
                    e = final.get(call)
                    if e is None and call in new:
                        e = new[call].as_dict()
                    got.append((e, first_is_1))
                if any(e is None for e, _ in got):
                    continue  # not judged (yet): leave the row without it
                vs = [(Verdict(call=e["call"], status=e["status"], verdict=e.get("verdict")), f) for e, f in got]
                outcome, status = judge.combine(vs)
                entry = {"outcome": outcome, "status": status,
                         "verdicts": [{"verdict": e.get("verdict"), "first_is_text_1": f,
                                       **({"replies": e.get("replies")} if e.get("status") != "ok" else {})}
                                      for e, f in got]}
                summary.malformed += status == "malformed"
                summary.errors += status == "error"
            judged = row.setdefault("judged", {}).setdefault(judge.name, {"vs": {}})
            before = judged["vs"].get(ref)
            judged["vs"][ref] = entry
            if before is None and entry["status"] != "error":
                summary.judged += 1


# --- the directory ---------------------------------------------------------------------------


def _rewrite_results(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)  # atomic: a crash leaves the old file or the new one


def judge_run(directory: str | Path, judges: Sequence[Any], *, progress: bool = True) -> list[JudgeSummary]:
    """Run ``judges`` over a results directory; store verdicts in its rows (see the module doc).

    Resumable: what a judge said is logged as it arrives, so Ctrl-C loses at most the
    requests in flight (rm: the current chunk); rows get everything judged so far.
    """
    d = Path(directory).expanduser()
    results = d / RESULTS_FILE
    summaries: list[JudgeSummary] = []
    read_run(d)  # a directory without rows is refused before its lock is taken
    with _dir_lock(d):
        rows, config = read_run(d)  # read again under the lock
        try:
            for judge in judges:
                summary = JudgeSummary(name=judge.name, kind=judge.kind)
                summaries.append(summary)
                log = _Log(d / JUDGES_DIR / f"{_slug(judge.name)}.jsonl")
                try:
                    if judge.kind == "rm":
                        _run_rm(judge, rows, log, summary, progress)
                    else:
                        _run_llm(judge, rows, log, summary, progress)
                finally:
                    log.close()
                    record = config.setdefault("judges", {}).setdefault(judge.name, {})
                    record.update(judge.describe())
                    record["cache"] = f"{JUDGES_DIR}/{log.path.name}"
                    record.setdefault("runs", []).append({
                        "items": summary.items, "cached": summary.cached, "judged": summary.judged,
                        "calls": summary.calls, "malformed": summary.malformed, "errors": summary.errors,
                        "seconds": round(summary.seconds, 2), "usage": summary.usage,
                        **({"truncated_inputs": judge.truncated} if judge.kind == "rm" else {}),
                    })
                    total = record.setdefault("usage", {})
                    for k, n in summary.usage.items():
                        total[k] = total.get(k, 0) + n
        finally:
            _rewrite_results(results, rows)
            _write_json(d / CONFIG_FILE, config)
    return summaries
