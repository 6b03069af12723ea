"""OpenAI's ``logprobs`` objects from the engine's per-token log-probabilities.

The numbers are the log-probabilities of the request's *method*: the log-softmax of the
scores its ``combine`` returned, after the repetition controls (for ``base``: the
model's own distribution), before temperature, top-k and top-p, as in vLLM. Shapes:

* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}], "refusal": null}``;
* completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
  "text_offset"}`` (offsets count characters from the start of the answer).

A token's text is its own decoding; ``bytes`` are its exact bytes (for a byte-level BPE
token that holds part of a UTF-8 character, the text shows U+FFFD and the bytes say
which part).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from ..engine import TokenLogprob

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte ↔ character map

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenText:
    """A tokenizer's token texts and bytes, cached per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            found = self._cache[token] = self._compute(token)
        return found

    def _compute(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token])
        piece = self.tokenizer.convert_ids_to_tokens(token)
        raw: bytes | None = None
        if isinstance(piece, str):
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:  # SentencePiece's byte fallback
                raw = bytes([int(fallback.group(1), 16)])
            else:
                decoder = _byte_decoder()
                if piece and all(ch in decoder for ch in piece):  # byte-level BPE (GPT-2, Llama 3, SmolLM)
                    raw = bytes(decoder[ch] for ch in piece)
                    if raw.decode("utf-8", errors="replace") != text and "\ufffd" not in text:
                        raw = None  # not a byte-level vocabulary after all
        return text, list(raw if raw is not None else text.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText) -> dict[str, Any]:
    """The chat ``choices[i].logprobs`` object for ``entries`` (one per token)."""
    content = []
    for entry in entries:
        token, raw = text_of(entry.token)
        top = []
        for other, logprob in entry.top:
            other_text, other_raw = text_of(other)
            top.append({"token": other_text, "logprob": logprob, "bytes": other_raw})
        content.append({"token": token, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], text_of: TokenText, offset: int = 0) -> dict[str, Any]:
    """The completions ``choices[i].logprobs`` object; ``offset``: characters before these tokens."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        token, _ = text_of(entry.token)
        tokens.append(token)
        token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for other, logprob in entry.top:
            top.setdefault(text_of(other)[0], logprob)  # two tokens may decode alike: keep the likelier
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


__all__ = ["TokenText", "chat_logprobs", "completion_logprobs"]
