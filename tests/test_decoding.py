"""Token choice on its own: beam search as a strategy, greedy/sampling, stop strings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from prefalign.decoding import BeamSearch, Greedy, Sampling, SamplingParams, StopStrings, make_generator, strategy_for
from prefalign.errors import PrefalignError
from prefalign.methods import make_method

EOS = 0
VOCAB = 4


def toy_logprobs(prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed next-token distribution per prefix: token 1 looks best first, but after it
    every continuation is poor; token 2 then 3 leads to a confident EOS."""
    table = {
        (): [0.0, 0.5, 0.4, 0.1],
        (1,): [0.3, 0.25, 0.25, 0.2],
        (2,): [0.05, 0.05, 0.05, 0.85],
        (2, 3): [0.9, 0.04, 0.03, 0.03],
    }
    probs = torch.tensor(table.get(prefix, [0.7, 0.1, 0.1, 0.1]))
    return probs.log()


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)
    score: float = 0.0


def run_beam(search: BeamSearch, max_new_tokens: int = 6) -> tuple[list[int], str, int]:
    state, beams, steps = search.start(), [Beam()], 0
    while True:
        scores = torch.stack([toy_logprobs(tuple(b.tokens)) for b in beams])
        step = search.step(beams, scores, state, eos_token_ids={EOS}, ignore_eos=False, max_new_tokens=max_new_tokens)
        steps += 1
        if step.done is not None:
            return step.done[0], step.done[1], steps
        assert len(step.running) <= search.width
        beams = [Beam(tokens=h.tokens, score=h.score) for h in step.running]


def sequence_logprob(tokens: list[int], eos: bool) -> float:
    total, prefix = 0.0, ()
    for token in tokens + ([EOS] if eos else []):
        total += float(toy_logprobs(prefix)[token])
        prefix = prefix + (token,)
    return total


def test_beam_search_finds_the_sequence_greedy_misses():
    # Greedy: 1 (p=.5), then EOS (p=.3) → probability .15; the beam keeps 2 (p=.4) → 3 → EOS: .4·.85·.9 ≈ .31.
    tokens, reason, _ = run_beam(BeamSearch(width=2))
    assert tokens == [2, 3] and reason == "stop"
    assert math.exp(sequence_logprob([2, 3], eos=True)) > math.exp(sequence_logprob([1], eos=True))
    greedy, prefix = [], ()
    while True:
        token = Greedy().token(toy_logprobs(prefix))
        if token == EOS:
            break
        greedy.append(token)
        prefix += (token,)
    assert greedy == [1]


def test_beam_length_penalty_belongs_to_the_strategy():
    # A strongly negative length penalty favours the short hypothesis (divides by length**-10).
    short, _, _ = run_beam(BeamSearch(width=2, length_penalty=-10.0))
    assert short == [1]


def test_beam_stops_at_max_new_tokens_with_reason_length():
    tokens, reason, steps = run_beam(BeamSearch(width=2), max_new_tokens=1)
    assert (len(tokens), reason, steps) == (1, "length", 1)


def test_beam_strategy_comes_from_the_method_and_needs_greedy_settings():
    beam = make_method("beam", width=3, length_penalty=0.5)
    assert strategy_for(beam, SamplingParams()) == BeamSearch(3, 0.5)
    with pytest.raises(PrefalignError, match="beam search is deterministic") as info:
        strategy_for(beam, SamplingParams(temperature=0.7))
    assert info.value.field == "temperature"
    # A beam of one decodes like any one-hypothesis method (as before the strategies).
    assert strategy_for(make_method("beam", width=1), SamplingParams()) == Greedy()
    assert strategy_for(make_method("pref"), SamplingParams()) == Greedy()
    assert strategy_for(make_method("pref"), SamplingParams(temperature=0.5)) == Sampling(SamplingParams(temperature=0.5))


def test_seeded_sampling_is_reproducible_and_greedy_rows_batch():
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.9, seed=11)
    scores = torch.randn(50, generator=torch.Generator().manual_seed(0))
    draw = lambda: [Sampling(params).token(scores, make_generator(params.seed, torch.device("cpu"))) for _ in range(3)]  # noqa: E731
    assert draw() == draw()
    top3 = set(scores.topk(3).indices.tolist())
    gen = make_generator(params.seed, torch.device("cpu"))
    assert all(Sampling(params).token(scores, gen) in top3 for _ in range(20))
    rows = torch.randn(5, 50)
    assert Greedy.tokens(rows) == [Greedy().token(r) for r in rows]
    assert make_generator(None, torch.device("cpu")) is None


def test_stop_strings_cut_and_hold_back():
    stops = StopStrings(("END", "\n\n"))
    assert stops.longest == 3
    assert stops.cut("hello EN", previous=6) is None
    assert stops.cut("hello END more", previous=8) == 6
    assert stops.cut("a\n\nb", previous=1) == 1
    # A running answer does not stream what may begin a stop string, nor a half character.
    assert stops.safe_end("hello EN", emitted=0) == 6
    assert StopStrings().safe_end("abc\ufffd", emitted=0) == 3
    assert StopStrings().safe_end("abc", emitted=3) == 3
    assert StopStrings().cut("anything", previous=0) is None


def test_batched_sampling_draws_what_each_row_draws_alone():
    """sample_rows gives each row the token Sampling.token gives it alone with the same
    generator state: seeds reproduce whatever the batch, with mixed settings and NaN rows."""
    from prefalign.decoding.sampling import sample_rows

    vocab = 3000
    settings = [
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.5, top_k=40, seed=2),
        SamplingParams(temperature=1.0, top_p=0.8, seed=3),
        SamplingParams(temperature=0.7, seed=4),
        SamplingParams(temperature=1.2, top_k=5, top_p=0.5, seed=None),
    ]
    for trial in range(5):
        scores = torch.randn(len(settings), vocab, generator=torch.Generator().manual_seed(trial)) * 4
        scores[1, :100] = float("nan")  # NaN counts as −inf, as for a request alone
        scores[3, 5:] = float("-inf")  # few candidates
        torch.manual_seed(99)
        gens = [make_generator(p.seed, torch.device("cpu")) for p in settings]
        tokens, ok = sample_rows(scores, settings, gens)
        torch.manual_seed(99)
        gens = [make_generator(p.seed, torch.device("cpu")) for p in settings]
        alone = [Sampling(p).token(row.masked_fill(row.isnan(), float("-inf")), g) for p, row, g in zip(settings, scores, gens)]
        assert tokens.tolist() == alone
        assert ok.all()
        assert tokens[3] < 5


def test_batched_sampling_marks_rows_it_cannot_sample():
    from prefalign.decoding.sampling import sample_rows

    scores = torch.randn(4, 100)
    scores[1] = float("-inf")  # everything ruled out
    scores[2, 7] = float("inf")  # +inf: probabilities NaN
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(4)]
    gens = [make_generator(p.seed, torch.device("cpu")) for p in params]
    gens[3] = "not a generator"
    _, ok = sample_rows(scores, params, gens)
    assert ok.tolist() == [True, False, False, False]
