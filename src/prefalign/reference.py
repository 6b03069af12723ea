"""The papers' decoding loop, uncached: a correctness reference and a speed baseline.

Amulet's and PAD's released code re-encode every context's whole sequence at every
step (no KV cache). This module does the same, greedily, with any prefalign method's
``combine`` — but with attention masks and position ids, so that padding does not
change answers (the official code passes no mask). Tests compare the engine against
it; ``benchmarks/decode_speed.py`` times it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .decoding.repetition import Histories, TokenHistory
from .engine import GenerationRequest
from .runners.forward import last_logprobs
from .runners.kv_cache import left_pad, positions_from_mask


@torch.inference_mode()
def reference_generate(models: dict[str, Any], requests: Sequence[GenerationRequest], eos_token_ids: Sequence[int], pad_token_id: int = 0) -> list[list[int]]:
    """Greedy tokens for ``requests`` (run together, left-padded), recomputing everything each step."""
    n = len(requests)
    answers: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    eos = set(eos_token_ids)
    max_steps = max(r.max_new_tokens for r in requests)
    n_contexts = len(requests[0].contexts)
    for _ in range(max_steps):
        live = [i for i in range(n) if not done[i]]
        if not live:
            break
        per_context = []
        for k in range(n_contexts):
            model_key = requests[live[0]].contexts[k][0]
            seqs = [requests[i].contexts[k][1] + answers[i] for i in live]
            per_context.append(_last_logprobs(models[model_key], seqs, pad_token_id))
        stacked = torch.stack(per_context, dim=1)  # [live, K, V]
        for row, i in enumerate(live):
            request = requests[i]
            weights = torch.tensor(request.weights, dtype=stacked.dtype)
            history = None
            if getattr(request.method, "uses_history", False):  # e.g. the safeguard's repetition guard
                history = Histories([TokenHistory(request.contexts[request.primary][1], list(answers[i]))])
            token = int(request.method.score(stacked[row : row + 1], weights, history=history).argmax(-1))
            if token in eos and not request.ignore_eos:
                done[i] = True
                continue
            answers[i].append(token)
            if len(answers[i]) >= request.max_new_tokens:
                done[i] = True
    return answers


def _last_logprobs(model: Any, seqs: list[list[int]], pad_token_id: int) -> torch.Tensor:
    ids, mask = left_pad(seqs, pad_token_id, next(model.parameters()).device)
    return last_logprobs(model, ids, mask, positions_from_mask(mask))
