"""Report sections for runs judged by several judges: win rates per judge, agreement.

Every judge gets its own columns, named, so no number is ever shown without the judge
that produced it: ``proxy`` (the offline judge of each preference, docs/judges.md), a
reward model (``rm:...``; a pair is won by the answer with the higher score), a pairwise
LLM judge (``llm:...``; its verdict, both orders combined). The pairs are those of the
main win-rate tables: each method's answer against the reference's (``pref``, ``base``)
to the same prompt under the same preference, collapsed answers left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PROXY", "Comparison", "compare_judges", "judge_sections", "spearman"]

PROXY = "proxy"


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan with < 3 points or a constant."""
    import numpy as np

    if len(xs) != len(ys) or len(xs) < 3:
        return math.nan

    def ranks(v: Sequence[float]) -> Any:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="mergesort")
        r = np.empty(len(a))
        sorted_a = a[order]
        i = 0
        while i < len(a):
            j = i
            while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass
class Comparison:
    """Per-judge outcomes on every (preference, dataset, prompt, variant, reference) pair."""

    judges: list[str]
    kinds: dict[str, str]
    outcomes: dict[str, dict[tuple[Any, ...], float]]  # judge -> pair -> 1 / 0.5 / 0
    scores: dict[str, dict[int, float]]  # judge -> id(row) -> aligned score (proxy, rm)
    rows: list[dict[str, Any]]
    unjudged: dict[str, dict[str, int]]  # judge -> status (malformed, error, ...) -> pairs


def _external_names(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    names: list[str] = list((config.get("judges") or {}).keys())
    for r in rows:
        for n in (r.get("judged") or {}):
            if n not in names:
                names.append(n)
    return names


def compare_judges(a: Any, *, include_collapsed: bool = False) -> Comparison | None:
    """Collect each judge's outcomes from an :class:`~prefalign.eval.analysis.Analysis`; None
    when no row carries an external judge. Pairs with a collapsed answer are left out
    unless ``include_collapsed``."""
    from .stats import REFERENCES, both_cut_by_length, win_outcome

    external = _external_names(a.rows, a.config)
    if not external:
        return None
    info = a.config.get("judges") or {}
    kinds = {PROXY: "proxy"}
    for n in external:
        kinds[n] = (info.get(n) or {}).get("kind") or ("llm" if n.startswith("llm:") else "rm")
    judges = [PROXY, *external]
    outcomes: dict[str, dict[tuple[Any, ...], float]] = {j: {} for j in judges}
    scores: dict[str, dict[int, float]] = {j: {} for j in judges if kinds[j] != "llm"}
    unjudged: dict[str, dict[str, int]] = {j: defaultdict(int) for j in judges}
    for r in a.rows:
        if r.get("collapsed") and not include_collapsed:
            continue
        if r.get("score") is not None:
            scores[PROXY][id(r)] = int(r.get("direction", 1)) * float(r["score"])
        for n in external:
            if kinds[n] == "rm":
                s = ((r.get("judged") or {}).get(n) or {}).get("score")
                if s is not None:
                    scores[n][id(r)] = float(s)
    for ref in REFERENCES:
        table = {(r["preference"], r["dataset"], r["prompt_id"]): r for r in a.rows if r["variant"] == ref}
        for r in a.rows:
            if r["variant"] == ref:
                continue
            other = table.get((r["preference"], r["dataset"], r["prompt_id"]))
            if other is None or (not include_collapsed and (r.get("collapsed") or other.get("collapsed"))):
                continue
            pair = (r["preference"], r["dataset"], r["prompt_id"], r["variant"], ref)
            if r.get("score") is not None and other.get("score") is not None:
                outcomes[PROXY][pair] = 0.5 if both_cut_by_length(r, other) else win_outcome(
                    float(r["score"]), float(other["score"]), int(r.get("direction", 1)))
            for n in external:
                if kinds[n] == "rm":
                    s, t = scores[n].get(id(r)), scores[n].get(id(other))
                    if s is not None and t is not None:
                        outcomes[n][pair] = win_outcome(s, t, 1)
                else:
                    entry = (((r.get("judged") or {}).get(n) or {}).get("vs") or {}).get(ref)
                    if entry is None:
                        continue  # a pair this judge was not asked about (vs=, methods=, only=)
                    if entry.get("outcome") is None:
                        unjudged[n][entry.get("status") or "no verdict"] += 1
                    else:
                        outcomes[n][pair] = float(entry["outcome"])
    return Comparison(judges, kinds, outcomes, scores, a.rows, {k: dict(v) for k, v in unjudged.items()})


def _rate_cell(values: list[float], clusters: list[Any], seed: int = 0) -> str:
    from .stats import bootstrap_ci

    if not values:
        return "–"
    lo, hi = bootstrap_ci(values, clusters=clusters, seed=seed)
    return f"{sum(values) / len(values):.2f} [{lo:.2f}, {hi:.2f}] (n={len(values)})"


def per_judge_win_table(c: Comparison, variants: Sequence[str], reference: str) -> list[str]:
    from .stats import _table

    header = ["method", *[f"`{j}`" for j in c.judges]]
    body = []
    for v in variants:
        if v == reference:
            continue
        cells = []
        for j in c.judges:
            got = [(o, (p[1], p[2])) for p, o in c.outcomes[j].items() if p[3] == v and p[4] == reference]
            cells.append(_rate_cell([o for o, _ in got], [k for _, k in got]))
        body.append([v, *cells])
    return _table(header, body)


def agreement_table(c: Comparison) -> list[str]:
    """Each pair of judges: pairs both decided, share agreeing on the outcome, and ρ."""
    from .stats import _table

    header = ["judge A", "judge B", "pairs", "same outcome", "same winner (no ties)", "Spearman ρ (answers)"]
    body = []
    for i, ja in enumerate(c.judges):
        for jb in c.judges[i + 1:]:
            common = [p for p in c.outcomes[ja] if p in c.outcomes[jb]]
            same = sum(1 for p in common if c.outcomes[ja][p] == c.outcomes[jb][p])
            decisive = [p for p in common if c.outcomes[ja][p] != 0.5 and c.outcomes[jb][p] != 0.5]
            same_dec = sum(1 for p in decisive if c.outcomes[ja][p] == c.outcomes[jb][p])
            rho = "–"
            if ja in c.scores and jb in c.scores:
                by_pref: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
                for r in c.rows:
                    k = id(r)
                    if k in c.scores[ja] and k in c.scores[jb]:
                        by_pref[r["preference"]][0].append(c.scores[ja][k])
                        by_pref[r["preference"]][1].append(c.scores[jb][k])
                rhos = [(spearman(x, y), len(x)) for x, y in by_pref.values()]
                rhos = [(r, n) for r, n in rhos if not math.isnan(r)]
                if rhos:
                    total = sum(n for _, n in rhos)
                    rho = f"{sum(r * n for r, n in rhos) / total:+.2f} (n={total})"
            body.append([
                f"`{ja}`", f"`{jb}`", str(len(common)),
                f"{same / len(common):.0%}" if common else "–",
                f"{same_dec / len(decisive):.0%} of {len(decisive)}" if decisive else "–",
                rho,
            ])
    return _table(header, body, "llrrrr")


def judges_table(c: Comparison, config: dict[str, Any]) -> list[str]:
    from .stats import _table

    info = config.get("judges") or {}
    body = []
    for j in c.judges:
        if j == PROXY:
            body.append([f"`{j}`", "offline proxy", "the preference's measure (see *Judges* below)", "–", "–"])
            continue
        d = info.get(j) or {}
        if c.kinds[j] == "rm":
            head = d.get("head") or {}
            what = (f"reward model, output {head.get('label', 'score')}, {d.get('mode', '?')} score, "
                    f"{d.get('format', '?')} input, preference {'in' if d.get('preference_in_prompt') else 'not in'} "
                    "the user turn")
            usage = "–"
        else:
            what = (f"pairwise LLM `{d.get('model', '?')}` at {d.get('base_url', '?')}, Amulet prompt, "
                    f"{'both orders' if d.get('order', 'swap') == 'swap' else 'one random order'}, "
                    f"temperature {d.get('temperature', 0)}, max {d.get('max_tokens', 5)} tokens")
            u = d.get("usage") or {}
            usage = f"{u.get('prompt_tokens', 0)} + {u.get('completion_tokens', 0)}" if u else "0"
        missing = c.unjudged.get(j) or {}
        body.append([f"`{j}`", c.kinds[j], what, usage,
                     ", ".join(f"{k} {n}" for k, n in sorted(missing.items())) or "–"])
    return _table(["judge", "kind", "what", "tokens (prompt + completion)", "pairs without outcome"], body, "lllrl")


def judge_sections(a: Any) -> list[str]:
    """Markdown lines of the judge comparison (empty when only the proxy judged)."""
    from .stats import REFERENCES

    c = compare_judges(a)
    if c is None:
        return []
    lines = [
        "",
        "## Judges compared",
        "",
        "The same pairs as the win-rate tables (collapsed answers left out), decided by each judge; column "
        "names are the judges. `proxy`: the preference's offline measure; `rm:`: a reward model (the higher "
        "score wins); `llm:`: a pairwise LLM verdict (both orders; disagreement is a tie). Pooled over "
        "preferences, 95% bootstrap interval over prompts.",
        "",
        *judges_table(c, a.config),
    ]
    for ref in REFERENCES:
        if ref not in a.variants:
            continue
        lines += ["", f"### Win rate against `{ref}`, per judge", "", *per_judge_win_table(c, a.variants, ref)]
    lines += [
        "",
        "### Agreement between judges",
        "",
        "Pairs both judges decided; *same outcome*: both say win, both tie or both loss; *same winner*: over "
        "pairs neither called a tie. Spearman ρ: rank correlation of the two judges' per-answer scores "
        "within each preference (proxy: direction × measure), averaged weighted by answers; LLM judges give "
        "no per-answer score (–).",
        "",
        *agreement_table(c),
    ]
    everything = compare_judges(a, include_collapsed=True)
    if everything is not None and sum(map(len, everything.outcomes.values())) > sum(map(len, c.outcomes.values())):
        lines += ["", "The same with collapsed answers included (a real judge sees them too):", "",
                  *agreement_table(everything)]
    return lines
