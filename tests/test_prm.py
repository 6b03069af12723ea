"""Personalised reward models: architecture, save/load, DPO training, resume, pair synthesis.

All on tiny random models with the embedded tokenizer (fast); the shipped PRM's checks
that need the embedded model are marked ``embedded``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from prefalign.compat import cache_kwargs, output_cache
from prefalign.errors import PrefalignError, TokenizerMismatchError
from prefalign.models import tokenizer_fingerprint
from prefalign.prm import build_prm, load_prm, save_prm
from prefalign.prm.data import encode_pairs, load_pair_rows, split_pairs
from prefalign.prm.train import TrainConfig, dpo_loss, train


def _ids(tokenizer, n=2, length=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


def _perturb(prm, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# --- architecture --------------------------------------------------------------------


def test_untrained_prm_equals_policy(tiny_model, tokenizer):
    prm = build_prm(tiny_model)
    ids = _ids(tokenizer)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as the engine batches
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        b = prm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(a, b)
    # PAD's token reward log_softmax(PRM) - log_softmax(policy) is exactly zero.
    assert torch.equal(torch.log_softmax(a, -1) - torch.log_softmax(b, -1), torch.zeros_like(a))
    assert sum(p.numel() for p in prm.trainable_parameters()) > 0


def test_prm_runs_with_kv_cache_like_the_engine(tiny_llama, tokenizer):
    from transformers import DynamicCache

    prm = build_prm(tiny_llama)
    _perturb(prm)
    ids = _ids(tokenizer, n=2, length=10)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = prm(input_ids=ids, attention_mask=mask).logits[:, -1]
        cache = DynamicCache(config=prm.config)
        out = prm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1,
                  **cache_kwargs(prm, cache))
        assert out.logits.shape == (2, 1, len(tokenizer))
        step = prm(
            input_ids=ids[:, -1:],
            attention_mask=mask,
            position_ids=torch.full((2, 1), ids.shape[1] - 1),
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(prm, output_cache(out)),
        ).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-4)
    assert prm.config is not None and next(prm.parameters()).device.type == "cpu"


def test_policy_left_unmodified(tiny_llama, tokenizer):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    modules = [type(m) for m in tiny_llama.modules()]
    prm = build_prm(tiny_llama)
    _perturb(prm)
    prm.merge_adapters()
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    assert modules == [type(m) for m in tiny_llama.modules()]
    # Frozen weights are shared, not copied.
    shared = tiny_llama.model.embed_tokens.weight.data_ptr()
    assert prm.backbone.embed_tokens.weight.data_ptr() == shared


def test_adapters_disabled_is_the_policy(tiny_llama, tokenizer):
    prm = build_prm(tiny_llama)
    _perturb(prm)
    ids = _ids(tokenizer)
    with torch.no_grad():
        a = tiny_llama(input_ids=ids).logits
        assert not torch.equal(a, prm(input_ids=ids).logits)
        with prm.adapters_disabled():
            assert torch.equal(a, prm(input_ids=ids).logits)
        assert not torch.equal(a, prm(input_ids=ids).logits)
    assert all(p.requires_grad for n, p in prm.named_parameters() if "lora_" in n)


def test_build_prm_on_fast_path_policy(tokenizer):
    from prefalign import fastpath

    if not fastpath.is_supported(torch.float32):
        pytest.skip(f"fast path not supported here: {fastpath.unsupported_reason(torch.float32)}")
    from conftest import _tiny_llama

    policy = _tiny_llama(len(tokenizer), seed=3)
    ids = _ids(tokenizer)
    with torch.no_grad():
        reference = policy(input_ids=ids).logits
    fastpath.optimize_for_cpu(policy, dtype=torch.float32)
    prm = build_prm(policy)
    assert fastpath.is_optimized(policy)
    assert not any(isinstance(m, fastpath.PackedLinear) for m in prm.modules())
    with torch.no_grad():
        assert torch.allclose(prm(input_ids=ids).logits, reference, atol=1e-4)


# --- save / load ---------------------------------------------------------------------


def test_save_load_round_trip(tiny_model, tokenizer, tmp_path):
    prm = build_prm(tiny_model)
    _perturb(prm)
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = prm(input_ids=ids).logits
    path = save_prm(prm, tmp_path / "prm", tokenizer, base_model_name="tiny", preferences=["concise"], extra={"k": 1}, dtype="float32")
    config = json.loads((path / "prm_config.json").read_text())
    assert config["base_model"] == "tiny" and config["preferences"] == ["concise"] and config["extra"] == {"k": 1}
    assert config["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    unmerged = load_prm(path, tiny_model, tokenizer, merge=False)
    merged = load_prm(path, tiny_model, tokenizer)
    with torch.no_grad():
        assert torch.equal(unmerged(input_ids=ids).logits, expected)
        diff = (merged(input_ids=ids).logits - expected).abs().max().item()
    assert diff < 1e-3, diff
    assert merged.merged and not any("lora_" in n for n, _ in merged.named_parameters())


def test_save_fp16_is_close(tiny_llama, tokenizer, tmp_path):
    prm = build_prm(tiny_llama)
    _perturb(prm, scale=0.01)
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = prm(input_ids=ids).logits
    save_prm(prm, tmp_path / "p", tokenizer, base_model_name="tiny", preferences=["x y"])
    loaded = load_prm(tmp_path / "p", tiny_llama, tokenizer, merge=False)
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - expected).abs().max().item() < 5e-3


def test_tokenizer_mismatch(tiny_llama, tokenizer, tmp_path):
    prm = build_prm(tiny_llama)
    save_prm(prm, tmp_path / "p", tokenizer, base_model_name="tiny", preferences=["concise"])
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<definitely_new_token>"])
    with pytest.raises(TokenizerMismatchError) as err:
        load_prm(tmp_path / "p", tiny_llama, other)
    message = str(err.value)
    assert tokenizer_fingerprint(tokenizer) in message and tokenizer_fingerprint(other) in message


def test_load_errors(tiny_llama, tokenizer, tmp_path):
    with pytest.raises(PrefalignError, match="not a PRM directory"):
        load_prm(tmp_path, tiny_llama, tokenizer)


def test_default_prm_path_error_or_shipped(tokenizer):
    from prefalign.prm import default_prm_path
    from prefalign.prm.io import SHIPPED_DIR, read_prm_config

    if not (SHIPPED_DIR / "prm_config.json").is_file():
        with pytest.raises(PrefalignError, match="train-prm"):
            default_prm_path()
        return
    config = read_prm_config(default_prm_path())
    assert config["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert len(config["preferences"]) >= 6
    size = sum(f.stat().st_size for f in SHIPPED_DIR.iterdir())
    assert size < 8 * 2**20


# --- training ------------------------------------------------------------------------

_TOPICS = [
    "How do I boil an egg?",
    "What is a good way to learn to swim?",
    "Why is the sky blue?",
    "How can I save money on groceries?",
    "What should I pack for a weekend trip?",
    "How do plants make food?",
    "What is the capital of France?",
    "How do I keep my houseplants alive?",
    "How do bees make honey?",
    "What makes bread rise?",
]


def _synthetic_rows():
    rows = []
    for q in _TOPICS:
        short = "Yes."
        long = "Here is a long and detailed answer with many words about it, step by step, in depth."
        rows.append({"preference": "concise", "prompt": q, "chosen": short, "rejected": long})
        rows.append({"preference": "verbose", "prompt": q, "chosen": long, "rejected": short})
    return rows


def _write_rows(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_loss_values():
    zero = torch.zeros(3)
    loss, _, _ = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx(0.6931, abs=1e-4)
    loss2, _, _ = dpo_loss(torch.ones(3) * 5, zero, zero, zero, beta=0.1)
    assert loss2 < loss


def test_dpo_loss_decreases_on_tiny_set(tiny_llama, tokenizer, tmp_path):
    data = _write_rows(tmp_path / "pairs.jsonl", _synthetic_rows())
    config = TrainConfig(
        data=data, output=tmp_path / "prm", epochs=6, batch_size=4, lr=1e-2, held_out=0.2, bf16=False,
        progress=False, checkpoint_every=100, seed=1, measure_before=True,
    )
    report = train(config, policy=tiny_llama, tokenizer=tokenizer)
    assert report["status"] == "done"
    assert report["held_out_before"]["accuracy"] == 0.5 and report["held_out_before"]["margin"] == 0.0
    assert not report["held_out_before"].get("derived")
    history = json.loads((tmp_path / "prm-checkpoints" / "report.json").read_text())["history_tail"]
    ckpt = torch.load(tmp_path / "prm-checkpoints" / "checkpoint.pt", weights_only=False)
    losses = [h["loss"] for h in ckpt["history"]]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, losses
    assert history and report["train_subset_after"]["loss"] < 0.6931
    # Same prompts never straddle the split.
    assert report["data"]["train_prompts"] + report["data"]["held_out_prompts"] == len(_TOPICS)
    # The trained PRM is saved and loads back.
    prm = load_prm(tmp_path / "prm", tiny_llama, tokenizer)
    assert sorted(prm.prm_config["preferences"]) == ["concise", "verbose"]


def test_resume_continues_at_the_right_step(tiny_llama, tokenizer, tmp_path):
    data = _write_rows(tmp_path / "pairs.jsonl", _synthetic_rows())

    def config(out, **kw):
        return TrainConfig(
            data=data, output=tmp_path / out, epochs=2, batch_size=4, lr=5e-3, held_out=0.2, bf16=False,
            progress=False, checkpoint_every=1, seed=2, **kw,
        )

    full = train(config("full"), policy=tiny_llama, tokenizer=tokenizer)
    total = full["steps"]["total"]
    part = train(config("part", stop_after_steps=2), policy=tiny_llama, tokenizer=tokenizer)
    assert part["status"] == "stopped"
    ckpt = torch.load(tmp_path / "part-checkpoints" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2
    resumed = train(config("part", resume=True), policy=tiny_llama, tokenizer=tokenizer)
    assert resumed["steps"]["done"] == total
    a = torch.load(tmp_path / "full-checkpoints" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part-checkpoints" / "checkpoint.pt", weights_only=False)
    assert [h["step"] for h in b["history"]] == list(range(1, total + 1))
    for name, tensor in a["trainable"].items():
        assert torch.allclose(tensor, b["trainable"][name], atol=1e-6), name


def test_resume_refuses_other_data(tiny_llama, tokenizer, tmp_path):
    rows = _synthetic_rows()
    data = _write_rows(tmp_path / "pairs.jsonl", rows)
    cfg = {"output": tmp_path / "p", "epochs": 1, "batch_size": 4, "bf16": False, "progress": False, "held_out": 0.2}
    train(TrainConfig(data=data, stop_after_steps=1, **cfg), policy=tiny_llama, tokenizer=tokenizer)
    data2 = _write_rows(tmp_path / "other.jsonl", rows[:-2])
    with pytest.raises(PrefalignError, match="other data"):
        train(TrainConfig(data=data2, resume=True, **cfg), policy=tiny_llama, tokenizer=tokenizer)


def test_pair_rows_validation_and_split(tokenizer, tmp_path):
    bad = _write_rows(tmp_path / "bad.jsonl", [{"preference": "concise", "prompt": "hi", "chosen": "a"}])
    with pytest.raises(PrefalignError, match="rejected"):
        load_pair_rows(bad)
    rows = load_pair_rows(_write_rows(tmp_path / "ok.jsonl", _synthetic_rows()))
    examples, dropped = encode_pairs(rows, tokenizer, max_answer_tokens=8)
    assert not dropped
    eos = tokenizer.eos_token_id
    short = next(e for e in examples if e.preference == "concise")
    assert short.chosen_ids[-1] == eos  # a complete answer ends its turn
    assert short.rejected_ids[-1] != eos and len(short.rejected_ids) == 8  # truncated: no end of turn
    assert "[Guidelines]" in tokenizer.decode(short.prompt_ids)
    train_set, eval_set = split_pairs(examples, 0.3, seed=0)
    assert not {e.group for e in train_set} & {e.group for e in eval_set}


def test_datasets_on_disk(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(_synthetic_rows()).save_to_disk(str(tmp_path / "ds"))
    assert len(load_pair_rows(tmp_path / "ds")) == len(_synthetic_rows())


# --- pair synthesis ------------------------------------------------------------------


def test_make_pairs_on_tiny_model(tiny_llama, tokenizer, tmp_path):
    from prefalign import Aligner
    from prefalign.eval.judges import judge_for
    from prefalign.prm.pairs import (
        CollapseFilter,
        PromptRow,
        read_rows,
        synthesize_pairs,
    )

    aligner = Aligner(tiny_llama, tokenizer)
    prompts = [PromptRow(f"t#{i}", q) for i, q in enumerate(_TOPICS[:3])]
    out = tmp_path / "pairs.jsonl"
    # A random model writes sub-word salad: relax the collapse filter for this test.
    relaxed = CollapseFilter(min_words=1, max_repetition=1.0, max_non_dictionary=1.0)
    stats = synthesize_pairs(
        aligner, prompts, out, preferences=("concise", "verbose"), base_samples=2, max_new_tokens=12,
        prompts_per_batch=2, collapse=relaxed, min_margins={"length_words": 1.0}, alternates={},
    )
    rows = list(read_rows(out))
    assert stats.samples == 3 * 4 and stats.rows == len(rows) > 0
    for row in rows:
        assert {"preference", "prompt", "chosen", "rejected"} <= set(row)
        judge = judge_for(row["preference"])
        assert judge.direction * (judge.score(row["chosen"]) - judge.score(row["rejected"])) >= 1.0
        assert row["prompt"] in _TOPICS
    # The rows train directly.
    examples, _ = encode_pairs(load_pair_rows(out), tokenizer)
    assert examples
    # Resuming skips prompts already done.
    again = synthesize_pairs(aligner, prompts, out, preferences=("concise", "verbose"), collapse=relaxed, alternates={})
    assert again.samples == 0 and len(list(read_rows(out))) == len(rows)


def test_collapse_filter():
    from prefalign.prm.pairs import CollapseFilter, pick_pair

    f = CollapseFilter()
    assert f.reason("ok") == "too_short"
    assert f.reason("the cat sat on the mat " * 10) == "repetition"
    assert f.reason("Boil the water, add the egg and wait ten minutes before cooling it.") is None
    assert pick_pair(["a", "b", "c"], [1.0, 5.0, 3.0], direction=-1, min_margin=1.0) == (0, 1)
    assert pick_pair(["a", "b"], [1.0, 1.5], direction=1, min_margin=1.0) is None


def test_training_prompts_exclude_evaluation(shared_data):
    from prefalign.prm.pairs import EVAL_HEAD_ROWS, evaluation_prompts, training_prompts

    rows = training_prompts(shared_data)
    assert rows and all(int(r.prompt_id.rpartition("#")[2]) >= EVAL_HEAD_ROWS for r in rows)
    held_out = evaluation_prompts(shared_data)
    assert not {r.text.strip().lower() for r in rows} & held_out


# --- the shipped PRM ---------------------------------------------------------------


@pytest.mark.embedded
def test_shipped_prm_loads_on_embedded_model(embedded):
    from prefalign.prm import default_prm_path
    from prefalign.prm.io import SHIPPED_DIR

    if not (SHIPPED_DIR / "prm_config.json").is_file():
        pytest.skip("no shipped PRM")
    prm = load_prm(default_prm_path(), embedded.model, embedded.tokenizer)
    ids = torch.tensor([embedded.tokenizer("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        a = torch.log_softmax(embedded.model(input_ids=ids).logits.float(), -1)
        b = torch.log_softmax(prm(input_ids=ids).logits.float(), -1)
    assert not torch.equal(a, b)  # trained: a non-zero reward
    assert torch.isfinite(b).all()


def test_adapters_on_top_layers_only(tiny_llama, tokenizer, tmp_path):
    prm = build_prm(tiny_llama, layers=[1])
    names = [n for n, _ in prm.lora_layers()]
    assert names and all(n.startswith("layers.1.") for n in names)
    _perturb(prm)
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = prm(input_ids=ids).logits
    save_prm(prm, tmp_path / "p", tokenizer, base_model_name="tiny", preferences=["concise"], dtype="float32")
    assert json.loads((tmp_path / "p" / "prm_config.json").read_text())["lora"]["layers"] == [1]
    loaded = load_prm(tmp_path / "p", tiny_llama, tokenizer, merge=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_shared_prefix_logps_match_full_sequences(tiny_model, tokenizer):
    from prefalign.prm.data import PairExample
    from prefalign.prm.train import sequence_logps, shared_prefix_logps

    prm = build_prm(tiny_model)
    _perturb(prm)
    e = PairExample(0, "c", "c", "q", list(range(5, 25)), [30, 31, 32, 2], [40, 41, 42, 43, 44, 45, 46])
    c, r = shared_prefix_logps(prm, e, pad_id=2)
    full = sequence_logps(prm, [(e.prompt_ids, e.chosen_ids), (e.prompt_ids, e.rejected_ids)], pad_id=2)
    assert torch.allclose(torch.cat([c, r]), full, atol=1e-3)


def test_interrupt_saves_checkpoint(tiny_llama, tokenizer, tmp_path, monkeypatch):
    import prefalign.prm.train as train_module

    data = _write_rows(tmp_path / "pairs.jsonl", _synthetic_rows())
    real = train_module.dpo_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second optimiser step (4 pairs per step)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "dpo_loss", flaky)
    cfg = {"data": data, "output": tmp_path / "p", "epochs": 1, "batch_size": 4, "bf16": False, "progress": False, "held_out": 0.2}
    report = train(TrainConfig(**cfg), policy=tiny_llama, tokenizer=tokenizer)
    assert report["status"] == "interrupted"
    ckpt = torch.load(tmp_path / "p-checkpoints" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 1
    monkeypatch.setattr(train_module, "dpo_loss", real)
    done = train(TrainConfig(resume=True, **cfg), policy=tiny_llama, tokenizer=tokenizer)
    assert done["status"] == "done" and done["steps"]["done"] == done["steps"]["total"]


def test_filter_rows_drops_short_readability_pairs():
    from prefalign.prm.pairs import filter_rows

    long = "This answer has quite a few words in it so that the readability grade means something at all here, really."
    rows = [
        {"judge": "fk_grade", "chosen": "Short text.", "rejected": long},
        {"judge": "fk_grade", "chosen": long, "rejected": long + " More."},
        {"judge": "length_words", "chosen": "Short text.", "rejected": long},
    ]
    assert filter_rows(rows) == rows[1:]


def test_policy_accelerated_after_loading(tokenizer, tmp_path):
    from prefalign import fastpath

    if not fastpath.is_supported(torch.float32):
        pytest.skip("fast path not supported here")
    from conftest import _tiny_llama

    policy = _tiny_llama(len(tokenizer), seed=4)
    prm = build_prm(policy)
    _perturb(prm)
    save_prm(prm, tmp_path / "p", tokenizer, base_model_name="tiny", preferences=["concise"], dtype="float32")
    loaded = load_prm(tmp_path / "p", policy, tokenizer)
    ids = _ids(tokenizer)
    with torch.no_grad():
        before = loaded(input_ids=ids).logits
    fastpath.optimize_for_cpu(policy, dtype=torch.float32)
    assert not any(isinstance(m, fastpath.PackedLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


def test_prm_from_checkpoint(tiny_llama, tokenizer, tmp_path):
    from prefalign.prm.train import prm_from_checkpoint

    data = _write_rows(tmp_path / "pairs.jsonl", _synthetic_rows())
    cfg = TrainConfig(data=data, output=tmp_path / "p", epochs=1, batch_size=4, bf16=False, progress=False,
                      held_out=0.2, lora_top_layers=1, stop_after_steps=2, lr=1e-2)
    train(cfg, policy=tiny_llama, tokenizer=tokenizer)
    prm = prm_from_checkpoint(tmp_path / "p-checkpoints" / "checkpoint.pt", tiny_llama)
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert not torch.equal(prm(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    assert all(n.startswith("layers.1.") for n, _ in prm.lora_layers())


def test_collapse_filter_template_echo_and_chosen_gate():
    from prefalign.prm.pairs import CollapseFilter, pick_pair

    f = CollapseFilter()
    assert f.reason("[Guidelines] Your task is to generate response by considering the following principle.") == "template_echo"
    assert f.reason("guideline: [Principle] Your answer must be concise and focused on the topic") == "template_echo"
    # The best-scoring candidate may not be chosen: the next best is.
    assert pick_pair(["a", "b", "c"], [1.0, 5.0, 3.0], direction=1, min_margin=1.0, can_choose=[True, False, True]) == (2, 0)
    assert pick_pair(["a", "b"], [1.0, 5.0], direction=1, min_margin=1.0, can_choose=[False, False]) is None


def test_make_pairs_on_policy_collapse_rows_and_pools(tiny_llama, tokenizer, tmp_path):
    """On-policy answers that collapse become rejected answers against the judge's best
    clean answer; every sample is kept in the pools file."""
    from prefalign import Aligner
    from prefalign.prm.pairs import (
        CollapseFilter,
        PromptRow,
        read_rows,
        synthesize_pairs,
    )

    aligner = Aligner(tiny_llama, tokenizer)
    prompts = [PromptRow(f"t#{i}", q) for i, q in enumerate(_TOPICS[:2])]
    # The on-policy method decodes greedily: its answers are known in advance. Flag exactly those.
    greedy = {
        aligner.engine.generate([aligner.build_request(p.text, pref, "pref", max_new_tokens=10)])[0].text.strip()
        for p in prompts for pref in ("concise", "verbose")
    }

    class FlagGreedy(CollapseFilter):
        def reason(self, text):
            return "loop" if text.strip() in greedy else None

    out = tmp_path / "pairs.jsonl"
    stats = synthesize_pairs(
        aligner, prompts, out, preferences=("concise", "verbose"), base_samples=2, max_new_tokens=10,
        prompts_per_batch=2, collapse=FlagGreedy(), min_margins={"length_words": 0.5}, alternates={},
        on_policy="pref", chosen_max_repetition=None,
    )
    rows = list(read_rows(out))
    loops = [r for r in rows if r["judge"] == "collapse"]
    assert loops and all(r["rejected"] in greedy and r["rejected_source"].startswith("pref:") for r in loops)
    assert all(r["chosen"] not in greedy for r in loops)
    pools = list(read_rows(out.with_name(out.name + ".pools.jsonl")))
    assert len(pools) == stats.samples == 2 * (2 + 2 + 2)  # per prompt: 2 preference samples, 2 base, 2 on-policy
    assert {p["collapsed"] for p in pools if p["source"].startswith("pref:")} == {"loop"}


def test_train_from_an_earlier_prm(tiny_llama, tokenizer, tmp_path):
    """--init starts from a trained PRM: same weights at step 0, and the held-out
    'before' is measured (not the untrained PRM's derived zeros)."""
    from prefalign.prm.train import prm_from_checkpoint

    data = _write_rows(tmp_path / "pairs.jsonl", _synthetic_rows())
    common = {"data": data, "batch_size": 4, "bf16": False, "progress": False, "held_out": 0.2, "lr": 1e-2}
    train(TrainConfig(output=tmp_path / "first", epochs=2, lora_top_layers=1, **common), policy=tiny_llama, tokenizer=tokenizer)
    first = load_prm(tmp_path / "first", tiny_llama, tokenizer, merge=False)
    report = train(
        TrainConfig(output=tmp_path / "second", epochs=1, init_from=tmp_path / "first", stop_after_steps=0, **common),
        policy=tiny_llama, tokenizer=tokenizer,
    )
    assert report["status"] == "stopped"
    start = prm_from_checkpoint(tmp_path / "second-checkpoints" / "checkpoint.pt", tiny_llama)
    assert [n for n, _ in start.lora_layers()] == [n for n, _ in first.lora_layers()]  # the init's layout, not the defaults
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(start(input_ids=ids).logits, first(input_ids=ids).logits, atol=1e-5, rtol=0)
    done = train(TrainConfig(output=tmp_path / "second", epochs=1, init_from=tmp_path / "first", resume=True, **common),
                 policy=tiny_llama, tokenizer=tokenizer)
    assert not done["held_out_before"].get("derived") and done["held_out_before"]["margin"] != 0.0
    assert done["hyperparameters"]["init_from"] == str(tmp_path / "first")


def test_make_pairs_on_policy_params_pairs_and_greedy_pref(tiny_llama, tokenizer, tmp_path):
    """--on-policy-param reaches the on-policy method; --on-policy-pairs rejects a clean
    on-policy answer the judge's best beats by the margin; --greedy-pref adds pref's
    greedy answers to the pool."""
    from prefalign import Aligner
    from prefalign.errors import PrefalignError
    from prefalign.prm.pairs import PromptRow, read_rows, synthesize_pairs

    aligner = Aligner(tiny_llama, tokenizer)
    prompts = [PromptRow(f"t#{i}", q) for i, q in enumerate(_TOPICS[:3])]
    prefs = ("concise", "verbose")

    def greedy(method, **params):
        return {
            (p.prompt_id, pref): aligner.engine.generate(
                [aligner.build_request(p.text, pref, method, max_new_tokens=10, **params)]
            )[0].text.strip()
            for p in prompts for pref in prefs
        }

    la_answers, pref_answers = greedy("la", r=0.5), greedy("pref")
    assert la_answers != greedy("la")  # r=0.5 must differ from the default r=2 for the test to mean anything
    out = tmp_path / "pairs.jsonl"
    margin = 0.5
    synthesize_pairs(
        aligner, prompts, out, preferences=prefs, base_samples=2, max_new_tokens=10, prompts_per_batch=3,
        min_margins={"length_words": margin}, alternates={}, chosen_max_repetition=None,
        on_policy="la", on_policy_params={"r": 0.5}, on_policy_pairs=True, greedy_pref=True,
    )
    pools = list(read_rows(out.with_name(out.name + ".pools.jsonl")))
    for p in pools:
        if ":" in p["source"]:
            kind, pref = p["source"].split(":", 1)
            expected = la_answers if kind == "la" else pref_answers
            assert p["text"] == expected[(p["prompt_id"], pref)], p["source"]
    assert {p["source"].split(":")[0] for p in pools} >= {"la", "pref-greedy"}
    rows = list(read_rows(out))
    own = [r for r in rows if r.get("pair") == "on-policy"]
    assert own, "expected at least one on-policy row with these random answers"
    for r in own:
        assert r["rejected"] == la_answers[(r["prompt_id"], r["preference"])]
        assert r["direction"] * (r["chosen_score"] - r["rejected_score"]) >= margin
        judged = [x for x in rows if x["prompt_id"] == r["prompt_id"] and x["preference"] == r["preference"] and "pair" not in x]
        assert all(x["rejected_source"] != r["rejected_source"] for x in judged)  # never the same pair twice
    with pytest.raises(PrefalignError, match="on_policy"):
        synthesize_pairs(aligner, prompts, tmp_path / "x.jsonl", preferences=prefs, on_policy_pairs=True)


def test_train_without_held_out_split(tiny_llama, tokenizer, tmp_path):
    """held_out=0 (or data from a single prompt) trains and reports an empty held-out set
    instead of dividing by zero."""
    data = _write_rows(tmp_path / "pairs.jsonl", _synthetic_rows())
    report = train(TrainConfig(data=data, output=tmp_path / "p", epochs=1, batch_size=4, bf16=False, progress=False,
                               held_out=0.0, lora_top_layers=1, lr=1e-2), policy=tiny_llama, tokenizer=tokenizer)
    assert report["status"] == "done"
    assert report["held_out_before"]["pairs"] == 0 and report["held_out_after"] == {"pairs": 0}
    assert report["policy_likelihood_baseline"] == {"pairs": 0}
    assert (tmp_path / "p" / "prm_config.json").is_file()


def test_train_in_another_template(tiny_llama, tokenizer, tmp_path):
    """--template renders the pairs in that template and records it in prm_config.json."""
    from prefalign.prm.data import encode_pairs
    from prefalign.prm.io import read_prm_config
    from prefalign.prompts import encode_context, to_chat

    rows = _synthetic_rows()
    examples, _ = encode_pairs(rows[:1], tokenizer, template="default")
    text = examples[0].preference_text
    assert examples[0].prompt_ids == encode_context(tokenizer, to_chat(rows[0]["prompt"]), text, "default")
    assert examples[0].prompt_ids != encode_context(tokenizer, to_chat(rows[0]["prompt"]), text, "pad")
    data = _write_rows(tmp_path / "pairs.jsonl", rows)
    report = train(TrainConfig(data=data, output=tmp_path / "p", epochs=1, batch_size=4, bf16=False, progress=False,
                               held_out=0.2, lora_top_layers=1, stop_after_steps=None, template="default"),
                   policy=tiny_llama, tokenizer=tokenizer)
    assert report["hyperparameters"]["template"] == "default"
    assert read_prm_config(tmp_path / "p")["template"] == "default"


def test_make_pairs_samples_in_the_given_template(tiny_llama, tokenizer, tmp_path):
    """template= renders the sampled answers' prompts (here greedy, so the answers are known)."""
    from prefalign import Aligner
    from prefalign.prm.pairs import PromptRow, read_rows, synthesize_pairs

    aligner = Aligner(tiny_llama, tokenizer)
    prompts = [PromptRow(f"t#{i}", q) for i, q in enumerate(_TOPICS[:2])]

    def greedy(template):
        return {(p.prompt_id, pref): aligner.engine.generate(
            [aligner.build_request(p.text, pref, "pref", template=template, max_new_tokens=8)])[0].text.strip()
            for p in prompts for pref in ("concise", "verbose")}

    in_default, in_pad = greedy("default"), greedy("pad")
    assert in_default != in_pad
    out = tmp_path / "pairs.jsonl"
    synthesize_pairs(aligner, prompts, out, preferences=("concise", "verbose"), base_samples=0, temperature=0.0,
                     max_new_tokens=8, alternates={}, template="default")
    pools = list(read_rows(out.with_name(out.name + ".pools.jsonl")))
    assert len(pools) == 4
    assert {(p["prompt_id"], p["source"]): p["text"] for p in pools} == in_default
