"""The evaluation grid runner on a tiny random model: rows, resume, sweeps, Ray, CLI."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from collections import Counter

import pytest

from prefalign import Aligner
from prefalign.errors import PrefalignError, UnknownNameError
from prefalign.eval.runner import (
    EvalConfig,
    MethodVariant,
    expand_methods,
    expand_preferences,
    key_of,
    parse_sweep,
    read_results,
    run_eval,
)

PREFS = ["concise", "formal"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    a = d / "qa.json"
    a.write_text(json.dumps([{"index": 10, "question": "What is rain?"}, {"index": 11, "question": "Name a colour."}]))
    b = d / "tasks.csv"
    b.write_text("Question,Other\nWhy is the sky blue?,x\nHow do bees fly?,y\n")
    return [str(a), str(b)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama, tokenizer):
    """The tiny model saved as a model directory, for code that loads by path (Ray workers, the CLI)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_llama.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


def _config(data_files, **kw) -> EvalConfig:
    base = dict(
        datasets=data_files, preferences=PREFS, methods=["base", "pref", "amulet"], sweeps=["amulet.alpha=1,4"],
        max_new_tokens=5, batch_size=3, fast=False, threads=1,
    )
    base.update(kw)
    return EvalConfig(**base)


def _texts(path) -> dict[str, str]:
    rows = read_results(path)
    keys = [key_of(r) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return {k: r["text"] for k, r in zip(keys, rows)}


# --- grid specification ----------------------------------------------------------------


def test_parse_sweep_and_aliases():
    assert parse_sweep("amulet.alpha=0.5,1,2,4") == ("amulet", "alpha", [0.5, 1, 2, 4])
    assert parse_sweep("la.r=3") == ("la", "ratio", [3])  # alias of ratio
    assert parse_sweep("amulet.lambda=1,2")[1] == "lam"
    with pytest.raises(PrefalignError, match="METHOD.PARAM"):
        parse_sweep("alpha=1")
    with pytest.raises(UnknownNameError):
        parse_sweep("nomethod.x=1")


def test_expand_methods_product_and_validation():
    variants = expand_methods(["base", "la", "amulet"], ["amulet.alpha=1,2", "amulet.iterations=10,60", "la.ratio=3"])
    labels = [v.label for v in variants]
    assert labels == [
        "base", "la(ratio=3)",
        "amulet(alpha=1,iterations=10)", "amulet(alpha=1,iterations=60)",
        "amulet(alpha=2,iterations=10)", "amulet(alpha=2,iterations=60)",
    ]
    assert variants[2].params["alpha"] == 1.0 and variants[2].params["lam"] == 2.0  # defaults filled in
    with pytest.raises(PrefalignError, match="not among the methods"):
        expand_methods(["base"], ["amulet.alpha=1"])
    with pytest.raises(PrefalignError, match="no parameter 'bogus'"):
        expand_methods(["amulet"], ["amulet.bogus=1"])
    with pytest.raises(PrefalignError, match="alpha"):
        expand_methods(["amulet"], ["amulet.alpha=-1"])
    assert not MethodVariant("base").needs_preference and MethodVariant("pref").needs_preference


def test_expand_preferences():
    assert expand_preferences(["concise,formal", "psoups:expert"]) == ["concise", "formal", "psoups:expert"]
    assert len(expand_preferences(["amulet:*"])) == 8
    free = "Answer like a pirate, with gusto."
    assert expand_preferences([free]) == [free]  # a sentence is never split on commas
    with pytest.raises(PrefalignError, match="twice"):
        expand_preferences(["concise,concise"])


def test_command_round_trip(data_files):
    cmd = _config(data_files, limit=2).command()
    assert cmd.startswith("prefalign eval --dataset ") and "--sweep amulet.alpha=1,4" in cmd and "--limit 2" in cmd


# --- running ----------------------------------------------------------------------------


def test_rows_and_config(tmp_path, data_files, tiny_llama, tokenizer):
    al = Aligner(tiny_llama, tokenizer)
    summary = run_eval(_config(data_files), tmp_path, aligner=al, progress=False, report=False)
    rows = read_results(tmp_path)
    # 4 prompts × 2 preferences × 4 variants (base, pref, amulet α=1, α=4)
    assert summary.rows_total == summary.rows_written == len(rows) == 32
    variants = Counter(r["variant"] for r in rows)
    assert variants == {"base": 8, "pref": 8, "amulet(alpha=1)": 8, "amulet(alpha=4)": 8}
    r = next(r for r in rows if r["variant"] == "amulet(alpha=4)" and r["preference"] == "concise")
    for key in ("dataset", "prompt_id", "prompt", "preference_text", "method", "params", "text", "completion_tokens",
                "finish_reason", "seconds", "forward_passes", "judge", "direction", "score", "guards", "batch"):
        assert key in r
    assert r["params"]["alpha"] == 4.0 and r["sweep"] == {"alpha": 4.0}
    assert r["judge"] == "length_words" and r["direction"] == -1
    assert r["forward_passes"] == r["completion_tokens"]  # one batched forward of the policy per token
    assert {"perplexity", "repetition_4", "non_dictionary_share", "collapsed"} <= set(r["guards"])
    assert {x["prompt_id"] for x in rows if x["dataset"] == "qa"} == {"10", "11"}
    # base decodes once per prompt; its answer is shared by both preferences' rows
    base = [x for x in rows if x["method"] == "base"]
    assert all(x["shared"] for x in base) and len({x["generation"] for x in base}) == 4
    config = json.loads((tmp_path / "config.json").read_text())
    run = config["runs"][-1]
    assert run["status"] == "finished" and run["command"].startswith("prefalign eval")
    assert run["versions"]["torch"] and config["settings"]["max_new_tokens"] == 5
    # a second run is a no-op, and other generation settings are refused
    again = run_eval(_config(data_files), tmp_path, aligner=al, progress=False, report=False)
    assert again.rows_written == 0 and again.rows_skipped == 32
    with pytest.raises(PrefalignError, match="other generation settings"):
        run_eval(_config(data_files, max_new_tokens=6), tmp_path, aligner=al, progress=False, report=False)


def test_resume_after_interrupt(tmp_path, data_files, tiny_llama, tokenizer):
    al = Aligner(tiny_llama, tokenizer)
    full = tmp_path / "full"
    run_eval(_config(data_files), full, aligner=al, progress=False, report=False)

    part = tmp_path / "part"
    seen = []

    def interrupt(row):
        seen.append(row)
        if len(seen) == 11:  # mid-way through a batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(_config(data_files), part, aligner=al, progress=False, report=False, on_row=interrupt)
    assert len(read_results(part)) == 11
    assert json.loads((part / "config.json").read_text())["runs"][-1]["status"] == "interrupted"
    # a write cut short by a hard kill leaves a partial line: resume repairs it
    with (part / "results.jsonl").open("a") as f:
        f.write('{"dataset": "qa", "trunc')
    summary = run_eval(_config(data_files), part, aligner=al, progress=False, report=False)
    assert summary.rows_skipped == 11 and summary.rows_written == 21
    # same rows, same answers as the uninterrupted run, no duplicates
    assert _texts(part) == _texts(full)


def test_growing_the_grid_reuses_rows(tmp_path, data_files, tiny_llama, tokenizer):
    al = Aligner(tiny_llama, tokenizer)
    run_eval(_config(data_files, methods=["base"], sweeps=[], limit=1), tmp_path, aligner=al, progress=False, report=False)
    first = {key_of(r) for r in read_results(tmp_path)}
    summary = run_eval(_config(data_files, methods=["base", "pref"], sweeps=[], limit=2), tmp_path, aligner=al,
                       progress=False, report=False)
    # limit 1 ⊂ limit 2 (nested subsample): the 2 prompts × 2 preferences of base from the first run are reused
    assert summary.rows_skipped == 4 and summary.rows_written == 12
    new = [r for r in read_results(tmp_path) if key_of(r) not in first]
    # ... and not decoded again: the batches that ran hold exactly the new answers
    batches = {r["batch"]["id"]: r["batch"]["size"] for r in new}
    assert sum(batches.values()) == len({r["generation"] for r in new}) == 2 + 8


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'prefalign[ray]')")
@pytest.mark.skipif(bool(os.environ.get("PREFALIGN_SKIP_RAY")), reason="PREFALIGN_SKIP_RAY is set")
def test_ray_backend_matches_local(tmp_path, data_files, tiny_dir):
    # Costly (~20 s to start Ray, then two actor processes importing torch): set
    # PREFALIGN_SKIP_RAY=1 to skip it on a busy machine.
    cfg = dict(model=tiny_dir, methods=["base", "amulet"], sweeps=[], preferences=["concise"])
    run_eval(_config(data_files, **cfg), tmp_path / "local", progress=False, report=False)
    summary = run_eval(_config(data_files, executor="ray", ray_workers=2, **cfg), tmp_path / "ray", progress=False, report=False)
    assert summary.rows_written == 8
    local_rows, ray_rows = read_results(tmp_path / "local"), read_results(tmp_path / "ray")
    assert set(local_rows[0]) == set(ray_rows[0])  # same file format
    assert _texts(tmp_path / "ray") == _texts(tmp_path / "local")
    run = json.loads((tmp_path / "ray" / "config.json").read_text())["runs"][-1]
    assert run["ray"]["workers"] == 2 and run["status"] == "finished"


def test_ray_missing_is_a_clear_error(monkeypatch, tmp_path, data_files, tiny_dir):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(PrefalignError, match=r"pip install 'prefalign\[ray\]'"):
        run_eval(_config(data_files, model=tiny_dir, executor="ray"), tmp_path, progress=False, report=False)


def test_cli_eval_and_report(tmp_path, data_files, tiny_dir):
    import typer
    from typer.testing import CliRunner

    from prefalign.eval.cli import eval_command, report_command

    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["eval", "--dataset", data_files[0], "--preferences", "concise", "--methods", "base,pref", "--limit", "1",
            "--max-new-tokens", "3", "--out", str(out), "--model", tiny_dir, "--no-fast", "--threads", "1",
            "--no-progress", "--no-report"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(read_results(out)) == 2
    result = runner.invoke(app, ["report", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text().startswith("# Evaluation report")
    bad = runner.invoke(app, [*args[:-2], "--sweep", "amulet.alpha=1"])
    assert bad.exit_code == 2 and "not among the methods" in " ".join(bad.output.split())


def test_a_sweep_reads_only_its_own_methods_spellings():
    from prefalign.eval.runner import expand_methods

    with pytest.raises(PrefalignError, match="min_p"):
        expand_methods(["la"], ["la.min_p=0.1"])  # PAD's old name is not la's
    (variant,) = expand_methods(["pad"], ["pad.min_p=0.1"])
    assert variant.overrides == (("plausibility", 0.1),)


#: Written by the runner before it was split into plan/execute/ray_executor (main at
#: 47777e0, the tiny Llama; how: its README.md): 16 rows.
WRITTEN_BEFORE_SPLIT = Path(__file__).parent / "data" / "eval_written_before_split"


def test_a_directory_written_before_the_split_resumes_without_decoding(tmp_path, monkeypatch, tiny_llama, tokenizer):
    import shutil

    from prefalign.eval.execute import ResultRow

    out = tmp_path / "run"
    shutil.copytree(WRITTEN_BEFORE_SPLIT, out)
    before = (out / "results.jsonl").read_text()
    monkeypatch.chdir(out)  # the old run named its dataset "qa.json"
    al = Aligner(tiny_llama, tokenizer)
    monkeypatch.setattr(al.engine, "session", lambda *a, **k: pytest.fail("a row written before was decoded again"))
    config = EvalConfig(datasets=["qa.json"], preferences=["concise", "formal"], methods=["base", "pref", "amulet"],
                        sweeps=["amulet.alpha=1,4"], max_new_tokens=3, batch_size=3, fast=False, threads=1)
    summary = run_eval(config, out, aligner=al, progress=False, report=False)
    assert (summary.rows_total, summary.rows_skipped, summary.rows_written) == (16, 16, 0)
    assert (out / "results.jsonl").read_text() == before
    rows = read_results(out)
    assert all(set(row) <= set(ResultRow.__annotations__) for row in rows)  # the typed row names every key
