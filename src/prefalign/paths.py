"""Where prefalign looks for the project's shared data (prompt files for demo and make-pairs),
and where it keeps its cache (:func:`cache_dir`).

One rule, used by ``prefalign demo``, ``prefalign make-pairs`` and stated in their
``--help``: ``$PREFALIGN_DATA`` if set, else ``../shared/data`` beside the current
directory, else ``./shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The rule in words, for help texts and error messages.
DATA_DIR_RULE = "$PREFALIGN_DATA, else ../shared/data, else ./shared/data (from the current directory)"


def data_dir_candidates() -> list[Path]:
    """The directories :func:`data_dir` tries, in order."""
    env = os.environ.get("PREFALIGN_DATA")
    if env:
        return [Path(env).expanduser()]
    cwd = Path.cwd()
    return [cwd.parent / "shared" / "data", cwd / "shared" / "data"]


def data_dir() -> Path | None:
    """The shared data directory by :data:`DATA_DIR_RULE`, or None if none exists.

    A set ``$PREFALIGN_DATA`` is the only candidate: a wrong value is not silently
    replaced by another directory.
    """
    return next((c for c in data_dir_candidates() if c.is_dir()), None)


def cache_dir() -> Path:
    """Root of prefalign's cache (``$PREFALIGN_CACHE`` or ``~/.cache/prefalign``)."""
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign")
