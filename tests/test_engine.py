"""The engine: equivalence with transformers and with the uncached reference, batching,
continuous joining, stopping, sampling, beam search, streaming and usage."""

from __future__ import annotations

import pytest
import torch

from prefalign import Aligner
from prefalign.engine import Engine
from prefalign.errors import PrefalignError
from prefalign.prompts import encode_context, to_chat
from prefalign.reference import reference_generate

PROMPTS = [
    "Hi",
    "Explain in detail why the sky is blue and what Rayleigh scattering means.",
    "List three fruits.",
]


def test_base_greedy_equals_transformers_generate(aligner):
    ids = encode_context(aligner.tokenizer, to_chat(PROMPTS[1]), None, "default")
    ref = aligner.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=20, do_sample=False, pad_token_id=aligner.tokenizer.pad_token_id,
    )[0, len(ids):].tolist()
    ours = aligner.generate(PROMPTS[1], method="base", max_new_tokens=20, ignore_eos=True)[0].token_ids
    assert ours == ref[: len(ours)]
    assert len(ours) == 20


@pytest.mark.parametrize("method", ["base", "pref", "la", "amulet"])
def test_cached_engine_equals_uncached_reference(aligner, method):
    requests = [aligner.build_request(p, "concise", method, max_new_tokens=12) for p in PROMPTS]
    expected = reference_generate(aligner.engine.models, requests, aligner.engine.eos_token_ids, aligner.tokenizer.pad_token_id)
    got = [r.token_ids for r in aligner.engine.generate(requests)]
    assert got == expected


@pytest.mark.parametrize("method", ["base", "amulet", "la"])
def test_batch_invariance(aligner, method):
    alone = [aligner.generate(p, preference="formal", method=method, max_new_tokens=16)[0].token_ids for p in PROMPTS]
    together = [r.token_ids for r in aligner.generate(PROMPTS, preference="formal", method=method, max_new_tokens=16)]
    assert together == alone


def test_batched_logprobs_match_single_to_tolerance(llama_aligner):
    """Padding changes no row's distribution beyond float rounding."""
    al = llama_aligner
    seqs = [encode_context(al.tokenizer, to_chat(p), None, "default") for p in PROMPTS]
    from prefalign.reference import _last_logprobs

    together = _last_logprobs(al.model, seqs, al.tokenizer.pad_token_id)
    for i, s in enumerate(seqs):
        alone = _last_logprobs(al.model, [s], al.tokenizer.pad_token_id)
        assert torch.allclose(together[i], alone[0], atol=1e-4)


def test_requests_join_a_running_batch(aligner):
    expected = [aligner.generate(p, preference="concise", method="amulet", max_new_tokens=10, ignore_eos=True)[0].token_ids for p in PROMPTS]
    engine = aligner.engine
    first = aligner.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=10, ignore_eos=True)
    engine.add(first)
    engine.step()
    engine.step()
    late = [aligner.build_request(p, "concise", "amulet", max_new_tokens=10, ignore_eos=True) for p in PROMPTS[1:]]
    for r in late:
        engine.add(r)
    while engine.has_work:
        engine.step()
    got = [engine.pop_result(r.request_id).token_ids for r in [first, *late]]
    assert got == expected


def test_mixed_methods_in_one_batch(aligner):
    expected = [
        aligner.generate(PROMPTS[0], preference="concise", method="amulet", max_new_tokens=8)[0].token_ids,
        aligner.generate(PROMPTS[1], method="base", max_new_tokens=8)[0].token_ids,
        aligner.generate(PROMPTS[2], preference="formal", method="la", max_new_tokens=8, ratio=1.0)[0].token_ids,
    ]
    requests = [
        aligner.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=8),
        aligner.build_request(PROMPTS[1], None, "base", max_new_tokens=8),
        aligner.build_request(PROMPTS[2], "formal", "la", max_new_tokens=8, ratio=1.0),
    ]
    assert [r.token_ids for r in aligner.engine.generate(requests)] == expected


def test_max_new_tokens_and_usage(aligner):
    out = aligner.generate(PROMPTS[0], preference="concise", method="amulet", max_new_tokens=7, ignore_eos=True)[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 7
    assert out.usage.completion_tokens == 7
    # One prefill pass, then one pass per further token, for one model.
    assert out.usage.forward_passes == 7
    ids = encode_context(aligner.tokenizer, to_chat(PROMPTS[0]), "Your answer should be concise as much as possible.", "default")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.context_tokens > out.usage.prompt_tokens


def test_eos_stops_and_is_not_in_the_answer(aligner):
    free = aligner.generate(PROMPTS[2], method="base", max_new_tokens=6, ignore_eos=True)[0]
    eos = free.token_ids[2]
    aligner.engine.eos_token_ids = {eos}
    out = aligner.generate(PROMPTS[2], method="base", max_new_tokens=6)[0]
    assert out.token_ids == free.token_ids[:2]
    assert out.finish_reason == "stop"


def test_stop_strings_cut_the_text(aligner):
    free = aligner.generate(PROMPTS[1], method="base", max_new_tokens=12, ignore_eos=True)[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert stop.strip()
    out = aligner.generate(PROMPTS[1], method="base", max_new_tokens=12, ignore_eos=True, stop=[stop])[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]
    assert stop not in out.text


def test_stream_concatenates_to_generate(aligner):
    stop = None
    for kwargs in ({}, {"stop": ["\n"]}):
        expected = aligner.generate(PROMPTS, preference="concise", method="la", max_new_tokens=15, **kwargs)
        pieces = {i: "" for i in range(len(PROMPTS))}
        tokens = {i: [] for i in range(len(PROMPTS))}
        reasons = {}
        for event in aligner.stream(PROMPTS, preference="concise", method="la", max_new_tokens=15, **kwargs):
            pieces[event.index] += event.text
            tokens[event.index] += event.token_ids
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
                assert event.usage is not None
        assert [pieces[i] for i in range(3)] == [r.text for r in expected]
        assert [tokens[i] for i in range(3)] == [r.token_ids for r in expected]
        assert [reasons[i] for i in range(3)] == [r.finish_reason for r in expected]
    assert stop is None


def test_stream_stopped_early_leaves_no_rows(aligner):
    for event in aligner.stream(PROMPTS, preference="concise", method="amulet", max_new_tokens=30, ignore_eos=True):
        break
    aligner.engine.step()
    assert aligner.engine.num_active == 0
    assert not aligner.engine.has_work


def test_cancel_frees_rows(aligner):
    engine = aligner.engine
    keep = aligner.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=6, ignore_eos=True)
    drop = aligner.build_request(PROMPTS[1], "concise", "amulet", max_new_tokens=50, ignore_eos=True)
    engine.add(keep)
    engine.add(drop)
    engine.step()
    engine.cancel(drop.request_id)
    engine.step()
    assert engine.num_active == 1
    assert all(a.request.request_id == keep.request_id for a, _, _ in engine._states["policy"].rows)
    while engine.has_work:
        engine.step()
    assert engine.pop_result(drop.request_id) is None
    assert engine.pop_result(keep.request_id).token_ids == aligner.generate(PROMPTS[0], preference="concise", method="amulet", max_new_tokens=6, ignore_eos=True)[0].token_ids


def test_sampling_is_seeded_and_top_k_one_is_greedy(aligner):
    a = aligner.generate(PROMPTS[1], preference="concise", method="amulet", max_new_tokens=12, temperature=1.5, seed=7, ignore_eos=True)[0]
    b = aligner.generate(PROMPTS[1], preference="concise", method="amulet", max_new_tokens=12, temperature=1.5, seed=7, ignore_eos=True)[0]
    c = aligner.generate(PROMPTS[1], preference="concise", method="amulet", max_new_tokens=12, temperature=1.5, seed=8, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = aligner.generate(PROMPTS[1], preference="concise", method="amulet", max_new_tokens=12, ignore_eos=True)[0]
    top1 = aligner.generate(PROMPTS[1], preference="concise", method="amulet", max_new_tokens=12, temperature=1.0, top_k=1, seed=3, ignore_eos=True)[0]
    assert top1.token_ids == greedy.token_ids
    # A seeded sample is the same alone and inside a batch.
    batch = aligner.generate(PROMPTS, preference="concise", method="amulet", max_new_tokens=12, temperature=1.5, seed=7, ignore_eos=True)
    assert batch[1].token_ids == a.token_ids


def test_beam_search_equals_transformers_beam_search(llama_aligner):
    al = llama_aligner
    for prompt in PROMPTS[:2]:
        ids = encode_context(al.tokenizer, to_chat(prompt), "Your answer should be concise as much as possible.", "default")
        ref = al.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=10,
            num_beams=4, do_sample=False, early_stopping=True, length_penalty=1.0, pad_token_id=al.tokenizer.pad_token_id,
        )[0, len(ids):].tolist()
        ref = [t for t in ref if t not in al.engine.eos_token_ids and t != al.tokenizer.pad_token_id]
        ours = al.generate(prompt, preference="concise", method="beam", width=4, max_new_tokens=10)[0]
        assert ours.token_ids == ref


def test_beam_in_a_batch_equals_alone(llama_aligner):
    al = llama_aligner
    alone = [al.generate(p, preference="concise", method="beam", width=3, max_new_tokens=8)[0].token_ids for p in PROMPTS]
    together = [r.token_ids for r in al.generate(PROMPTS, preference="concise", method="beam", width=3, max_new_tokens=8)]
    assert together == alone


def test_several_preferences_run_as_extra_rows(aligner):
    out = aligner.generate(PROMPTS[0], preference=[("concise", 1.0), ("formal", 2.0)], method="amulet", max_new_tokens=5)[0]
    assert out.usage.forward_passes <= 5
    assert len(aligner.build_request(PROMPTS[0], [("concise", 1.0), ("formal", 2.0)], "amulet").contexts) == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "amulet", "preference": None}, "preference"),
        ({"method": "nope", "preference": "concise"}, "method"),
        ({"method": "amulet", "preference": "concise", "temperature": -1}, "temperature"),
        ({"method": "amulet", "preference": "concise", "top_p": 0}, "top_p"),
        ({"method": "amulet", "preference": "concise", "top_p": 1.5}, "top_p"),
        ({"method": "amulet", "preference": "concise", "max_new_tokens": 0}, "max_new_tokens"),
        ({"method": "amulet", "preference": "concise", "max_new_tokens": 10_000}, "max_new_tokens"),
        ({"method": "amulet", "preference": "concise", "eta": 0}, "eta"),
        ({"method": "amulet", "preference": "concise", "iterations": 0}, "iterations"),
        ({"method": "beam", "preference": "concise", "temperature": 0.7}, "temperature"),
    ],
)
def test_bad_input_names_the_field(aligner, kwargs, field):
    with pytest.raises(PrefalignError) as info:
        aligner.generate("Hello there", **kwargs)
    assert info.value.field == field


def test_empty_prompt_is_rejected(aligner):
    with pytest.raises(PrefalignError, match="empty"):
        aligner.generate("  ", method="base")


def test_engine_rejects_unknown_model_key(tokenizer, tiny_llama):
    engine = Engine(tiny_llama, tokenizer)
    al = Aligner(tiny_llama, tokenizer)
    request = al.build_request("Hi", "concise", "amulet")
    request.contexts[0] = ("prm", request.contexts[0][1])
    with pytest.raises(PrefalignError, match="prm"):
        engine.add(request)


def test_a_request_whose_scores_are_unusable_fails_alone(aligner):
    from dataclasses import dataclass

    from prefalign.methods import Method
    from prefalign.methods.method import ContextRole

    @dataclass(frozen=True)
    class RulesEverythingOut(Method):
        name = "nothing"
        summary = "test: every score NaN"
        needs_preference = False

        def roles(self, n):
            return [ContextRole(None)]

        def combine(self, scores):
            return torch.full_like(scores.base, float("nan"))

    good = aligner.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=5, ignore_eos=True)
    bad = aligner.build_request(PROMPTS[1], None, RulesEverythingOut(), max_new_tokens=5)
    results = aligner.engine.generate([good, bad])
    assert results[1].finish_reason == "error" and results[1].token_ids == []
    assert results[0].token_ids == aligner.generate(PROMPTS[0], preference="concise", method="amulet", max_new_tokens=5, ignore_eos=True)[0].token_ids


def test_tiny_temperature_is_greedy_and_reset_clears(aligner):
    greedy = aligner.generate(PROMPTS[1], method="base", max_new_tokens=6)[0].token_ids
    assert aligner.generate(PROMPTS[1], method="base", max_new_tokens=6, temperature=1e-30, seed=1)[0].token_ids == greedy
    aligner.engine.add(aligner.build_request(PROMPTS[0], None, "base", max_new_tokens=6))
    aligner.engine.step()
    aligner.engine.reset()
    assert not aligner.engine.has_work and aligner.engine.num_active == 0
    assert aligner.generate(PROMPTS[1], method="base", max_new_tokens=6)[0].token_ids == greedy


def test_encode_context_matches_the_request_contexts(aligner):
    request = aligner.build_request(PROMPTS[0], "concise", "amulet")
    assert request.contexts[0][1] == aligner.encode_context(PROMPTS[0])
    assert request.contexts[1][1] == aligner.encode_context(PROMPTS[0], "concise")


def test_steady_steps_reuse_the_plan_and_keep_rows_on_the_device(aligner, monkeypatch):
    """Rows are re-selected and the step plan rebuilt only when rows join or leave."""
    engine = aligner.engine
    builds, selects = [], []
    build, select = engine._build_plan, None
    monkeypatch.setattr(engine, "_build_plan", lambda: builds.append(1) or build())
    requests = [aligner.build_request(p, "concise", "amulet", max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, (6, 9, 9))]
    engine.add(requests[0])
    engine.step()
    runner = engine._states["policy"].runner
    select = runner.select
    monkeypatch.setattr(runner, "select", lambda keep, tokens: selects.append(len(keep)) or select(keep, tokens))
    for _ in range(2):
        engine.step()
    assert builds == [1] and selects == []  # steady: no rebuild, no row selection
    for r in requests[1:]:
        engine.add(r)
    engine.step()  # they join: one rebuild
    assert len(builds) == 2 and selects == []
    while engine.has_work:
        engine.step()
    assert selects[0] == 4  # the first request left (2 contexts × 2 requests remain)
    assert len(builds) == 3  # one more, after it left
    alone = [aligner.generate(p, preference="concise", method="amulet", max_new_tokens=n, ignore_eos=True)[0].token_ids
             for p, n in zip(PROMPTS, (6, 9, 9))]
    assert [engine.pop_result(r.request_id).token_ids for r in requests] == alone


def test_seeded_samples_with_different_settings_in_one_batch_equal_alone(aligner):
    settings = [dict(temperature=0.7, seed=1), dict(temperature=1.5, top_k=20, seed=2), dict(temperature=1.0, top_p=0.7, seed=3)]
    alone = [aligner.generate(p, preference="concise", method="la", max_new_tokens=10, ignore_eos=True, **kw)[0].token_ids
             for p, kw in zip(PROMPTS, settings)]
    requests = [aligner.build_request(p, "concise", "la", max_new_tokens=10, ignore_eos=True, **kw) for p, kw in zip(PROMPTS, settings)]
    requests.append(aligner.build_request(PROMPTS[0], None, "base", max_new_tokens=10))  # a greedy one beside them
    results = aligner.engine.generate(requests)
    assert [r.token_ids for r in results[:3]] == alone
    assert results[3].token_ids == aligner.generate(PROMPTS[0], method="base", max_new_tokens=10)[0].token_ids
