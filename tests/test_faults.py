"""Fault isolation: a request that fails, fails alone, and a failed call leaves the API usable."""

from __future__ import annotations

import pytest
import torch

from prefalign import Aligner
from prefalign.errors import PrefalignError
from conftest import exploding_method

PROMPTS = ["Why is the sky blue?", "Write a haiku about tea and rain, please.", "How do I boil an egg?", "hi"]


Explodes = exploding_method()


class PoisonToken(torch.nn.Module):
    """Wraps a causal LM and raises whenever ``poison`` is among the input ids (a bad prompt)."""

    def __init__(self, model: torch.nn.Module, poison: int) -> None:
        super().__init__()
        self.inner, self.poison, self.config = model, poison, model.config
        self.generation_config = model.generation_config

    @property
    def cache_keyword(self) -> str:
        from prefalign.compat import cache_keyword

        return cache_keyword(self.inner)

    def forward(self, input_ids, **kwargs):
        if (input_ids == self.poison).any():
            raise RuntimeError("this prompt cannot be run")
        return self.inner(input_ids=input_ids, **kwargs)


@pytest.fixture
def al(tiny_llama, tokenizer) -> Aligner:
    return Aligner(tiny_llama, tokenizer)


def alone(al: Aligner, prompt: str, **kwargs) -> list[int]:
    return al.generate(prompt, **{"method": "amulet", "preference": "concise", "max_new_tokens": 8, "ignore_eos": True, **kwargs})[0].token_ids


def test_a_failing_method_fails_its_requests_only(al):
    good = [al.build_request(p, "concise", "amulet", max_new_tokens=8, ignore_eos=True) for p in PROMPTS[:2]]
    bad = al.build_request(PROMPTS[2], None, Explodes(), max_new_tokens=8)
    results = al.engine.generate([good[0], bad, good[1]])
    assert results[1].finish_reason == "error" and "overflow" in results[1].error and results[1].token_ids == []
    assert [results[0].token_ids, results[2].token_ids] == [alone(al, PROMPTS[0]), alone(al, PROMPTS[1])]
    assert results[0].error is None
    assert not al.engine.has_work


def test_a_request_failing_mid_answer_keeps_the_others_running(al):
    """A group that fails after others joined: the others' tokens are those they get alone."""
    engine = al.engine
    first = al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=8, ignore_eos=True)
    engine.add(first)
    engine.step()
    engine.step()
    engine.add(al.build_request(PROMPTS[1], None, Explodes(), max_new_tokens=8))
    while engine.has_work:
        engine.step()
    assert engine.pop_result(first.request_id).token_ids == alone(al, PROMPTS[0])


def test_a_prompt_the_model_cannot_run_fails_alone(tiny_llama, tokenizer):
    plain = Aligner(tiny_llama, tokenizer)
    poison = tokenizer("zebra", add_special_tokens=False)["input_ids"][0]
    al = Aligner(PoisonToken(tiny_llama, poison), tokenizer)
    requests = [al.build_request(p, "concise", "amulet", max_new_tokens=6, ignore_eos=True) for p in (PROMPTS[0], "zebra zebra", PROMPTS[1])]
    results = al.engine.generate(requests)
    assert results[1].finish_reason == "error" and "prefill failed" in results[1].error
    assert [results[0].token_ids, results[2].token_ids] == [alone(plain, PROMPTS[0], max_new_tokens=6), alone(plain, PROMPTS[1], max_new_tokens=6)]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(seed=2**64), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(preference=[("concise", float("inf"))]), "preference"),
        (dict(preference=[("concise", 0.0), ("formal", 1.0)]), "preference"),
        (dict(preference=[("concise", float("nan"))]), "preference"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(method="nope"), "method"),
    ],
)
def test_a_call_that_raises_leaves_the_aligner_usable(al, kwargs, field):
    before = al.generate(PROMPTS[3], method="base", max_new_tokens=4)[0].token_ids
    call = {"preference": "concise", "method": "amulet", "max_new_tokens": 2, **kwargs}
    with pytest.raises(PrefalignError) as info:
        al.generate(["hi", "hello"], **call)
    assert info.value.field == field
    assert not al.engine.has_work
    assert al.generate(PROMPTS[3], method="base", max_new_tokens=4)[0].token_ids == before


def test_extreme_seeds_within_range_work(al):
    for seed in (0, 2**64 - 1, -(2**63)):
        out = al.generate(PROMPTS[0], method="base", max_new_tokens=3, temperature=0.7, seed=seed)[0]
        assert out.finish_reason in ("stop", "length")


def test_a_failed_shared_pass_is_raised_and_leaves_nothing_behind(al):
    before = alone(al, PROMPTS[0])
    model = al.engine.models["policy"]
    calls = {"n": 0}
    original = model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    model.forward = flaky
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            al.generate(PROMPTS[:2], preference="concise", method="amulet", max_new_tokens=8, ignore_eos=True)
    finally:
        del model.forward
    assert not al.engine.has_work
    assert alone(al, PROMPTS[0]) == before


def test_an_abandoned_stream_leaves_nothing_behind(al):
    events = al.stream(PROMPTS[:2], preference="concise", method="amulet", max_new_tokens=20, ignore_eos=True)
    next(events)
    events.close()
    assert not al.engine.has_work
    assert alone(al, PROMPTS[0]) == alone(al, PROMPTS[0])


def test_a_request_whose_sampling_fails_fails_alone(al):
    """A sampled request whose draw raises fails; the others sampled with it are unchanged."""
    kwargs = dict(preference="concise", method="amulet", max_new_tokens=8, ignore_eos=True, temperature=0.9)
    expected = [alone(al, p, temperature=0.9, seed=s) for p, s in ((PROMPTS[0], 5), (PROMPTS[2], 6))]
    requests = [al.build_request(p, "concise", "amulet", max_new_tokens=8, ignore_eos=True, temperature=0.9, seed=s)
                for p, s in ((PROMPTS[0], 5), (PROMPTS[1], 9), (PROMPTS[2], 6))]
    engine = al.engine
    for r in requests:
        engine.add(r)
    engine.step()
    engine._active[requests[1].request_id].generator = "broken"  # its next draw raises
    while engine.has_work:
        engine.step()
    results = [engine.pop_result(r.request_id) for r in requests]
    assert results[1].finish_reason == "error" and "choose" in results[1].error
    assert [results[0].token_ids, results[2].token_ids] == expected
    assert kwargs  # the same settings as alone()
