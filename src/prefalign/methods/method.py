"""What a decoding-time alignment method is: a rule over next-token scores.

A method says which *contexts* it needs (the chat without a preference, with one
preference, shown to the policy or to a reward model) and how it *combines* their
next-token log-probabilities into one score per vocabulary entry. It owns no loop:
the engine runs every method.

The engine stacks the contexts' log-probs in the order of :meth:`Method.roles` and calls
:meth:`Method.score`, which names them (:class:`ContextScores`: ``.base``,
``.preferences``, ``.reward``, ``.candidates``) before :meth:`Method.combine` reads them,
so no method slices the stacked tensor by position.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from ..errors import PrefalignError

POLICY = "policy"
#: Engine key of the personalised reward model (PAD's PRM).
PRM = "prm"


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
class RoleLayout:
    """Where each named input lies along the context axis of the stacked ``[n, K, V]`` log-probs.

    ``base``: the index of the base context (no preference, the policy, the request's
    template), or None. ``groups``: for each ``(model, template)`` the indices of its
    per-preference contexts, in preference order, as a ``slice`` when they are
    consecutive (the usual case: a view, no copy) or a tuple of indices otherwise.
    """

    n_contexts: int
    base: int | None
    groups: dict[tuple[str, str | None], slice | tuple[int, ...]]

    @classmethod
    def of(cls, roles: list[ContextRole]) -> RoleLayout:
        base = None
        found: dict[tuple[str, str | None], list[tuple[int, int]]] = {}
        for index, role in enumerate(roles):
            if role.preference is None:
                if role.model == POLICY and role.template is None and base is None:
                    base = index
                continue
            found.setdefault((role.model, role.template), []).append((role.preference, index))
        groups: dict[tuple[str, str | None], slice | tuple[int, ...]] = {}
        for key, pairs in found.items():
            indices = tuple(index for _, index in sorted(pairs))
            consecutive = indices == tuple(range(indices[0], indices[0] + len(indices)))
            groups[key] = slice(indices[0], indices[-1] + 1) if consecutive else indices
        return cls(len(roles), base, groups)


@lru_cache(maxsize=1024)
def _layout(method: Method, n_preferences: int) -> RoleLayout:
    return RoleLayout.of(method.roles(n_preferences))


@dataclass(frozen=True)
class ContextScores:
    """The contexts' next-token log-probs of one method call, by name instead of position.

    Built by :meth:`Method.score` from the stacked ``logprobs`` (``[n, K, V]``, in the
    order of :meth:`Method.roles`) and the preferences' ``weights`` (``[P]``). Every
    accessor is a view of ``logprobs`` (no copy) when the roles are laid out as the
    built-in methods lay them out.
    """

    logprobs: torch.Tensor
    weights: torch.Tensor
    layout: RoleLayout
    #: The rows' answers so far (:class:`~prefalign.decoding.repetition.Histories`), given
    #: by the engine to methods whose ``uses_history`` is true; None otherwise.
    history: Any = None

    @property
    def n_preferences(self) -> int:
        return int(self.weights.shape[0])

    @property
    def base(self) -> torch.Tensor | None:
        """``[n, V]``: the chat without a preference, read by the policy; None if not a role."""
        return None if self.layout.base is None else self.logprobs[:, self.layout.base]

    @property
    def preferences(self) -> torch.Tensor:
        """``[n, P, V]``: the policy reading each preference (the request's template)."""
        return self.rows(POLICY)

    @property
    def reward(self) -> torch.Tensor:
        """``[n, P, V]``: the reward model (:data:`PRM`) reading each preference."""
        return self.rows(PRM)

    @property
    def candidates(self) -> torch.Tensor:
        """``[n, P, V]``: the policy reading each preference through the method's own template
        (PAD's ``candidate_template``)."""
        templates = [t for (model, t) in self.layout.groups if model == POLICY and t is not None]
        if len(templates) != 1:
            raise LookupError(f"the method's roles have {len(templates)} policy templates of their own, not one")
        return self.rows(POLICY, templates[0])

    def rows(self, model: str = POLICY, template: str | None = None) -> torch.Tensor:
        """``[n, P, V]``: the per-preference contexts read by ``model`` under ``template``."""
        where = self.layout.groups.get((model, template))
        if where is None:
            raise LookupError(f"the method's roles have no per-preference context of model {model!r} with template {template!r}")
        return self.logprobs[:, where] if isinstance(where, slice) else self.logprobs[:, list(where)]

    def weighted(self, per_preference: torch.Tensor) -> torch.Tensor:
        """Weighted mean over the preference axis with the request's weights: ``[n, P, V]`` → ``[n, V]``."""
        return weighted_mean(per_preference, self.weights)


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
    #: Other spellings of the method's parameters, mapped to the field names (``{"lambda": "lam"}``).
    aliases: ClassVar[dict[str, str]] = {}
    #: Parameters that multiply the per-token cost, with the largest value a server accepts,
    #: so that one request cannot stall the batch everyone shares.
    cost_limits: ClassVar[dict[str, int]] = {}

    def search(self) -> Any:
        """The search strategy the engine decodes this method with (see
        :mod:`prefalign.decoding`); None: the request's sampling settings decide (greedy
        or sampling)."""
        return None

    @property
    def deterministic(self) -> bool:
        """True when the method cannot sample (beam search): the server then defaults to temperature 0."""
        return False

    @property
    def extra_models(self) -> tuple[str, ...]:
        """Keys of models besides the policy that the method's contexts need."""
        return ()

    @abstractmethod
    def roles(self, n_preferences: int) -> list[ContextRole]:
        """The contexts to run, in the order the engine stacks their log-probs."""

    @abstractmethod
    def combine(self, scores: ContextScores) -> torch.Tensor:
        """Combine the named contexts' log-probs (:class:`ContextScores`) into scores ``[n, V]``.

        ``scores.weights`` (``[P]``, positive) are the preferences' weights, in the order
        of the preferences. Scores may be unnormalised; the engine samples from their
        softmax or takes their argmax.
        """

    @property
    def uses_history(self) -> bool:
        """True when :meth:`combine` reads ``scores.history`` (the answers so far): the
        engine then keeps each hypothesis's tokens for it."""
        return False

    def score(self, logprobs: torch.Tensor, weights: torch.Tensor, history: Any = None) -> torch.Tensor:
        """What the engine calls: name the stacked log-probs ``[n, K, V]`` after :meth:`roles`, then :meth:`combine`.

        ``history`` (:class:`~prefalign.decoding.repetition.Histories`, or None): the
        rows' answers so far, for methods that read them.
        """
        layout = _layout(self, int(weights.shape[0]))
        if logprobs.shape[1] != layout.n_contexts:
            raise ValueError(f"method {self.name!r} reads {layout.n_contexts} contexts, got {logprobs.shape[1]}")
        return self.combine(ContextScores(logprobs, weights, layout, history))

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


def plausibility_mask(scores: torch.Tensor, reference: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep only tokens whose reference probability is ≥ ``threshold`` × the best one.

    The adaptive plausibility constraint of contrastive decoding (Li et al. 2023;
    transformers' ``min_p``): amplifying a contrast or adding a reward can promote tokens
    the reference context finds implausible; this removes them. ``la``, ``amulet`` and
    ``pad`` share it as their ``plausibility`` parameter (0 = off).
    """
    if threshold <= 0:
        return scores
    cutoff = reference.max(dim=-1, keepdim=True).values + math.log(threshold)
    return scores.masked_fill(reference < cutoff, float("-inf"))


def base_and_preferences(n_preferences: int) -> list[ContextRole]:
    """Roles ``[base, pref_0, ..., pref_{P-1}]`` of the contrastive methods."""
    return [ContextRole(None)] + [ContextRole(i) for i in range(n_preferences)]
