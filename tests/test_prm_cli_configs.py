"""make-pairs and train-prm build their PairsConfig / TrainConfig before anything loads
(issue #23): the config's checks answer first, and the options are the config's fields
(default and help written once, in prefalign/prm/config.py)."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.prm.config import PairsConfig, TrainConfig

runner = CliRunner()


def test_make_pairs_refuses_a_template_no_prm_reads_before_loading(no_model, tmp_path):
    # `amulet` is a prompt template (prompts.TEMPLATES) but not one a PRM is trained in.
    result = runner.invoke(app, ["make-pairs", "--template", "amulet", "--output", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 2, result.output
    assert "PairsConfig.template must be pad or default, got 'amulet'" in " ".join(result.output.split())
    assert "AssertionError" not in result.output


def test_train_prm_refuses_a_template_no_prm_reads_before_loading(no_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    result = runner.invoke(app, ["train-prm", str(pairs), "--template", "amulet", "--output", str(tmp_path / "prm")])
    assert result.exit_code == 2, result.output
    assert "TrainConfig.template must be pad or default, got 'amulet'" in " ".join(result.output.split())


@pytest.mark.parametrize("args,field", [(["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "-1"], "temperature")])
def test_make_pairs_settings_are_checked_by_the_config(no_model, tmp_path, args, field):
    result = runner.invoke(app, ["make-pairs", *args, "--output", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 2 and f"PairsConfig.{field} must be" in result.output


def test_make_pairs_hands_the_config_over(monkeypatch, tmp_path):
    seen = {}

    def fake(config, **where):
        seen["config"], seen["where"] = config, where
        raise SystemExit(0)

    monkeypatch.setattr("prefalign.prm.cli._synthesize", fake)
    result = runner.invoke(app, [
        "make-pairs", "--preferences", "concise,verbose", "--max-new-tokens", "12", "--time-budget", "2",
        "--chosen-max-repetition", "1", "--template", "default", "--output", str(tmp_path / "p.jsonl"),
    ])
    assert result.exit_code == 0, result.output
    assert seen["config"] == PairsConfig(
        preferences=("concise", "verbose"), max_new_tokens=12, time_budget_s=120.0, chosen_max_repetition=None, template="default",
    )
    assert seen["where"]["output"] == tmp_path / "p.jsonl"


def test_train_prm_hands_the_config_over(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("prefalign.prm.train.train", lambda config: calls.append(config) or {"status": "done"})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    result = runner.invoke(app, ["train-prm", str(pairs), "--output", str(tmp_path / "prm"), "--beta", "0.2", "--fp32",
                                 "--lora-top-layers", "0", "--time-budget", "1"])
    assert result.exit_code == 0, result.output
    (config,) = calls
    expected = TrainConfig(data=pairs, output=tmp_path / "prm", beta=0.2, bf16=False, lora_top_layers=None, time_budget_s=60.0)
    assert dataclasses.replace(config, command=None) == expected


@pytest.mark.parametrize("command,config", [("make-pairs", PairsConfig), ("train-prm", TrainConfig)])
def test_each_option_shows_its_fields_help_and_default(command, config):
    from typer.main import get_command

    params = {p.name: p for p in get_command(app).commands[command].params}
    fields = {f.name: f for f in dataclasses.fields(config)}
    # data/output: the command's argument and its own --output; preferences: one comma-separated string
    shared = sorted(set(params) & set(fields) - {"data", "output", "preferences"})
    assert len(shared) >= 8, shared
    for name in shared:
        assert params[name].help == fields[name].metadata["help"], name
        if name != "lora_top_layers":  # 0 on the command line is None (all layers) in the config
            assert params[name].default == fields[name].default, name
