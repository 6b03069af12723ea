"""When a one-hypothesis answer ends, and which part of its text is safe to stream.

An answer ends at EOS (unless ``ignore_eos``), at ``max_new_tokens``, or at a stop
string: the text is cut before the first one found. While it runs, the streamed text
holds back an incomplete UTF-8 character (decoded as U+FFFD) and anything that may be
the beginning of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What the tokenizer decodes an incomplete UTF-8 sequence to.
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class StopStrings:
    """A request's stop strings."""

    strings: tuple[str, ...] = ()

    @property
    def longest(self) -> int:
        return max((len(s) for s in self.strings), default=0)

    def cut(self, text: str, previous: int) -> int | None:
        """Where ``text`` must be cut (before the first stop string), or None.

        ``previous`` is the length of the text before the last token: only a stop string
        that ends after it can be new, so the search starts ``longest`` characters before.
        """
        if not self.strings:
            return None
        start = max(0, previous - self.longest)
        hits = [i for s in self.strings if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def safe_end(self, text: str, emitted: int) -> int:
        """How much of ``text`` a running answer may stream (never less than ``emitted``)."""
        safe = len(text)
        while safe > emitted and text[safe - 1] == REPLACEMENT:
            safe -= 1
        return max(emitted, safe - max(0, self.longest - 1))


def drop_incomplete_tail(text: str) -> str:
    """An answer cut off mid-character (``max_new_tokens``): drop the replacement char(s)."""
    return text.rstrip(REPLACEMENT)


__all__ = ["REPLACEMENT", "StopStrings", "drop_incomplete_tail"]
