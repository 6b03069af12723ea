"""``la``: Linear Alignment, ``p + r·(p − b)`` (Gao et al. 2024, as run in the Amulet paper)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .method import ContextRole, Method, base_and_preferences, fraction, positive, weighted_mean


def plausibility_mask(scores: torch.Tensor, reference: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep only tokens whose reference probability is ≥ ``threshold`` × the best one.

    The adaptive plausibility constraint of contrastive decoding: amplifying
    ``p − b`` can promote tokens neither context finds plausible; this removes them.
    """
    if threshold <= 0:
        return scores
    cutoff = reference.max(dim=-1, keepdim=True).values + math.log(threshold)
    return scores.masked_fill(reference < cutoff, float("-inf"))


@dataclass(frozen=True)
class LinearAlignment(Method):
    """Scores ``p + r·(p − b)`` per preference, weighted mean over preferences.

    ``plausibility`` (0 = off) masks tokens whose preference-context probability is
    below that fraction of the most likely token's.
    """

    name = "la"
    summary = "Linear Alignment: p + ratio·(p − b)"
    ratio: float = 2.0
    plausibility: float = 0.0

    def __post_init__(self) -> None:
        positive("ratio", self.ratio, allow_zero=True)
        fraction("plausibility", self.plausibility)

    def roles(self, n_preferences: int) -> list[ContextRole]:
        return base_and_preferences(n_preferences)

    def combine(self, logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        base, prefs = logprobs[:, :1], logprobs[:, 1:]
        aligned = weighted_mean(prefs + self.ratio * (prefs - base), weights)
        return plausibility_mask(aligned, weighted_mean(prefs, weights), self.plausibility)
