"""Usage counting: the token and compute counts of one request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Usage:
    """Token and compute counts of one request.

    ``prompt_tokens``: the prompt the answer continues (the request's primary context);
    ``context_tokens``: all its contexts together; ``forward_passes``: model forwards
    that computed its rows (a prefill chunk, a decode step: one per model).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    context_tokens: int = 0
    forward_passes: int = 0

    @classmethod
    def of_contexts(cls, contexts: Sequence[tuple[str, Sequence[int]]], primary: int) -> Usage:
        """A request's usage before its first token (``primary`` < 0: the last context)."""
        primary = primary if primary >= 0 else len(contexts) - 1
        return cls(prompt_tokens=len(contexts[primary][1]), context_tokens=sum(len(ids) for _, ids in contexts))

    @classmethod
    def of_choices(cls, usages: Sequence[Usage]) -> Usage:
        """The usage of the ``n`` answers of one prompt: their completion tokens add up;
        the prompt and the forward passes are shared (prefilled and stepped together)."""
        first = usages[0]
        return cls(
            prompt_tokens=first.prompt_tokens,
            completion_tokens=sum(u.completion_tokens for u in usages),
            context_tokens=first.context_tokens,
            forward_passes=max(u.forward_passes for u in usages),
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "context_tokens": self.context_tokens,
            "forward_passes": self.forward_passes,
        }


__all__ = ["Usage"]
