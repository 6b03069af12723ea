"""``amulet``: test-time realignment as an online-learning game (Zhang et al., ICLR 2025).

Per token, with ``b`` and ``p`` the log-softmax of the base and preference contexts'
next-token logits, the paper runs T iterations of follow-the-regularised-leader::

    l_0 = p
    Q_t = α (l_{t-1} − b)
    l_t = (λ p + (Q_1 + … + Q_t)/t + l_{t-1}/(η t)) / (λ + 1/(η t))

re-normalising ``l_t`` with log-softmax between iterations (not after the last).
Every iterate is ``p + c_t (p − b)`` plus a per-row constant (log-softmax only shifts
by a constant, and the update is affine), with the scalar recursion::

    c_0 = 0,   S_t = S_{t-1} + α (1 + c_{t-1}),   c_t = (S_t / t + c_{t-1}/(η t)) / (λ + 1/(η t))

so the exact answer is one fused op, ``p + c_T (p − b)``. ``exact=True`` runs the
literal loop instead (the reference the tests compare against).

``kl_budget`` > 0 (the safeguard, :mod:`prefalign.methods.safeguard`) lowers the
strength per token from ``c_T`` to the largest ``c`` whose realigned distribution stays
within that KL of the preference context's; ``kl_budget=0`` is the paper's rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import PrefalignError
from .method import (
    MAX_STRENGTH,
    ContextRole,
    ContextScores,
    Method,
    base_and_preferences,
    count,
    fraction,
    plausibility_mask,
    positive,
)
from .safeguard import (
    AMULET_KL_BUDGET,
    REPEAT_NGRAM,
    check_kl_budget,
    check_repeat_ngram,
    contrast,
    guard_repeats,
    kl_bounded_strength,
    repeats_of,
)


@lru_cache(maxsize=256)
def amulet_coefficient(alpha: float, lam: float, eta: float, iterations: int) -> float:
    """``c_T`` such that the T-step FTRL iterate equals ``p + c_T (p − b)`` up to a constant."""
    c, running_sum = 0.0, 0.0
    for t in range(1, iterations + 1):
        running_sum += alpha * (1.0 + c)
        c = (running_sum / t + c / (eta * t)) / (lam + 1.0 / (eta * t))
        if not math.isfinite(c):  # λ → 0 makes c grow like (1 + αη)^t: stop once it is inf/NaN
            return math.inf
    return c


def _bisect_parameter(strength_at, lo: float, hi: float, *, increasing: bool, geometric: bool) -> float:
    """The boundary value in ``[lo, hi]`` where ``strength_at`` crosses MAX_STRENGTH (60 halvings)."""
    for _ in range(60):
        mid = math.sqrt(lo * hi) if geometric else (lo + hi) / 2
        ok = math.isfinite(s := strength_at(mid)) and s <= MAX_STRENGTH
        if ok == increasing:
            lo = mid
        else:
            hi = mid
    return lo if increasing else hi


def check_amulet_strength(alpha: float, lam: float, eta: float, iterations: int) -> float:
    """``c_T`` for these parameters, or a :class:`PrefalignError` if it is not finite or exceeds MAX_STRENGTH.

    ``c_T`` grows as λ shrinks (λ = 0 gives ~1e80 at the defaults) and as α grows; the
    error names the parameter that is furthest from the paper's defaults (α = λ = 2) and
    the bound that parameter must respect given the others.
    """
    c = amulet_coefficient(alpha, lam, eta, iterations)
    if math.isfinite(c) and c <= MAX_STRENGTH:
        return c
    shown = f"{c:.3g}" if math.isfinite(c) else "not finite"
    # c_T decreases with λ and increases with α (on the accepted ranges): bisect each bound.
    lam_min = _bisect_parameter(lambda x: amulet_coefficient(alpha, x, eta, iterations), max(lam, 1e-12), 1e4, increasing=False, geometric=True)
    alpha_max = _bisect_parameter(lambda x: amulet_coefficient(x, lam, eta, iterations), 0.0, alpha, increasing=True, geometric=False)
    lam_off = math.inf if lam <= 0 else math.log(2.0 / lam)
    alpha_off = math.log(max(alpha, 1e-300) / 2.0)
    field = "lam" if lam_off >= alpha_off else "alpha"
    where = f"alpha={alpha:g}, lam={lam:g}, eta={eta:g}, iterations={iterations}"
    fix = f"lam must be ≥ {lam_min:.3g} with these alpha, eta, iterations (or alpha ≤ {alpha_max:.3g} with this lam)"
    if field == "alpha":
        fix = f"alpha must be ≤ {alpha_max:.3g} with these lam, eta, iterations (or lam ≥ {lam_min:.3g} with this alpha)"
    raise PrefalignError(
        f"Amulet's strength c_T is {shown} for {where}; it must be finite and at most {MAX_STRENGTH:g}: {fix}",
        field=field,
    )


def ftrl_loop(p: torch.Tensor, b: torch.Tensor, alpha: float, lam: float, eta: float, iterations: int) -> torch.Tensor:
    """The paper's literal FTRL iteration on log-probs ``p``, ``b`` (``[..., V]``); returns ``l_T``."""
    q_sum = torch.zeros_like(p)
    current = p
    for t in range(1, iterations + 1):
        q_sum = q_sum + alpha * (current - b)
        updated = (lam * p + q_sum / t + current / (eta * t)) / (lam + 1.0 / (eta * t))
        if t == iterations:
            return updated
        current = torch.log_softmax(updated, dim=-1)
    return current


@dataclass(frozen=True)
class Amulet(Method):
    """Amulet with the paper's defaults α=2, λ=2, η=10, T=60, and the safeguard on (``kl_budget=0.5``, docs/safeguard.md).

    ``kl_budget=0`` is the paper's rule exactly (whatever ``repeat_ngram``).

    ``exact=False`` (default) computes the closed form; ``exact=True`` runs the FTRL
    loop (same tokens, slower). Several preferences: weighted mean of the per-preference
    realigned scores. ``plausibility``, ``kl_budget`` and ``repeat_ngram`` as in
    :class:`~prefalign.methods.la.LinearAlignment`, with ``c_T`` as the strength's upper
    bound. Parameters whose ``c_T`` is not finite or above ``MAX_STRENGTH`` (1e4) are
    rejected (e.g. λ = 0).
    """

    name = "amulet"
    summary = "Amulet: FTRL game between base and preference contexts"
    helps = (
        "a model that follows the preference prompt: on Qwen2.5-1.5B it beat pref in 7 of 7 decided pairs "
        "(probe, 12 pairs, 2 collapsed vs 7 at the paper's rule); on the embedded 135M it stays fluent "
        "(2/32 collapsed vs 28/32) but is about even with pref (14 of 32 wins) and shortens every answer "
        "(docs/safeguard.md); its repetition guard (repeat_ngram=3) cut collapses on held-out prompts from "
        "40 % to 33 % (pref 22 %, 45 answers; docs/results/by-model.md)"
    )
    aliases = {"lambda": "lam", "T": "iterations", "t": "iterations"}
    cost_limits = {"iterations": 1000}
    alpha: float = 2.0
    lam: float = 2.0
    eta: float = 10.0
    iterations: int = 60
    exact: bool = False
    plausibility: float = 0.0
    kl_budget: float = AMULET_KL_BUDGET
    repeat_ngram: int = REPEAT_NGRAM

    def __post_init__(self) -> None:
        positive("alpha", self.alpha, allow_zero=True)
        positive("lam", self.lam, allow_zero=True)
        positive("eta", self.eta)
        count("iterations", self.iterations)
        if not isinstance(self.exact, bool):
            raise PrefalignError(f"exact must be true or false, got {self.exact!r}", field="exact")
        fraction("plausibility", self.plausibility)
        check_kl_budget(self.kl_budget)
        check_repeat_ngram(self.repeat_ngram)
        check_amulet_strength(float(self.alpha), float(self.lam), float(self.eta), int(self.iterations))

    @property
    def coefficient(self) -> float:
        """``c_T`` for these parameters (4.6487 at the paper's defaults)."""
        return amulet_coefficient(float(self.alpha), float(self.lam), float(self.eta), int(self.iterations))

    @property
    def uses_history(self) -> bool:
        """The repetition guard reads the answer; it is part of the safeguard (off with ``kl_budget=0``)."""
        return self.kl_budget > 0 and self.repeat_ngram > 0

    def roles(self, n_preferences: int) -> list[ContextRole]:
        return base_and_preferences(n_preferences)

    def combine(self, scores: ContextScores) -> torch.Tensor:
        base, prefs = scores.base[:, None], scores.preferences  # [n, 1, V], [n, P, V]
        c_t = self.coefficient
        if self.kl_budget > 0:
            base = guard_repeats(prefs, base, repeats_of(self.repeat_ngram, scores))
        strength = kl_bounded_strength(prefs, base, c_t, self.kl_budget) if self.kl_budget > 0 else None
        if self.exact:
            realigned = ftrl_loop(prefs, base.expand_as(prefs), self.alpha, self.lam, self.eta, self.iterations)
            if strength is not None and c_t > 0:
                # l_T = p + c_T(p − b) + const, so scaling l_T − p by c/c_T gives p + c(p − b) + const.
                realigned = prefs + (strength / c_t) * (realigned - prefs)
        elif strength is None:
            realigned = torch.lerp(base, prefs, 1.0 + c_t)  # b + (1+c)(p−b) = p + c(p−b)
        else:
            realigned = contrast(prefs, base, strength)
        return plausibility_mask(scores.weighted(realigned), scores.weighted(prefs), self.plausibility)
