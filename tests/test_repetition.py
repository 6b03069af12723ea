"""Repetition controls (frequency/presence/repetition penalties, no-repeat n-grams):
each against an independent computation, batched rows with different settings, and
the engine applying them after every method's scores."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from prefalign.decoding import SamplingParams
from prefalign.decoding.repetition import TokenHistory, apply_repetition_controls
from prefalign.errors import PrefalignError

VOCAB = 50


def random_case(seed: int, rows: int = 4, prompt_len: int = 12, answer_len: int = 20):
    """Random scores (some positive, some −inf) and per-row prompt/answer token histories
    drawn from a small alphabet, so that tokens and n-grams repeat."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, VOCAB, generator=g) * 3
    scores[torch.rand(rows, VOCAB, generator=g) < 0.05] = float("-inf")
    prompts = [torch.randint(0, 8, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    answers = [torch.randint(0, 8, (answer_len - 3 * r,), generator=g).tolist() for r in range(rows)]
    return scores, prompts, answers


def histories(prompts, answers, *, incremental: bool):
    """Histories built token by token (state created at the first token) or all at once."""
    out = []
    for prompt, answer in zip(prompts, answers):
        h = TokenHistory(prompt)
        if incremental and answer:
            h.push(answer[0])
            h.counts(VOCAB, torch.device("cpu"))
            h.seen(VOCAB, torch.device("cpu"))
            for n in range(1, 5):
                h.completing(n, with_prompt=True)
            for token in answer[1:]:
                h.push(token)
        else:
            for token in answer:
                h.push(token)
        out.append(h)
    return out


def openai_formula(row: torch.Tensor, answer: list[int], frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's published formula, one token at a time:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    out = row.clone()
    for j, c in Counter(answer).items():  # tokens with c = 0 keep their score
        out[j] = row[j] - c * frequency - float(c > 0) * presence
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("incremental", [False, True])
def test_frequency_and_presence_follow_openais_formula(seed, incremental):
    scores, prompts, answers = random_case(seed)
    settings = [
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.3),
        SamplingParams(frequency_penalty=-1.5),
        SamplingParams(presence_penalty=2.0),
        SamplingParams(),
    ]
    got = apply_repetition_controls(scores, settings, histories(prompts, answers, incremental=incremental))
    for r, s in enumerate(settings):
        want = openai_formula(scores[r], answers[r], s.frequency_penalty, s.presence_penalty)
        torch.testing.assert_close(got[r], want, rtol=0, atol=1e-6)
    assert torch.equal(got[3], scores[3])  # neutral row: bit-identical


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("incremental", [False, True])
def test_repetition_penalty_equals_transformers(seed, incremental):
    from transformers import RepetitionPenaltyLogitsProcessor

    scores, prompts, answers = random_case(seed)
    penalties = [1.3, 0.7, 1.0, 2.5]
    settings = [SamplingParams(repetition_penalty=p) for p in penalties]
    got = apply_repetition_controls(scores, settings, histories(prompts, answers, incremental=incremental))
    for r, p in enumerate(penalties):
        ids = torch.tensor([prompts[r] + answers[r]])  # transformers sees the prompt + answer
        want = RepetitionPenaltyLogitsProcessor(penalty=p)(ids, scores[r : r + 1].clone())[0]
        assert torch.equal(got[r], want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("incremental", [False, True])
def test_no_repeat_ngram_equals_transformers(seed, incremental):
    from transformers import NoRepeatNGramLogitsProcessor

    scores, prompts, answers = random_case(seed)
    sizes = [1, 2, 3, 0]
    settings = [SamplingParams(no_repeat_ngram_size=n) for n in sizes]
    got = apply_repetition_controls(scores, settings, histories(prompts, answers, incremental=incremental))
    assert torch.isinf(got).sum() > torch.isinf(scores).sum()  # the case bans something
    for r, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(got[r], scores[r])
            continue
        ids = torch.tensor([prompts[r] + answers[r]])
        want = NoRepeatNGramLogitsProcessor(n)(ids, scores[r : r + 1].clone())[0]
        assert torch.equal(got[r], want)


def test_all_controls_together_in_one_batch_equal_the_processors_in_sequence():
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    scores, prompts, answers = random_case(5, rows=3)
    settings = [
        SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.4, no_repeat_ngram_size=3),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.9, frequency_penalty=-0.2, no_repeat_ngram_size=2),
    ]
    got = apply_repetition_controls(scores, settings, histories(prompts, answers, incremental=True))
    assert torch.equal(got[1], scores[1])
    for r in (0, 2):
        s = settings[r]
        ids = torch.tensor([prompts[r] + answers[r]])
        want = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, scores[r : r + 1].clone())[0]
        want = openai_formula(want, answers[r], s.frequency_penalty, s.presence_penalty)
        want = NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size)(ids, want[None])[0]
        torch.testing.assert_close(got[r], want, rtol=0, atol=1e-6)


def test_beam_child_history_is_independent():
    parent = TokenHistory([1, 2])
    parent.push(3)
    parent.counts(VOCAB, torch.device("cpu"))
    a, b = parent.child(4), parent.child(5)
    assert a.counts(VOCAB, torch.device("cpu"))[4] == 1 and a.counts(VOCAB, torch.device("cpu"))[5] == 0
    assert b.counts(VOCAB, torch.device("cpu"))[5] == 1 and parent.counts(VOCAB, torch.device("cpu"))[4] == 0
    assert parent.answer == [3] and a.answer == [3, 4]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 2.0}, "no_repeat_ngram_size"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(PrefalignError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def test_defaults_are_neutral():
    s = SamplingParams()
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty, s.no_repeat_ngram_size) == (0.0, 0.0, 1.0, 0)
    assert not s.penalizes


# --- through the engine ------------------------------------------------------------------

PROMPTS = ["Explain in detail why the sky is blue.", "List three fruits."]


def test_engine_no_repeat_ngram_answers_have_no_repeated_ngram(aligner):
    for method in ("base", "amulet"):
        out = aligner.generate(PROMPTS, preference="concise", method=method, max_new_tokens=40, ignore_eos=True, no_repeat_ngram_size=2)
        for result in out:
            ids = result.token_ids
            bigrams = list(zip(ids, ids[1:]))
            assert len(bigrams) == len(set(bigrams))


def reference_with_processors(al, request, steps: int) -> tuple[list[int], int]:
    """Greedy, uncached: the method's scores of the whole sequence each step, then
    transformers' processors and OpenAI's formula; returns the tokens and the number of
    steps at which the controls changed the scores."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from prefalign.reference import _last_logprobs

    s = request.sampling
    prompt = request.contexts[request.primary][1]
    answer: list[int] = []
    changed = 0
    for _ in range(steps):
        stacked = torch.stack([_last_logprobs(al.engine.models[m], [ids + answer], al.tokenizer.pad_token_id) for m, ids in request.contexts], dim=1)
        scores = request.method.score(stacked, torch.tensor(request.weights))
        ids = torch.tensor([prompt + answer])
        out = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, scores.clone())
        if s.frequency_penalty or s.presence_penalty:
            out = openai_formula(out[0], answer, s.frequency_penalty, s.presence_penalty)[None]
        if s.no_repeat_ngram_size:
            out = NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size)(ids, out)
        changed += int(not torch.equal(out, scores))
        answer.append(int(out.argmax()))
    return answer, changed


def test_engine_applies_each_rows_controls_after_the_methods_scores(llama_aligner):
    al = llama_aligner
    settings = [
        dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, no_repeat_ngram_size=2),
        dict(),
        dict(frequency_penalty=-2.0),
    ]
    requests = [al.build_request(p, "concise", "la", max_new_tokens=10, ignore_eos=True, **kw) for p, kw in zip(PROMPTS + PROMPTS[:1], settings)]
    got = [r.token_ids for r in al.engine.generate(requests)]
    for request, tokens in zip(requests, got):
        want, changed = reference_with_processors(al, request, 10)
        assert tokens == want
        assert (changed > 0) == request.sampling.penalizes


def test_engine_greedy_no_repeat_ngram_equals_transformers_generate(llama_aligner):
    from prefalign.prompts import encode_context, to_chat

    al = llama_aligner
    ids = encode_context(al.tokenizer, to_chat(PROMPTS[0]), None, "default")
    ref = al.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=20,
        do_sample=False, no_repeat_ngram_size=3, pad_token_id=al.tokenizer.pad_token_id,
    )[0, len(ids):].tolist()
    ours = al.generate(PROMPTS[0], method="base", max_new_tokens=20, ignore_eos=True, no_repeat_ngram_size=3)[0]
    assert ours.token_ids == ref[: len(ours.token_ids)]


def test_engine_beam_with_penalties_equals_transformers_beam_search(llama_aligner):
    """transformers' beam search applies its processors to log-probs, as the engine does
    to every method's scores (for ``beam`` and ``base``, the model's log-probs)."""
    from prefalign.prompts import encode_context, to_chat

    al = llama_aligner
    ids = encode_context(al.tokenizer, to_chat(PROMPTS[1]), "Your answer should be concise as much as possible.", "default")
    ref = al.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=12,
        num_beams=3, do_sample=False, early_stopping=True, length_penalty=1.0, repetition_penalty=1.5,
        no_repeat_ngram_size=2, pad_token_id=al.tokenizer.pad_token_id,
    )[0, len(ids):].tolist()
    ref = [t for t in ref if t not in al.engine.eos_token_ids and t != al.tokenizer.pad_token_id]
    ours = al.generate(PROMPTS[1], preference="concise", method="beam", width=3, max_new_tokens=12, repetition_penalty=1.5, no_repeat_ngram_size=2)[0]
    assert ours.token_ids == ref


def test_engine_beam_with_no_repeat_ngram(llama_aligner):
    out = llama_aligner.generate(PROMPTS[0], preference="concise", method="beam", width=3, max_new_tokens=20, no_repeat_ngram_size=2)[0]
    bigrams = list(zip(out.token_ids, out.token_ids[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_eval_sweeps_and_cli_params_route_repetition_controls_to_sampling():
    from prefalign.cli_options import check_request
    from prefalign.eval.runner import expand_methods

    variants = expand_methods(["pref", "amulet"], ["pref.repetition_penalty=1.2", "amulet.no_repeat_ngram_size=0,3"])
    assert [v.label for v in variants] == ["pref(repetition_penalty=1.2)", "amulet(no_repeat_ngram_size=0)", "amulet(no_repeat_ngram_size=3)"]
    assert variants[0].params["repetition_penalty"] == 1.2 and "kl_budget" in variants[2].params
    with pytest.raises(PrefalignError) as err:
        expand_methods(["pref"], ["pref.frequency_penalty=3"])
    assert err.value.field == "frequency_penalty"
    checked = check_request(method="la", preference=["concise"], weight=[], param=["presence_penalty=0.5", "ratio=1"])
    assert checked.params == {"presence_penalty": 0.5, "ratio": 1}
    with pytest.raises(PrefalignError) as err:
        check_request(method="la", preference=["concise"], weight=[], param=["repetition_penalty=-1"])
    assert err.value.field == "repetition_penalty"
