"""Decoding-time alignment methods, one small file each, and their registry.

Add a method by subclassing :class:`Method` (a frozen dataclass of its parameters)
and calling :func:`register`. A method declares what else the CLI and the server need:
its parameters' other spellings (``aliases``) and the parameters a server caps
(``cost_limits``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import PrefalignError, UnknownNameError
from .amulet import Amulet, amulet_coefficient, ftrl_loop
from .base import Base
from .beam import Beam
from .la import LinearAlignment
from .method import POLICY, PRM, ContextRole, ContextScores, Method, plausibility_mask
from .pad import Pad
from .pref import Pref

METHODS: dict[str, type[Method]] = {}

#: Spellings users reach for, mapped to the dataclass field names: the union of the
#: registered methods' ``aliases`` (for the CLI's and eval's ``--param``/``--sweep``).
PARAM_ALIASES: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    """Make a method available by its ``name`` (usable as a class decorator)."""
    METHODS[cls.name] = cls
    PARAM_ALIASES.update(cls.aliases)
    return cls


for _cls in (Base, Pref, Beam, LinearAlignment, Amulet, Pad):
    register(_cls)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``, or a clear error listing the known ones."""
    if isinstance(name, str) and name.lower() in METHODS:
        return METHODS[name.lower()]
    from ..suggest import did_you_mean

    raise UnknownNameError(
        f"unknown method {name!r}{did_you_mean(str(name), METHODS)}; choose one of {', '.join(sorted(METHODS))} (see `prefalign methods`)",
        field="method",
    )


def make_method(name: str | Method, **params: Any) -> Method:
    """Build a method from its name and parameters, rejecting unknown parameters."""
    if isinstance(name, Method):
        return dataclasses.replace(name, **params) if params else name
    cls = method_class(name)
    known = {f.name: f for f in dataclasses.fields(cls)}
    clean: dict[str, Any] = {}
    for key, value in params.items():
        field = cls.aliases.get(key, key)
        if field not in known:
            allowed = ", ".join(known) or "none"
            raise PrefalignError(
                f"method {cls.name!r} has no parameter {key!r}; its parameters: {allowed}", field=key
            )
        default = known[field].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise PrefalignError(f"{key} must be true or false, got {value!r}", field=key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        clean[field] = value
    return cls(**clean)


__all__ = [
    "METHODS",
    "POLICY",
    "PRM",
    "Amulet",
    "Base",
    "Beam",
    "ContextRole",
    "ContextScores",
    "LinearAlignment",
    "Method",
    "Pad",
    "Pref",
    "amulet_coefficient",
    "ftrl_loop",
    "make_method",
    "method_class",
    "PARAM_ALIASES",
    "plausibility_mask",
    "register",
]
