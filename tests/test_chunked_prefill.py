"""Chunked prefill gives the tokens an unchunked prefill gives, and interleaves with decoding."""

from __future__ import annotations

import pytest
import torch

from prefalign import Aligner
from prefalign.compat import cache_kwargs
from prefalign.engine import GenerationRequest
from prefalign.runners.kv_cache import left_pad, positions_from_mask
from prefalign.errors import PrefalignError
from prefalign.prompts import encode_context, to_chat

PROMPTS = [
    "Hi",
    "Explain in detail why the sky is blue and what Rayleigh scattering means for sunsets.",
    "List three fruits.",
]
#: fp32 logits of a chunked and a whole prefill differ by summation order only.
LOGPROB_TOLERANCE = 1e-4


def tokens(al: Aligner, chunk: int | None, method: str = "amulet", prompts=PROMPTS, **kwargs) -> list[list[int]]:
    al.engine.prefill_chunk = chunk
    al.engine.chunk_idle_prefill = True
    try:
        out = al.generate(prompts, preference="concise", method=method, max_new_tokens=10, ignore_eos=True, **kwargs)
    finally:
        al.engine.prefill_chunk = None
    return [r.token_ids for r in out]


@pytest.mark.parametrize("method", ["base", "amulet", "la", "beam"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_whole_prefill(aligner, method, chunk):
    kwargs = {"width": 2} if method == "beam" else {}
    assert tokens(aligner, chunk, method, **kwargs) == tokens(aligner, None, method, **kwargs)


def test_chunked_last_position_logprobs_match_within_tolerance(tiny_llama, tokenizer):
    from transformers import DynamicCache

    seqs = [encode_context(tokenizer, to_chat(p), "concise", "default") for p in PROMPTS]
    ids, mask = left_pad(seqs, tokenizer.pad_token_id)
    positions = positions_from_mask(mask)

    def run(chunk: int) -> torch.Tensor:
        cache = DynamicCache(config=tiny_llama.config)
        for start in range(0, ids.shape[1], chunk):
            end = start + chunk
            out = tiny_llama(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                             use_cache=True, logits_to_keep=1, **cache_kwargs(tiny_llama, cache))
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    with torch.inference_mode():
        whole = run(ids.shape[1])
        for chunk in (1, 5, 16):
            assert (run(chunk) - whole).abs().max() < LOGPROB_TOLERANCE


def test_a_long_prompt_is_prefilled_between_decode_steps(llama_aligner):
    """Running requests get a token every step while a long prompt is prefilled in chunks,
    and every answer equals the one it gets alone."""
    al = llama_aligner
    short = al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=30, ignore_eos=True)
    long_prompt = "Tell me everything about the history of tea. " * 12
    long = al.build_request(long_prompt, "concise", "amulet", max_new_tokens=5, ignore_eos=True)
    engine = al.engine
    engine.prefill_chunk = 16
    engine.chunk_idle_prefill = True
    try:
        engine.add(short)
        while not engine.num_active:  # its own (short) prefill takes a few chunks too
            engine.step()
        engine.add(long)
        steps_with_short_tokens = 0
        prefill_steps = 0
        while engine.has_work:
            deltas = engine.step()
            if engine._prefilling:
                prefill_steps += 1
                steps_with_short_tokens += any(d.request_id == short.request_id and d.token_ids for d in deltas)
        assert prefill_steps >= 10 and steps_with_short_tokens == prefill_steps
        got_short, got_long = engine.pop_result(short.request_id), engine.pop_result(long.request_id)
    finally:
        engine.prefill_chunk = None
    assert got_short.token_ids == al.generate(PROMPTS[0], preference="concise", method="amulet", max_new_tokens=30, ignore_eos=True)[0].token_ids
    assert got_long.token_ids == al.generate(long_prompt, preference="concise", method="amulet", max_new_tokens=5, ignore_eos=True)[0].token_ids
    # Each chunk is one forward of the prompt's rows: counted in the usage.
    assert got_long.usage.forward_passes > 5


def test_cancel_during_prefill_removes_the_request(llama_aligner):
    al = llama_aligner
    engine = al.engine
    engine.prefill_chunk = 8
    engine.chunk_idle_prefill = True
    try:
        keep = al.build_request(PROMPTS[1], "concise", "amulet", max_new_tokens=6, ignore_eos=True)
        drop = al.build_request(PROMPTS[2], "concise", "amulet", max_new_tokens=6, ignore_eos=True)
        engine.add(keep)
        engine.add(drop)
        engine.step()
        engine.step()
        assert engine._prefilling
        engine.cancel(drop.request_id)
        while engine.has_work:
            engine.step()
        assert engine.pop_result(drop.request_id) is None
        got = engine.pop_result(keep.request_id).token_ids
    finally:
        engine.prefill_chunk = None
    assert got == al.generate(PROMPTS[1], preference="concise", method="amulet", max_new_tokens=6, ignore_eos=True)[0].token_ids


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_prefill_chunk_is_checked(llama_aligner, bad):
    with pytest.raises(PrefalignError) as info:
        llama_aligner.engine.prefill_chunk = bad
    assert info.value.field == "prefill_chunk"


def test_run_validates_every_request_before_queueing_any(llama_aligner):
    al = llama_aligner
    good = al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=3)
    bad = al.build_request(PROMPTS[1], "concise", "amulet", max_new_tokens=3)
    bad.contexts[0] = ("prm", bad.contexts[0][1])  # a model this engine does not have
    with pytest.raises(PrefalignError, match="prm"):
        al.engine.generate([good, bad])
    assert not al.engine.has_work


@pytest.mark.parametrize("weights", [(0.0,), (-1.0,), (float("inf"),), (float("nan"),), ()])
def test_a_request_built_by_hand_is_refused_bad_weights(llama_aligner, weights):
    made = llama_aligner.build_request(PROMPTS[1], "concise", "amulet", max_new_tokens=3)
    with pytest.raises(PrefalignError) as info:
        GenerationRequest(contexts=made.contexts, method=made.method, weights=weights, sampling=made.sampling)
    assert info.value.field == "preference"


@pytest.mark.embedded
def test_chunked_prefill_on_the_embedded_model(embedded):
    prompts = PROMPTS[1:]
    for method in ("base", "amulet"):
        assert tokens(embedded, 5, method, prompts=prompts) == tokens(embedded, None, method, prompts=prompts)


def test_a_much_longer_prompt_gets_its_own_cache_bucket(llama_aligner):
    """Short rows are not padded to a long prompt's length (their cache is copied every
    step); the answers are the ones each request gets alone."""
    al = llama_aligner
    engine = al.engine
    short = al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=12, ignore_eos=True)
    long_prompt = "Tell me everything about the history of tea. " * 20
    long = al.build_request(long_prompt, None, "base", max_new_tokens=4, ignore_eos=True)
    engine.add(short)
    engine.step()
    engine.add(long)
    engine.step()
    runner = engine._states["policy"].runner
    widths = sorted(b.mask.shape[1] for b in runner.buckets)
    assert len(widths) == 2 and widths[0] < 60 < 200 < widths[1]
    while engine.has_work:
        engine.step()
    assert engine.pop_result(short.request_id).token_ids == al.generate(PROMPTS[0], preference="concise", method="amulet", max_new_tokens=12, ignore_eos=True)[0].token_ids
    assert engine.pop_result(long.request_id).token_ids == al.generate(long_prompt, method="base", max_new_tokens=4, ignore_eos=True)[0].token_ids
    assert len(runner.buckets) <= 1


def test_with_nothing_running_a_prefill_runs_whole(llama_aligner):
    """Chunks protect running streams; with none running there is no one to wait for."""
    engine = llama_aligner.engine
    engine.prefill_chunk = 4
    try:
        first = llama_aligner.build_request(PROMPTS[1], "concise", "amulet", max_new_tokens=20, ignore_eos=True)
        engine.add(first)
        engine.step()
        assert engine.num_active == 1 and not engine._prefilling  # whole, in one step
        engine.add(llama_aligner.build_request(PROMPTS[2], "concise", "amulet", max_new_tokens=2))
        engine.step()
        assert engine._prefilling  # now someone is running: chunked
        while engine.has_work:
            engine.step()
    finally:
        engine.prefill_chunk = None
