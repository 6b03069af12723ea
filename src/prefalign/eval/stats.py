"""Statistics and table helpers of the evaluation report, shared with the judges' report.

:mod:`~prefalign.eval.report` and :mod:`~prefalign.eval.judge_report` both use them;
living here, neither needs the other's module to compute a win rate
(tests/test_imports.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import PrefalignError

#: Reference variants that win rates compare against, in table order.
REFERENCES = ("pref", "base")
BOOTSTRAP_SAMPLES = 2000


# --- Statistics ----------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float],
    *,
    clusters: Sequence[Any] | None = None,
    stat: Callable[[Sequence[float]], float] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (default: the mean) of ``values``.

    ``clusters`` (one label per value) resamples whole clusters, e.g. all rows of one
    prompt, so that correlated values do not narrow the interval. Deterministic for a
    given ``seed``. Returns ``(nan, nan)`` for no values; one value gives a zero-width
    interval.
    """
    import numpy as np

    vals = np.asarray(values, dtype=float)
    if vals.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    if clusters is None:
        groups = [np.array([v]) for v in vals]
    else:
        if len(clusters) != len(vals):
            raise PrefalignError("clusters must label every value", field="clusters")
        by: dict[Any, list[float]] = defaultdict(list)
        for c, v in zip(clusters, vals):
            by[c].append(float(v))
        groups = [np.asarray(g) for g in by.values()]
    n = len(groups)
    picks = rng.integers(0, n, size=(samples, n))
    if stat is None and all(len(g) == 1 for g in groups):
        flat = np.array([g[0] for g in groups])
        stats = flat[picks].mean(axis=1)
    else:
        fn = stat or (lambda xs: float(np.mean(xs)))
        stats = np.array([fn(np.concatenate([groups[i] for i in row])) for row in picks])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def win_outcome(score: float, reference: float, direction: int) -> float:
    """1 if ``score`` beats ``reference`` in the judge's direction, 0.5 on a tie, else 0."""
    a, b = direction * score, direction * reference
    return 1.0 if a > b else 0.5 if a == b else 0.0


#: Judges that score an answer's length. An answer cut at ``max_new_tokens`` would have
#: gone on, so its length is only a lower bound (right-censored).
LENGTH_JUDGES = frozenset({"length_words"})


def both_cut_by_length(row: dict[str, Any], reference: dict[str, Any]) -> bool:
    """True when a length judge compares two answers that both hit the token budget.

    Their word counts then differ only by words per token, not by how long either
    answer wanted to be, so the pair counts as a tie.
    """
    return (
        row.get("judge") in LENGTH_JUDGES
        and row.get("finish_reason") == "length"
        and reference.get("finish_reason") == "length"
    )


def reachable_outcome(reference: dict[str, Any]) -> float:
    """The best outcome an answer within the same token budget can reach against ``reference``.

    Against a reference that filled the budget, a judge that rewards length cannot be
    beaten by an answer that fills it too (a tie, :func:`both_cut_by_length`); only an
    answer that stops early *and* has more words could win, which the report counts
    (:attr:`Ceiling.early_wins`). Every other judge can, in principle, always be beaten.
    """
    cut = reference.get("finish_reason") == "length"
    rewards_length = reference.get("judge") in LENGTH_JUDGES and int(reference.get("direction", 1)) > 0
    return 0.5 if cut and rewards_length else 1.0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines
