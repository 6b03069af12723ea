"""Low-level text statistics shared by the judges' measures and the collapse guards.

Words (:func:`words`), sentences (:func:`sentences`), n-grams (:func:`ngrams`,
:func:`distinct_n`) and MTLD (:func:`mtld`): pure functions of a string, no
dictionaries or models. :mod:`prefalign.eval.measures` builds the judges' measures on
them, :mod:`prefalign.eval.guards` the collapse guards.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["distinct_n", "mtld", "ngrams", "sentences", "straight", "words"]

# Words are runs of letters/digits, keeping inner apostrophes and hyphens ("don't",
# "well-known"), so that contractions stay one token for the formality lexicon.
_WORD_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def straight(text: str) -> str:
    """``text`` with curly apostrophes written ``'`` (as the word lists spell them)."""
    return text.translate(_APOSTROPHES)


def words(text: str, *, lower: bool = True) -> list[str]:
    """Word tokens of ``text``, lower-cased unless ``lower=False`` (curly apostrophes become ``'``)."""
    text = straight(text)
    return _WORD_RE.findall(text.lower() if lower else text)


_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+|\n+")


def sentences(text: str) -> list[str]:
    """The non-empty sentences of ``text`` (split after ``.``, ``!``, ``?`` and at line breaks)."""
    return [s for s in _SENTENCE_RE.split(text) if s.strip()]


# MTLD (as computed by lexicalrichness) and distinct-n

_MTLD_PUNCT = str.maketrans({p: " " for p in string.punctuation})


def _mtld_tokens(text: str) -> list[str]:
    # Same preprocessing as lexicalrichness 0.5 (lower case, digits and dashes removed,
    # punctuation to spaces) so that scores are comparable with published MTLD values.
    text = re.sub(r"[0-9]+", "", text.lower())
    for dash in ("\u2013", "\u2014", "-"):
        text = text.replace(dash, "")
    return text.translate(_MTLD_PUNCT).split()


def _mtld_pass(tokens: Sequence[str], threshold: float) -> float:
    terms: set[str] = set()
    count = 0
    factors = 0.0
    ttr = 1.0
    for w in tokens:
        count += 1
        terms.add(w)
        ttr = len(terms) / count
        if ttr <= threshold:
            factors += 1
            terms, count = set(), 0
    if count > 0:  # partial factor for the unfinished last segment
        factors += (1 - ttr) / (1 - threshold)
    if factors == 0:  # TTR never fell: the whole text is one (partial) factor
        whole = len(set(tokens)) / len(tokens)
        factors = 1.0 if whole == 1 else (1 - whole) / (1 - threshold)
    return len(tokens) / factors


def mtld(text: str, threshold: float = 0.72) -> float:
    """Measure of Textual Lexical Diversity (McCarthy & Jarvis 2010), bidirectional mean.

    Reimplements ``lexicalrichness.LexicalRichness(text).mtld(threshold)`` (0.5.x) exactly,
    tokenisation included, without importing its pandas/scipy/textblob stack (~2.5 s).
    Empty text scores 0.
    """
    tokens = _mtld_tokens(text)
    if not tokens:
        return 0.0
    return (_mtld_pass(tokens, threshold) + _mtld_pass(tokens[::-1], threshold)) / 2


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The ``n``-grams of ``tokens``, in order (none when there are fewer than ``n``)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(text: str, n: int = 2) -> float:
    """Share of distinct word n-grams among all word n-grams (0 when the text has none)."""
    grams = ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else 0.0
