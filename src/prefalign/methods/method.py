"""What a decoding-time alignment method is: a rule over next-token scores.

A method says which *contexts* it needs (the chat without a preference, with one
preference, shown to the policy or to a reward model) and how it *combines* their
next-token log-probabilities into one score per vocabulary entry. It owns no loop:
the engine runs every method.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PrefalignError

POLICY = "policy"


@dataclass(frozen=True)
class ContextRole:
    """One context a method reads.

    ``preference`` is the index of the preference shown in it, or None for the base
    context (no preference). ``model`` names the model that reads it (``"policy"``, or
    a reward model's key such as ``"prm"``). ``template`` renders this context with a
    given chat template instead of the request's (None: the request's).
    """

    preference: int | None
    model: str = POLICY
    template: str | None = None


@dataclass(frozen=True)
class Method(ABC):
    """Base class of every method. Subclasses are frozen dataclasses of their parameters.

    Being frozen and hashable lets the engine batch together requests that use the
    same method with the same parameters.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_preference: ClassVar[bool] = True
    #: Which template the method uses unless the caller chooses one.
    default_template: ClassVar[str] = "default"
    #: Where the method measurably helps, and by how much (from the docs' measurements, not
    #: hopes), for `prefalign methods` and the docs; empty when not measured.
    helps: ClassVar[str] = ""

    @property
    def beam_width(self) -> int:
        """Number of hypotheses the engine keeps per prompt (1: greedy or sampling)."""
        return 1

    def search(self) -> Any:
        """The search strategy the engine decodes this method with (see
        :mod:`prefalign.decoding`); None: the request's sampling settings decide (greedy
        or sampling)."""
        return None

    @property
    def extra_models(self) -> tuple[str, ...]:
        """Keys of models besides the policy that the method's contexts need."""
        return ()

    @abstractmethod
    def roles(self, n_preferences: int) -> list[ContextRole]:
        """The contexts to run, in the order :meth:`combine` receives them."""

    @abstractmethod
    def combine(self, logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combine per-context log-probs ``[n, K, V]`` into scores ``[n, V]``.

        ``weights`` (``[P]``, positive) are the preferences' weights, in the order of
        the preferences. Scores may be unnormalised; the engine samples from their
        softmax or takes their argmax.
        """

    def primary_context(self, n_preferences: int) -> int:
        """Index of the context whose prompt the answer continues (for usage counts)."""
        return len(self.roles(n_preferences)) - 1

    def params(self) -> dict[str, Any]:
        """The method's parameters as a plain dict."""
        return dataclasses.asdict(self)


#: Largest contrastive strength (``la``'s ``ratio``, Amulet's ``c_T``) accepted. Scores are
#: ``p + c·(p − b)`` on float32 log-probs (|p − b| up to ~100): 1e4 keeps them far from
#: float32's range, while Amulet's recursion reaches 1e80 at λ = 0 and overflows ``combine``.
MAX_STRENGTH = 1e4


def positive(name: str, value: float, *, allow_zero: bool = False, maximum: float = 1e4) -> None:
    """Reject a non-numeric, non-finite, non-positive or absurdly large parameter, naming it.

    The upper bound keeps scores finite: e.g. Amulet's ``c_T`` grows with α, and
    ``p + c(p − b)`` overflows into NaN long before α = 1e300.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PrefalignError(f"{name} must be a number, got {value!r}", field=name)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value > maximum:
        bound = "≥ 0" if allow_zero else "> 0"
        raise PrefalignError(f"{name} must be {bound} and at most {maximum:g}, got {value}", field=name)


def fraction(name: str, value: float) -> None:
    """Reject a value outside [0, 1), naming it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise PrefalignError(f"{name} must be a number in [0, 1), got {value!r}", field=name)


def count(name: str, value: int, *, minimum: int = 1, maximum: int = 10_000) -> None:
    """Reject a non-integer or out-of-range count, naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise PrefalignError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}", field=name)


def weighted_mean(per_preference: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the preference axis: ``[n, P, V]`` → ``[n, V]``."""
    w = (weights / weights.sum()).to(per_preference.dtype)
    if w.numel() == 1:
        return per_preference[:, 0]
    return torch.einsum("npv,p->nv", per_preference, w)


def base_and_preferences(n_preferences: int) -> list[ContextRole]:
    """Roles ``[base, pref_0, ..., pref_{P-1}]`` of the contrastive methods."""
    return [ContextRole(None)] + [ContextRole(i) for i in range(n_preferences)]
