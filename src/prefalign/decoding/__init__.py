"""Token choice: how a request's scores become its next token(s).

The engine computes, per request, the method's scores ``[hypotheses, V]``; a *search
strategy* turns them into tokens:

* :class:`~prefalign.decoding.sampling.Greedy` — the argmax (one hypothesis);
* :class:`~prefalign.decoding.sampling.Sampling` — temperature / top-k / top-p
  sampling with the request's seeded generator (one hypothesis);
* :class:`~prefalign.decoding.beam.BeamSearch` — several hypotheses, reordered each step.

:func:`strategy_for` picks one: the method's own (``Method.search()``, e.g. ``beam``'s
beam search), else the request's sampling settings decide between greedy and sampling.
Stop strings, EOS on a single hypothesis and streaming text live in
:mod:`prefalign.decoding.stopping`.
"""

from __future__ import annotations

from typing import Any, Union

from .beam import BeamSearch, BeamState, BeamStep, Hypothesis
from .sampling import GREEDY_TEMPERATURE, SEED_MAX, SEED_MIN, Greedy, Sampling, SamplingParams, make_generator
from .stopping import StopStrings

SearchStrategy = Union[Greedy, Sampling, BeamSearch]


def strategy_for(method: Any, sampling: SamplingParams) -> SearchStrategy:
    """The strategy decoding a request with ``method`` and ``sampling`` (checked against them)."""
    search = getattr(method, "search", None)
    strategy = search() if callable(search) else None
    if strategy is None:
        strategy = Greedy() if sampling.greedy else Sampling(sampling)
    strategy.check(sampling)
    return strategy


__all__ = [
    "GREEDY_TEMPERATURE",
    "SEED_MAX",
    "SEED_MIN",
    "BeamSearch",
    "BeamState",
    "BeamStep",
    "Greedy",
    "Hypothesis",
    "Sampling",
    "SamplingParams",
    "SearchStrategy",
    "StopStrings",
    "make_generator",
    "strategy_for",
]
