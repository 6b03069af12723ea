"""Rules every face applies to a request: the Python API, the CLI, chat, the server and eval.

Each rule is written here once, so that the faces agree on it and say the same thing
when it is broken:

* :func:`choose_method`: the default policy: ``base`` without a preference, ``pref``
  with one, unless the caller names a method;
* :func:`check_preferences`: a method that reads a preference gets one;
* :func:`check_backend`: a known backend, and no PAD on llama.cpp;
* :func:`check_prm_given`: PAD on a model other than the embedded one names its PRM;
* :func:`check_prm_path`: a PRM path is a directory with a ``prm_config.json``.

None of them loads a model, so the CLI runs them before loading anything.
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PrefalignError

if TYPE_CHECKING:
    from .methods import Method

#: The method used when none is given: ``base`` without a preference, ``pref`` with one
#: (the preference in the system prompt: what measurably follows a preference on the
#: embedded model without collapsing, docs/results/amulet/report.md).
DEFAULT_METHOD_WITHOUT_PREFERENCE = "base"
DEFAULT_METHOD_WITH_PREFERENCE = "pref"

#: What runs the policy model.
BACKENDS = ("transformers", "llamacpp")
PAD_BACKEND_MESSAGE = (
    "method 'pad' runs on the transformers backend only: its reward model is the policy's torch backbone "
    "plus LoRA adapters and a linear layer, which llama.cpp cannot apply to some rows of a batch; "
    "load the model with backend='transformers' (CLI: --backend transformers)"
)


def default_method(has_preference: bool, with_preference: str | None = None) -> str:
    """The method of a request that names none: ``pref`` with a preference, else ``base``.

    ``with_preference`` replaces ``pref`` (a server's ``--default-method``); nothing
    replaces ``base``, since no other method answers without a preference.
    """
    if has_preference:
        return with_preference or DEFAULT_METHOD_WITH_PREFERENCE
    return DEFAULT_METHOD_WITHOUT_PREFERENCE


def choose_method(method: str | Method | None, preferences: Any, with_preference: str | None = None) -> str | Method:
    """``method`` if given, else :func:`default_method` for ``preferences``.

    ``preferences``: anything :func:`prefalign.prompts.parse_preferences` takes (None, a
    name, a sentence, a list), or a parsed list; only whether there is one matters.
    """
    if method is not None:
        return method
    return default_method(_has_preference(preferences), with_preference)


def _has_preference(preferences: Any) -> bool:
    if preferences is None:
        return False
    if isinstance(preferences, str):
        return bool(preferences.strip())
    if isinstance(preferences, Sized):
        return len(preferences) > 0
    return True


def check_preferences(rule: Method, n_preferences: int) -> None:
    """Refuse a method that reads a preference when none is given."""
    if rule.needs_preference and not n_preferences:
        raise PrefalignError(
            f"method {rule.name!r} needs a preference (a preset name such as 'concise' or a sentence; "
            "CLI: -p concise); use method 'base' to answer without one",
            field="preference",
        )


def check_backend(backend: str, method: str | None = None) -> None:
    """Refuse an unknown backend, and PAD on llama.cpp, before anything loads."""
    if backend not in BACKENDS:
        from .suggest import did_you_mean

        raise PrefalignError(
            f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}{did_you_mean(str(backend), BACKENDS)}",
            field="backend",
        )
    if backend == "llamacpp" and method == "pad":
        raise PrefalignError(PAD_BACKEND_MESSAGE, field="method")


def check_prm_given(policy: str | None, prm: Any) -> None:
    """PAD needs a PRM trained for its policy; prefalign ships one for the embedded model only.

    ``policy``: the model as the user named it (None, ``"embedded"``) or as it is loaded
    (its ``name_or_path``); ``prm``: the PRM path given, or None.
    """
    from .models import EMBEDDED_DISPLAY_NAME, EMBEDDED_MODEL

    if prm is None and policy not in (None, "", EMBEDDED_MODEL, EMBEDDED_DISPLAY_NAME):
        raise PrefalignError(
            f"method 'pad' needs a personalised reward model (PRM) trained for the policy {policy!r}, "
            "and prefalign ships one only for the embedded model: pass one with "
            "Aligner.from_pretrained(..., prm=PATH), Aligner.load_prm(PATH) or `--prm PATH`, "
            "or train one with `prefalign train-prm`",
            field="prm",
        )


def check_prm_path(prm: str | Path) -> Path:
    """A PRM directory that exists and holds a ``prm_config.json``, else a clear error."""
    path = Path(prm).expanduser()
    if not path.exists():
        raise PrefalignError(f"PRM not found: {path} (a directory written by `prefalign train-prm`)", field="prm")
    if not (path / "prm_config.json").is_file():
        raise PrefalignError(f"{path} is not a PRM directory: it has no prm_config.json", field="prm")
    return path
