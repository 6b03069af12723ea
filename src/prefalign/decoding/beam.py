"""Beam search as a search strategy: several hypotheses per request, transformers-style.

The engine keeps one row per hypothesis (× the method's contexts) and hands the
strategy each step's scores ``[hypotheses, V]``; :meth:`BeamSearch.step` says which
hypotheses continue (and from which parent, so that the engine reorders its caches) or
that the request is finished, with the best hypothesis.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import PrefalignError
from ..runners.forward import to_logprobs
from .sampling import SamplingParams


class Scored(Protocol):
    """A running hypothesis as the engine holds it: its tokens and summed log-prob."""

    tokens: list[int]
    score: float


@dataclass
class Hypothesis:
    """A hypothesis that continues: ``parent`` indexes the hypotheses it was chosen from."""

    tokens: list[int]
    score: float
    parent: int


@dataclass
class BeamState:
    """One request's finished hypotheses: ``(length-normalised score, tokens)``, best first."""

    finished: list[tuple[float, list[int]]] = field(default_factory=list)


@dataclass
class BeamStep:
    """The outcome of one step: the hypotheses that go on, or the request's answer.

    ``done`` is ``(tokens, reason)`` (reason ``"stop"`` or ``"length"``) once the search
    is over; ``generated`` is the answer length the step reached (usage's count).
    """

    running: list[Hypothesis]
    done: tuple[list[int], str] | None
    generated: int


@dataclass(frozen=True)
class BeamSearch:
    """Transformers' beam search with ``early_stopping=True``.

    Per step, ``(number of EOS ids + 1) × width`` candidates (so that ``width``
    unfinished ones remain); a candidate ending in EOS, or reaching ``max_new_tokens``,
    finishes if it ranks among the best ``width`` and is scored by
    ``logprob / length**length_penalty``; the search stops once ``width`` hypotheses
    are finished (or none can continue), answering the best finished one.
    Deterministic: it needs greedy sampling settings.
    """

    width: int
    length_penalty: float = 1.0

    def check(self, sampling: SamplingParams) -> None:
        if not sampling.greedy:
            raise PrefalignError("beam search is deterministic; use temperature 0 with method 'beam'", field="temperature")
        if sampling.logprobs:
            # Its hypotheses are re-ranked each step: a token's score is not one step's choice.
            raise PrefalignError("logprobs are not available with beam search (method 'beam')", field="logprobs")

    def start(self) -> BeamState:
        return BeamState()

    def step(
        self,
        beams: Sequence[Scored],
        scores: torch.Tensor,
        state: BeamState,
        *,
        eos_token_ids: Collection[int],
        ignore_eos: bool,
        max_new_tokens: int,
    ) -> BeamStep:
        """Advance the hypotheses ``beams`` by one token given their scores ``[len(beams), V]``."""
        width = self.width
        logprobs = to_logprobs(scores)
        vocab = logprobs.shape[-1]
        running = torch.tensor([b.score for b in beams], dtype=logprobs.dtype, device=logprobs.device)
        total = (logprobs + running[:, None]).reshape(-1)
        top_scores, top_ids = torch.topk(total, k=min((len(eos_token_ids) + 1) * width, total.numel()))
        generated = len(beams[0].tokens) + 1
        going_on: list[Hypothesis] = []
        for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
            parent, token = divmod(flat, vocab)
            is_eos = token in eos_token_ids and not ignore_eos
            if is_eos or generated >= max_new_tokens:
                # Only the best `width` candidates may finish (the rest are spares to keep
                # `width` beams running), scored by length-normalised log-prob.
                if rank < width:
                    tokens = beams[parent].tokens + ([] if is_eos else [token])
                    state.finished.append((score / generated ** float(self.length_penalty), tokens))
                continue
            if len(going_on) < width:
                going_on.append(Hypothesis(tokens=beams[parent].tokens + [token], score=score, parent=parent))
        state.finished.sort(key=lambda item: -item[0])
        del state.finished[width:]
        if len(state.finished) >= width or not going_on:
            best = state.finished[0][1]
            return BeamStep(running=[], done=(best, "length" if len(best) >= max_new_tokens else "stop"), generated=generated)
        return BeamStep(running=going_on, done=None, generated=generated)


__all__ = ["BeamSearch", "BeamState", "BeamStep", "Hypothesis"]
