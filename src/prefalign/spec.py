"""One request, before any model: :class:`RequestSpec`.

Every face builds one — the Python API (:meth:`prefalign.Aligner.generate` and
``stream`` build it from their keywords), the CLI and chat (before the model loads), the
server's translator and the evaluation's sweep expansion — so that a setting a user can
get wrong is checked once, by the same code, with the same message:

* the method and its parameters (:func:`prefalign.methods.make_method`; ``method=None``:
  the default of every face, :func:`prefalign.rules.choose_method`);
* the preferences and their weights (:func:`prefalign.prompts.parse_preferences`), and
  that a method reading a preference gets one (:func:`prefalign.rules.check_preferences`);
* the template (:func:`prefalign.prompts.check_template`);
* the decoding settings (:class:`~prefalign.decoding.sampling.SamplingParams`), and that
  the method can search with them (beam search is greedy only).

What needs the model — the context window, the PRM a method reads, the backend —
is :meth:`prefalign.Aligner.prepare`'s, which turns a spec and a prompt into an engine
request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .decoding import strategy_for
from .decoding.sampling import SamplingParams
from .methods import Method, make_method
from .prompts import Preference, check_template, parse_preferences
from .rules import check_preferences, choose_method

__all__ = ["SAMPLING_FIELDS", "RequestSpec"]

#: The keywords that are decoding settings; any other keyword is a method parameter.
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True)
class RequestSpec:
    """What to answer with: method and parameters, preferences and weights, template and
    decoding settings. Frozen; checked at construction (no model needed).

    >>> spec = RequestSpec.build("amulet", "concise", max_new_tokens=64, alpha=2.0)
    >>> spec.method.name, spec.weights, spec.sampling.max_new_tokens
    ('amulet', (1.0,), 64)
    """

    method: Method
    preferences: tuple[Preference, ...] = ()
    #: None: the method's own (or its PRM's), chosen by :meth:`prefalign.Aligner.template_for`.
    template: str | None = None
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        check_preferences(self.method, len(self.preferences))
        if self.template is not None:
            check_template(self.template)
        strategy_for(self.method, self.sampling)  # e.g. beam search with sampling settings

    @classmethod
    def build(
        cls,
        method: str | Method | None = None,
        preference: Any = None,
        *,
        template: str | None = None,
        sampling: SamplingParams | None = None,
        default_method: str | None = None,
        **settings: Any,
    ) -> RequestSpec:
        """A spec from the keywords every face speaks.

        ``preference``: None, a preset name, a sentence, or a list of these or of
        ``(text, weight)``; ``method=None``: ``pref`` with a preference (or
        ``default_method``, a server's ``--default-method``), ``base`` without one.
        ``settings``: :class:`SamplingParams`'s fields (``max_new_tokens``,
        ``temperature``, ...; None: unset), overriding ``sampling``'s, and the method's
        parameters (e.g. ``alpha``).
        """
        preferences = parse_preferences(preference)
        given = {k: v for k, v in settings.items() if k in SAMPLING_FIELDS and v is not None}
        method_params = {k: v for k, v in settings.items() if k not in SAMPLING_FIELDS}
        rule = make_method(choose_method(method, preferences, default_method), **method_params)
        decoding = dataclasses.replace(sampling or SamplingParams(), **given)
        return cls(rule, tuple(preferences), template, decoding)

    @property
    def weights(self) -> tuple[float, ...]:
        """The preferences' weights (``(1.0,)`` without a preference: one row of weights)."""
        return tuple(p.weight for p in self.preferences) or (1.0,)
