"""``la``: Linear Alignment, ``p + r·(p − b)`` (Gao et al. 2024, as run in the Amulet paper)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .method import (
    MAX_STRENGTH,
    ContextRole,
    ContextScores,
    Method,
    base_and_preferences,
    fraction,
    plausibility_mask,
    positive,
)
from .safeguard import (
    LA_KL_BUDGET,
    REPEAT_NGRAM,
    check_kl_budget,
    check_repeat_ngram,
    contrast,
    guard_repeats,
    kl_bounded_strength,
    repeats_of,
)


@dataclass(frozen=True)
class LinearAlignment(Method):
    """Scores ``p + r·(p − b)`` per preference, weighted mean over preferences.

    ``kl_budget`` (nats; default 0.25, docs/safeguard.md; 0 = off, the paper's rule) lowers the strength per token to
    the largest ``c ≤ ratio`` with ``KL(softmax(p + c(p − b)) ‖ softmax(p)) ≤ kl_budget``
    (:func:`~prefalign.methods.safeguard.kl_bounded_strength`), each preference on its own.
    With the safeguard on, ``repeat_ngram`` (default 3; 0 = off) gives no amplification to a
    token that would complete an n-gram the answer already contains
    (:func:`~prefalign.methods.safeguard.guard_repeats`).
    ``plausibility`` (0 = off) masks tokens whose preference-context probability is
    below that fraction of the most likely token's.
    """

    name = "la"
    summary = "Linear Alignment: p + ratio·(p − b)"
    helps = (
        "a model that follows the preference prompt: on Qwen2.5-1.5B it beat pref in 7 of 8 decided pairs "
        "(probe, 12 pairs, 2 collapsed vs 4 at the paper's rule); on the embedded 135M it stays fluent "
        "(2/32 collapsed vs 10/32) but is about even with pref (14 of 32 wins), shorter for every preference "
        "(docs/safeguard.md); its repetition guard (repeat_ngram=3) cut collapses on held-out prompts from "
        "40 % to 31 % (pref 22 %, 45 answers; docs/results/by-model.md)"
    )
    aliases = {"r": "ratio"}
    ratio: float = 2.0
    plausibility: float = 0.0
    kl_budget: float = LA_KL_BUDGET
    repeat_ngram: int = REPEAT_NGRAM

    def __post_init__(self) -> None:
        positive("ratio", self.ratio, allow_zero=True, maximum=MAX_STRENGTH)
        fraction("plausibility", self.plausibility)
        check_kl_budget(self.kl_budget)
        check_repeat_ngram(self.repeat_ngram)

    @property
    def uses_history(self) -> bool:
        """The repetition guard reads the answer; it is part of the safeguard (off with ``kl_budget=0``)."""
        return self.kl_budget > 0 and self.repeat_ngram > 0

    def roles(self, n_preferences: int) -> list[ContextRole]:
        return base_and_preferences(n_preferences)

    def combine(self, scores: ContextScores) -> torch.Tensor:
        base, prefs = scores.base[:, None], scores.preferences  # [n, 1, V], [n, P, V]
        if self.kl_budget > 0:
            base = guard_repeats(prefs, base, repeats_of(self.repeat_ngram, scores))
            strength = kl_bounded_strength(prefs, base, self.ratio, self.kl_budget)
            aligned = scores.weighted(contrast(prefs, base, strength))
        else:  # the paper's formula, literally (its scores unchanged to the bit)
            aligned = scores.weighted(prefs + self.ratio * (prefs - base))
        return plausibility_mask(aligned, scores.weighted(prefs), self.plausibility)
