"""`prefalign eval --judge ...`, `prefalign judge RUN_DIR` and `--protocol`, end to end on
a tiny random policy, a tiny random reward model and the stub LLM judge server."""

from __future__ import annotations

import json

import pytest
import torch
from judge_helpers import Stub

from prefalign.errors import PrefalignError
from prefalign.eval.protocols import PROTOCOLS, resolve_protocol
from prefalign.eval.runner import read_results

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama, tokenizer):
    d = tmp_path_factory.mktemp("tiny_policy")
    tiny_llama.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.3)
    d = tmp_path_factory.mktemp("tiny_rm")
    LlamaForSequenceClassification(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge_data")
    f = d / "qa.json"
    f.write_text(json.dumps([{"index": 1, "question": "What is rain?"}, {"index": 2, "question": "Name a colour."}]))
    return str(f)


@pytest.fixture()
def app():
    import typer

    from prefalign.eval.cli import eval_command, judge_command, report_command

    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("judge")(judge_command)
    app.command("report")(report_command)
    return app


def _eval_args(data_file, tiny_dir, out):
    return ["eval", "--dataset", data_file, "--preferences", "concise", "--methods", "base,pref,amulet",
            "--max-new-tokens", "4", "--out", str(out), "--model", tiny_dir, "--no-fast", "--threads", "1",
            "--no-progress"]


def test_eval_with_judges_then_judge_a_finished_run(app, tmp_path, data_file, tiny_dir, rm_dir):
    from typer.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "run"
    with Stub() as stub:
        args = [*_eval_args(data_file, tiny_dir, out), "--judge", "proxy", "--judge", f"rm:{rm_dir}",
                "--judge", f"llm:{stub.url}", "--judge-model", "stub-judge"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        rows = read_results(out)
        assert len(rows) == 6
        names = set(rows[0]["judged"])
        assert any(n.startswith("rm:") for n in names) and f"llm:stub-judge@{stub.url[7:]}" in names
        assert all(isinstance(r["judged"][f"rm:{rm_dir}"]["score"], float) for r in rows)
        md = (out / "report.md").read_text()
        assert "## Judges compared" in md and f"`rm:{rm_dir}`" in md
        asked = len(stub.requests)
        assert asked > 0

        # the same command again: nothing decoded, nothing judged again
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert len(stub.requests) == asked and len(read_results(out)) == 6

        # add a judge to the finished run (another order protocol = another judge name)
        result = runner.invoke(app, ["judge", str(out), "--judge", f"llm:{stub.url},order=random,vs=pref",
                                     "--judge-model", "stub-judge", "--no-progress", "--json"])
        assert result.exit_code == 0, result.output
        [summary] = json.loads(result.stdout)
        assert summary["name"].endswith(",order=random") and summary["judged"] == 4  # 2 prompts × (base, amulet) vs pref
        assert summary["kind"] == "llm" and summary["calls"] <= 4
    rows = read_results(out)
    assert all(len(r["judged"]) == (2 if r["variant"] == "pref" else 3) for r in rows)  # pref is the reference


def test_bad_judges_fail_before_decoding(app, tmp_path, data_file, tiny_dir, monkeypatch):
    from typer.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "never"
    for judge, msg in ((["--judge", "rm:./no/such/rm"], "not found"),
                       (["--judge", "llm:http://127.0.0.1:9/v1", "--judge-model", "m"], "cannot reach"),
                       (["--judge", "llm:http://127.0.0.1:9/v1"], "needs a model name"),
                       (["--judge", "gpt4"], "unknown judge")):
        result = runner.invoke(app, [*_eval_args(data_file, tiny_dir, out), *judge])
        assert result.exit_code == 2, result.output
        assert msg in " ".join(result.output.split())
        assert not (out / "results.jsonl").exists()
    result = runner.invoke(app, ["judge", str(out), "--judge", "rm:x"])
    assert result.exit_code == 2 and "no results.jsonl" in " ".join(result.output.split())


def test_protocol_presets(shared_data, monkeypatch):
    monkeypatch.setenv("PREFALIGN_SHARED_DATA", str(shared_data))
    p = resolve_protocol("amulet")
    assert [d.split("/")[-1] for d in p.datasets] == [
        "HelpSteer_train.json", "UltraFeedback_truthful_qa.json", "UltraFeedback_ultrachat.json",
        "personal_preference_eval_preference_data.json"]
    assert (p.preferences, p.methods, p.template, p.max_new_tokens) == (
        ["amulet:*"], ["base", "pref", "beam", "la", "amulet"], "amulet", 128)
    assert p.judges == ["rm:RLHFlow/ArmoRM-Llama3-8B-v0.1@ultrafeedback-instruction_following"]
    # a local reward model replaces the preset's; an llm judge gets the paper's model and order
    p = resolve_protocol("amulet", judges=["rm:/models/armorm@6", "llm:http://127.0.0.1:8000/v1"],
                         methods=["base", "amulet"])
    assert p.judges == ["rm:/models/armorm@6", "llm:http://127.0.0.1:8000/v1,order=random,model=gpt-4o-2024-05-13"]
    assert p.methods == ["base", "amulet"]
    pad = resolve_protocol("pad")
    assert pad.preferences == ["pad:helpful", "pad:harmless", "pad:humor"] and len(pad.judges) == 5
    assert all(",pref=no" in j and ",only=pad:" in j for j in pad.judges)
    with pytest.raises(PrefalignError, match="choose amulet, pad"):
        resolve_protocol("psoups")
    monkeypatch.setenv("PREFALIGN_SHARED_DATA", "/nonexistent")
    with pytest.raises(PrefalignError, match="dataset files not found"):
        resolve_protocol("pad")
    assert set(PROTOCOLS) == {"amulet", "pad"}


def test_protocol_needs_the_remote_code_opt_in_before_decoding(app, tmp_path, shared_data, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setenv("PREFALIGN_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["eval", "--protocol", "amulet", "--limit", "1", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "ArmoRM" in result.output and "hub" in result.output
    assert not (tmp_path / "a" / "results.jsonl").exists()
