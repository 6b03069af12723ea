"""The KL-budget safeguard of ``la`` and ``amulet``, and the strength bounds of both."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.methods import Amulet, LinearAlignment, make_method
from prefalign.methods.method import MAX_STRENGTH
from prefalign.methods.safeguard import STEPS, contrast, kl_bounded_strength


def _logprobs(n: int, k: int, v: int = 2000, seed: int = 0, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, k, v, generator=g, dtype=dtype) * scale, dim=-1)


def _kl(scores: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """KL(softmax(scores) ‖ softmax(pref)) per row, computed independently of the helper."""
    log_q = torch.log_softmax(scores, -1)
    return (log_q.exp() * (log_q - torch.log_softmax(pref, -1))).sum(-1)


@pytest.mark.parametrize("budget", [0.05, 0.3, 1.0, 3.0])
def test_strength_keeps_the_kl_within_budget_and_is_nearly_the_largest(budget):
    lp = _logprobs(16, 2)
    b, p = lp[:, :1], lp[:, 1:]
    c_max = 4.6487
    c = kl_bounded_strength(p, b, c_max, budget)
    assert c.shape == (16, 1, 1)
    assert ((c >= 0) & (c <= c_max)).all()
    kl = _kl(contrast(p, b, c), p)
    assert (kl <= budget + 1e-9).all()
    # Bisection precision: a step of c_max / 2**STEPS more breaks the budget where c < c_max.
    bound = (c < c_max).squeeze(-1)
    above = _kl(contrast(p, b, (c + c_max / 2**STEPS).clamp_max(c_max)), p)
    assert (above[bound] > budget).all()


def test_kl_never_decreases_with_the_strength():
    """The property the search relies on: dKL/dc = c·Var_q(p − b) ≥ 0."""
    lp = _logprobs(8, 2, seed=8)
    b, p = lp[:, :1], lp[:, 1:]
    kls = torch.stack([_kl(contrast(p, b, c), p) for c in torch.linspace(0, 6, 61).tolist()])
    assert torch.allclose(kls[0], torch.zeros_like(kls[0]), atol=1e-12)
    assert (kls.diff(dim=0) >= -1e-12).all()


def test_strength_is_monotone_in_the_budget():
    lp = _logprobs(32, 2, seed=1)
    b, p = lp[:, :1], lp[:, 1:]
    previous = torch.zeros(32, 1, 1, dtype=lp.dtype)
    for budget in (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0):
        c = kl_bounded_strength(p, b, 4.6487, budget)
        assert (c >= previous).all()
        previous = c
    assert (c == 4.6487).all()  # a budget this large never binds


def test_full_strength_when_the_budget_does_not_bind():
    lp = _logprobs(4, 2, scale=0.05)  # nearly uniform contexts: p − b tiny, KL tiny at any c
    b, p = lp[:, :1], lp[:, 1:]
    assert (_kl(contrast(p, b, 2.0), p) < 0.05).all()
    assert torch.equal(kl_bounded_strength(p, b, 2.0, 0.05), torch.full((4, 1, 1), 2.0, dtype=lp.dtype))
    # and then the methods give the papers' scores
    w = torch.ones(1, dtype=lp.dtype)
    # the papers' rules keep their own arithmetic (la: p + r(p − b), amulet: a lerp): equal to rounding
    assert torch.allclose(LinearAlignment(kl_budget=0.05).score(lp, w), LinearAlignment(kl_budget=0).score(lp, w), rtol=0, atol=1e-12)
    assert (_kl(contrast(p, b, Amulet().coefficient), p) < 0.5).all()
    assert torch.allclose(Amulet(kl_budget=0.5).score(lp, w), Amulet(kl_budget=0).score(lp, w), rtol=0, atol=1e-12)


def test_rows_are_independent_of_their_batch():
    lp = _logprobs(6, 3, seed=2, dtype=torch.float32)
    w = torch.tensor([2.0, 1.0])
    for method in (Amulet(kl_budget=0.3), LinearAlignment(kl_budget=0.3), Amulet(kl_budget=0.3, exact=True)):
        together = method.score(lp, w)
        alone = torch.cat([method.score(lp[i : i + 1], w) for i in range(6)])
        assert torch.equal(together, alone)


def test_safeguard_off_is_the_papers_rule_exactly():
    lp = _logprobs(5, 3, seed=3)
    b, pa, pb = lp[:, 0], lp[:, 1], lp[:, 2]
    w = torch.tensor([3.0, 1.0], dtype=lp.dtype)
    assert torch.equal(
        LinearAlignment(ratio=1.5, kl_budget=0).score(lp, w),
        (3 * (pa + 1.5 * (pa - b)) + (pb + 1.5 * (pb - b))) / 4,
    )
    c = Amulet().coefficient
    expected = (3 * torch.lerp(b, pa, 1 + c) + torch.lerp(b, pb, 1 + c)) / 4
    assert torch.equal(Amulet(kl_budget=0).score(lp, w), expected)


def test_safeguard_lowers_the_kl_of_each_method():
    lp = _logprobs(8, 2, seed=4)
    w = torch.ones(1, dtype=lp.dtype)
    p = lp[:, 1]
    for paper, guarded in ((LinearAlignment(kl_budget=0), LinearAlignment(kl_budget=0.2)), (Amulet(kl_budget=0), Amulet(kl_budget=0.2))):
        assert (_kl(paper.score(lp, w), p) > 0.2).all()  # the paper's rule moves far on these rows
        assert (_kl(guarded.score(lp, w), p) <= 0.2 + 1e-9).all()


def test_exact_loop_and_closed_form_agree_with_the_safeguard_on():
    lp = _logprobs(4, 2, seed=5)
    w = torch.ones(1, dtype=lp.dtype)
    closed = torch.log_softmax(Amulet(kl_budget=0.3).score(lp, w), -1)
    exact = torch.log_softmax(Amulet(kl_budget=0.3, exact=True).score(lp, w), -1)
    assert torch.allclose(closed, exact, atol=1e-9)


def test_safeguard_with_plausibility_masks_after_bounding():
    lp = _logprobs(3, 2, seed=6)
    w = torch.ones(1, dtype=lp.dtype)
    both = LinearAlignment(kl_budget=0.3, plausibility=0.1).score(lp, w)
    kl_only = LinearAlignment(kl_budget=0.3).score(lp, w)
    p = lp[:, 1]
    keep = p >= p.max(-1, keepdim=True).values + math.log(0.1)
    assert torch.equal(torch.isfinite(both), keep)
    assert torch.equal(both[keep], kl_only[keep])


@pytest.mark.parametrize("budget", [1e-6, 0.3])  # 1e-6: the strength falls to 0 on every row
def test_banned_tokens_stay_banned_without_nan(budget):
    lp = _logprobs(3, 2, seed=7)
    p = lp[:, 1].clone()
    p[:, :5] = float("-inf")  # e.g. a transformers processor banned these in the preference context
    banned = torch.stack([lp[:, 0], torch.log_softmax(p, -1)], dim=1)
    for method in (LinearAlignment(kl_budget=budget), Amulet(kl_budget=budget)):
        scores = method.score(banned, torch.ones(1, dtype=lp.dtype))
        assert not torch.isnan(scores).any()
        assert torch.isneginf(scores[:, :5]).all() and torch.isfinite(scores[:, 5:]).all()
    assert (kl_bounded_strength(banned[:, 1:], banned[:, :1], 4.6487, budget) >= 0).all()


def test_helper_rejects_a_non_positive_budget():
    lp = _logprobs(1, 2)
    with pytest.raises(ValueError, match="positive budget"):
        kl_bounded_strength(lp[:, 1:], lp[:, :1], 2.0, 0.0)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("amulet", {"lam": 0}, "lam"),
        ("amulet", {"lam": 1e-300}, "lam"),
        ("amulet", {"lam": 1e-4}, "lam"),
        ("amulet", {"lam": 0.5}, "lam"),  # c_T = 4.3e4
        ("amulet", {"alpha": 1e4}, "alpha"),
        ("amulet", {"alpha": 8.0}, "alpha"),  # c_T = 5e4
        ("amulet", {"kl_budget": -0.1}, "kl_budget"),
        ("amulet", {"kl_budget": float("inf")}, "kl_budget"),
        ("la", {"kl_budget": 1e3}, "kl_budget"),
        ("la", {"ratio": float("inf")}, "ratio"),
        ("la", {"ratio": 1e5}, "ratio"),
    ],
)
def test_strengths_beyond_the_bound_are_rejected_with_the_field(name, params, field):
    with pytest.raises(PrefalignError) as info:
        make_method(name, **params)
    assert info.value.field == field
    assert field in str(info.value)
    if name == "amulet" and field in ("lam", "alpha"):
        assert "at most 10000" in str(info.value)


def test_amulet_error_states_a_bound_that_works():
    with pytest.raises(PrefalignError) as info:
        Amulet(lam=0.0)
    # "lam must be ≥ X": X is accepted, and a bit below it is not
    text = str(info.value)
    bound = float(text.split("lam must be ≥ ")[1].split(" ")[0])
    Amulet(lam=bound * 1.01)
    with pytest.raises(PrefalignError):
        Amulet(lam=bound * 0.97)


@pytest.mark.parametrize("params", [dict(lam=0.6), dict(alpha=6.0), dict(iterations=10_000), dict(alpha=0.0)])
def test_accepted_amulet_parameters_combine_to_finite_scores(params):
    method = Amulet(**params)
    assert method.coefficient <= MAX_STRENGTH
    lp = _logprobs(2, 2, dtype=torch.float32)
    assert torch.isfinite(method.score(lp, torch.ones(1))).all()


def test_largest_la_ratio_gives_finite_scores():
    lp = _logprobs(2, 2, dtype=torch.float32)
    assert torch.isfinite(LinearAlignment(ratio=MAX_STRENGTH).score(lp, torch.ones(1))).all()


def test_safeguard_is_on_by_default_and_shown_in_the_parameters():
    import dataclasses

    from prefalign.methods import method_class

    assert Amulet().kl_budget == 0.5 and LinearAlignment().kl_budget == 0.25  # docs/safeguard.md
    for name in ("amulet", "la"):
        assert "kl_budget" in [f.name for f in dataclasses.fields(method_class(name))]
        assert make_method(name, kl_budget=0).kl_budget == 0.0


def test_the_accelerator_path_without_host_checks_gives_the_same_strengths():
    """Accelerators search every row without the early exit (no host sync): same answer."""
    from prefalign.methods.safeguard import _bounded_rows

    lp = _logprobs(12, 2, seed=5, dtype=torch.float32)
    lp[:4] = _logprobs(4, 2, scale=0.05, dtype=torch.float32)  # rows that keep the full strength
    b, p = lp[:, 0], lp[:, 1]
    chunked = kl_bounded_strength(p, b, 4.6487, 0.5)
    whole = _bounded_rows(p, b, 4.6487, 0.5, STEPS, early_exit=False)
    assert torch.equal(chunked, whole)
    assert (whole[:4] == 4.6487).all() and (whole[4:] < 4.6487).any()


# --- the repetition guard ------------------------------------------------------------------


def _completing(answer: list[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of ``answer``, by brute force over its n-grams."""
    if len(answer) < n - 1:
        return set()
    prefix = tuple(answer[len(answer) - (n - 1):]) if n > 1 else ()
    return {answer[i + n - 1] for i in range(len(answer) - n + 1) if tuple(answer[i : i + n - 1]) == prefix}


@pytest.mark.parametrize("method", ["la", "amulet"])
@pytest.mark.parametrize("n", [2, 3])
def test_repeat_guard_equals_the_safeguard_on_a_base_without_the_repeats_lead(method, n):
    """Guarded scores equal the plain safeguard computed with ``b`` raised to ``p`` on the
    tokens that would complete a repeated n-gram (found by brute force)."""
    from prefalign.decoding.repetition import Histories, TokenHistory

    V = 40
    lp = _logprobs(3, 2, v=V, seed=7)
    w = torch.ones(1, dtype=lp.dtype)
    g = torch.Generator().manual_seed(1)
    answers = [torch.randint(0, 6, (30,), generator=g).tolist() for _ in range(3)]
    answers[2] = answers[2][:1]  # too short to repeat anything
    guarded = make_method(method, repeat_ngram=n)
    got = guarded.score(lp, w, history=Histories([TokenHistory([99], a) for a in answers]))
    b, p = lp[:, 0].clone(), lp[:, 1]
    marked = 0
    for row, answer in enumerate(answers):
        for token in _completing(answer, n):
            marked += 1
            b[row, token] = max(b[row, token], p[row, token])
    assert marked > 0
    expected = make_method(method, repeat_ngram=0).score(torch.stack([b, p], dim=1), w)
    assert torch.equal(got, expected)
    assert torch.equal(got[2], make_method(method, repeat_ngram=0).score(lp, w)[2])  # nothing to guard


def test_repeat_guard_never_lifts_a_repeat_above_the_preference_context():
    from prefalign.decoding.repetition import Histories, TokenHistory

    lp = _logprobs(1, 2, v=30, seed=9)
    b, p = lp[0, 0], lp[0, 1]
    token = int((p - b).argmax())  # the token the contrast favours most
    answer = [token, 3, token, 3]  # "token 3" already occurred: after 3, token completes it
    for method in ("la", "amulet"):
        rule = make_method(method, repeat_ngram=2)
        plain = torch.log_softmax(make_method(method, repeat_ngram=0).score(lp, torch.ones(1, dtype=lp.dtype)), -1)[0]
        guarded = torch.log_softmax(rule.score(lp, torch.ones(1, dtype=lp.dtype), history=Histories([TokenHistory([], answer)])), -1)[0]
        assert plain[token] > p[token]  # unguarded, the repeat is amplified
        assert guarded[token] <= p[token] + 1e-9


def test_repeat_guard_is_part_of_the_safeguard():
    for name in ("la", "amulet"):
        assert make_method(name).uses_history and make_method(name).repeat_ngram == 3
        assert not make_method(name, kl_budget=0).uses_history  # the paper's rule reads no history
        assert not make_method(name, repeat_ngram=0).uses_history
        with pytest.raises(PrefalignError) as err:
            make_method(name, repeat_ngram=-1)
        assert err.value.field == "repeat_ngram"
