"""``base``: the model answering the chat as given, without any preference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .method import ContextRole, ContextScores, Method


@dataclass(frozen=True)
class Base(Method):
    """Plain decoding of the base context; a preference, if given, is ignored."""

    name = "base"
    summary = "the model without the preference (baseline)"
    helps = "the baseline: the model without the preference"
    needs_preference = False

    def roles(self, n_preferences: int) -> list[ContextRole]:
        return [ContextRole(None)]

    def combine(self, scores: ContextScores) -> torch.Tensor:
        return scores.base
