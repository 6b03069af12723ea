"""``pref``: the preference written into the prompt, nothing else (the papers' baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .method import ContextRole, ContextScores, Method


@dataclass(frozen=True)
class Pref(Method):
    """Decode the preference context.

    With several preferences each gets its own context and the scores are their
    weighted mean log-probability (a product of experts), so ``pref`` composes the
    same way the contrastive methods do.
    """

    name = "pref"
    summary = "preference in the prompt only (baseline)"
    helps = "any model that follows instructions; on the embedded 135M one of the two methods measured to follow a preference (docs/results)"

    def roles(self, n_preferences: int) -> list[ContextRole]:
        return [ContextRole(i) for i in range(n_preferences)]

    def combine(self, scores: ContextScores) -> torch.Tensor:
        return scores.weighted(scores.preferences)
