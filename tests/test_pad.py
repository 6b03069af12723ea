"""PAD decoding: the combine rule by hand, zero reward == base, several preferences,
engine == uncached reference, batch invariance, sampling, and the PRM errors."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign import Aligner
from prefalign.errors import PrefalignError
from prefalign.methods import PARAM_ALIASES, PRM, Pad, make_method
from prefalign.methods.pad import pad_scores
from prefalign.prompts import PAD_GUIDELINE_TEMPLATE
from prefalign.reference import reference_generate

PROMPTS = [
    "Hi",
    "Explain in detail why the sky is blue and what Rayleigh scattering means.",
    "List three fruits.",
]
NEG = float("-inf")


@pytest.fixture(scope="module")
def other_llama(tokenizer):
    """A second tiny model with other random weights: a stand-in PRM with non-zero rewards."""
    from conftest import _tiny_llama

    return _tiny_llama(len(tokenizer), seed=1)


@pytest.fixture
def same_prm(tiny_llama, tokenizer):
    """The policy as its own PRM: reward exactly zero."""
    al = Aligner(tiny_llama, tokenizer)
    al.add_model(PRM, tiny_llama)
    return al


@pytest.fixture
def pad_aligner(tiny_llama, other_llama, tokenizer):
    al = Aligner(tiny_llama, tokenizer)
    al.add_model(PRM, other_llama)
    return al


# --- the rule on small tensors ---------------------------------------------------------


def _lsm(values):
    m = max(values)
    z = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - z for v in values]


def test_combine_by_hand_one_preference():
    # Policy logits over V=6; candidates = its top-3: tokens 1, 4, 0.
    policy_logits = torch.tensor([[2.0, 5.0, -1.0, 0.0, 3.0, -3.0]])
    prm_logits = torch.tensor([[4.0, 1.0, 9.0, 0.0, 2.0, 7.0]])  # likes 2 and 5, which are off the top-3
    policy = torch.log_softmax(policy_logits, -1)
    prm = torch.log_softmax(prm_logits, -1)
    method = Pad(w=0.5, k=3, plausibility=0.0)
    scores = method.score(torch.stack([policy, prm], dim=1), torch.tensor([1.0]))

    cand = [1, 4, 0]
    r = [a - b for a, b in zip(_lsm([prm_logits[0, c].item() for c in cand]), _lsm([policy_logits[0, c].item() for c in cand]))]
    # The paper adds w·r to the raw logits; the engine gives log-softmax (logits − const per row).
    const = torch.logsumexp(policy_logits, -1).item()
    expected = [NEG] * 6
    for c, rc in zip(cand, r):
        expected[c] = policy_logits[0, c].item() - const + 0.5 * rc
    assert torch.allclose(scores, torch.tensor([expected]), atol=1e-6)
    # Off the candidates: −inf even where the PRM is confident.
    assert scores[0, 2] == NEG and scores[0, 5] == NEG and scores[0, 3] == NEG
    # By hand: r(1) = lsm_prm(1) − lsm_pol(1); the PRM prefers 0 (logit 4) among the candidates.
    assert scores[0].argmax().item() == 1  # w=0.5 is not enough to overturn the policy's margin of 3
    assert Pad(w=3.0, k=3, plausibility=0.0).score(torch.stack([policy, prm], dim=1), torch.tensor([1.0]))[0].argmax().item() == 0


def test_combine_equals_paper_rule_on_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    prm_logits = torch.randn(4, 50) * 3
    ours = Pad(w=0.8, k=10, plausibility=0.0).score(
        torch.stack([torch.log_softmax(logits, -1), torch.log_softmax(prm_logits, -1)], dim=1), torch.tensor([1.0])
    )
    # The official code: new_scores = w·(lsm(rm[topk]) − lsm(base[topk])) + base_logits[topk].
    top_logits, top = logits.topk(10, -1)
    paper = 0.8 * (torch.log_softmax(prm_logits.gather(-1, top), -1) - torch.log_softmax(top_logits, -1)) + top_logits
    shift = torch.logsumexp(logits, -1, keepdim=True)
    assert torch.allclose(ours.gather(-1, top), paper - shift, atol=1e-5)
    assert torch.equal(ours.argmax(-1), top.gather(-1, paper.argmax(-1, keepdim=True))[:, 0])
    assert torch.isinf(ours).sum().item() == 4 * 40
    # Same sampling distribution over the candidates at any temperature.
    for t in (0.7, 1.0):
        assert torch.allclose(torch.softmax(ours / t, -1).gather(-1, top), torch.softmax(paper / t, -1), atol=1e-6)


def test_combine_zero_weight_and_identical_prm():
    torch.manual_seed(1)
    lp = torch.log_softmax(torch.randn(3, 30), -1)
    other = torch.log_softmax(torch.randn(3, 30), -1)
    top = lp.topk(10, -1)
    # w = 0: the policy restricted to its top-k, whatever the PRM says.
    zero = Pad(w=0.0, plausibility=0.0).score(torch.stack([lp, other], 1), torch.tensor([1.0]))
    assert torch.equal(zero.gather(-1, top.indices), top.values)
    # PRM == policy: reward exactly zero, scores exactly the policy's on the candidates.
    same = Pad(w=1.5, plausibility=0.0).score(torch.stack([lp, lp], 1), torch.tensor([1.0]))
    assert torch.equal(same.gather(-1, top.indices), top.values)
    assert torch.equal(same.argmax(-1), lp.argmax(-1))


def test_combine_several_preferences_weighted_sum_of_rewards():
    torch.manual_seed(2)
    n, v, k, w = 2, 40, 5, 0.7
    b = torch.log_softmax(torch.randn(n, 2, v) * 2, -1)  # policy under preferences 0 and 1
    m = torch.log_softmax(torch.randn(n, 2, v) * 2, -1)  # PRM under preferences 0 and 1
    weights = torch.tensor([1.0, 3.0])
    scores = Pad(w=w, k=k, plausibility=0.0).score(torch.cat([b, m], dim=1), weights)  # roles: [b_0, b_1, m_0, m_1]

    share = weights / weights.sum()
    base = share[0] * b[:, 0] + share[1] * b[:, 1]  # the policy's score: weighted mean, as in `pref`
    for row in range(n):
        cand = base[row].topk(k).indices
        reward = sum(
            share[i] * (torch.log_softmax(m[row, i, cand], -1) - torch.log_softmax(b[row, i, cand], -1)) for i in range(2)
        )
        expected = torch.full((v,), NEG)
        expected[cand] = base[row, cand] + w * reward
        assert torch.allclose(scores[row], expected, atol=1e-5)
    # Weights scale together: (1, 3) and (2, 6) give the same scores.
    assert torch.allclose(scores, Pad(w=w, k=k, plausibility=0.0).score(torch.cat([b, m], 1), weights * 2), atol=1e-6)


def test_combine_policy_minus_inf_candidates_stay_minus_inf():
    lp = torch.log_softmax(torch.tensor([[3.0, 1.0, NEG, NEG, NEG]]), -1)
    prm = torch.log_softmax(torch.tensor([[0.0, 2.0, 5.0, 1.0, 1.0]]), -1)
    scores = Pad(w=1.0, k=4, plausibility=0.0).score(torch.stack([lp, prm], 1), torch.tensor([1.0]))
    assert not torch.isnan(scores).any()
    assert scores[0, 2:].tolist() == [NEG] * 3
    assert torch.isfinite(scores[0, :2]).all()


def test_pad_scores_k_larger_than_vocab():
    lp = torch.log_softmax(torch.randn(1, 4), -1)
    out = pad_scores(lp, lp[:, None], lp[:, None], torch.tensor([1.0]), 1.0, 10)
    assert torch.allclose(out, lp)


def test_plausibility_drops_implausible_candidates_by_hand():
    # Policy probabilities over V=5: 0.5, 0.3, 0.1, 0.06, 0.04; the PRM loves token 4.
    policy = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    prm = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0, 8.0]]), -1)
    stacked, one = torch.stack([policy, prm], 1), torch.tensor([1.0])
    plain = Pad(w=2.0, k=5, plausibility=0.0).score(stacked, one)
    assert plain[0].argmax().item() == 4  # the paper's rule: any top-k candidate may win
    # plausibility = 0.15: candidates need probability ≥ 0.15 · 0.5 = 0.075 → tokens 0, 1, 2.
    floored = Pad(w=2.0, k=5, plausibility=0.15).score(stacked, one)
    assert floored[0, 3:].tolist() == [NEG, NEG]
    # Kept candidates keep their scores exactly (rewards are normalised over all top-k).
    assert torch.equal(floored[0, :3], plain[0, :3])
    # Uniform PRM over 0–3: score = log p − 2·log p + const, so the least likely *kept* token wins.
    assert floored[0].argmax().item() == 2
    # Several preferences: the floor applies to the weighted policy score.
    two = torch.cat([policy, policy, prm, prm], 0)[None]
    assert torch.equal(Pad(w=2.0, k=5, plausibility=0.15).score(two, torch.tensor([1.0, 3.0])), floored)


def test_plausibility_near_one_is_greedy_policy(pad_aligner):
    """Only the policy's favourite survives the floor: PAD decodes what ``pref`` decodes."""
    pad = pad_aligner.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=12, w=5.0, plausibility=0.999)
    pref = pad_aligner.generate(PROMPTS, preference="pad:humor", method="pref", template="pad", max_new_tokens=12)
    assert [r.token_ids for r in pad] == [r.token_ids for r in pref]
    plain = pad_aligner.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=12, w=5.0)
    assert [r.token_ids for r in plain] != [r.token_ids for r in pref]  # the reward does act without it


def test_parameters_aliases_and_validation():
    assert make_method("pad") == Pad(w=1.6, k=10, plausibility=0.2)  # tuned for the shipped PRM (docs/prm.md)
    assert make_method("pad", rm_weight=1.5, topk=5) == Pad(w=1.5, k=5)
    assert make_method("pad", w=1) == Pad(w=1.0)
    # min_p, PAD's old name of the plausibility rule it shares with la and amulet, still works.
    assert make_method("pad", min_p=0.1) == make_method("pad", plausibility=0.1) == Pad(plausibility=0.1)
    assert Pad.aliases["min_p"] == "plausibility" and PARAM_ALIASES["min_p"] == "plausibility"
    with pytest.raises(PrefalignError, match="plausibility must be"):
        make_method("pad", min_p=1.0)
    with pytest.raises(PrefalignError, match="no parameter 'min_p'"):
        make_method("la", min_p=0.1)  # the alias is PAD's; la always called it plausibility
    for bad in ({"k": 0}, {"k": 2.5}, {"w": -0.1}, {"w": float("nan")}, {"plausibility": 1.0}, {"plausibility": -0.1}, {"candidate_template": "chatml"}):
        with pytest.raises(PrefalignError) as info:
            make_method("pad", **bad)
        assert info.value.field in bad
    roles = Pad().roles(2)
    assert [(r.preference, r.model) for r in roles] == [(0, "policy"), (1, "policy"), (0, "prm"), (1, "prm")]
    assert Pad.default_template == "pad" and Pad().extra_models == ("prm",)


# --- through the engine --------------------------------------------------------------------


def test_contexts_show_the_guideline_to_both_models(same_prm):
    request = same_prm.build_request(PROMPTS[2], "pad:humor", "pad", max_new_tokens=4)
    assert [m for m, _ in request.contexts] == ["policy", "prm"]
    assert request.contexts[0][1] == request.contexts[1][1]
    text = same_prm.tokenizer.decode(request.contexts[0][1])
    assert PAD_GUIDELINE_TEMPLATE.format(principles="humor", instruction=PROMPTS[2]) in text
    assert request.primary == 0


def test_zero_reward_pad_equals_base_with_pad_template(same_prm):
    """PRM == policy: PAD decodes exactly what the policy decodes from the guideline prompt."""
    for pref in ("pad:helpful+harmless", [("pad:helpful", 1.0), ("pad:humor", 2.0)]):
        pad = same_prm.generate(PROMPTS, preference=pref, method="pad", max_new_tokens=16, w=1.0)
        base = same_prm.generate(PROMPTS, preference=pref, method="pref", template="pad", max_new_tokens=16)
        assert [r.token_ids for r in pad] == [r.token_ids for r in base]
        assert all(len(r.token_ids) > 0 for r in pad)


def test_untrained_prm_gives_zero_reward(tiny_llama, tokenizer):
    """The identity-initialised PRM with untrained adapters (once prefalign.prm exists)."""
    prm_api = pytest.importorskip("prefalign.prm")
    if not hasattr(prm_api, "build_prm"):
        pytest.skip("prefalign.prm has no build_prm yet")
    al = Aligner(tiny_llama, tokenizer)
    al.add_model(PRM, prm_api.build_prm(tiny_llama).eval())
    pad = al.generate(PROMPTS, preference="pad:helpful", method="pad", max_new_tokens=12, w=1.5)
    base = al.generate(PROMPTS, preference="pad:helpful", method="pref", template="pad", max_new_tokens=12)
    assert [r.token_ids for r in pad] == [r.token_ids for r in base]


def test_engine_equals_uncached_reference(pad_aligner):
    al = pad_aligner
    for pref in ("pad:humor", [("pad:helpful", 1.0), ("pad:humor", 0.5)]):
        requests = [al.build_request(p, pref, "pad", max_new_tokens=12, w=1.5) for p in PROMPTS]
        expected = reference_generate(al.engine.models, requests, al.engine.eos_token_ids, al.tokenizer.pad_token_id)
        got = [r.token_ids for r in al.engine.generate(requests)]
        assert got == expected


def test_candidate_template_same_as_request_is_the_two_context_rule(pad_aligner):
    """A third context identical to the first changes nothing: same tokens, exactly."""
    for pref in ("pad:humor", [("pad:helpful", 1.0), ("pad:humor", 0.5)]):
        two = pad_aligner.generate(PROMPTS, preference=pref, method="pad", max_new_tokens=14, w=1.5)
        three = pad_aligner.generate(PROMPTS, preference=pref, method="pad", max_new_tokens=14, w=1.5, candidate_template="pad")
        assert [r.token_ids for r in three] == [r.token_ids for r in two]


def test_candidate_template_contexts_and_zero_reward(same_prm, pad_aligner):
    request = same_prm.build_request(PROMPTS[2], "pad:humor", "pad", max_new_tokens=4, candidate_template="default")
    assert [m for m, _ in request.contexts] == ["policy", "prm", "policy"]
    assert request.contexts[0][1] == request.contexts[1][1]  # the reward's two contexts: the guideline prompt
    assert request.contexts[2][1] == same_prm.encode_context(PROMPTS[2], "pad:humor", template="default")
    assert request.primary == 2
    # The evaluation scores perplexity after the base context of the template the answer continues.
    from prefalign.eval.runner import _answer_template

    assert _answer_template(request, "pad") == "default"
    assert _answer_template(same_prm.build_request(PROMPTS[2], "pad:humor", "pad", max_new_tokens=4), "pad") == "pad"
    # PRM == policy: zero reward, so PAD decodes what the policy says through the default template.
    pad = same_prm.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=14, w=2.0, candidate_template="default")
    pref = same_prm.generate(PROMPTS, preference="pad:humor", method="pref", max_new_tokens=14)
    assert [r.token_ids for r in pad] == [r.token_ids for r in pref]
    # With a real reward: the engine equals the uncached reference loop.
    al = pad_aligner
    for pref in ("pad:humor", [("pad:helpful", 1.0), ("pad:humor", 0.5)]):
        requests = [al.build_request(p, pref, "pad", max_new_tokens=12, w=1.5, candidate_template="default") for p in PROMPTS]
        expected = reference_generate(al.engine.models, requests, al.engine.eos_token_ids, al.tokenizer.pad_token_id)
        assert [r.token_ids for r in al.engine.generate(requests)] == expected


def test_reward_changes_the_answer(pad_aligner):
    pad = [r.token_ids for r in pad_aligner.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=16, w=1.5)]
    pref = [r.token_ids for r in pad_aligner.generate(PROMPTS, preference="pad:humor", method="pref", template="pad", max_new_tokens=16)]
    assert pad != pref


def test_batch_invariance(pad_aligner):
    al = pad_aligner
    alone = [al.generate(p, preference="pad:humor", method="pad", max_new_tokens=16, w=1.0)[0].token_ids for p in PROMPTS]
    together = [r.token_ids for r in al.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=16, w=1.0)]
    assert together == alone
    # ... and beside requests of other methods in the same engine step.
    requests = [
        al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=16),
        al.build_request(PROMPTS[1], "pad:humor", "pad", max_new_tokens=16, w=1.0),
        al.build_request(PROMPTS[2], None, "base", max_new_tokens=16),
    ]
    assert al.engine.generate(requests)[1].token_ids == alone[1]


def test_sampling_stays_in_the_top_k_and_is_seeded(pad_aligner):
    al = pad_aligner
    kwargs = dict(preference="pad:humor", method="pad", max_new_tokens=10, temperature=0.7, ignore_eos=True, k=3)
    a = al.generate(PROMPTS[1], seed=5, **kwargs)[0]
    b = al.generate(PROMPTS[1], seed=5, **kwargs)[0]
    assert a.token_ids == b.token_ids
    # Every sampled token is among the policy's top-3 after the tokens before it.
    request = al.build_request(PROMPTS[1], "pad:humor", "pad", max_new_tokens=10)
    context = request.contexts[0][1]
    with torch.no_grad():
        logits = al.model(torch.tensor([context + a.token_ids])).logits[0]
    for i, token in enumerate(a.token_ids):
        assert token in logits[len(context) - 1 + i].topk(3).indices.tolist()


def test_usage_counts_both_models(pad_aligner):
    out = pad_aligner.generate(PROMPTS[0], preference="pad:humor", method="pad", max_new_tokens=5, ignore_eos=True)[0]
    assert out.usage.completion_tokens == 5
    assert out.usage.forward_passes == 10  # policy + PRM, per token
    assert out.usage.context_tokens == 2 * out.usage.prompt_tokens


def test_stop_string_and_eos_are_honoured(pad_aligner):
    al = pad_aligner
    kwargs = dict(preference="pad:humor", method="pad", max_new_tokens=12)
    free = al.generate(PROMPTS[1], ignore_eos=True, **kwargs)[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    cut = al.generate(PROMPTS[1], ignore_eos=True, stop=[stop], **kwargs)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    eos = free.token_ids[3]
    al.engine.eos_token_ids = {eos}
    out = al.generate(PROMPTS[1], **kwargs)[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(eos)]
    assert out.finish_reason == "stop"


# --- errors ---------------------------------------------------------------------------------


def test_pad_without_a_prm_is_a_clear_error(tiny_llama, tokenizer):
    al = Aligner(tiny_llama, tokenizer)
    with pytest.raises(PrefalignError) as info:
        al.generate("Hi", preference="pad:helpful", method="pad")
    assert info.value.field == "prm"
    message = str(info.value)
    assert "prm" in message.lower() and "--prm" in message and "load_prm" in message
    with pytest.raises(PrefalignError, match="train-prm"):
        al.load_prm()


def test_missing_shipped_prm_is_a_clear_error(tiny_llama, tokenizer, monkeypatch):
    """For the embedded model the shipped PRM is used; while it is missing, say so."""
    prm_api = pytest.importorskip("prefalign.prm")
    if not hasattr(prm_api, "default_prm_path"):
        pytest.skip("prefalign.prm has no default_prm_path yet")
    from prefalign.models import EMBEDDED_DISPLAY_NAME

    def missing():
        raise FileNotFoundError("no shipped PRM in this build")

    monkeypatch.setattr(prm_api, "default_prm_path", missing)
    al = Aligner(tiny_llama, tokenizer)
    monkeypatch.setattr(tiny_llama.config, "name_or_path", EMBEDDED_DISPLAY_NAME)
    with pytest.raises(PrefalignError, match="shipped") as info:
        al.generate("Hi", preference="pad:helpful", method="pad")
    assert info.value.field == "prm"


def test_tokenizer_mismatch_is_a_clear_error(tiny_llama, tokenizer, tmp_path):
    prm_api = pytest.importorskip("prefalign.prm")
    if not all(hasattr(prm_api, n) for n in ("build_prm", "save_prm", "load_prm")):
        pytest.skip("prefalign.prm has no build/save/load yet")
    from transformers import AutoTokenizer

    from prefalign.errors import TokenizerMismatchError

    prm = prm_api.build_prm(tiny_llama)
    prm_api.save_prm(prm, tmp_path / "prm", tokenizer, base_model_name="tiny-llama", preferences=["pad:helpful"])
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<an-extra-token>"])
    al = Aligner(tiny_llama, other)
    with pytest.raises(TokenizerMismatchError):
        al.load_prm(tmp_path / "prm")
    assert PRM not in al.engine.models


# --- one pass per step: the policy's and the PRM's rows together -----------------------------


def _trained_looking_prm(policy, seed=3):
    """A PRM with non-zero LoRA updates and a perturbed linear layer (unmerged)."""
    prm_api = pytest.importorskip("prefalign.prm")
    if not hasattr(prm_api, "build_prm"):
        pytest.skip("prefalign.prm has no build_prm yet")
    prm = prm_api.build_prm(policy)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in prm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        prm.linear.weight.add_(torch.randn(prm.linear.weight.shape, generator=generator) * 0.05)
    return prm.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_pass_equals_two_passes(arch, tiny_llama, tiny_gpt2, tokenizer):
    from prefalign.pad_fused import FusedPadModel

    policy = tiny_llama if arch == "llama" else tiny_gpt2
    prm = _trained_looking_prm(policy)
    two = Aligner(policy, tokenizer)
    two.add_model(PRM, prm)
    fused = Aligner(policy, tokenizer)
    fused.add_model(PRM, FusedPadModel(policy, prm))
    for pref in ("pad:humor", [("pad:helpful", 1.0), ("pad:humor", 0.5)]):
        expected = [r.token_ids for r in two.generate(PROMPTS, preference=pref, method="pad", max_new_tokens=14, w=1.5)]
        got = fused.generate(PROMPTS, preference=pref, method="pad", max_new_tokens=14, w=1.5)
        assert [r.token_ids for r in got] == expected
        if isinstance(pref, str):
            # Called like a causal LM (no route), the fused module is the PRM: the uncached loop agrees.
            requests = [fused.build_request(p, pref, "pad", max_new_tokens=8, w=1.5) for p in PROMPTS]
            got = reference_generate(fused.engine.models, requests, fused.engine.eos_token_ids, tokenizer.pad_token_id)
            assert got == [e[:8] for e in expected]
    # Same next-token log-probs on a batch of mixed rows, to float tolerance.
    requests = [fused.build_request(p, "pad:humor", "pad") for p in PROMPTS]
    from prefalign.reference import _last_logprobs

    seqs = [r.contexts[0][1] for r in requests]
    policy_lp = _last_logprobs(policy, seqs, tokenizer.pad_token_id)
    prm_lp = _last_logprobs(prm, seqs, tokenizer.pad_token_id)
    engine = fused.engine
    for r in requests:
        engine.add(r)
    engine.step()
    state = engine._states[PRM]
    assert len(state.rows) == 2 * len(PROMPTS)  # both keys' rows in the one pass
    while engine.has_work:
        engine.step()
    mixed = fused.engine.models[PRM]
    route = torch.tensor([0, 1] * len(seqs))
    inter = [s for s in seqs for _ in (0, 1)]
    length = max(len(s) for s in inter)
    ids = torch.full((len(inter), length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(inter):
        ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    with torch.no_grad():
        out = mixed(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), route=route).logits[:, -1]
    lp = torch.log_softmax(out.float(), -1)
    assert torch.allclose(lp[0::2], policy_lp, atol=1e-4)
    assert torch.allclose(lp[1::2], prm_lp, atol=1e-4)


def test_fused_identity_prm_is_exactly_base(tiny_llama, tokenizer):
    prm_api = pytest.importorskip("prefalign.prm")
    if not hasattr(prm_api, "build_prm"):
        pytest.skip("prefalign.prm has no build_prm yet")
    from prefalign.pad_fused import FusedPadModel

    al = Aligner(tiny_llama, tokenizer)
    al.add_model(PRM, FusedPadModel(tiny_llama, prm_api.build_prm(tiny_llama)))
    pad = al.generate(PROMPTS, preference="pad:helpful", method="pad", max_new_tokens=12, w=1.5)
    base = al.generate(PROMPTS, preference="pad:helpful", method="pref", template="pad", max_new_tokens=12)
    assert [r.token_ids for r in pad] == [r.token_ids for r in base]
    assert pad[0].usage.forward_passes == len(pad[0].token_ids) + (pad[0].finish_reason == "stop")


def test_fused_batch_invariance_and_other_methods_alongside(tiny_llama, tokenizer):
    from prefalign.pad_fused import FusedPadModel

    prm = _trained_looking_prm(tiny_llama)
    al = Aligner(tiny_llama, tokenizer)
    plain = [al.generate(PROMPTS[i], preference="concise", method="amulet", max_new_tokens=10)[0].token_ids for i in range(2)]
    al.add_model(PRM, FusedPadModel(tiny_llama, prm))
    alone = [al.generate(p, preference="pad:humor", method="pad", max_new_tokens=14)[0].token_ids for p in PROMPTS]
    together = [r.token_ids for r in al.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=14)]
    assert together == alone
    # Three contexts per prompt (two of them policy rows) through the fused pass.
    three = {"preference": "pad:humor", "method": "pad", "max_new_tokens": 14, "candidate_template": "default"}
    alone3 = [al.generate(p, **three)[0].token_ids for p in PROMPTS]
    assert [r.token_ids for r in al.generate(PROMPTS, **three)] == alone3
    requests = [
        al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=10),
        al.build_request(PROMPTS[2], "pad:humor", "pad", max_new_tokens=14),
        al.build_request(PROMPTS[1], "concise", "amulet", max_new_tokens=10),
    ]
    out = al.engine.generate(requests)
    assert [out[0].token_ids, out[2].token_ids] == plain  # other methods unaffected by the PRM rows
    assert out[1].token_ids == alone[2]


def test_load_prm_from_a_directory_fused_and_two_pass(tiny_llama, tokenizer, tmp_path):
    prm_api = pytest.importorskip("prefalign.prm")
    if not all(hasattr(prm_api, n) for n in ("build_prm", "save_prm", "load_prm")):
        pytest.skip("prefalign.prm has no build/save/load yet")
    from prefalign.pad_fused import FusedPadModel

    prm = _trained_looking_prm(tiny_llama)
    path = prm_api.save_prm(prm, tmp_path / "prm", tokenizer, base_model_name="tiny-llama", preferences=["pad:humor"])
    fused = Aligner(tiny_llama, tokenizer)
    assert isinstance(fused.load_prm(path), FusedPadModel)
    two = Aligner(tiny_llama, tokenizer)
    assert not isinstance(two.load_prm(path, fused=False), FusedPadModel)
    a = [r.token_ids for r in fused.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=12)]
    b = [r.token_ids for r in two.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=12)]
    assert a == b


def test_fused_model_added_while_requests_run(tiny_llama, tokenizer):
    """A PRM loaded while other requests decode (e.g. the server's first PAD request)."""
    from prefalign.pad_fused import FusedPadModel

    prm = _trained_looking_prm(tiny_llama)
    reference = Aligner(tiny_llama, tokenizer)
    reference.add_model(PRM, FusedPadModel(tiny_llama, prm))
    expected_pad = reference.generate(PROMPTS[1], preference="pad:humor", method="pad", max_new_tokens=10, ignore_eos=True)[0].token_ids
    al = Aligner(tiny_llama, tokenizer)
    expected_amulet = al.generate(PROMPTS[0], preference="concise", method="amulet", max_new_tokens=12, ignore_eos=True)[0].token_ids
    engine = al.engine
    running = al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=12, ignore_eos=True)
    engine.add(running)
    engine.step()
    engine.step()
    al.add_model(PRM, FusedPadModel(tiny_llama, prm))
    late = al.build_request(PROMPTS[1], "pad:humor", "pad", max_new_tokens=10, ignore_eos=True)
    engine.add(late)
    while engine.has_work:
        engine.step()
    assert engine.pop_result(running.request_id).token_ids == expected_amulet
    assert engine.pop_result(late.request_id).token_ids == expected_pad
    # Once the policy's own rows are gone, the next PAD request runs in one pass.
    out = al.generate(PROMPTS[1], preference="pad:humor", method="pad", max_new_tokens=4, ignore_eos=True)[0]
    assert out.usage.forward_passes == 4 and out.token_ids == expected_pad[:4]


def test_cli_pad_with_a_prm_path_and_w(tiny_llama, tokenizer, tmp_path):
    prm_api = pytest.importorskip("prefalign.prm")
    if not all(hasattr(prm_api, n) for n in ("build_prm", "save_prm", "load_prm")):
        pytest.skip("prefalign.prm has no build/save/load yet")
    import json

    from typer.testing import CliRunner

    from prefalign.cli import app

    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = prm_api.save_prm(_trained_looking_prm(tiny_llama), tmp_path / "prm", tokenizer,
                            base_model_name="tiny-llama", preferences=["pad:humor"])
    args = ["generate", "Hi there", "-p", "pad:humor", "--method", "pad", "-n", "8", "--json", "--model", str(model_dir), "--fast", "off"]
    result = CliRunner().invoke(app, [*args, "--prm", str(path), "--w", "1.2", "--param", "min_p=0.05"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    al = Aligner(tiny_llama, tokenizer)
    al.load_prm(path)
    expected = al.generate("Hi there", preference="pad:humor", method="pad", max_new_tokens=8, w=1.2, min_p=0.05)[0]
    assert data["token_ids"] == expected.token_ids
    assert data["params"] == {"w": 1.2, "k": 10, "plausibility": 0.05, "candidate_template": None}
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "--prm" in missing.output


@pytest.mark.parametrize("fused", [True, False])
def test_pad_reads_the_preference_through_the_prms_template(tiny_llama, tokenizer, tmp_path, fused):
    """A PRM trained in the default template is read in it unless the request names another."""
    from prefalign.prm import build_prm, save_prm
    from prefalign.prompts import encode_context, to_chat

    save_prm(build_prm(tiny_llama, layers=[1]), tmp_path / "p", tokenizer, base_model_name="tiny",
             preferences=["concise"], template="default")
    al = Aligner(tiny_llama, tokenizer)
    with pytest.raises(PrefalignError, match="--prm"):
        al.template_for("pad")  # no PRM loaded and none shipped for this model
    al.load_prm(tmp_path / "p", fused=fused)
    assert al.prm_template == "default" and al.template_for("pad") == "default" and al.template_for("pref") == "default"
    assert al.template_for("amulet") == make_method("amulet").default_template
    text = "Your answer must be concise."
    req = al.build_request("Hi", text, "pad")
    assert [ids for _, ids in req.contexts] == [encode_context(tokenizer, to_chat("Hi"), text, "default")] * 2
    explicit = al.build_request("Hi", text, "pad", template="pad")
    assert explicit.contexts[0][1] == encode_context(tokenizer, to_chat("Hi"), text, "pad")


def test_fused_pad_with_chunked_prefill_equals_whole_prefill(tiny_llama, tokenizer):
    from prefalign.pad_fused import FusedPadModel

    al = Aligner(tiny_llama, tokenizer)
    al.add_model(PRM, FusedPadModel(tiny_llama, _trained_looking_prm(tiny_llama)))
    whole = [r.token_ids for r in al.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=10)]
    al.engine.prefill_chunk = 6
    al.engine.chunk_idle_prefill = True
    chunked = [r.token_ids for r in al.generate(PROMPTS, preference="pad:humor", method="pad", max_new_tokens=10)]
    assert chunked == whole
