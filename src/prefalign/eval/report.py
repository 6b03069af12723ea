"""Reports of an evaluation directory: ``report.md`` with paper-style tables, and plots.

:func:`write_report` reads ``DIR/results.jsonl`` and ``DIR/config.json`` and writes
``DIR/report.md`` plus PNG plots (see :mod:`prefalign.eval.plots`):

- **Scores**: preferences as rows, method variants as columns, the mean judge score
  (in the judge's units; the arrow says which way is better), best in bold.
- **Win rates** against ``pref`` and against ``base``: per prompt, does the method's
  answer score better (by the judge's direction) than the reference's answer to the
  same prompt under the same preference? Ties count half. 95% intervals by bootstrap
  over prompts. Where a reference's answers cap what any answer could reach (a length
  judge that rewards length, against answers that filled the token budget), a *best
  possible* column gives that ceiling.
- **Fluency**: perplexity under the model, repetition, non-dictionary share,
  truncation rate and collapsed share per method; **speed**: tokens/s per method.

Collapsed answers (see :mod:`prefalign.eval.guards`; the verdict is recomputed here
with the perplexity-ratio rule, using the ``base`` answer to the same prompt as the
reference) are left out of mean scores and win rates, counted, and listed.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .results import REPORT_FILE, read_run
from .stats import (  # re-exported: the report's statistics live in .stats
    BOOTSTRAP_SAMPLES,
    LENGTH_JUDGES,
    REFERENCES,
    _table,
    both_cut_by_length,
    bootstrap_ci,
    reachable_outcome,
    win_outcome,
)

from .analysis import (  # noqa: F401 (re-exported: report.X is where they were)
    Analysis,
    Ceiling,
    ScoreCell,
    WinRate,
    _mean,
    _unique_generations,
    analyse,
    mark_collapse,
)

# --- Markdown --------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    """A number with about three significant digits (``–`` for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    a = abs(value)
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.0f}%"


def _arrow(direction: int) -> str:
    return "↑" if direction >= 0 else "↓"


def score_table(a: Analysis, cells: dict[Any, ScoreCell], prefix: tuple[str, ...] = ()) -> list[str]:
    """Preferences × variants of mean scores; the best per row (by direction) in bold."""
    header = ["preference", "judge", *a.variants]
    body = []
    for p in a.preferences:
        j = a.judges.get(p, {})
        direction = int(j.get("direction", 1))
        row_cells = {v: cells.get((*prefix, p, v)) for v in a.variants}
        present = {v: c for v, c in row_cells.items() if c is not None and c.n > 0}
        if not any(c is not None for c in row_cells.values()):
            continue
        best = max((direction * c.mean for c in present.values()), default=None)
        out = []
        for v in a.variants:
            c = row_cells[v]
            if c is None:
                out.append("")
                continue
            text = fmt(c.mean) if c.n else "–"
            if best is not None and c.n and math.isclose(direction * c.mean, best, rel_tol=0, abs_tol=1e-12):
                text = f"**{text}**"
            if c.collapsed:
                text += f" †{c.collapsed}"
            out.append(text)
        body.append([p, f"{j.get('name', '?')} {_arrow(direction)}", *out])
    return _table(header, body, "ll" + "r" * len(a.variants))


def has_ceiling(a: Analysis, reference: str) -> bool:
    """True when some preference's win rate against ``reference`` cannot reach 1 (see :class:`Ceiling`)."""
    return any(c.capped for c in a.ceilings.get(reference, {}).values())


def _ceiling_cell(c: Ceiling | None) -> str:
    return "–" if c is None or not c.n else f"{c.rate:.2f}"


def win_table(a: Analysis, reference: str) -> list[str]:
    variants = [v for v in a.variants if v != reference]
    ceiling = has_ceiling(a, reference)
    header = ["preference", *variants, *(["best possible"] if ceiling else [])]
    body = []
    for p in a.preferences:
        row = []
        for v in variants:
            w = a.wins[reference].get((p, v))
            row.append("" if w is None else w.cell() + (f" †{w.excluded}" if w.excluded else ""))
        if ceiling:
            row.append(_ceiling_cell(a.ceilings[reference].get(p)))
        body.append([p, *row])
    pooled = []
    for v in variants:
        w = a.wins_all[reference][v]
        pooled.append(f"**{w.cell()}**" + (f" †{w.excluded}" if w.excluded else "") if w.n else "–")
    last = [f"{c} (n={a.wins_all[reference][v].n})" for c, v in zip(pooled, variants)]
    if ceiling:
        last.append(_ceiling_cell(a.ceilings[reference].get("*all*")))
    body.append(["*all (n pairs)*", *last])
    return _table(header, body)


def ceiling_note(a: Analysis, reference: str) -> list[str]:
    """What the ``best possible`` column means, with the counts behind it (empty when there is none)."""
    if not has_ceiling(a, reference):
        return []
    overall = a.ceilings[reference]["*all*"]
    per_preference = [(p, c) for p, c in a.ceilings[reference].items() if p != "*all*" and c.capped]
    capped = ", ".join(f"{p} {c.capped} of {c.n}" for p, c in per_preference)
    return [
        "",
        f"*Best possible*: the highest win rate any answer could reach against `{reference}`'s answers under these "
        f"rules. Where `{reference}`'s answer already filled the token budget under a judge that rewards length, a "
        f"longer answer does not fit in the budget and the best is a tie; `{reference}` filled it in {capped} "
        f"uncollapsed answers. (An answer that stops early could still win with more words in fewer tokens: "
        f"{overall.early_wins} of the {overall.early_pairs} measured such pairs did.)",
    ]


def fluency_table(a: Analysis) -> list[str]:
    header = ["method", "answers", "mean tokens", "median perplexity", "ppl / base", "repeated 4-grams",
              "non-dictionary words", "truncated", "collapsed", "about its instructions"]
    body = []
    for v in a.variants:
        f = a.fluency[v]
        body.append([v, str(int(f["answers"])), fmt(f["tokens"]), fmt(f["perplexity"]), fmt(f["perplexity_ratio"]),
                     _pct(f["repetition"]), _pct(f["non_dictionary"]), _pct(f["truncated"]), _pct(f["collapsed"]),
                     _pct(f["leaked"])])
    return _table(header, body)


def length_table(a: Analysis) -> list[str]:
    """Mean answer length in words per preference × method (all answers, collapsed included)."""
    header = ["preference", *a.variants]
    body = []
    for p in a.preferences:
        row = []
        for v in a.variants:
            ws = [r["guards"]["words"] for r in a.rows
                  if r["preference"] == p and r["variant"] == v and (r.get("guards") or {}).get("words") is not None]
            row.append(fmt(_mean(ws)) if ws else "")
        body.append([p, *row])
    return _table(header, body)


def speed_table(a: Analysis) -> list[str]:
    header = ["method", "answers", "tokens/s", "answers/min", "mean latency (s)", "forward passes / token"]
    body = []
    for v in a.variants:
        s = a.speed[v]
        body.append([v, str(int(s["answers"])), fmt(s["tokens_per_s"]), fmt(s["answers_per_min"]),
                     fmt(s["latency"]), fmt(s["passes_per_token"])])
    return _table(header, body)


def collapse_table(a: Analysis) -> list[str]:
    header = ["preference", *a.variants]
    body = []
    for p in a.preferences:
        row = []
        for v in a.variants:
            c = a.scores.get((p, v))
            row.append("" if c is None else f"{c.collapsed}/{c.collapsed + c.n + _missing(a, p, v)}")
        body.append([p, *row])
    return _table(header, body)


def collapse_reason_table(a: Analysis) -> list[str]:
    """Per method: how many distinct answers each guard rule flagged (an answer can trip several)."""
    rules = ("repetition", "non-words", "perplexity")
    header = ["method", "answers", *rules]
    body = []
    for v in a.variants:
        gens = _unique_generations([r for r in a.rows if r["variant"] == v])
        counts = [sum(1 for r in gens if rule + ":" in r.get("collapse_reasons", "")) for rule in rules]
        body.append([v, str(len(gens)), *map(str, counts)])
    return _table(header, body)


def _verdict(w: WinRate) -> str:
    if not w.n:
        return "no comparable pairs"
    if w.low > 0.5:
        return "better"
    if w.high < 0.5:
        return "worse"
    return "no clear difference"


def summary_lines(a: Analysis) -> list[str]:
    """Plain-language summary: each method against pref and base, and its length change."""
    lines = []
    base_tokens = a.fluency.get("base", {}).get("tokens")
    for v in a.variants:
        if v == "base":  # its win rate against pref is the mirror of pref's against base
            continue
        parts = []
        for ref in REFERENCES:
            if ref == v or ref not in a.wins_all:
                continue
            w, raw = a.wins_all[ref][v], a.wins_all_raw[ref][v]
            parts.append(f"vs `{ref}` {w.cell()} over {w.n} pairs: **{_verdict(w)}** "
                         f"(all rows, collapsed included: {raw.cell()})")
        if not parts:
            continue
        f = a.fluency[v]
        extra = ""
        if base_tokens and v != "base" and not math.isnan(f["tokens"]):
            change = f["tokens"] / base_tokens - 1
            extra = f"; answers {abs(change):.0%} {'shorter' if change < 0 else 'longer'} than base's"
        lines.append(f"- `{v}`: " + "; ".join(parts) + f"; collapsed {_pct(f['collapsed'])}{extra}.")
    return lines


def _missing(a: Analysis, p: str, v: str) -> int:
    # rows neither collapsed nor scored (a judge error): counted in the denominator
    return sum(1 for r in a.rows if r["preference"] == p and r["variant"] == v and not r["collapsed"] and r.get("score") is None)


def _examples(a: Analysis, per_variant: int = 3) -> list[dict[str, Any]]:
    """Collapsed answers to show: each distinct answer once, up to ``per_variant`` per method."""
    out: list[dict[str, Any]] = []
    for v in a.variants:
        gens = _unique_generations([r for r in a.collapsed_rows if r["variant"] == v])
        out.extend(gens[:per_variant])
    return out


def _thresholds() -> str:
    from .guards import DEFAULT_THRESHOLDS

    t = DEFAULT_THRESHOLDS
    return ", ".join(f"{k} {v}" for k, v in vars(t).items()) if hasattr(t, "__dict__") else str(t)


def _snippet(text: str, n: int = 160) -> str:
    t = " ".join(text.split()).replace("|", "\\|")
    return t if len(t) <= n else t[: n - 1] + "…"


def render_markdown(a: Analysis, plots: Sequence[Path] = (), *, title: str = "Evaluation report") -> str:
    """The report as Markdown (plots linked by file name, relative to the report)."""
    cfg = a.config
    runs = cfg.get("runs") or []
    settings = cfg.get("settings") or {}
    model = next((r.get("model") for r in reversed(runs) if r.get("model")), settings.get("model", "?"))
    lines = [f"# {title}", ""]
    n_prompts = {d: len({r["prompt_id"] for r in a.rows if r["dataset"] == d}) for d in a.datasets}
    lines += [
        f"- **Model:** {model}; max_new_tokens {settings.get('max_new_tokens', '?')}, "
        f"template {settings.get('template') or 'each method’s default'}, greedy decoding.",
        f"- **Datasets (prompts):** " + ", ".join(f"{d} ({n})" for d, n in n_prompts.items()),
        f"- **Preferences:** {', '.join(a.preferences)}",
        f"- **Methods:** {', '.join(a.variants)}",
        f"- **Rows:** {len(a.rows)}; collapsed: {len(a.collapsed_rows)} "
        f"({_pct(len(a.collapsed_rows) / len(a.rows))}).",
    ]
    planned = runs[-1].get("rows_planned") if runs else None
    if runs and any(r.get("status") != "finished" for r in runs[-1:]):
        lines.append(f"- **Incomplete:** the last run's status is *{runs[-1].get('status')}*; rerun its command to resume.")
    elif planned and planned > len(a.rows) and len(runs) == 1:
        lines.append(f"- **Incomplete:** {len(a.rows)} of {planned} planned rows.")
    if runs:
        commands = [shlex.join(r["argv"]) if r.get("argv") else r.get("command") for r in runs]
        lines += ["", "Commands (in order; each resumes the same directory):", "", "```sh",
                  *dict.fromkeys(c for c in commands if c), "```"]
    summary = summary_lines(a)
    if summary:
        lines += [
            "",
            "## Summary",
            "",
            "Pooled win rate over all preferences and prompts (95% interval; \"better\"/\"worse\" only when the "
            "interval excludes 0.5):",
            "",
            *summary,
        ]
        prompts = len({(r["dataset"], r["prompt_id"]) for r in a.rows})
        if prompts < 10:
            lines += ["", f"*Only {prompts} prompts: bootstrap intervals over so few prompts are too narrow to trust; "
                          "treat these as a smoke test and raise `--limit`.*"]
    lines += [
        "",
        "## Judge scores",
        "",
        "Mean judge score per preference (rows) and method (columns), over all datasets, in the judge's units; "
        "↑/↓: higher/lower is more aligned. **Bold**: best in the row. Collapsed answers are left out; "
        "†k: k answers of that cell collapsed (see *Collapse*).",
        "",
        *score_table(a, a.scores),
    ]
    for ref in REFERENCES:
        if ref not in a.wins:
            continue
        lines += [
            "",
            f"## Win rate against `{ref}`",
            "",
            f"Share of prompts where the method's answer beats `{ref}`'s answer to the same prompt under the same "
            "preference, by the preference's judge (ties count half), with a 95% bootstrap interval over prompts. "
            "Pairs where either answer collapsed are left out (†k: k pairs). For length judges, two answers that "
            "both hit the token budget tie (neither's full length is known). 0.5 = no effect.",
            "",
            *win_table(a, ref),
            *ceiling_note(a, ref),
        ]
    from .judge_report import judge_sections

    lines += judge_sections(a)  # per-judge win rates and agreement, when other judges ran
    lines += [
        "",
        "## Fluency",
        "",
        "Per method, each distinct answer once (a `base` answer serves every preference). Perplexity: of the answer "
        "under the model given the prompt without preference (median); ppl / base: median ratio to the `base` answer's "
        "perplexity on the same prompt; repeated 4-grams: mean share; non-dictionary words: mean share of words not "
        "in CMUdict; truncated: stopped at max_new_tokens; collapsed: flagged by the guards.",
        "",
        *fluency_table(a),
        "",
        "Mean answer length in words, per preference (all answers, collapsed included): does a method change "
        "length the way the preference asks, or whatever the preference?",
        "",
        *length_table(a),
        "",
        "## Speed",
        "",
        "Throughput over the wall time of the batches (answers in a batch decode together); latency: per answer "
        "from its prefill to its last token; beam's tokens are those of the returned hypothesis (it decodes `width` "
        "rows per answer). Measured on the machine that ran the grid, while sharing it; each run's first batch "
        "also pays one-time warm-up (judges, guards, kernels), which weighs on methods with few batches (`base`).",
        "",
        *speed_table(a),
        "",
        "## Collapse",
        "",
        "Collapsed answers / answers, per preference and method (repetition loops, non-words, or perplexity "
        f"far above the base answer's; see docs/judges.md). Verdicts computed when this report was written, with "
        f"{_thresholds()}.",
        "",
        *collapse_table(a),
        "",
        "Which rule flagged them (distinct answers per method):",
        "",
        *collapse_reason_table(a),
    ]
    if a.collapsed_rows:
        lines += ["", "Examples (distinct answers, a few per method):", ""]
        examples = [[r["dataset"], str(r["prompt_id"]), "(all: shared answer)" if r.get("shared") else r["preference"],
                     r["variant"], r["collapse_reasons"], _snippet(r.get("text", ""))] for r in _examples(a)]
        lines += _table(["dataset", "id", "preference", "method", "why", "answer"], examples, "llllll")
    leaks = [r for r in _unique_generations(a.rows) if r.get("instruction_leak")]
    if leaks:
        lines += ["", "## Answers about their instructions", "",
                  "Answers that talk about the preference or PAD's guideline instead of answering "
                  "(`prefalign.eval.guards.instruction_leak`; the *about its instructions* column of *Fluency*), "
                  "a few per method, with the flagged passage:", ""]
        shown = [r for v in a.variants for r in [x for x in leaks if x["variant"] == v][:3]]
        lines += _table(["dataset", "id", "preference", "method", "passage"],
                        [[r["dataset"], str(r["prompt_id"]), r["preference"], r["variant"], r["instruction_leak"]]
                         for r in shown], "lllll")
    if len(a.datasets) > 1:
        lines += ["", "## By dataset", ""]
        for d in a.datasets:
            lines += [f"### {d}", "", *score_table(a, a.scores_by_dataset, (d,)), ""]
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.name})", ""]
    lines += ["", "## Judges", "", "See docs/judges.md for what each measure computes and where it misleads.", ""]
    jrows = [[p, str(j.get("name")), _arrow(int(j.get("direction", 1))), str(j.get("units", ""))
              + (" (first of a combined principle)" if j.get("combined") else "")] for p, j in a.judges.items()]
    lines += _table(["preference", "judge", "better", "units"], jrows, "llll")
    if runs:
        v = runs[-1].get("versions") or {}
        lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "."]
    return "\n".join(lines).rstrip() + "\n"


def write_report(directory: str | Path, *, plots: bool = True, title: str | None = None) -> Path:
    """Write ``DIR/report.md`` (and plots next to it) from ``DIR/results.jsonl``; return its path."""
    d = Path(directory).expanduser()
    rows, config = read_run(d)
    a = analyse(rows, config)
    images: list[Path] = []
    if plots:
        try:
            from .plots import make_plots
        except ImportError as exc:  # pragma: no cover - matplotlib missing
            import logging

            logging.getLogger(__name__).warning("no plots: %s (pip install 'prefalign[eval]')", exc)
        else:
            images = make_plots(a, d)
    path = d / REPORT_FILE
    path.write_text(render_markdown(a, images, title=title or f"Evaluation report: {d.name}"), encoding="utf-8")
    return path
