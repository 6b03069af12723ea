"""transformers-native use: two-context methods inside a plain ``model.generate(...)``.

:class:`PreferenceLogitsProcessor` works like transformers' classifier-free-guidance
processor: ``generate`` decodes the *preference* context, and the processor keeps its
own KV cache of the *base* context, feeding it each generated token, then replaces the
scores with the method's combination (Amulet's ``p + c_T (p − b)``, LA's ``p + r (p − b)``).
transformers applies temperature/top-k/top-p after custom processors, so sampling
works on the combined scores as in the engine.

What needs prefalign's :class:`~prefalign.engine.Engine` instead: beam search (generate
reorders beams, which this processor cannot follow), several preferences, reward-model
methods (PAD), continuous batching and stop strings shared with the server.

>>> proc = PreferenceLogitsProcessor.from_prompt(model, tokenizer, "Why is the sky blue?", method="amulet")
>>> out = model.generate(**proc.preference_inputs, logits_processor=[proc], max_new_tokens=64, do_sample=False)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor

from .runners.forward import last_logprobs, to_logprobs
from .runners.kv_cache import left_pad, positions_from_mask
from .decoding.repetition import Histories, TokenHistory
from .errors import PrefalignError
from .methods import Method, make_method
from .prompts import encode_context, parse_preferences, to_chat


class PreferenceLogitsProcessor(LogitsProcessor):
    """Combine ``generate``'s (preference-context) scores with a base context run alongside.

    ``base_input_ids``/``base_attention_mask`` are the base context, left-padded like
    the generate inputs (one row per generate row). ``method`` is ``"amulet"``, ``"la"``
    (or any method whose roles are exactly ``[base, preference]``) with its parameters.
    """

    def __init__(self, model: Any, base_input_ids: torch.Tensor, base_attention_mask: torch.Tensor | None = None, method: str | Method = "amulet", **params: Any) -> None:
        self.model = model
        self.method = make_method(method, **params)
        roles = self.method.roles(1)
        if [(r.preference, r.model) for r in roles] != [(None, "policy"), (0, "policy")]:
            raise PrefalignError(
                f"method {self.method.name!r} is not a base-vs-preference method; use prefalign's Engine for it",
                field="method",
            )
        if self.method.search() is not None:  # beam search keeps several hypotheses
            raise PrefalignError("beam methods need prefalign's Engine", field="method")
        self.base_ids = base_input_ids
        self.mask = base_attention_mask if base_attention_mask is not None else torch.ones_like(base_input_ids)
        self.cache: DynamicCache | None = None
        self.seen = 0
        self.start = 0  # where the answer begins in generate's input_ids
        self.preference_inputs: dict[str, torch.Tensor] = {}

    @classmethod
    def from_prompt(cls, model: Any, tokenizer: Any, prompts: Any, preference: Any = "concise", method: str | Method = "amulet", template: str = "default", **params: Any) -> PreferenceLogitsProcessor:
        """Build the processor and the matching ``generate`` inputs (``.preference_inputs``) for prompts."""
        batch = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)) else list(prompts)
        prefs = parse_preferences(preference)
        if len(prefs) != 1:
            raise PrefalignError("the logits processor takes exactly one preference; use the Engine to compose", field="preference")
        chats = [to_chat(p) for p in batch]
        base = left_pad([encode_context(tokenizer, c, None, template) for c in chats], tokenizer.pad_token_id or 0)
        pref = left_pad([encode_context(tokenizer, c, prefs[0].text, template) for c in chats], tokenizer.pad_token_id or 0)
        processor = cls(model, base[0], base[1], method, **params)
        processor.preference_inputs = {"input_ids": pref[0], "attention_mask": pref[1]}
        return processor

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != self.base_ids.shape[0]:
            raise PrefalignError("generate's batch differs from the base context's (beam search or num_return_sequences>1 are not supported)")
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
            ids, positions = self.base_ids, positions_from_mask(self.mask)
            self.start = input_ids.shape[1]
        else:
            ids = input_ids[:, self.seen:]
            positions = self.mask.sum(-1, keepdim=True) + torch.arange(ids.shape[1], device=ids.device)
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=-1)
        self.seen = input_ids.shape[1]
        base = last_logprobs(self.model, ids.to(self.model.device), self.mask, positions, self.cache)
        pref = to_logprobs(scores)
        vocab = min(base.shape[-1], pref.shape[-1])
        history = None
        if self.method.uses_history:  # the safeguard's repetition guard reads the answers so far
            answers = input_ids[:, self.start:].tolist()
            history = Histories([TokenHistory([], answer) for answer in answers])
        combined = self.method.score(torch.stack([base[:, :vocab], pref[:, :vocab]], dim=1), torch.ones(1), history=history)
        return combined.to(scores.dtype)
