"""The evaluation report: a synthetic results file renders the expected tables."""

from __future__ import annotations

import json
import math
import random

import pytest

from prefalign.errors import PrefalignError
from prefalign.eval.report import analyse, bootstrap_ci, fmt, render_markdown, win_outcome, write_report

# Scores per preference → variant → prompt p0..p3. concise is judged by length (lower is
# better), formal by the formality proxy (higher is better).
SCORES = {
    "concise": {"base": [40, 40, 40, 40], "pref": [30, 30, 30, 30], "amulet": [20, 20, 20, 5]},
    "formal": {"base": [50, 50, 50, 50], "pref": [52, 54, 55, 55], "amulet": [52, 52, 52, 52]},
}
JUDGE = {"concise": ("length_words", -1), "formal": ("formality_f", 1)}
# amulet's answer to p3 under "concise" collapsed: perplexity 10x the base answer's.
COLLAPSED = ("concise", "amulet", "p3")


def _rows() -> list[dict]:
    rows = []
    for pref, by_variant in SCORES.items():
        for variant, scores in by_variant.items():
            for i, score in enumerate(scores):
                pid = f"p{i}"
                ppl = 100.0 if (pref, variant, pid) == COLLAPSED else 10.0
                gen = f"base-{pid}" if variant == "base" else f"{variant}-{pref}-{pid}"
                rows.append({
                    "dataset": "toy", "prompt_id": pid, "prompt": "Question?", "preference": pref,
                    "method": variant, "variant": variant, "sweep": {}, "params": {}, "template": "amulet",
                    "text": "A short fine answer.", "completion_tokens": 10, "finish_reason": "stop",
                    "seconds": 1.0, "forward_passes": 10 if variant in ("base", "pref") else 20,
                    "judge": JUDGE[pref][0], "direction": JUDGE[pref][1], "score": float(score),
                    "guards": {"perplexity": ppl, "repetition_4": 0.0, "non_dictionary_share": 0.0},
                    "generation": gen, "shared": variant == "base",
                    "batch": {"id": f"b-{variant}", "size": 8, "elapsed": 2.0}, "time": "2026-01-01T00:00:00+00:00",
                })
    return rows


def _row_of(markdown: str, section: str, first_cell: str) -> list[str]:
    """Cells of the table row starting with ``first_cell`` in the section titled ``section``."""
    part = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in section {section!r}")


def test_score_table_means_and_bold():
    md = render_markdown(analyse(_rows()))
    header = _row_of(md, "Judge scores", "preference")
    assert header == ["preference", "judge", "base", "pref", "amulet"]
    # collapsed row left out of amulet's mean (20, not 16.25), flagged †1; lowest length is best
    assert _row_of(md, "Judge scores", "concise") == ["concise", "length_words ↓", "40.0", "30.0", "**20.0** †1"]
    assert _row_of(md, "Judge scores", "formal") == ["formal", "formality_f ↑", "50.0", "**54.0**", "52.0"]


def test_win_rates_ties_and_exclusions():
    a = analyse(_rows())
    vs_pref, vs_base = a.wins["pref"], a.wins["base"]
    w = vs_pref[("concise", "amulet")]
    assert (w.rate, w.n, w.excluded) == (1.0, 3, 1)  # the collapsed pair is excluded
    w = vs_pref[("formal", "amulet")]
    assert w.rate == pytest.approx(0.125) and w.n == 4  # one tie (52 vs 52) counts half
    assert vs_base[("formal", "pref")].rate == 1.0 and vs_base[("concise", "pref")].rate == 1.0
    assert vs_base[("formal", "amulet")].rate == 1.0
    md = render_markdown(a)
    assert _row_of(md, "Win rate against `pref`", "concise") == ["concise", "0.00 [0.00, 0.00]", "1.00 [1.00, 1.00] †1"]


def test_length_judge_ties_two_answers_cut_at_the_budget():
    rows = _rows()
    for r in rows:
        if r["preference"] == "concise" and r["variant"] in ("pref", "amulet") and r["prompt_id"] in ("p0", "p1"):
            r["finish_reason"] = "length"  # both cut on p0 and p1: amulet's shorter count means nothing
        if r["preference"] == "formal" and r["variant"] in ("pref", "amulet"):
            r["finish_reason"] = "length"  # not a length judge: the scores still decide
    a = analyse(rows)
    w = a.wins["pref"][("concise", "amulet")]
    assert (w.rate, w.n) == (pytest.approx((0.5 + 0.5 + 1.0) / 3), 3)  # p3 collapsed, excluded
    assert a.wins["pref"][("formal", "amulet")].rate == pytest.approx(0.125)
    # Only one of the two cut: the comparison stands (pref vs base on p0: 30 < 40 words).
    assert a.wins["base"][("concise", "pref")].rate == 1.0


def test_fluency_speed_and_collapse_tables():
    a = analyse(_rows())
    assert a.fluency["base"]["answers"] == 4  # shared base answers counted once
    assert a.fluency["amulet"]["collapsed"] == pytest.approx(1 / 8)
    assert a.fluency["amulet"]["perplexity_ratio"] == pytest.approx(1.0)
    assert a.speed["base"]["tokens_per_s"] == pytest.approx(40 / 2.0)  # 4 answers × 10 tokens in one 2 s batch
    assert a.speed["amulet"]["passes_per_token"] == pytest.approx(2.0)
    md = render_markdown(a)
    assert _row_of(md, "Collapse", "concise") == ["concise", "0/4", "0/4", "1/4"]
    assert "perplexity: 10.0x the reference" in md


def test_write_report_with_plots(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    path = write_report(tmp_path)
    md = path.read_text()
    assert "![scores_by_preference](scores_by_preference.png)" in md
    for name in ("scores_by_preference.png", "win_rates.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    with pytest.raises(PrefalignError, match="no results.jsonl"):
        write_report(tmp_path / "missing")


def test_bootstrap_interval_contains_mean():
    rng = random.Random(0)
    values = [rng.gauss(3.0, 2.0) for _ in range(40)]
    mean = sum(values) / len(values)
    lo, hi = bootstrap_ci(values, seed=1)
    assert lo < mean < hi and hi - lo < 2.5
    assert bootstrap_ci(values, seed=1) == (lo, hi)  # deterministic
    clusters = [i // 4 for i in range(40)]
    clo, chi = bootstrap_ci(values, clusters=clusters)
    assert clo <= mean <= chi
    assert bootstrap_ci([2.0]) == (2.0, 2.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_helpers():
    assert win_outcome(3, 5, -1) == 1.0 and win_outcome(3, 5, 1) == 0.0 and win_outcome(4, 4, 1) == 0.5
    assert [fmt(x) for x in (1234.5, 54.04, 3.14159, 0.12345, float("nan"))] == ["1234", "54.0", "3.14", "0.123", "–"]


def _verbose_rows() -> list[dict]:
    """verbose (length judge, longer is better): pref's answers to p0 and p1 filled the budget."""
    rows = []
    for r in _rows():
        if r["preference"] != "concise":
            continue
        r = dict(r, preference="verbose", direction=1, generation=r["generation"].replace("concise", "verbose"))
        if r["variant"] == "pref" and r["prompt_id"] in ("p0", "p1"):
            r["finish_reason"] = "length"
        rows.append(r)
    return rows


def test_best_possible_win_rate_against_answers_that_filled_the_budget():
    rows = _verbose_rows() + [r for r in _rows() if r["preference"] == "formal"]
    # amulet's p0 answer stops early yet has more words than pref's cut one: the exception the note counts
    for r in rows:
        if r["preference"] == "verbose" and r["variant"] == "amulet" and r["prompt_id"] == "p0":
            r["score"] = 31.0
    a = analyse(rows)
    c = a.ceilings["pref"]["verbose"]
    assert (c.rate, c.n, c.capped) == (pytest.approx((0.5 + 0.5 + 1 + 1) / 4), 4, 2)
    assert a.ceilings["pref"]["formal"].capped == 0 and a.ceilings["pref"]["formal"].rate == 1.0
    assert a.ceilings["pref"]["*all*"].rate == pytest.approx((3.0 + 4.0) / 8)
    # early-stopping answers against the 2 cut pref answers: base (p0, p1; 40 words) and amulet (p0: 31, p1: 20)
    assert (a.ceilings["pref"]["verbose"].early_pairs, a.ceilings["pref"]["verbose"].early_wins) == (4, 3)
    assert a.ceilings["base"]["verbose"].capped == 0  # base's answers all stopped on their own
    md = render_markdown(a)
    assert _row_of(md, "Win rate against `pref`", "preference")[-1] == "best possible"
    assert _row_of(md, "Win rate against `pref`", "verbose")[-1] == "0.75"
    assert _row_of(md, "Win rate against `pref`", "formal")[-1] == "1.00"
    assert "filled it in verbose 2 of 4 uncollapsed" in md and "3 of the 4 measured such pairs" in md
    assert "best possible" not in md.split("## Win rate against `base`", 1)[1].split("\n## ", 1)[0]


def test_a_collapsed_or_shorter_preferring_reference_sets_no_ceiling():
    a = analyse(_rows())  # concise: the length judge prefers fewer words; nothing is capped
    assert not any(c.capped for c in a.ceilings["pref"].values())
    assert "best possible" not in render_markdown(a)
    rows = _verbose_rows()
    for r in rows:  # pref's cut p0 answer collapsed: it is compared with nothing, so it caps nothing
        if r["variant"] == "pref" and r["prompt_id"] == "p0":
            r["guards"]["perplexity"] = 100.0
    c = analyse(rows).ceilings["pref"]["verbose"]
    assert (c.n, c.capped, c.rate) == (3, 1, pytest.approx(2.5 / 3))


def test_report_with_a_ceiling_draws_its_plots(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _verbose_rows()))
    md = write_report(tmp_path).read_text()
    assert "best possible" in md and (tmp_path / "win_rates.png").stat().st_size > 10_000


def _captured_figures(monkeypatch):
    from prefalign.eval import plots

    figures = []
    original = plots._figure

    def capture(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(plots, "_figure", capture)
    return figures


def test_win_rate_plot_draws_no_mirrored_panel_and_no_legend_for_an_absent_bar(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from prefalign.eval.plots import plot_win_rates

    figures = _captured_figures(monkeypatch)
    plot_win_rates(analyse(_rows()), tmp_path / "w.png")
    (fig,) = figures
    pref_panel, base_panel = fig.axes[:2]
    labels = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]  # noqa: E731
    assert "base" in labels(pref_panel)
    assert "pref" not in labels(base_panel)  # pref vs base = 1 − base vs pref: not drawn again
    assert "1 − the panel above" in base_panel.get_ylabel()
    assert "best possible" not in labels(pref_panel) + labels(base_panel)
    assert "best possible" not in fig.get_suptitle()  # no ceiling here: the title names no bar
    assert pref_panel.get_ylim()[1] > 1.05


def test_win_rate_plot_says_when_every_answer_collapsed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from prefalign.eval.plots import plot_win_rates

    rows = _rows()
    for r in rows:
        r["guards"]["perplexity"] = 100.0 if r["variant"] != "base" else 10.0
    figures = _captured_figures(monkeypatch)
    plot_win_rates(analyse(rows), tmp_path / "w.png")
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    assert any("every pair had a collapsed answer" in t for t in texts)


def test_collapse_mark_sits_beyond_the_error_bar(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from prefalign.eval.plots import plot_scores

    a = analyse(_rows())
    figures = _captured_figures(monkeypatch)
    plot_scores(a, tmp_path / "s.png")
    ax = figures[0].axes[a.preferences.index("concise")]
    (mark,) = [t for t in ax.texts if t.get_text().startswith("†")]
    c = a.scores[("concise", "amulet")]
    assert mark.xy[1] >= c.high - 1e-9  # at the whisker's end, not on the bar's top inside the error bar


def test_answers_about_their_instructions_are_counted_and_shown():
    rows = _rows()
    leaked = next(r for r in rows if (r["preference"], r["variant"], r["prompt_id"]) == ("formal", "amulet", "p1"))
    leaked["text"] = "Sure! Here's a formal answer: the meeting is at noon."
    quoting = next(r for r in rows if (r["preference"], r["variant"], r["prompt_id"]) == ("formal", "pref", "p2"))
    quoting["preference_text"] = "Your answer should be formal as much as possible."
    quoting["text"] = "The meeting, formal as much as possible, is at noon."
    a = analyse(rows)
    assert a.fluency["amulet"]["leaked"] == pytest.approx(1 / 8)
    assert a.fluency["pref"]["leaked"] == pytest.approx(1 / 8)
    assert a.fluency["base"]["leaked"] == 0
    assert not leaked["collapsed"]  # a fluent answer about its instructions is not word salad
    md = render_markdown(a)
    assert _row_of(md, "Fluency", "amulet")[-1] == "12%"
    assert _row_of(md, "Answers about their instructions", "toy")[3:] == ["pref", "formal as much as possible"]
    section = md.split("## Answers about their instructions", 1)[1].split("\n## ", 1)[0]
    assert "Here's a formal answer" in section and "formal as much as possible" in section
