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

from ..errors import PrefalignError
from .forward import last_logprobs


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
        if self.logprobs is not None:
            self.logprobs = self.logprobs[index]


@dataclass
class _Bucket:
    """Rows of similar length sharing one left-padded cache."""

    cache: Any
    mask: torch.Tensor  # [r, L]
    members: list[int]  # the engine's row index of each local row, in local order


#: A prefill joins a bucket only if neither side must be padded to more than twice its
#: length (+ this many columns): one 4,000-token prompt must not make every short row's
#: cache (copied on every decode step) 4,000 columns long.
PADDING_SLACK = 64


def _fits(old: int, new: int) -> bool:
    return max(old, new) <= 2 * min(old, new) + PADDING_SLACK


class TransformersRunner:
    """Running rows of one transformers causal LM: left-padded ``DynamicCache`` buckets.

    Rows of similar lengths share one cache (one forward per step for all of them); a
    prompt much longer or shorter than the running rows gets its own bucket (its own
    forward) instead of padding everyone to its length. The engine sees one row order;
    each bucket knows its rows' places in it.

    A model with a ``serves`` tuple (PAD's fused policy+PRM module) is told each row's
    key as ``route`` (indices into ``serves``).
    """

    def __init__(self, model: Any, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.buckets: list[_Bucket] = []
        self.next_tokens: torch.Tensor | None = None  # [R], the engine's row order
        self.tags: list[str] = []
        # decode()'s log-probs are written into the same memory every step: a fresh
        # [rows, V] tensor per step is memory the allocator maps and faults in anew
        # (measured: up to 2x the step of a 2-context method at 32 rows on a CPU).
        self._buffer: torch.Tensor | None = None

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
        start, n = len(self.tags), len(prefill.tags)
        placeholder = torch.zeros(n, dtype=torch.long, device=self.device)
        self.next_tokens = placeholder if self.next_tokens is None else torch.cat([self.next_tokens, placeholder])
        self.tags.extend(prefill.tags)
        members = list(range(start, start + n))
        new_len = prefill.mask.shape[1]
        bucket = next((b for b in self.buckets if _fits(b.mask.shape[1], new_len)), None)
        if bucket is None:
            self.buckets.append(_Bucket(cache=prefill.cache, mask=prefill.mask, members=members))
            return
        old_len = bucket.mask.shape[1]
        _pad_cache_left(bucket.cache, new_len - old_len)
        _pad_cache_left(prefill.cache, old_len - new_len)
        length = max(old_len, new_len)
        bucket.mask = torch.cat([F.pad(bucket.mask, (length - old_len, 0)), F.pad(prefill.mask, (length - new_len, 0))])
        _concat_caches(bucket.cache, prefill.cache)
        bucket.members.extend(members)

    def decode(self) -> torch.Tensor:
        """One forward of every row's next token: log-probs ``[rows, V]``, valid until the
        next ``decode`` (which writes into the same memory when the rows are the same)."""
        assert self.next_tokens is not None
        if len(self.buckets) == 1:  # the usual case: the engine's row order is the bucket's
            bucket = self.buckets[0]
            positions = bucket.mask.sum(-1, keepdim=True)
            bucket.mask = F.pad(bucket.mask, (0, 1), value=1)
            out = last_logprobs(
                self.model, self.next_tokens[:, None], bucket.mask, positions, bucket.cache, self._route(self.tags), out=self._buffer,
            )
            self._buffer = out
            _check_cache_length(bucket.cache, bucket.mask.shape[1])
            return out
        out: torch.Tensor | None = None
        for bucket in self.buckets:
            positions = bucket.mask.sum(-1, keepdim=True)
            bucket.mask = F.pad(bucket.mask, (0, 1), value=1)
            index = torch.tensor(bucket.members, dtype=torch.long, device=self.device)
            logprobs = last_logprobs(
                self.model, self.next_tokens[index][:, None], bucket.mask, positions, bucket.cache,
                self._route([self.tags[m] for m in bucket.members]),
            )
            _check_cache_length(bucket.cache, bucket.mask.shape[1])
            if out is None:
                out = logprobs.new_empty((len(self.tags), logprobs.shape[-1]))
            out[index] = logprobs
        assert out is not None
        return out

    def feed(self, next_tokens: torch.Tensor) -> None:
        """The same rows, fed ``next_tokens`` ``[rows]`` (already on the model's device) next."""
        self.next_tokens = next_tokens

    def select(self, keep: list[int], next_tokens: list[int]) -> None:
        where = {m: (b, local) for b, bucket in enumerate(self.buckets) for local, m in enumerate(bucket.members)}
        picks: list[list[tuple[int, int]]] = [[] for _ in self.buckets]  # per bucket: (new row, old local row)
        for new, old in enumerate(keep):
            b, local = where[old]
            picks[b].append((new, local))
        buckets = []
        for bucket, chosen in zip(self.buckets, picks):
            if not chosen:
                continue
            local = [c for _, c in chosen]
            if local != list(range(len(bucket.members))):
                index = torch.tensor(local, dtype=torch.long, device=self.device)
                bucket.cache.batch_select_indices(index)
                bucket.mask = bucket.mask[index]
            bucket.members = [n for n, _ in chosen]
            # Columns that are padding for every remaining row cost compute: drop them.
            used = bucket.mask.any(dim=0).nonzero()
            first = int(used[0]) if used.numel() else 0
            if first > 0:
                _drop_cache_prefix(bucket.cache, first)
                bucket.mask = bucket.mask[:, first:]
            buckets.append(bucket)
        self.buckets = buckets
        self.tags = [self.tags[i] for i in keep]
        self.next_tokens = torch.tensor(next_tokens, dtype=torch.long, device=self.device) if keep else None


__all__ = ["CachePrefill", "TransformersRunner", "last_logprobs", "left_pad", "positions_from_mask"]
