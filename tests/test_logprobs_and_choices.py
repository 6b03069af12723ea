"""``logprobs`` / ``top_logprobs`` (of the method's final scores) and ``n`` answers per prompt."""

from __future__ import annotations

import pytest
import torch

from prefalign import Aligner, SamplingParams
from prefalign.decoding.repetition import Histories, TokenHistory
from prefalign.errors import PrefalignError

PROMPT = "How do I boil an egg?"
TWO = [("Answer concisely.", 2.0), ("Answer like a pirate.", 1.0)]


@pytest.fixture
def al(tiny_llama, tokenizer) -> Aligner:
    return Aligner(tiny_llama, tokenizer)


@torch.inference_mode()
def direct_logprobs(al: Aligner, request, tokens: list[int]) -> list[torch.Tensor]:
    """log_softmax(Method.score(...)) at each step, from uncached forwards of every context."""
    out = []
    weights = torch.tensor(request.weights, dtype=torch.float32)
    for t in range(len(tokens)):
        per_context = []
        for model_key, ids in request.contexts:
            model = al.engine.models[model_key]
            logits = model(input_ids=torch.tensor([ids + tokens[:t]])).logits[:, -1].float()
            per_context.append(torch.log_softmax(logits, dim=-1))
        history = None
        if getattr(request.method, "uses_history", False):  # e.g. the safeguard's repetition guard
            history = Histories([TokenHistory(request.contexts[request.primary][1], tokens[:t])])
        scores = request.method.score(torch.stack(per_context, dim=1), weights, history=history)[0]
        out.append(torch.log_softmax(scores.masked_fill(scores.isnan(), float("-inf")), dim=-1))
    return out


@pytest.mark.parametrize("method,preference", [("base", None), ("pref", "concise"), ("amulet", "concise"), ("amulet", TWO), ("la", TWO)])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_logprobs_are_the_log_softmax_of_the_method_s_scores(al, method, preference, sampled):
    kwargs = dict(max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5)
    if sampled:
        kwargs.update(temperature=0.9, seed=11)
    request = al.build_request(PROMPT, preference, method, **kwargs)
    result = al.engine.generate([request])[0]
    assert len(result.logprobs) == len(result.token_ids) == 6
    expected = direct_logprobs(al, request, result.token_ids)
    for entry, token, want in zip(result.logprobs, result.token_ids, expected):
        assert entry.token == token
        assert entry.logprob == pytest.approx(float(want[token]), abs=1e-4)
        values, ids = torch.topk(want, 5)
        assert [i for i, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert all(a >= b for (_, a), (_, b) in zip(entry.top, entry.top[1:]))
        if not sampled:
            assert entry.top[0][0] == token  # greedy chose the best
    # Asking for logprobs does not change the tokens.
    plain = al.generate(PROMPT, preference, method, **{k: v for k, v in kwargs.items() if "logprobs" not in k})[0]
    assert plain.token_ids == result.token_ids and plain.logprobs is None


def test_streamed_logprobs_equal_the_whole_answer_s(al):
    kwargs = dict(preference="concise", method="amulet", max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=2, stop=["zzz"])
    whole = al.generate(PROMPT, **kwargs)[0]
    streamed, tokens = [], []
    for event in al.stream(PROMPT, **kwargs):
        assert event.logprobs is not None and len(event.logprobs) == len(event.token_ids)
        streamed.extend(event.logprobs)
        tokens.extend(event.token_ids)
    assert tokens == whole.token_ids and streamed == whole.logprobs


def test_logprobs_without_top_and_with_eos(al):
    result = al.generate(PROMPT, method="base", max_new_tokens=40, logprobs=True)[0]
    assert len(result.logprobs) == len(result.token_ids)  # EOS is not part of the answer
    assert all(entry.top == () and entry.logprob <= 0 for entry in result.logprobs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(top_logprobs=21, logprobs=True), "top_logprobs"),
        (dict(top_logprobs=-1, logprobs=True), "top_logprobs"),
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(logprobs="yes"), "logprobs"),
        (dict(logprobs=True, method="beam", width=2), "logprobs"),
        (dict(n=0), "n"),
        (dict(n=129), "n"),
        (dict(n=2.0), "n"),
    ],
)
def test_bad_logprobs_and_n_are_refused_naming_the_field(al, kwargs, field):
    call = {"preference": "concise", "method": "amulet", "max_new_tokens": 2, **kwargs}
    with pytest.raises(PrefalignError) as info:
        al.generate(PROMPT, **call)
    assert info.value.field == field
    assert not al.engine.has_work


# --- n answers ---------------------------------------------------------------------------


def test_n_answers_are_reproducible_and_each_equals_a_single_request_with_its_seed(al):
    kwargs = dict(preference="concise", method="amulet", max_new_tokens=10, ignore_eos=True, temperature=1.0, seed=40)
    answers = al.generate(PROMPT, n=4, **kwargs)
    assert [a.choice for a in answers] == [0, 1, 2, 3]
    assert [a.token_ids for a in al.generate(PROMPT, n=4, **kwargs)] == [a.token_ids for a in answers]
    singles = [al.generate(PROMPT, **{**kwargs, "seed": 40 + i})[0].token_ids for i in range(4)]
    assert [a.token_ids for a in answers] == singles
    assert len({tuple(t) for t in singles}) > 1  # sampled: the answers differ


def test_n_with_several_prompts_comes_prompt_by_prompt(al):
    prompts = [PROMPT, "Why is the sky blue?"]
    kwargs = dict(method="base", max_new_tokens=5, ignore_eos=True, temperature=0.8, seed=3, logprobs=True)
    answers = al.generate(prompts, n=2, **kwargs)
    assert [a.choice for a in answers] == [0, 1, 0, 1]
    for p, prompt in enumerate(prompts):
        for i in range(2):
            single = al.generate(prompt, **{**kwargs, "seed": 3 + i})[0]
            assert answers[2 * p + i].token_ids == single.token_ids
            # Batched beside a prompt of another length (padding): equal to float32 rounding.
            got = [e.logprob for e in answers[2 * p + i].logprobs]
            assert got == pytest.approx([e.logprob for e in single.logprobs], abs=1e-4)


def test_n_answers_share_the_prompt_s_prefill(al, monkeypatch):
    from prefalign.runners.kv_cache import TransformersRunner

    kwargs = dict(preference="concise", method="amulet", max_new_tokens=4, temperature=0.7)
    singles = [al.generate(PROMPT, **kwargs, seed=1 + i)[0].token_ids for i in range(5)]
    seen: list[int] = []
    original = TransformersRunner.start_prefill

    def spy(self, seqs, tags):
        seen.append(len(seqs))
        return original(self, seqs, tags)

    monkeypatch.setattr(TransformersRunner, "start_prefill", spy)
    answers = al.generate(PROMPT, n=5, seed=1, **kwargs)
    assert seen == [2]  # amulet's 2 contexts, prefilled once for the 5 answers (not 10 rows)
    assert [a.token_ids for a in answers] == singles


def test_a_choice_cancelled_mid_prefill_leaves_the_others_exact(al):
    """Chunked prefill of shared contexts; one answer leaves before its prompt is done."""
    kwargs = dict(preference="concise", method="amulet", max_new_tokens=6, ignore_eos=True, temperature=0.9, seed=8)
    long_prompt = "Tell me, in some detail, how a steam engine works and who built the first one. " * 3
    expected = [al.generate(long_prompt, **{**kwargs, "seed": 8 + i})[0].token_ids for i in range(3)]
    engine = al.engine
    engine.prefill_chunk, engine.chunk_idle_prefill = 8, True
    choices = al.build_request(long_prompt, n=3, **kwargs).split_choices()
    with engine.session(choices) as session:
        session.step()
        session.cancel(choices[1].request_id)
        results = {e.request_id: e.result for e in session if e.result is not None}
    assert sorted(results) == sorted([choices[0].request_id, choices[2].request_id])
    assert [results[choices[0].request_id].token_ids, results[choices[2].request_id].token_ids] == [expected[0], expected[2]]
    assert not engine.has_work


def test_n_answers_stream_with_their_choice(al):
    kwargs = dict(preference="concise", method="pref", max_new_tokens=6, ignore_eos=True, temperature=0.9, seed=2)
    whole = al.generate(PROMPT, n=3, **kwargs)
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finished = []
    for event in al.stream(PROMPT, n=3, **kwargs):
        assert event.index == 0
        streamed[event.choice].extend(event.token_ids)
        if event.finish_reason:
            finished.append(event.choice)
    assert sorted(finished) == [0, 1, 2]
    assert [streamed[i] for i in range(3)] == [a.token_ids for a in whole]


def test_derived_seeds_wrap_into_the_seed_range():
    top = SamplingParams(seed=2**64 - 1, n=3, temperature=1.0)
    assert [top.for_choice(i).seed for i in range(3)] == [2**64 - 1, -(2**63), -(2**63) + 1]
    assert SamplingParams(n=2).for_choice(1).seed is None and SamplingParams(n=2).for_choice(1).n == 1


def test_an_unsplit_request_for_n_answers_is_refused(al):
    request = al.build_request(PROMPT, None, "base", n=2)
    with pytest.raises(PrefalignError) as info:
        al.engine.generate([request])
    assert info.value.field == "n" and "split_choices" in str(info.value)
