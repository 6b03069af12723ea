"""Methods as rules over next-token scores: formulas, closed form vs loop, parameters."""

from __future__ import annotations

import pytest
import torch

from prefalign.errors import PrefalignError, UnknownNameError
from prefalign.methods import Amulet, LinearAlignment, amulet_coefficient, ftrl_loop, make_method


def _logprobs(n: int, k: int, v: int = 500, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, k, v, generator=g, dtype=dtype) * 3, dim=-1)


def test_amulet_coefficient_at_paper_defaults():
    assert amulet_coefficient(2.0, 2.0, 10.0, 60) == pytest.approx(4.6487, abs=1e-4)
    assert Amulet().coefficient == pytest.approx(4.6487, abs=1e-4)


@pytest.mark.parametrize("params", [dict(), dict(alpha=0.5, lam=1.0, eta=3.0, iterations=7), dict(alpha=4.0, iterations=1)])
def test_closed_form_matches_literal_ftrl_loop(params):
    lp = _logprobs(4, 2)
    closed = Amulet(kl_budget=0, **params).score(lp, torch.ones(1, dtype=lp.dtype))
    exact = Amulet(exact=True, kl_budget=0, **params).score(lp, torch.ones(1, dtype=lp.dtype))
    # Both are l_T up to a per-row constant: compare normalised distributions.
    assert torch.allclose(torch.log_softmax(closed, -1), torch.log_softmax(exact, -1), atol=1e-9)
    assert torch.equal(closed.argmax(-1), exact.argmax(-1))


def test_closed_form_matches_loop_in_float32_to_tolerance():
    lp = _logprobs(8, 2, v=4096, dtype=torch.float32)
    closed = torch.log_softmax(Amulet(kl_budget=0).score(lp, torch.ones(1)), -1)
    exact = torch.log_softmax(Amulet(exact=True, kl_budget=0).score(lp, torch.ones(1)), -1)
    assert (closed - exact).abs().max() < 1e-3
    assert torch.equal(closed.argmax(-1), exact.argmax(-1))


def test_ftrl_loop_follows_the_stated_recursion_step_by_step():
    lp = _logprobs(1, 2, v=50)
    p, b = lp[:, 1], lp[:, 0]
    alpha, lam, eta = 2.0, 2.0, 10.0
    history = [p]
    qs = []
    for t in range(1, 4):
        qs.append(alpha * (history[-1] - b))
        l_t = (lam * p + sum(qs) / t + history[-1] / (eta * t)) / (lam + 1 / (eta * t))
        history.append(torch.log_softmax(l_t, -1) if t < 3 else l_t)
    assert torch.allclose(ftrl_loop(p, b, alpha, lam, eta, 3), history[-1], atol=1e-12)


def test_linear_alignment_formula_and_plausibility():
    lp = _logprobs(3, 2)
    b, p = lp[:, 0], lp[:, 1]
    out = LinearAlignment(ratio=2.0, kl_budget=0).score(lp, torch.ones(1, dtype=lp.dtype))
    assert torch.allclose(out, p + 2.0 * (p - b))
    masked = LinearAlignment(ratio=2.0, plausibility=0.1, kl_budget=0).score(lp, torch.ones(1, dtype=lp.dtype))
    keep = p >= p.max(-1, keepdim=True).values + torch.log(torch.tensor(0.1, dtype=lp.dtype))
    assert torch.equal(torch.isfinite(masked), keep)
    assert torch.allclose(masked[keep], out[keep])


def test_several_preferences_combine_as_weighted_mean_of_aligned_scores():
    lp = _logprobs(2, 3)  # base, pref A, pref B
    w = torch.tensor([3.0, 1.0], dtype=lp.dtype)
    c = Amulet().coefficient
    b, pa, pb = lp[:, 0], lp[:, 1], lp[:, 2]
    expected = (3 * (pa + c * (pa - b)) + 1 * (pb + c * (pb - b))) / 4
    assert torch.allclose(Amulet(kl_budget=0).score(lp, w), expected)
    la = LinearAlignment(ratio=1.5, kl_budget=0).score(lp, w)
    assert torch.allclose(la, (3 * (pa + 1.5 * (pa - b)) + (pb + 1.5 * (pb - b))) / 4)
    pref = make_method("pref").score(lp[:, 1:], w)
    assert torch.allclose(pref, (3 * pa + pb) / 4)
    # The same preference twice equals it once, whatever the weights.
    twice = torch.stack([b, pa, pa], dim=1)
    assert torch.allclose(Amulet().score(twice, w), Amulet().score(lp[:, :2], w[:1]))


def test_roles():
    assert [r.preference for r in make_method("amulet").roles(2)] == [None, 0, 1]
    assert [r.preference for r in make_method("pref").roles(2)] == [0, 1]
    assert [r.preference for r in make_method("base").roles(3)] == [None]
    assert make_method("beam").search().width == 16


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("amulet", {"eta": 0}, "eta"),
        ("amulet", {"eta": -1.0}, "eta"),
        ("amulet", {"iterations": 0}, "iterations"),
        ("amulet", {"alpha": float("nan")}, "alpha"),
        ("amulet", {"exact": "yes"}, "exact"),
        ("la", {"plausibility": 1.5}, "plausibility"),
        ("beam", {"width": 0}, "width"),
        ("amulet", {"gamma": 1}, "gamma"),
        ("amulet", {"alpha": 1e300}, "alpha"),
        ("amulet", {"iterations": 10**6}, "iterations"),
        ("la", {"plausibility": "x"}, "plausibility"),
        ("la", {"ratio": -1}, "ratio"),
        ("beam", {"width": 1000}, "width"),
    ],
)
def test_bad_parameters_are_named(name, params, field):
    with pytest.raises(PrefalignError) as info:
        make_method(name, **params)
    assert info.value.field == field
    assert field in str(info.value)


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownNameError, match="amulet"):
        make_method("amulett")


def test_parameter_aliases():
    m = make_method("amulet", **{"lambda": 3, "T": 5})
    assert (m.lam, m.iterations) == (3.0, 5)
    assert make_method("la", r=1).ratio == 1.0
