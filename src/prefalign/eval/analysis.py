"""The analysis of an evaluation: results rows → the numbers a report shows.

:func:`analyse` reads the rows of a results directory (and its config) into an
:class:`Analysis`: mean scores per preference × variant (:class:`ScoreCell`), win rates
against ``pref`` and ``base`` (:class:`WinRate`, with the best-possible
:class:`Ceiling`), fluency, speed and the collapse verdicts (:func:`mark_collapse`).
Rendering it is :mod:`prefalign.eval.report` (Markdown) and :mod:`prefalign.eval.plots`
(PNG), which both read an :class:`Analysis` and nothing else.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PrefalignError
from .stats import (
    REFERENCES,
    both_cut_by_length,
    bootstrap_ci,
    reachable_outcome,
    win_outcome,
)




@dataclass
class WinRate:
    """Win rate of a variant against a reference over matched prompts."""

    rate: float
    low: float
    high: float
    n: int
    excluded: int  # pairs left out because either answer collapsed

    def cell(self) -> str:
        if self.n == 0:
            return "–"
        return f"{self.rate:.2f} [{self.low:.2f}, {self.high:.2f}]"


@dataclass
class Ceiling:
    """The highest win rate any answer could reach against a reference, given its answers.

    ``rate`` averages :func:`reachable_outcome` over the reference's ``n`` uncollapsed,
    scored answers (the pairs a method that never collapses would be compared on), of
    which ``capped`` can only be tied. ``early_wins`` / ``early_pairs``: of the measured
    pairs where the reference filled the budget under a length-rewarding judge and the
    method's answer stopped early, how many the answer still won (more words in fewer
    tokens): the exception to the bound.
    """

    n: int
    capped: int
    early_wins: int = 0
    early_pairs: int = 0

    @property
    def rate(self) -> float:
        return 1.0 - 0.5 * self.capped / self.n if self.n else math.nan

    def __add__(self, other: Ceiling) -> Ceiling:
        return Ceiling(self.n + other.n, self.capped + other.capped, self.early_wins + other.early_wins,
                       self.early_pairs + other.early_pairs)


@dataclass
class ScoreCell:
    """Mean judge score of one preference × variant (collapsed rows left out)."""

    mean: float
    low: float
    high: float
    n: int
    collapsed: int
    values: list[float] = field(default_factory=list, repr=False)


@dataclass
class Analysis:
    """Everything the report and the plots show, computed once from the rows."""

    rows: list[dict[str, Any]]
    config: dict[str, Any]
    preferences: list[str]
    variants: list[str]
    datasets: list[str]
    judges: dict[str, dict[str, Any]]  # preference -> {name, direction, units}
    scores: dict[tuple[str, str], ScoreCell]  # (preference, variant)
    scores_by_dataset: dict[tuple[str, str, str], ScoreCell]  # (dataset, preference, variant)
    wins: dict[str, dict[tuple[str, str], WinRate]]  # reference -> (preference, variant) -> WinRate
    wins_all: dict[str, dict[str, WinRate]]  # reference -> variant -> pooled WinRate
    wins_all_raw: dict[str, dict[str, WinRate]]  # the same, collapsed answers included (judge only)
    ceilings: dict[str, dict[str, Ceiling]]  # reference -> preference (and "*all*") -> Ceiling
    fluency: dict[str, dict[str, float]]  # variant -> measure -> value
    fluency_by_pref: dict[tuple[str, str], dict[str, float]]
    speed: dict[str, dict[str, float]]
    collapsed_rows: list[dict[str, Any]]
    method_of: dict[str, str]  # variant -> method
    sweep_of: dict[str, dict[str, Any]]  # variant -> swept params


def _order(seen: Sequence[str], preferred: Sequence[str] = ()) -> list[str]:
    present = set(seen)
    out = list(dict.fromkeys(p for p in preferred if p in present))  # several runs list the same names
    return out + [s for s in dict.fromkeys(seen) if s not in out]


def mark_collapse(rows: list[dict[str, Any]]) -> None:
    """Recompute each row's collapse verdict with the perplexity-ratio rule.

    The reference perplexity is that of the ``base`` answer to the same prompt (same
    dataset, prompt id and template when available). Sets ``row["collapsed"]`` and
    ``row["collapse_reasons"]`` in place.
    """
    from ..prompts import PAD_GUIDELINE_TEMPLATE
    from .guards import guard_report, instruction_leak

    guideline = PAD_GUIDELINE_TEMPLATE.split("{")[0]  # the fixed words PAD's template shows before the principle
    ref: dict[tuple[Any, ...], float] = {}
    for r in rows:
        ppl = (r.get("guards") or {}).get("perplexity")
        if r.get("method") == "base" and not r.get("sweep") and ppl is not None:
            ref.setdefault((r["dataset"], r["prompt_id"], r.get("template")), ppl)
            ref.setdefault((r["dataset"], r["prompt_id"]), ppl)
    for r in rows:
        g = r.get("guards") or {}
        reference = ref.get((r["dataset"], r["prompt_id"], r.get("template")), ref.get((r["dataset"], r["prompt_id"])))
        ppl = g.get("perplexity")
        report = guard_report(
            r.get("text", ""),
            finish_reason=r.get("finish_reason"),
            perplexity=ppl if ppl is not None else None,
            reference_perplexity=reference,
        )
        r["collapsed"] = report.collapsed
        r["collapse_reasons"] = "; ".join(report.reasons)
        r["perplexity_ratio"] = report.perplexity_ratio
        # Not a collapse (the answer may be fluent), but not an answer either: counted apart.
        r["instruction_leak"] = instruction_leak(r.get("text", ""), [r.get("preference_text") or "", guideline])


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _score_cell(rows: Sequence[dict[str, Any]], seed: int) -> ScoreCell:
    kept = [r for r in rows if not r["collapsed"] and r.get("score") is not None]
    values = [float(r["score"]) for r in kept]
    lo, hi = bootstrap_ci(values, seed=seed) if values else (math.nan, math.nan)
    return ScoreCell(_mean(values), lo, hi, len(values), sum(1 for r in rows if r["collapsed"]), values)


def _win_rate(
    rows: Sequence[dict[str, Any]], reference: dict[tuple[str, str, str], dict[str, Any]], seed: int,
    *, include_collapsed: bool = False,
) -> WinRate:
    outcomes, clusters, excluded = [], [], 0
    for r in rows:
        ref = reference.get((r["preference"], r["dataset"], r["prompt_id"]))
        if ref is None or r.get("score") is None or ref.get("score") is None:
            continue
        if not include_collapsed and (r["collapsed"] or ref["collapsed"]):
            excluded += 1
            continue
        if both_cut_by_length(r, ref):
            outcomes.append(0.5)
        else:
            outcomes.append(win_outcome(float(r["score"]), float(ref["score"]), int(r.get("direction", 1))))
        clusters.append((r["dataset"], r["prompt_id"]))
    if not outcomes:
        return WinRate(math.nan, math.nan, math.nan, 0, excluded)
    lo, hi = bootstrap_ci(outcomes, clusters=clusters, seed=seed)
    return WinRate(_mean(outcomes), lo, hi, len(outcomes), excluded)


def _ceiling(rows: Sequence[dict[str, Any]], reference: dict[tuple[str, str, str], dict[str, Any]]) -> Ceiling:
    """The ceiling of one preference: ``rows`` are its other variants' answers."""
    comparable = [r for r in reference.values() if not r["collapsed"] and r.get("score") is not None]
    capped = {id(r) for r in comparable if reachable_outcome(r) < 1.0}
    early_pairs = early_wins = 0
    for row in rows:
        ref = reference.get((row["preference"], row["dataset"], row["prompt_id"]))
        if ref is None or id(ref) not in capped or row["collapsed"] or row.get("score") is None:
            continue
        if row.get("finish_reason") != "length":
            early_pairs += 1
            early_wins += win_outcome(float(row["score"]), float(ref["score"]), int(row.get("direction", 1))) == 1.0
    return Ceiling(len(comparable), len(capped), early_wins, early_pairs)


def _unique_generations(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # base answers are shared by every preference: count each answer once.
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r.get("generation") or id(r), r)  # type: ignore[arg-type]
    return list(seen.values())


def _fluency(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    gens = _unique_generations(rows)
    ppl = [r["guards"]["perplexity"] for r in gens if (r.get("guards") or {}).get("perplexity") is not None]
    ratios = [r["perplexity_ratio"] for r in gens if r.get("perplexity_ratio") is not None]
    g = [r.get("guards") or {} for r in gens]
    return {
        "answers": len(gens),
        "tokens": _mean([r.get("completion_tokens", 0) for r in gens]),
        "perplexity": statistics.median(ppl) if ppl else math.nan,
        "perplexity_ratio": statistics.median(ratios) if ratios else math.nan,
        "repetition": _mean([x.get("repetition_4", 0.0) for x in g]),
        "non_dictionary": _mean([x.get("non_dictionary_share", 0.0) for x in g]),
        "truncated": _mean([1.0 if r.get("finish_reason") == "length" else 0.0 for r in gens]),
        "collapsed": _mean([1.0 if r["collapsed"] else 0.0 for r in gens]),
        "leaked": _mean([1.0 if r.get("instruction_leak") else 0.0 for r in gens]),
    }


def _speed(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    gens = _unique_generations(rows)
    tokens = sum(r.get("completion_tokens", 0) for r in gens)
    # Throughput: tokens over the wall time of the batches that produced them (rows of
    # one batch decode concurrently, so per-answer seconds overlap).
    walls: dict[str, float] = {}
    for r in gens:
        b = r.get("batch") or {}
        if b.get("id") is not None and b.get("elapsed") is not None:
            walls[b["id"]] = max(walls.get(b["id"], 0.0), float(b["elapsed"]))
    wall = sum(walls.values())
    latency = [r["seconds"] for r in gens if r.get("seconds") is not None]
    passes = sum(r.get("forward_passes", 0) for r in gens)
    return {
        "answers": len(gens),
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "answers_per_min": 60 * len(gens) / wall if wall > 0 else math.nan,
        "latency": _mean(latency),
        "passes_per_token": passes / tokens if tokens else math.nan,
    }


def analyse(rows: list[dict[str, Any]], config: dict[str, Any] | None = None, *, seed: int = 0) -> Analysis:
    """Compute the report's tables from results rows (marks collapse on the rows)."""
    if not rows:
        raise PrefalignError("no results rows to report on", field="dir")
    mark_collapse(rows)
    config = config or {}
    runs = config.get("runs") or []
    planned_prefs = [p for run in runs for p in run.get("preferences", [])]
    planned_variants = [v for run in runs for v in run.get("variants", [])]
    preferences = _order([r["preference"] for r in rows], planned_prefs)
    variants = _order([r["variant"] for r in rows], planned_variants)
    planned_datasets = [d["name"] for run in runs for d in run.get("datasets", [])]
    datasets = _order([r["dataset"] for r in rows], planned_datasets)
    method_of = {r["variant"]: r["method"] for r in rows}
    sweep_of = {r["variant"]: r.get("sweep") or {} for r in rows}
    judges: dict[str, dict[str, Any]] = {}
    for r in rows:
        judges.setdefault(r["preference"], {"name": r.get("judge"), "direction": r.get("direction", 1)})
    _add_judge_units(judges)

    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    cells_ds: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["preference"], r["variant"])].append(r)
        cells_ds[(r["dataset"], r["preference"], r["variant"])].append(r)
    scores = {k: _score_cell(v, seed) for k, v in cells.items()}
    scores_ds = {k: _score_cell(v, seed) for k, v in cells_ds.items()}

    wins: dict[str, dict[tuple[str, str], WinRate]] = {}
    wins_all: dict[str, dict[str, WinRate]] = {}
    wins_all_raw: dict[str, dict[str, WinRate]] = {}
    ceilings: dict[str, dict[str, Ceiling]] = {}
    for ref_name in REFERENCES:
        if ref_name not in variants:
            continue
        reference = {(r["preference"], r["dataset"], r["prompt_id"]): r for r in rows if r["variant"] == ref_name}
        ceilings[ref_name] = {
            p: _ceiling([r for v in variants if v != ref_name for r in cells.get((p, v), ())],
                        {k: r for k, r in reference.items() if k[0] == p})
            for p in preferences
        }
        ceilings[ref_name]["*all*"] = sum(ceilings[ref_name].values(), Ceiling(0, 0))
        wins[ref_name] = {
            (p, v): _win_rate(cells[(p, v)], reference, seed)
            for p in preferences for v in variants if v != ref_name and (p, v) in cells
        }
        wins_all[ref_name] = {
            v: _win_rate([r for r in rows if r["variant"] == v], reference, seed) for v in variants if v != ref_name
        }
        wins_all_raw[ref_name] = {
            v: _win_rate([r for r in rows if r["variant"] == v], reference, seed, include_collapsed=True)
            for v in variants if v != ref_name
        }

    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_variant[r["variant"]].append(r)
    fluency = {v: _fluency(by_variant[v]) for v in variants}
    fluency_by_pref = {k: _fluency(v) for k, v in cells.items()}
    speed = {v: _speed(by_variant[v]) for v in variants}
    collapsed_rows = [r for r in rows if r["collapsed"]]
    return Analysis(
        rows=rows, config=config, preferences=preferences, variants=variants, datasets=datasets, judges=judges,
        scores=scores, scores_by_dataset=scores_ds, wins=wins, wins_all=wins_all, wins_all_raw=wins_all_raw,
        ceilings=ceilings,
        fluency=fluency,
        fluency_by_pref=fluency_by_pref, speed=speed, collapsed_rows=collapsed_rows, method_of=method_of,
        sweep_of=sweep_of,
    )


def _add_judge_units(judges: dict[str, dict[str, Any]]) -> None:
    try:
        from .judges import judges_for
    except ImportError:  # pragma: no cover - judges are part of the package
        return
    for pref, info in judges.items():
        try:
            found = judges_for(pref, backend="keywords")  # never loads a model just for a label
        except Exception:
            continue
        info["units"] = found[0].units
        info["combined"] = len(found) > 1
