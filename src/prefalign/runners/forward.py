"""One model forward → the last position's next-token log-probs (the engine's, the
uncached reference's and the transformers logits processor's, written once)."""

from __future__ import annotations

from typing import Any

import torch

from ..compat import cache_kwargs


def to_logprobs(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax over the vocabulary, in float32: ``[..., V]`` → ``[..., V]`` (into
    ``out`` when it is given with the right shape, dtype and device)."""
    scores = scores.float()
    if out is not None and out.shape == scores.shape and out.dtype == scores.dtype and out.device == scores.device:
        return torch.log_softmax(scores, dim=-1, out=out)
    return torch.log_softmax(scores, dim=-1)


def last_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Any = None,
    route: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward; the last position's log-softmax ``[rows, V]`` in float32.

    With a ``cache`` the forward extends it and computes only the last position's
    logits (``logits_to_keep=1``); without one it is a plain uncached forward over
    the whole sequence (the reference loop's). ``route`` is passed through to models
    that serve several keys in one forward (:mod:`prefalign.pad_fused`). ``out``: a
    buffer to write the log-probs into (see :func:`to_logprobs`).
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
    if cache is None:
        kwargs["use_cache"] = False
    else:
        kwargs.update(use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    if route is not None:
        kwargs["route"] = route
    logits = model(**kwargs).logits[:, -1, :]
    return to_logprobs(logits, out)


__all__ = ["last_logprobs", "to_logprobs"]
