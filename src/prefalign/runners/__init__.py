"""Model runners: how one model keeps the KV state of the engine's rows.

The engine decides *which* rows exist (a request's contexts × beam tracks) and in which
order; a runner owns *how* one model stores and advances them. One runner per model
key. The interface, in the order the engine calls it each step:

* :meth:`ModelRunner.decode` — one forward over every running row with its next token;
  returns the last position's log-softmax ``[rows, V]``;
* :meth:`ModelRunner.start_prefill` / :meth:`ModelRunner.prefill_step` — new rows'
  prompts, in one forward or in chunks of at most ``budget`` tokens per call;
* :meth:`ModelRunner.join` — a finished prefill's rows become running rows (appended);
* :meth:`ModelRunner.select` — after tokens are chosen: keep and reorder rows (a row
  may appear twice: beams), and set each row's next token;
* ``feed`` (optional) — the rows did not change: only the next tokens, as a tensor on
  the device where the engine chose them (no host round trip). A runner without it is
  sent ``select`` with every row kept.

:class:`~prefalign.runners.kv_cache.TransformersRunner` is the default (transformers'
``DynamicCache``, left-padded rows). A model object can bring its own runner with a
``make_runner(pad_token_id)`` method (the llama.cpp backend does).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol

import torch


class Prefill(Protocol):
    """New rows being prefilled; ``logprobs`` is set once ``finished``."""

    finished: bool
    logprobs: torch.Tensor | None

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (their requests were cancelled mid-prefill; ``[]``: none,
        releasing whatever the runner holds for them). Repeats copy a row (rows that
        share a prompt get their own copy once it is prefilled)."""


class ModelRunner(Protocol):
    """The KV state of one model's running rows (see the module docs)."""

    rows: int

    def start_prefill(self, seqs: list[list[int]], tags: list[str]) -> Prefill:
        """Prepare prompts ``seqs`` (one per new row; ``tags`` name each row's model key)."""

    def prefill_step(self, prefill: Prefill, budget: int | None) -> int:
        """Run the next ≤ ``budget`` prompt tokens (None: all); return how many ran."""

    def join(self, prefill: Prefill) -> None:
        """Append the finished prefill's rows to the running rows."""

    def decode(self) -> torch.Tensor:
        """One forward of every running row's next token: log-probs ``[rows, V]``."""

    def select(self, keep: list[int], next_tokens: list[int]) -> None:
        """Running rows become ``old[keep]`` (repeats allowed), fed ``next_tokens`` next."""

    def feed(self, next_tokens: torch.Tensor) -> None:
        """Optional: the same rows, fed ``next_tokens`` ``[rows]`` next."""


def runner_for(model: Any, pad_token_id: int) -> ModelRunner:
    """The runner of ``model``: its own (``make_runner``), else transformers' KV cache."""
    make = getattr(model, "make_runner", None)
    if callable(make):
        return make(pad_token_id)
    from .kv_cache import TransformersRunner

    return TransformersRunner(model, pad_token_id)


def pass_owners(models: Mapping[str, Any], busy: Collection[str] = ()) -> dict[str, str]:
    """Which model (pass key) computes each model key's rows: itself, or one whose ``serves`` names it.

    A model with a ``serves`` attribute (a tuple of keys, e.g. PAD's fused policy+PRM
    module, :mod:`prefalign.pad_fused`) runs the rows of all those keys in one forward,
    told each row's key by ``route`` (indices into ``serves``; the transformers runner
    passes it). It takes over a key only while that key has no running rows of its own
    (``busy``: the keys that have), so a model added while requests run never splits a
    key's rows across two caches.
    """
    owner = {key: key for key in models}
    for key, model in models.items():
        for served in getattr(model, "serves", None) or ():
            if served in owner and served != key and served not in busy:
                owner[served] = key
    return owner


__all__ = ["ModelRunner", "Prefill", "pass_owners", "runner_for"]
