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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import PrefalignError
from .la import plausibility_mask
from .method import ContextRole, Method, base_and_preferences, count, fraction, positive, weighted_mean


@lru_cache(maxsize=256)
def amulet_coefficient(alpha: float, lam: float, eta: float, iterations: int) -> float:
    """``c_T`` such that the T-step FTRL iterate equals ``p + c_T (p − b)`` up to a constant."""
    c, running_sum = 0.0, 0.0
    for t in range(1, iterations + 1):
        running_sum += alpha * (1.0 + c)
        c = (running_sum / t + c / (eta * t)) / (lam + 1.0 / (eta * t))
    return c


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
    """Amulet with the paper's defaults α=2, λ=2, η=10, T=60.

    ``exact=False`` (default) computes the closed form; ``exact=True`` runs the FTRL
    loop (same tokens, slower). Several preferences: weighted mean of the per-preference
    realigned scores. ``plausibility`` as in :class:`~prefalign.methods.la.LinearAlignment`.
    """

    name = "amulet"
    summary = "Amulet: FTRL game between base and preference contexts"
    alpha: float = 2.0
    lam: float = 2.0
    eta: float = 10.0
    iterations: int = 60
    exact: bool = False
    plausibility: float = 0.0

    def __post_init__(self) -> None:
        positive("alpha", self.alpha, allow_zero=True)
        positive("lam", self.lam, allow_zero=True)
        positive("eta", self.eta)
        count("iterations", self.iterations)
        if not isinstance(self.exact, bool):
            raise PrefalignError(f"exact must be true or false, got {self.exact!r}", field="exact")
        fraction("plausibility", self.plausibility)

    @property
    def coefficient(self) -> float:
        """``c_T`` for these parameters (4.6487 at the paper's defaults)."""
        return amulet_coefficient(float(self.alpha), float(self.lam), float(self.eta), int(self.iterations))

    def roles(self, n_preferences: int) -> list[ContextRole]:
        return base_and_preferences(n_preferences)

    def combine(self, logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        base, prefs = logprobs[:, :1], logprobs[:, 1:]
        if self.exact:
            realigned = ftrl_loop(prefs, base.expand_as(prefs), self.alpha, self.lam, self.eta, self.iterations)
        else:
            realigned = torch.lerp(base, prefs, 1.0 + self.coefficient)  # b + (1+c)(p−b) = p + c(p−b)
        scores = weighted_mean(realigned, weights)
        return plausibility_mask(scores, weighted_mean(prefs, weights), self.plausibility)
