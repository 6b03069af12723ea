"""Repetition controls: the post-score stage between a method's scores and token choice.

Four per-request settings of :class:`~prefalign.decoding.sampling.SamplingParams`,
applied by the engine to every method's scores ``[rows, V]`` before greedy, sampling
or beam search picks tokens, in this order:

1. ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``): the
   score of every token already *seen* is divided by the penalty when positive and
   multiplied by it when negative. As in transformers, *seen* means the prompt (the
   request's primary context, chat template included) and the answer so far.
2. ``frequency_penalty`` / ``presence_penalty`` (OpenAI's formula):
   ``score − count·frequency_penalty − (count > 0)·presence_penalty``, where ``count``
   is how often the token occurs in the answer so far (not the prompt: OpenAI's and
   vLLM's semantics).
3. ``no_repeat_ngram_size`` (transformers' ``NoRepeatNGramLogitsProcessor``): a token
   that would complete an n-gram already present in the prompt + answer gets −inf.

All four act on the method's *scores*, which are log-probabilities for ``base``, ``pref``
and ``beam`` (as in transformers' beam search, whose processors also see log-probs) and
unnormalised for the contrastive methods. OpenAI's penalties subtract per token, so a
per-row constant (log-softmax vs logits) changes nothing: same tokens as on logits. The
repetition penalty is not shift-invariant: on log-probs (all ≤ 0) it always multiplies,
so ``repetition_penalty=1.2`` makes a seen token's log-prob 20 % more negative; where
transformers' greedy search applies it to raw logits the same value acts differently.

The stage is batched: one op over the rows that use a control, with per-row
parameters; each hypothesis keeps its own :class:`TokenHistory` (token counts, seen
mask, n-gram index), updated incrementally as tokens are appended. Requests with the
default settings have no history and their scores are untouched (same tokens, to the
bit, as without the stage).

:class:`Histories` also gives repetition-aware methods (the contrastive safeguard,
:mod:`prefalign.methods.safeguard`) the tokens that would complete an n-gram the answer
already contains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

_NEG_INF = float("-inf")


class NgramIndex:
    """The continuations seen after every (n−1)-token prefix of a token sequence, kept incrementally."""

    __slots__ = ("n", "tail", "seen")

    def __init__(self, n: int, tokens: Sequence[int] = ()) -> None:
        self.n = n
        self.tail: list[int] = []  # the last n−1 tokens
        self.seen: dict[tuple[int, ...], set[int]] = {}
        for token in tokens:
            self.push(token)

    def push(self, token: int) -> None:
        if len(self.tail) == self.n - 1:
            self.seen.setdefault(tuple(self.tail), set()).add(token)
        self.tail.append(token)
        if len(self.tail) > self.n - 1:
            del self.tail[0]

    def completing(self) -> set[int] | tuple[()]:
        """Tokens that, appended now, would repeat an n-gram already in the sequence."""
        if len(self.tail) < self.n - 1:
            return ()
        return self.seen.get(tuple(self.tail), ())

    def copy(self) -> NgramIndex:
        new = NgramIndex.__new__(NgramIndex)
        new.n, new.tail = self.n, list(self.tail)
        new.seen = {k: set(v) for k, v in self.seen.items()}
        return new


@dataclass
class TokenHistory:
    """One hypothesis's tokens, with the state the post-score stage reads, built on first use.

    ``prompt`` is the primary context's tokens (what transformers' processors see
    before the answer); ``answer`` the tokens generated so far.
    """

    prompt: Sequence[int]
    answer: list[int] = field(default_factory=list)
    _counts: torch.Tensor | None = None  # [V] float32: occurrences in the answer
    _seen: torch.Tensor | None = None  # [V] bool: in prompt or answer
    _ngrams: dict[tuple[int, bool], NgramIndex] = field(default_factory=dict)

    def push(self, token: int) -> None:
        """Append one generated token, updating whatever state has been built."""
        self.answer.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        if self._seen is not None:
            self._seen[token] = True
        for index in self._ngrams.values():
            index.push(token)

    def child(self, token: int) -> TokenHistory:
        """A copy continued by ``token`` (beam search: a hypothesis extending this one)."""
        new = TokenHistory(
            self.prompt,
            list(self.answer),
            None if self._counts is None else self._counts.clone(),
            None if self._seen is None else self._seen.clone(),
            {key: index.copy() for key, index in self._ngrams.items()},
        )
        new.push(token)
        return new

    def counts(self, vocab: int, device: torch.device) -> torch.Tensor:
        """``[V]`` float32: how often each token occurs in the answer."""
        if self._counts is None:
            ids = torch.tensor(self.answer, dtype=torch.long, device=device)
            self._counts = torch.bincount(ids, minlength=vocab)[:vocab].to(torch.float32)
        return self._counts

    def seen(self, vocab: int, device: torch.device) -> torch.Tensor:
        """``[V]`` bool: tokens present in the prompt or the answer."""
        if self._seen is None:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [t for t in (*self.prompt, *self.answer) if 0 <= t < vocab]
            if ids:
                seen[torch.tensor(ids, dtype=torch.long, device=device)] = True
            self._seen = seen
        return self._seen

    def completing(self, n: int, *, with_prompt: bool) -> set[int] | tuple[()]:
        """Tokens that would complete an n-gram already in the answer (or prompt + answer)."""
        key = (n, with_prompt)
        index = self._ngrams.get(key)
        if index is None:
            index = self._ngrams[key] = NgramIndex(n, [*self.prompt, *self.answer] if with_prompt else self.answer)
        return index.completing()


def ngram_pairs(histories: Sequence[TokenHistory | None], n: int, vocab: int, *, with_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(rows, tokens): each row's tokens that would complete an n-gram already in its
    answer (or prompt + answer); rows without a history have none."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, history in enumerate(histories):
        if history is None:
            continue
        found = [t for t in history.completing(n, with_prompt=with_prompt) if t < vocab]
        rows.extend([row] * len(found))
        tokens.extend(found)
    return rows, tokens


def ngram_mask(histories: Sequence[TokenHistory | None], n: int, scores: torch.Tensor, *, with_prompt: bool = False) -> torch.Tensor | None:
    """``[rows, V]`` bool: tokens that would complete an n-gram already in each row's
    answer (or prompt + answer); None when no row has one (rows without a history have none)."""
    rows, tokens = ngram_pairs(histories, n, scores.shape[-1], with_prompt=with_prompt)
    if not rows:
        return None
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask[torch.tensor(rows, device=scores.device), torch.tensor(tokens, device=scores.device)] = True
    return mask


def penalize(
    scores: torch.Tensor,
    *,
    seen: torch.Tensor | None = None,
    repetition: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    frequency: torch.Tensor | None = None,
    presence: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """The repetition controls on ``scores`` ``[rows, V]`` with per-row parameters ``[rows, 1]``.

    ``seen`` (bool ``[rows, V]``) with ``repetition``: transformers' repetition penalty;
    ``counts`` (``[rows, V]``) with ``frequency`` and ``presence``: OpenAI's penalties;
    ``banned`` (bool ``[rows, V]``): tokens set to −inf (no-repeat n-grams). A parameter
    at its neutral value (1, 0, 0) leaves its rows' scores bit-identical.
    """
    if repetition is not None and seen is not None:
        repetition = repetition.to(scores.dtype)
        penalised = torch.where(scores < 0, scores * repetition, scores / repetition)
        scores = torch.where(seen, penalised, scores)
    if counts is not None and frequency is not None and presence is not None:
        counts = counts.to(scores.dtype)
        scores = scores - counts * frequency.to(scores.dtype) - (counts > 0).to(scores.dtype) * presence.to(scores.dtype)
    if banned is not None:
        scores = scores.masked_fill(banned, _NEG_INF)
    return scores


def apply_repetition_controls(scores: torch.Tensor, settings: Sequence[object], histories: Sequence[TokenHistory | None]) -> torch.Tensor:
    """The post-score stage over a group's rows: ``settings[i]`` is row i's
    :class:`~prefalign.decoding.sampling.SamplingParams`, ``histories[i]`` its history.

    Rows whose settings are all neutral are left as they are; the others are processed
    together, in one op per control, with their own parameters.
    """
    live = [i for i, s in enumerate(settings) if getattr(s, "penalizes", False)]
    if not live:
        return scores
    vocab, device = scores.shape[-1], scores.device
    rows_settings = [settings[i] for i in live]
    rows_hist = [histories[i] for i in live]
    assert all(h is not None for h in rows_hist), "a row with repetition controls has no history"
    hist: list[TokenHistory] = rows_hist  # type: ignore[assignment]
    block = scores[live] if len(live) < scores.shape[0] else scores

    def column(name: str) -> torch.Tensor:
        return torch.tensor([[float(getattr(s, name))] for s in rows_settings], dtype=scores.dtype, device=device)

    seen = repetition = counts = frequency = presence = banned = None
    if any(s.repetition_penalty != 1.0 for s in rows_settings):  # type: ignore[attr-defined]
        repetition = column("repetition_penalty")
        seen = torch.stack([h.seen(vocab, device) if s.repetition_penalty != 1.0 else torch.zeros(vocab, dtype=torch.bool, device=device)  # type: ignore[attr-defined]
                            for h, s in zip(hist, rows_settings)])
    if any(s.frequency_penalty or s.presence_penalty for s in rows_settings):  # type: ignore[attr-defined]
        frequency, presence = column("frequency_penalty"), column("presence_penalty")
        zero = None
        stacked = []
        for h, s in zip(hist, rows_settings):
            if s.frequency_penalty or s.presence_penalty:  # type: ignore[attr-defined]
                stacked.append(h.counts(vocab, device))
            else:
                zero = torch.zeros(vocab, dtype=torch.float32, device=device) if zero is None else zero
                stacked.append(zero)
        counts = torch.stack(stacked)
    sizes = {s.no_repeat_ngram_size for s in rows_settings}  # type: ignore[attr-defined]
    for n in sorted(sizes - {0}):
        mask = ngram_mask([h if s.no_repeat_ngram_size == n else None for h, s in zip(hist, rows_settings)], n, block, with_prompt=True)  # type: ignore[attr-defined]
        if mask is not None:
            banned = mask if banned is None else banned | mask
    block = penalize(block, seen=seen, repetition=repetition, counts=counts, frequency=frequency, presence=presence, banned=banned)
    if len(live) == scores.shape[0]:
        return block
    out = scores.clone()
    out[live] = block
    return out


class Histories:
    """The histories of the rows of one method call (``ContextScores.history``): what a
    repetition-aware method reads about the answers so far."""

    def __init__(self, rows: Sequence[TokenHistory | None]) -> None:
        self.rows = list(rows)

    def repeats(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """``[rows, V]`` bool: tokens that would complete an n-gram the row's answer already
        contains (the prompt is not counted); None when no row has one. ``like`` gives
        the shape ``[rows, V]`` and device."""
        return ngram_mask(self.rows, n, like, with_prompt=False)

    def repeat_pairs(self, n: int, vocab: int) -> tuple[list[int], list[int]]:
        """Like :meth:`repeats`, as (rows, tokens) lists: the sparse form."""
        return ngram_pairs(self.rows, n, vocab, with_prompt=False)


__all__ = ["Histories", "NgramIndex", "TokenHistory", "apply_repetition_controls", "ngram_mask", "ngram_pairs", "penalize"]
