"""Preference weights: any finite positive weights are valid, however far apart.

The request scales them by their largest (``engine.normalise_weights``), so no sum of
them overflows and no method's weighted mean turns into NaN mid-decode.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from prefalign import Aligner
from prefalign.engine import GenerationRequest, normalise_weights
from prefalign.errors import PrefalignError
from prefalign.methods import make_method

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROMPT = "How do I boil an egg?"
TEXTS = ["Answer concisely.", "Answer like a pirate.", "Answer formally."]
METHODS = ("pref", "la", "amulet")
#: Every positive finite double, subnormals included, and the extremes themselves.
weight = st.one_of(
    st.floats(min_value=5e-324, max_value=sys.float_info.max, allow_subnormal=True),
    st.sampled_from([5e-324, 1e-310, sys.float_info.min, 1e-300, 1.0, 1e300, 1e308, sys.float_info.max]),
)


@pytest.fixture(scope="module")
def al(tokenizer):
    from conftest import _tiny_llama

    return Aligner(_tiny_llama(len(tokenizer)), tokenizer)


def tokens(al: Aligner, weights: tuple[float, ...]) -> list[list[int]]:
    preference = list(zip(TEXTS, weights))
    requests = [al.build_request(PROMPT, preference, m, max_new_tokens=3, ignore_eos=True) for m in METHODS]
    results = al.engine.generate(requests)
    assert [r.error for r in results] == [None] * len(METHODS)
    return [r.token_ids for r in results]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(weights=st.lists(weight, min_size=2, max_size=3), shift=st.integers(min_value=-1074, max_value=1023))
def test_any_finite_positive_weights_generate_as_their_normalised_form(al, weights, shift):
    """Weights anywhere in the positive float range decode every method, and only their
    ratios count: the same tokens as ``w / max(w)`` and as ``w`` times a power of two."""
    got = tokens(al, tuple(weights))
    top = max(weights)
    assert got == tokens(al, tuple(max(w / top, 5e-324) for w in weights))  # a ratio under 5e-324 is no weight
    try:
        scaled = tuple(math.ldexp(w, shift) for w in weights)
    except OverflowError:
        return
    if all(sys.float_info.min <= w <= sys.float_info.max for w in (*weights, *scaled)):  # exact: both normal
        assert got == tokens(al, scaled)


@pytest.mark.parametrize("weights", [(1e300, 1.0), (1.0, 1e300), (1e308, 1e308), (5e-324, 5e-324), (5e-324, 1.0, 1e308)])
def test_the_issue_s_weights_decode_every_method(al, weights):
    """1e300 and 1 failed every method but base mid-decode ("ruled out every token")."""
    assert tokens(al, weights)


def test_weights_far_apart_act_as_the_largest_alone(al):
    """A preference 1e300 times lighter counts for nothing (its share is below float32's range)."""
    assert tokens(al, (1.0, 1e-300)) == tokens(al, (1.0, 5e-324)) == tokens(al, (1e300, 1e-10))


def test_ordinary_weights_score_bit_identically():
    """Weights whose largest is 1 are kept as given; others give the same float32 shares."""
    torch.manual_seed(0)
    for name in METHODS:
        method = make_method(name)
        logprobs = torch.log_softmax(3 * torch.randn(4, len(method.roles(2)), 50), dim=-1)
        for given, scaled in [((1.0, 1.0), (2.0, 2.0)), ((2.0, 1.0), (1.0, 0.5)), ((1.0, 3.0), (0.25, 0.75))]:
            a = method.score(logprobs, torch.tensor(normalise_weights(given), dtype=torch.float32))
            b = method.score(logprobs, torch.tensor(given, dtype=torch.float32))
            c = method.score(logprobs, torch.tensor(normalise_weights(scaled), dtype=torch.float32))
            assert torch.equal(a, b) and torch.equal(a, c)
    assert normalise_weights((1.0,)) == (1.0,) and normalise_weights((0.5, 1.0)) == (0.5, 1.0)


@pytest.mark.parametrize("weights", [(0.0,), (-1.0,), (float("inf"),), (float("nan"),), (1.0, float("inf")), (), (True,), ("1",)])
def test_weights_that_are_not_finite_positive_numbers_are_refused(al, weights):
    made = al.build_request(PROMPT, "concise", "amulet", max_new_tokens=3)
    with pytest.raises(PrefalignError) as info:
        GenerationRequest(contexts=made.contexts, method=made.method, weights=weights, sampling=made.sampling)
    assert info.value.field == "preference"
