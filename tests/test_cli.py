"""The command line on a tiny local model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prefalign import Aligner
from prefalign.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_generate_json_matches_the_api(model_dir, tiny_llama, tokenizer):
    result = runner.invoke(app, ["generate", "Hi there", "-p", "concise", "--method", "amulet", "-n", "8", "--json", "--model", model_dir, "--fast", "off"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    expected = Aligner(tiny_llama, tokenizer).generate("Hi there", preference="concise", method="amulet", max_new_tokens=8)[0]
    assert data["token_ids"] == expected.token_ids
    assert data["text"] == expected.text
    assert data["params"]["alpha"] == 2.0
    assert set(data["usage"]) >= {"prompt_tokens", "completion_tokens", "forward_passes"}


def test_generate_params_and_composition(model_dir):
    result = runner.invoke(app, ["generate", "Hi", "-p", "concise", "-p", "formal", "--weight", "2", "--weight", "1",
                                 "--method", "la", "-P", "ratio=1.5", "-n", "4", "--json", "--model", model_dir, "--fast", "off"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["params"]["ratio"] == 1.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method"),
        (["--method", "amulet", "-P", "eta=0"], "eta"),
        (["--method", "amulet"], "needs a preference"),
        (["--method", "base", "-n", "0"], "max_new_tokens"),
        (["--method", "amulet", "-p", "concize"], "unknown preference preset"),
    ],
)
def test_bad_input_exits_2_with_a_message(model_dir, args, message):
    result = runner.invoke(app, ["generate", "Hi", *args, "--model", model_dir, "--fast", "off"])
    assert result.exit_code == 2
    assert message in result.output


def test_methods_lists_parameters():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    rows = {r["method"]: r for r in json.loads(result.stdout)}
    assert rows["amulet"]["params"]["iterations"] == 60
    assert {"base", "pref", "beam", "la", "amulet"} <= set(rows)


def test_chat_switches_preference_and_method(model_dir):
    script = "/pref concise\n/method la\n/param ratio=1\nHello\n/method nope\n/quit\n"
    result = runner.invoke(app, ["chat", "--model", model_dir, "--fast", "off", "-n", "4"], input=script)
    assert result.exit_code == 0, result.output
    assert "method: la" in result.output
    assert "unknown method" in result.output


def test_make_pairs_and_train_prm_commands(model_dir, tiny_llama, tokenizer, shared_data, tmp_path):
    """make-pairs --skip/--on-policy/--prm and train-prm --init, through the CLI."""
    prm_api = pytest.importorskip("prefalign.prm")
    from prefalign.prm.pairs import read_rows, training_prompts

    first = tmp_path / "first-prm"
    prm_api.save_prm(prm_api.build_prm(tiny_llama, layers=[1]), first, tokenizer, base_model_name="tiny", preferences=["concise"])
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, [
        "make-pairs", "--output", str(out), "--model", model_dir, "--preferences", "concise,verbose",
        "--num-prompts", "2", "--skip", "3", "--max-new-tokens", "6", "--on-policy", "pad", "--prm", str(first),
        "--on-policy-param", "candidate_template=default", "--on-policy-param", "w=2.4", "--on-policy-pairs",
        "--greedy-pref", "--data-dir", str(shared_data),
    ])
    assert result.exit_code == 0, result.output
    expected_ids = [p.prompt_id for p in training_prompts(shared_data)[3:5]]
    assert out.with_name(out.name + ".done").read_text().split() == expected_ids
    pools = list(read_rows(out.with_name(out.name + ".pools.jsonl")))
    assert {p["source"] for p in pools} >= {"pad:concise", "pad:verbose", "base", "pref-greedy:concise", "pref-greedy:verbose"}
    bad = runner.invoke(app, ["make-pairs", "--output", str(tmp_path / "x.jsonl"), "--on-policy", "pad",
                              "--on-policy-param", "bogus=1", "--data-dir", str(shared_data)])
    assert bad.exit_code == 2 and "no parameter 'bogus'" in bad.output
    bad = runner.invoke(app, ["make-pairs", "--output", str(tmp_path / "x.jsonl"), "--on-policy-pairs", "--data-dir", str(shared_data)])
    assert bad.exit_code == 2 and "need an on_policy method" in bad.output

    pairs = tmp_path / "train.jsonl"
    pairs.write_text("".join(json.dumps({"preference": p, "prompt": f"Question {i}?", "chosen": c, "rejected": r}) + "\n"
                             for i in range(6) for p, c, r in (("concise", "Yes.", "Yes, and here is much more."),
                                                              ("verbose", "Yes, and here is much more.", "Yes."))))
    result = runner.invoke(app, [
        "train-prm", str(pairs), "--output", str(tmp_path / "second-prm"), "--model", model_dir, "--init", str(first),
        "--epochs", "1", "--fp32", "--held-out", "0.34",
    ])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "second-prm" / "prm_config.json").read_text())
    assert config["lora"]["layers"] == [1]  # the --init PRM's layout
    assert config["extra"]["training"]["hyperparameters"]["init_from"] == str(first)
