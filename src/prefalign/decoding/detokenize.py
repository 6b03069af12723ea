"""Incremental detokenisation: the text of a growing answer, decoding only its tail.

Re-decoding a whole answer at every token costs O(length) per token, O(n²) per answer.
:class:`IncrementalText` keeps the text of the tokens up to a *read offset* and decodes
only a short window: the tokens from a *prefix offset* (a few tokens before the read
offset, so that a tokenizer which treats a sequence's first token specially, e.g.
SentencePiece's leading space, sees it in context) to the end. The new text is the
window's text past the text of its context part. Offsets advance only when the new
text does not end in an incomplete UTF-8 character (decoded as U+FFFD), so a character
split over several byte tokens is decoded once it is whole. This is the scheme of
vLLM's ``detokenize_incrementally`` (``prefix_offset``/``read_offset``).

``text`` always equals ``tokenizer.decode(tokens, skip_special_tokens=True)`` of the
whole list (tested on random token sequences); a tokenizer whose decode of a window is
not consistent with its decode of the context part falls back to whole decodes.
"""

from __future__ import annotations

from typing import Any

from .stopping import REPLACEMENT


class IncrementalText:
    """The decoded text of a token list that only grows (one answer's tokens)."""

    __slots__ = ("tokenizer", "text", "_committed", "_context", "_prefix", "_read", "_whole")

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        #: ``tokenizer.decode(tokens, skip_special_tokens=True)`` of the tokens seen so far.
        self.text = ""
        self._committed = ""  # text of tokens[:_read]
        self._context = ""  # text of tokens[_prefix:_read], decoded on its own
        self._prefix = 0
        self._read = 0
        self._whole = False  # this tokenizer's windows did not line up: decode whole lists

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""

    def update(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (the previous call's list with tokens appended); sets ``text``."""
        if self._whole:
            self.text = self._decode(tokens)
            return self.text
        window = self._decode(tokens[self._prefix:])
        if not window.startswith(self._context):
            self._whole = True
            return self.update(tokens)
        new = window[len(self._context):]
        self.text = self._committed + new
        if new and not new.endswith(REPLACEMENT):
            # The tail is whole characters: the next window starts at this step's read offset.
            self._committed = self.text
            self._prefix, self._read = self._read, len(tokens)
            self._context = self._decode(tokens[self._prefix:self._read])
        return self.text


__all__ = ["IncrementalText"]
