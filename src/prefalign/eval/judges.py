"""Offline judges: one measurable score per preference.

The seed papers score preference following with reward models and GPT-4 judges that
need a GPU or a network. prefalign's evaluation must run offline on a laptop, so each
preference gets a cheap, deterministic proxy measure (length, readability grade,
sentiment, a formality proxy, lexical diversity, lexicon rates, embedding similarity).
A :class:`Judge` bundles the measure with its *direction*: ``+1`` when a higher score
means the answer follows the preference better, ``-1`` when a lower one does (e.g.
length for ``concise``). ``docs/judges.md`` tabulates the judges and their weaknesses.

This module is the registry (which preference gets which judge); the measures are in
:mod:`prefalign.eval.measures`, the text statistics under them in
:mod:`prefalign.eval.text`, and both are re-exported here. Resolve a judge with :func:`judge_for`, which accepts preset names (``"concise"``),
namespaced preset names (``"amulet:concise"``, ``"psoups:concise"``, ``"pad:humor"``)
and free text (``"Answer like a pirate."``), which gets a generic embedding-similarity
judge. Heavy libraries (textstat, VADER, transformers) are imported on first use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from ..errors import PrefalignError, UnknownNameError
from .measures import (  # noqa: F401 (re-exported: judges.X is where they were)
    DISTINCT_2,
    EMBEDDING_MODEL_ENV,
    FLATTERY,
    FORMALITY,
    HARM,
    HUMOR,
    LENGTH,
    LEXICAL_DIVERSITY,
    READABILITY,
    SENTIMENT,
    SENTIMENT_SENTENCE_MEAN,
    Judge,
    Measure,
    _pick_backend,
    _similarity_measure,
    embedding_model_path,
    formality_proxy,
    free_text_judge,
    keyword_overlap,
)
from .text import distinct_n, mtld, words  # noqa: F401 (re-exported)

__all__ = [
    "EMBEDDING_MODEL_ENV",
    "PRESETS",
    "Judge",
    "Measure",
    "distinct_n",
    "embedding_model_path",
    "formality_proxy",
    "free_text_judge",
    "judge_for",
    "judges_for",
    "keyword_overlap",
    "list_judges",
    "mtld",
    "words",
]

PRESETS: Mapping[str, frozenset[str]] = {
    "amulet": frozenset({"creative", "sycophantic", "verbose", "complex", "formal", "pleasant", "concise", "uplifting"}),
    "psoups": frozenset({"elementary", "expert", "concise", "informative", "friendly"}),
    "pad": frozenset({"helpful", "harmless", "humor"}),
}
"""Preset names of each source paper (``namespace:name``); bare names search them all."""

_NAMESPACE_ALIASES = {"amulet": "amulet", "psoups": "psoups", "p-soups": "psoups", "p_soups": "psoups", "pad": "pad"}

# preset -> (primary measure, direction, secondary measures). "helpful" is built per call
# because its relevance measure depends on which embedding backend is available.
_STATIC: dict[str, tuple[Measure, Literal[1, -1], tuple[Measure, ...]]] = {
    "verbose": (LENGTH, 1, ()),
    "concise": (LENGTH, -1, ()),
    "informative": (LENGTH, 1, ()),
    "complex": (READABILITY, 1, ()),
    "expert": (READABILITY, 1, ()),
    "elementary": (READABILITY, -1, ()),
    "pleasant": (SENTIMENT, 1, (SENTIMENT_SENTENCE_MEAN,)),
    "uplifting": (SENTIMENT, 1, (SENTIMENT_SENTENCE_MEAN,)),
    "friendly": (SENTIMENT, 1, (SENTIMENT_SENTENCE_MEAN, HUMOR)),
    "unfriendly": (SENTIMENT, -1, (SENTIMENT_SENTENCE_MEAN,)),
    "formal": (FORMALITY, 1, ()),
    "creative": (LEXICAL_DIVERSITY, 1, (DISTINCT_2,)),
    "sycophantic": (FLATTERY, 1, ()),
    "humor": (HUMOR, 1, (SENTIMENT,)),
    "harmless": (HARM, -1, ()),
}
_KNOWN = frozenset(_STATIC) | {"helpful"}


def _known_names() -> str:
    return ", ".join(sorted(_KNOWN)) + "; or namespaced: " + ", ".join(
        f"{ns}:{{{','.join(sorted(names))}}}" for ns, names in PRESETS.items()
    )


def _preset_judge(name: str, backend: Literal["auto", "embedding", "keywords"]) -> Judge:
    if name == "helpful":
        # Offline proxy for a helpfulness reward model: is the answer about the question?
        kind, path = _pick_backend(backend)
        return Judge(preference=name, measure=_similarity_measure(None, kind, path), direction=1, secondary=(LENGTH,))
    measure, direction, secondary = _STATIC[name]
    return Judge(preference=name, measure=measure, direction=direction, secondary=secondary)


def _split_name(preference: str) -> tuple[str | None, str]:
    text = preference.strip()
    ns, sep, rest = text.partition(":")
    if sep and ns.strip().lower() in _NAMESPACE_ALIASES:
        return _NAMESPACE_ALIASES[ns.strip().lower()], rest.strip().lower()
    return None, text.lower()


def _is_name(text: str) -> bool:
    # A preset reference is one token ("concise", "helpful+humor"); anything with spaces
    # (or sentence punctuation) is a free-text preference for the generic judge.
    return bool(re.fullmatch(r"[\w+\-]+", text))


def _resolve(namespace: str | None, name: str) -> str:
    if namespace is not None and name not in PRESETS[namespace]:
        raise UnknownNameError(
            f"unknown {namespace} preference {name!r}; {namespace} presets: {', '.join(sorted(PRESETS[namespace]))}",
            field="preference",
        )
    if name not in _KNOWN:
        raise UnknownNameError(
            f"unknown preference/judge name {name!r}; known: {_known_names()}. "
            "Free-text preferences (a phrase with spaces) get the embedding-similarity judge.",
            field="preference",
        )
    return name


def judges_for(preference: str, *, backend: Literal["auto", "embedding", "keywords"] = "auto") -> list[Judge]:
    """Judges for a preference, one per component of a combined PAD principle.

    ``"pad:helpful+humor"`` gives ``[helpful judge, humor judge]``; a single preset or
    free text gives a one-element list. ``backend`` picks the similarity backend of the
    free-text and ``helpful`` judges (see :func:`free_text_judge`).
    """
    namespace, name = _split_name(preference)
    if not name:
        raise PrefalignError("empty preference", field="preference")
    if namespace is None and not _is_name(name):
        return [free_text_judge(preference, backend=backend)]
    if not _is_name(name):
        raise UnknownNameError(f"{preference!r} is not a preset name; known: {_known_names()}", field="preference")
    return [_preset_judge(_resolve(namespace, part), backend) for part in name.split("+")]


def judge_for(preference: str, *, backend: Literal["auto", "embedding", "keywords"] = "auto") -> Judge:
    """The judge of one preference: a preset name, ``namespace:name`` or free text.

    Raises :class:`~prefalign.errors.UnknownNameError` (listing the known names) for an
    unknown single-word name, and :class:`~prefalign.errors.PrefalignError` for a
    combined principle such as ``"helpful+humor"`` (use :func:`judges_for`).
    """
    found = judges_for(preference, backend=backend)
    if len(found) != 1:
        raise PrefalignError(
            f"{preference!r} combines {len(found)} preferences, each with its own judge; use judges_for()",
            field="preference",
        )
    return found[0]


def list_judges(*, backend: Literal["auto", "embedding", "keywords"] = "auto") -> list[Judge]:
    """The judge of every preset (bare names, sorted), for tables and documentation."""
    return [_preset_judge(name, backend) for name in sorted(_KNOWN)]

