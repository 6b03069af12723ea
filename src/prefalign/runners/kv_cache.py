"""The transformers runner: left-padded rows in one ``DynamicCache`` per model.

Rows are left-padded to a common length; position ids come from the attention mask
(``cumsum − 1`` in a prefill, the count of real tokens when decoding), so padding never
shifts positions, and only the last position's logits are computed (``logits_to_keep=1``).
A finished prefill's cache is merged into the running one by left-padding whichever is
shorter (padded key/value slots are masked out); rows leave or follow beams by one
index select on every layer's keys and values; leading columns that became padding
for every row are cropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..compat import cache_kwargs
from ..errors import PrefalignError


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into ``(input_ids, attention_mask)``, both ``[n, longest]``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), length), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, length - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded prefill: real tokens count from 0, padding never shifts them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def last_logprobs(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, route: torch.Tensor | None = None) -> torch.Tensor:
    """One cached forward; the last position's log-softmax ``[rows, V]`` in float32."""
    extra = {} if route is None else {"route": route}
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **cache_kwargs(model, cache),
        **extra,
    )
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise PrefalignError(
            f"the model's cache ({type(cache).__name__}) has no per-layer keys/values; prefalign's engine "
            "needs a transformers DynamicCache-style cache to batch and reorder rows"
        )
    return layers


def _pad_cache_left(cache: Any, pad: int) -> None:
    if pad <= 0:
        return
    for layer in _cache_layers(cache):
        layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
        layer.values = F.pad(layer.values, (0, 0, pad, 0))


def _concat_caches(first: Any, second: Any) -> None:
    """Append ``second``'s rows to ``first`` (same sequence length)."""
    for a, b in zip(_cache_layers(first), _cache_layers(second)):
        a.keys = torch.cat([a.keys, b.keys], dim=0)
        a.values = torch.cat([a.values, b.values], dim=0)


def _drop_cache_prefix(cache: Any, n: int) -> None:
    for layer in _cache_layers(cache):
        layer.keys = layer.keys[:, :, n:]
        layer.values = layer.values[:, :, n:]


def _check_cache_length(cache: Any, length: int) -> None:
    for layer in _cache_layers(cache):
        if layer.keys.shape[-2] != length:
            raise PrefalignError(
                "a cache layer dropped tokens (sliding-window attention past its window); "
                "prefalign's engine supports sequences within the window only"
            )


@dataclass
class CachePrefill:
    """New rows being prefilled into their own cache, chunk by chunk."""

    ids: torch.Tensor  # [R, L] left-padded
    mask: torch.Tensor  # [R, L]
    positions: torch.Tensor  # [R, L]
    cache: Any
    tags: list[str]
    done: int = 0  # columns already run through the model
    logprobs: torch.Tensor | None = None  # last position's, once finished

    @property
    def finished(self) -> bool:
        return self.done >= self.ids.shape[1]

    def select(self, keep: list[int]) -> None:
        if not keep:
            self.cache, self.tags = None, []
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.ids.device)
        self.tags = [self.tags[i] for i in keep]
        self.ids, self.mask, self.positions = self.ids[index], self.mask[index], self.positions[index]
        if self.done > 0:
            self.cache.batch_select_indices(index)


class TransformersRunner:
    """Running rows of one transformers causal LM: a ``DynamicCache``, a mask, next tokens.

    A model with a ``serves`` tuple (PAD's fused policy+PRM module) is told each row's
    key as ``route`` (indices into ``serves``).
    """

    def __init__(self, model: Any, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [R, L]
        self.next_tokens: torch.Tensor | None = None  # [R]
        self.tags: list[str] = []

    @property
    def rows(self) -> int:
        return len(self.tags)

    def _route(self, tags: list[str]) -> torch.Tensor | None:
        serves = getattr(self.model, "serves", None)
        if not serves:
            return None
        return torch.tensor([serves.index(tag) for tag in tags], device=self.device)

    def start_prefill(self, seqs: list[list[int]], tags: list[str]) -> CachePrefill:
        from transformers import DynamicCache

        ids, mask = left_pad(seqs, self.pad_token_id, self.device)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        return CachePrefill(ids=ids, mask=mask, positions=positions_from_mask(mask), cache=cache, tags=list(tags))

    def prefill_step(self, prefill: CachePrefill, budget: int | None) -> int:
        """Run the next columns of the left-padded prompts; the budget counts prompt tokens,
        not padding: prompts whose remaining tokens fit it run whole, else ``budget // rows``
        columns at a time (at least one)."""
        rows, length = prefill.ids.shape
        remaining = int(prefill.mask[:, prefill.done:].sum())
        if budget is None or remaining <= budget:
            columns = length - prefill.done
        else:
            columns = max(1, min(length - prefill.done, budget // rows))
        end = prefill.done + columns
        spent = int(prefill.mask[:, prefill.done:end].sum())
        out = last_logprobs(
            self.model, prefill.ids[:, prefill.done:end], prefill.mask[:, :end], prefill.positions[:, prefill.done:end],
            prefill.cache, self._route(prefill.tags),
        )
        prefill.done = end
        if prefill.finished:
            prefill.logprobs = out
        return spent

    def join(self, prefill: CachePrefill) -> None:
        placeholder = torch.zeros(len(prefill.tags), dtype=torch.long, device=self.device)
        if not self.tags:
            self.cache, self.mask, self.next_tokens, self.tags = prefill.cache, prefill.mask, placeholder, list(prefill.tags)
            return
        assert self.mask is not None and self.next_tokens is not None
        old_len, new_len = self.mask.shape[1], prefill.mask.shape[1]
        _pad_cache_left(self.cache, new_len - old_len)
        _pad_cache_left(prefill.cache, old_len - new_len)
        length = max(old_len, new_len)
        self.mask = torch.cat([F.pad(self.mask, (length - old_len, 0)), F.pad(prefill.mask, (length - new_len, 0))])
        _concat_caches(self.cache, prefill.cache)
        self.next_tokens = torch.cat([self.next_tokens, placeholder])
        self.tags.extend(prefill.tags)

    def decode(self) -> torch.Tensor:
        assert self.mask is not None and self.next_tokens is not None
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logprobs = last_logprobs(self.model, self.next_tokens[:, None], self.mask, positions, self.cache, self._route(self.tags))
        _check_cache_length(self.cache, self.mask.shape[1])
        return logprobs

    def select(self, keep: list[int], next_tokens: list[int]) -> None:
        if not keep:
            self.cache, self.mask, self.next_tokens, self.tags = None, None, None, []
            return
        assert self.mask is not None
        if keep != list(range(len(self.tags))):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            self.tags = [self.tags[i] for i in keep]
        self.next_tokens = torch.tensor(next_tokens, dtype=torch.long, device=self.device)
        # Columns that are padding for every remaining row cost compute: drop them.
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first > 0:
            _drop_cache_prefix(self.cache, first)
            self.mask = self.mask[:, first:]


__all__ = ["CachePrefill", "TransformersRunner", "last_logprobs", "left_pad", "positions_from_mask"]
