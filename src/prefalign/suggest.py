""""Did you mean …" suggestions for mistyped names (methods, presets, judges)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'amulet'?)`` for the closest of ``choices`` to ``name``, else ``""``.

    The text starts with a space so that it can be appended to a message as is.
    """
    if not isinstance(name, str) or not name.strip():
        return ""
    options = list(dict.fromkeys(choices))
    lowered = {c.lower(): c for c in options}
    match = difflib.get_close_matches(name.strip().lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[match[0]]!r}?)" if match else ""
