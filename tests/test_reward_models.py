"""Reward-model judges on tiny random sequence-classification models saved to tmp dirs.

Each score is checked against a direct, unbatched forward of the same model on the
input laid out by hand, so batching, padding, head selection and input formats are
all pinned down.
"""

from __future__ import annotations

import json

import pytest
import torch

from prefalign.errors import ModelLoadError, PrefalignError
from prefalign.eval.reward_models import HH_LAYOUT, RewardModelJudge, parse_rm_spec

torch.set_num_threads(1)

ITEMS = [
    ("Why is the sky blue?", "Rayleigh scattering of sunlight.", "Your answer should be concise as much as possible."),
    ("How do I boil an egg?", "Put it in boiling water for nine minutes, then cool it in cold water.", "Be formal."),
    ("Name a prime.", "7", None),
]
LABELS = {0: "helpfulness", 1: "safety", 2: "humor"}


@pytest.fixture(scope="module")
def llama_rm_dir(tmp_path_factory, tokenizer):
    """Llama-style RM with three named outputs and the embedded tokenizer's chat template."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()}, problem_type="regression", pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
    )
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("llama_rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert tokenizer.chat_template
    return path


@pytest.fixture(scope="module")
def gpt2_rm_dir(tmp_path_factory, tokenizer):
    """GPT-2-style scalar RM whose tokenizer has no chat template and no pad token id in config."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, num_labels=1, initializer_range=0.3)
    model = GPT2ForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("gpt2_rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (path / extra).unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(path).chat_template
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    """A two-label single-label classifier (like a humour classifier), no chat template."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(2)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, num_labels=2,
                        id2label={0: "no_humor", 1: "humor"}, label2id={"no_humor": 0, "humor": 1},
                        problem_type="single_label_classification", initializer_range=0.3,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("clf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def _direct(path, ids):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_llama_chat_template_heads_match_direct_forward(llama_rm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_rm_dir)
    for head, index in (("@1", 1), ("@safety", 1), ("@HUMOR", 2), ("@0", 0)):
        judge = RewardModelJudge(f"{llama_rm_dir}{head},batch=2")
        assert judge.format == "chat" and judge.mode == "raw" and judge.head == index
        scores = judge.score_many(ITEMS)
        for (prompt, answer, pref), got in zip(ITEMS, scores):
            user = f"{prompt} {pref}" if pref else prompt
            text = tok.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids[:2] != [tok.bos_token_id] * 2  # special tokens not added twice
            assert got == pytest.approx(float(_direct(llama_rm_dir, ids)[index]), abs=1e-4)
    assert RewardModelJudge(f"{llama_rm_dir}@safety").name.endswith("@safety")
    assert RewardModelJudge(f"{llama_rm_dir}@1").name == RewardModelJudge(f"{llama_rm_dir}@safety").name


def test_preference_off_changes_the_input(llama_rm_dir):
    with_pref = RewardModelJudge(f"{llama_rm_dir}@0")
    without = RewardModelJudge(f"{llama_rm_dir}@0,pref=no")
    assert with_pref.name != without.name
    a = with_pref.score_many(ITEMS[:1])[0]
    b = without.score_many(ITEMS[:1])[0]
    c = without.score_many([(ITEMS[0][0], ITEMS[0][1], None)])[0]
    assert a != b and b == pytest.approx(c, abs=1e-6)


def test_gpt2_scalar_rm_uses_hh_pair_layout(gpt2_rm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_rm_dir)
    judge = RewardModelJudge(str(gpt2_rm_dir) + ",batch=3")
    assert judge.format == "hh" and judge.mode == "raw" and judge.head is None
    scores = judge.score_many(ITEMS)
    for (prompt, answer, pref), got in zip(ITEMS, scores):
        user = f"{prompt} {pref}" if pref else prompt
        ids = tok(HH_LAYOUT.format(prompt=user), answer)["input_ids"]
        assert got == pytest.approx(float(_direct(gpt2_rm_dir, ids)[0]), abs=1e-4)
    assert len(set(scores)) == 3  # distinct inputs, distinct scores: the batch did not mix rows


def test_classifier_label_probability(classifier_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifier_dir)
    judge = RewardModelJudge(f"{classifier_dir}@humor")
    assert judge.mode == "prob" and judge.format == "answer"
    for (_, answer, _), got in zip(ITEMS, judge.score_many(ITEMS)):
        probs = torch.softmax(_direct(classifier_dir, tok(answer)["input_ids"]), -1)
        assert got == pytest.approx(float(probs[1]), abs=1e-5)
        assert 0.0 <= got <= 1.0
    raw = RewardModelJudge(f"{classifier_dir}@humor,mode=raw")
    assert raw.name != judge.name and raw.score_many(ITEMS[:1])[0] != judge.score_many(ITEMS[:1])[0]


def test_truncation_is_counted(gpt2_rm_dir):
    judge = RewardModelJudge(f"{gpt2_rm_dir},max_length=8")
    judge.score_many(ITEMS)
    assert judge.truncated == 3


def test_head_errors_name_the_outputs(llama_rm_dir):
    with pytest.raises(PrefalignError, match="3 outputs.*helpfulness, safety, humor"):
        RewardModelJudge(str(llama_rm_dir))
    with pytest.raises(PrefalignError, match="out of range"):
        RewardModelJudge(f"{llama_rm_dir}@7")
    with pytest.raises(PrefalignError, match="no output named 'funny'.*1=safety"):
        RewardModelJudge(f"{llama_rm_dir}@funny")


def test_remote_code_needs_opt_in(tmp_path, gpt2_rm_dir):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(gpt2_rm_dir, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_x.XForReward"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="ships its own model code.*--judge-trust-remote-code"):
        RewardModelJudge(str(custom))


def test_unreachable_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is not reachable.*local-dir DIR"):
        RewardModelJudge("nobody-here/no-such-reward-model-xyz")
    with pytest.raises(ModelLoadError, match="not found"):
        RewardModelJudge("./no/such/dir")


def test_spec_parsing():
    s = parse_rm_spec("Ray2333/gpt2-large-helpful-reward_model,pref=no,only=pad:helpful+helpful,batch=4")
    assert (s.source, s.head, s.preference, s.only, s.batch_size) == (
        "Ray2333/gpt2-large-helpful-reward_model", None, False, ("pad:helpful", "helpful"), 4)
    assert parse_rm_spec(s.spec) == s
    assert parse_rm_spec("RLHFlow/ArmoRM-Llama3-8B-v0.1@6").head == 6
    assert parse_rm_spec("x@ultrafeedback-instruction_following").head == "ultrafeedback-instruction_following"
    for bad, msg in (("x,colour=red", "unknown option"), ("x,format=xml", "format"), ("x@", "nothing after"),
                     ("x,batch=0", "batch"), ("", "names no model")):
        with pytest.raises(PrefalignError, match=msg):
            parse_rm_spec(bad)


# --- judging a results directory ------------------------------------------------------------


def test_judge_run_stores_scores_under_the_name_and_reruns_cost_nothing(tmp_path, llama_rm_dir, gpt2_rm_dir, monkeypatch):
    from judge_helpers import make_run

    from prefalign.eval.judging import build_judges, judge_run

    answers = {"base": ["alpha beta", "gamma", "delta epsilon zeta"], "pref": ["eta", "theta iota", "kappa"]}
    d = make_run(tmp_path / "run", answers)
    judges = build_judges([f"rm:{llama_rm_dir}@safety", f"rm:{gpt2_rm_dir},pref=no"])
    assert judges[0].name != judges[1].name
    [s1, s2] = judge_run(d, judges, progress=False)
    assert (s1.items, s1.judged, s1.cached) == (6, 6, 0)
    rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    direct = RewardModelJudge(f"{llama_rm_dir}@safety")
    for row in rows:
        assert set(row["judged"]) == {judges[0].name, judges[1].name}
        want = direct.score_many([(row["prompt"], row["text"], row["preference_text"])])[0]
        assert row["judged"][judges[0].name]["score"] == pytest.approx(want, abs=1e-4)
        assert row["score"] == float(len(row["text"].split()))  # the proxy score is untouched

    calls = {"n": 0}
    real = RewardModelJudge.score_ids

    def counting(self, ids):
        calls["n"] += len(ids)
        return real(self, ids)

    monkeypatch.setattr(RewardModelJudge, "score_ids", counting)
    [t1, t2] = judge_run(d, judges, progress=False)
    assert calls["n"] == 0 and (t1.judged, t1.cached) == (0, 6)

    # the cache alone (rows rewritten without the field, e.g. an interrupted merge) is enough
    for r in rows:
        r.pop("judged")
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge_run(d, judges, progress=False)
    assert calls["n"] == 0
    rows2 = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    assert all(judges[1].name in r["judged"] for r in rows2)

    # a grown run: only the new rows are scored
    new_rows = [json.loads(line) for line in
                (make_run(tmp_path / "other", {"amulet": ["lambda mu", "nu", "xi"]}) / "results.jsonl").read_text().splitlines()]
    with (d / "results.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in new_rows))
    judge_run(d, judges[:1], progress=False)
    assert calls["n"] == 3
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["judges"][judges[0].name]["head"] == {"index": 1, "label": "safety"}


def test_only_selects_preferences_with_or_without_namespace():
    from prefalign.eval.reward_models import preference_selected

    assert preference_selected("pad:humor", ()) and preference_selected("anything", ())
    assert preference_selected("pad:humor", ("pad:humor",)) and preference_selected("humor", ("pad:humor",))
    assert preference_selected("pad:humor", ("humor",))
    assert not preference_selected("pad:helpful", ("pad:humor",)) and not preference_selected("concise", ("humor",))
