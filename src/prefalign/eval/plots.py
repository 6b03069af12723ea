"""Plots of an evaluation (matplotlib, PNG), drawn from a :class:`~prefalign.eval.analysis.Analysis`.

- ``scores_by_preference.png``: one panel per preference, a bar per method with its
  95% bootstrap interval (judges have different units, so panels do not share axes);
- ``win_rates.png``: win rate against ``pref`` and ``base`` per preference, with intervals;
- ``sweep_<method>.png``: for a method run at several strengths, the preference score
  against the answers' perplexity (a preference-vs-fluency curve), one panel per
  preference, with ``base`` and ``pref`` as reference points.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot), so no
global backend or GUI is involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from .analysis import Analysis

_ARROW = {1: "↑", -1: "↓"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _colors(variants: Sequence[str], a: Analysis) -> dict[str, Any]:
    """One colour per variant; variants of one method share a hue family."""
    from matplotlib import colormaps

    fixed = {"base": "#7f7f7f", "pref": "#1f77b4", "beam": "#9467bd", "la": "#ff7f0e", "amulet": "#2ca02c", "pad": "#d62728"}
    ramps = {"la": "Oranges", "amulet": "Greens", "pad": "Reds", "beam": "Purples", "pref": "Blues", "base": "Greys"}
    by_method: dict[str, list[str]] = {}
    for v in variants:
        by_method.setdefault(a.method_of.get(v, v), []).append(v)
    out: dict[str, Any] = {}
    other = colormaps["tab10"]
    for i, (method, vs) in enumerate(by_method.items()):
        if len(vs) == 1:
            out[vs[0]] = fixed.get(method, other(i % 10))
        else:
            ramp = colormaps[ramps.get(method, "viridis")]
            for k, v in enumerate(vs):
                out[v] = ramp(0.4 + 0.55 * k / max(len(vs) - 1, 1))
    return out


def _finite(x: float) -> bool:
    return x is not None and not math.isnan(x)


def plot_scores(a: Analysis, path: Path) -> Path:
    """Per-preference panels: mean judge score per method with 95% intervals."""
    prefs = a.preferences
    ncols = min(4, len(prefs))
    nrows = math.ceil(len(prefs) / ncols)
    fig = _figure(max(3.3 * ncols, 6.0), 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = _colors(a.variants, a)
    positions = list(range(len(a.variants)))  # every panel keeps every method's slot
    for i, p in enumerate(prefs):
        ax = axes[i // ncols][i % ncols]
        judge = a.judges.get(p, {})
        direction = int(judge.get("direction", 1))
        drawn: list[tuple[int, float]] = []
        for k, v in enumerate(a.variants):
            c = a.scores.get((p, v))
            if c is None:
                continue
            if not c.n:
                if c.collapsed:
                    ax.text(k, 0, "all\ncollapsed", ha="center", va="bottom", fontsize=6, color="#d62728")
                continue
            lo = max(c.mean - c.low, 0) if _finite(c.low) else 0
            hi = max(c.high - c.mean, 0) if _finite(c.high) else 0
            ax.bar([k], [c.mean], color=colors[v], yerr=[[lo], [hi]], capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": "#333333"})
            if c.collapsed:  # beyond the error bar's end, so that the two do not overlap
                up = c.mean >= 0
                ax.annotate(f"†{c.collapsed}", (k, c.mean + hi if up else c.mean - lo), fontsize=6, ha="center",
                            va="bottom" if up else "top", xytext=(0, 2 if up else -2),
                            textcoords="offset points", color="#d62728")
            drawn.append((k, c.mean))
        if drawn:  # outline the best bar(s), ties included, as the table bolds them
            best = max(direction * m for _, m in drawn)
            tied = [(k, m) for k, m in drawn if math.isclose(direction * m, best, rel_tol=0, abs_tol=1e-12)]
            ax.bar([k for k, _ in tied], [m for _, m in tied], fill=False, edgecolor="black", linewidth=1.8)
        ax.set_xticks(positions, a.variants, rotation=40, ha="right", fontsize=7)
        units = str(judge.get("units", ""))
        ax.set_title(f"{p}\n{judge.get('name', '')} ({_ARROW.get(direction, '')} better)", fontsize=9)
        ax.set_ylabel(units if len(units) < 30 else units[:28] + "…", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top + 0.12 * (top - bottom))  # room above the whiskers for the †k marks
    for j in range(len(prefs), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.suptitle("Mean judge score per method, 95% bootstrap interval\n"
                 "outlined: best in panel; collapsed answers left out (†k: k left out)", fontsize=9)
    fig.savefig(path)
    return path


def plot_win_rates(a: Analysis, path: Path) -> Path | None:
    """Win rate against each reference (pref, base) per preference, with intervals (dot plot)."""
    refs = [r for r in ("pref", "base") if r in a.wins]
    if not refs:
        return None
    groups = [*a.preferences, "all"]
    fig = _figure(max(6.0, 0.75 * len(groups) + 3.0), 2.8 * len(refs) + 0.9)
    axes = fig.subplots(len(refs), 1, squeeze=False)
    colors = _colors(a.variants, a)
    any_ceiling = False
    for row, ref in enumerate(refs):
        ax = axes[row][0]
        # pref-vs-base is 1 − base-vs-pref (drawn in the pref panel): not drawn twice, mirrored.
        mirrored = [r for r in refs[:row] if r != ref]
        variants = [v for v in a.variants if v != ref and v not in mirrored]
        step = 0.7 / max(len(variants), 1)
        drawn = 0
        for k, v in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for g, p in enumerate(groups):
                w = a.wins_all[ref].get(v) if p == "all" else a.wins[ref].get((p, v))
                if w is None or not w.n:
                    continue
                xs.append(g - 0.35 + step * (k + 0.5))
                ys.append(w.rate)
                lo.append(max(w.rate - w.low, 0))
                hi.append(max(w.high - w.rate, 0))
            drawn += len(xs)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", markersize=4.5, capsize=2, elinewidth=1,
                        color=colors[v], label=v)
        if not drawn:
            ax.text((len(groups) - 1) / 2, 0.5, f"no pairs to compare with {ref}: every pair had a collapsed answer",
                    ha="center", va="center", fontsize=8, color="#d62728")
        ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
        label = "best possible"  # the best any answer could reach, where below 1 (see Ceiling)
        for g, p in enumerate(groups):
            c = a.ceilings.get(ref, {}).get("*all*" if p == "all" else p)
            if c is not None and c.capped and c.rate < 1 - 1e-9:
                ax.hlines(c.rate, g - 0.42, g + 0.42, color="black", linewidth=2.2, label=label, zorder=3)
                label = None
                any_ceiling = True
        ax.axvline(len(a.preferences) - 0.5, color="#999999", linewidth=0.6)
        for g in range(1, len(groups), 2):  # shade every other group so dots read as groups
            ax.axvspan(g - 0.5, g + 0.5, color="#f2f2f2", zorder=0)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_ylim(-0.06, 1.08)  # a point or bar at 0 or 1 stays clear of the frame
        ylabel = f"win rate vs {ref}"
        if mirrored:
            ylabel += f"\n({', '.join(mirrored)}: 1 − the panel above)"
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        if drawn or label is None:
            longest = max((len(v) for v in variants), default=0)
            per_row = 6 if longest <= 12 else 4 if longest <= 24 else 2  # long variant names: fewer per row, none cut
            ax.legend(fontsize=7, ncols=min(len(variants) + 1, per_row), loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    fig.suptitle("Win rate by the preference's judge: ties count half, 95% bootstrap interval over prompts,\n"
                 "collapsed pairs left out; 0.5 (dashed) = no effect" + ("; black bar: best possible" if any_ceiling else ""),
                 fontsize=9)
    fig.savefig(path)
    return path


def _sweep_value(a: Analysis, v: str) -> tuple[Any, ...]:
    s = a.sweep_of.get(v) or {}
    return tuple(s[k] for k in sorted(s))


def plot_sweep(a: Analysis, method: str, path: Path) -> Path | None:
    """Preference score vs perplexity for the variants of one swept method."""
    variants = sorted((v for v in a.variants if a.method_of.get(v) == method), key=lambda v: _sweep_value(a, v))
    if len(variants) < 2:
        return None
    refs = [r for r in ("base", "pref") if r in a.variants and r not in variants]
    prefs = a.preferences
    ncols = min(4, len(prefs))
    nrows = math.ceil(len(prefs) / ncols)
    fig = _figure(3.3 * ncols, 2.9 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, p in enumerate(prefs):
        ax = axes[i // ncols][i % ncols]
        judge = a.judges.get(p, {})
        direction = int(judge.get("direction", 1))
        xs, ys, err, missing = [], [], [[], []], []
        for v in variants:
            c, f = a.scores.get((p, v)), a.fluency_by_pref.get((p, v))
            if c is None or f is None or not c.n or not _finite(f["perplexity"]):
                if c is not None and c.collapsed and not c.n:
                    missing.append(",".join(str(x) for x in _sweep_value(a, v)))
                continue
            xs.append(f["perplexity"])
            ys.append(c.mean)
            err[0].append(max(c.mean - c.low, 0) if _finite(c.low) else 0)
            err[1].append(max(c.high - c.mean, 0) if _finite(c.high) else 0)
            label = ",".join(str(x) for x in _sweep_value(a, v))
            collapsed = f"†{c.collapsed}" if c.collapsed else ""
            ax.annotate(label + collapsed, (f["perplexity"], c.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, linewidth=1.2, capsize=2, color="#2ca02c" if method == "amulet" else "#ff7f0e", label=method)
        for ref, marker in zip(refs, ("s", "^")):
            c, f = a.scores.get((p, ref)), a.fluency_by_pref.get((p, ref))
            if c is not None and f is not None and c.n and _finite(f["perplexity"]):
                ax.plot([f["perplexity"]], [c.mean], marker=marker, color="black" if ref == "base" else "#1f77b4", linestyle="none", label=ref)
        if missing:
            ax.text(0.02, 0.02, f"all collapsed: {'; '.join(missing)}", transform=ax.transAxes, fontsize=6,
                    color="#d62728", va="bottom")
        ax.set_title(f"{p}: {judge.get('name', '')} ({_ARROW.get(direction, '')} better)", fontsize=8)
        ax.set_xlabel("median perplexity of answers", fontsize=7)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6, frameon=False, loc="best")
    for j in range(len(prefs), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    swept = ",".join(sorted({k for v in variants for k in a.sweep_of.get(v, {})}))
    fig.suptitle(f"{method}: preference score vs perplexity as {swept} grows (labels: {swept}; †k: k collapsed answers left out)", fontsize=9)
    fig.savefig(path)
    return path


def make_plots(a: Analysis, out: Path) -> list[Path]:
    """Draw every plot the analysis supports into ``out``; return the files written."""
    out = Path(out)
    made: list[Path | None] = [plot_scores(a, out / "scores_by_preference.png"), plot_win_rates(a, out / "win_rates.png")]
    methods = dict.fromkeys(a.method_of[v] for v in a.variants)
    for m in methods:
        made.append(plot_sweep(a, m, out / f"sweep_{m}.png"))
    return [p for p in made if p is not None]
