"""``base``: the model answering the chat as given, without any preference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .method import ContextRole, Method


@dataclass(frozen=True)
class Base(Method):
    """Plain decoding of the base context; a preference, if given, is ignored."""

    name = "base"
    summary = "the model without the preference (baseline)"
    helps = "the baseline: the model without the preference"
    needs_preference = False

    def roles(self, n_preferences: int) -> list[ContextRole]:
        return [ContextRole(None)]

    def combine(self, logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return logprobs[:, 0]
