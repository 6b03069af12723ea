"""Differences between the transformers versions prefalign supports (``>=5.0,<6``).

A recent transformers 5.x (5.24, the release tested here, has it) renamed a causal
LM's KV-cache argument and output field from ``past_key_values`` to ``cache``; the
old name still works there with a ``FutureWarning`` and is announced to go away in
5.40. Earlier 5.x releases and custom (remote-code) models only know
``past_key_values``. prefalign passes the cache
under whichever name the model's ``forward`` declares, so it works on both sides of the
rename without warnings.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

CACHE = "cache"
LEGACY_CACHE = "past_key_values"


@functools.cache
def _declared_cache_keyword(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters  # follows functools.wraps decorators
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - builtins, odd callables
        return LEGACY_CACHE
    return CACHE if CACHE in params else LEGACY_CACHE


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model``'s forward takes its KV cache.

    ``"cache"`` when its ``forward`` declares that parameter, else ``"past_key_values"``
    (older releases, custom models, and forwards that only take ``**kwargs``). A wrapper
    that forwards its keywords to another model (the PRM, the fused PAD module) says
    which name it needs with a ``cache_keyword`` attribute.
    """
    own = getattr(model, "cache_keyword", None)
    if isinstance(own, str):
        return own
    return _declared_cache_keyword(type(model))


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)``: ``model(ids, **cache_kwargs(model, cache))``."""
    return {cache_keyword(model): cache}


def output_cache_field(output_class: type) -> str:
    """The field of a transformers output class (e.g. ``CausalLMOutputWithPast``) that holds the cache."""
    return CACHE if CACHE in getattr(output_class, "__dataclass_fields__", {}) else LEGACY_CACHE


def output_cache(output: Any) -> Any:
    """The KV cache a model returned, whichever field name its output class uses."""
    return getattr(output, output_cache_field(type(output)), None)
