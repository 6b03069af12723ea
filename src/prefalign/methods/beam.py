"""``beam``: beam search on the preference context (the Amulet paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding.beam import BeamSearch
from ..errors import PrefalignError
from .method import count
from .pref import Pref


@dataclass(frozen=True)
class Beam(Pref):
    """Deterministic beam search over the preference context(s).

    The method's rule is :class:`~prefalign.methods.pref.Pref`'s; the search is
    :class:`~prefalign.decoding.beam.BeamSearch`, which :meth:`search` hands the engine.

    Follows transformers' beam search (``early_stopping=True``): 2×width candidates
    per step, finished hypotheses scored by ``logprob / length**length_penalty``,
    stop once ``width`` hypotheses are finished. The paper's script passes
    ``do_sample=True`` to beam search; prefalign's beam is deterministic.
    """

    name = "beam"
    summary = "beam search on the preference context (baseline)"
    helps = "a baseline of the Amulet paper; 16 rows per prompt, so slow"
    aliases = {"num_beams": "width", "beam_width": "width"}
    cost_limits = {"width": 16}
    width: int = 16
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        count("width", self.width, maximum=128)
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool) or not -10 <= self.length_penalty <= 10:
            raise PrefalignError(f"length_penalty must be a number in [-10, 10], got {self.length_penalty!r}", field="length_penalty")

    @property
    def deterministic(self) -> bool:
        # Beam search is deterministic; OpenAI's default temperature (1) would reject it.
        return self.width > 1

    def search(self) -> BeamSearch | None:
        """Beam search with this width and length penalty (a beam of one decodes as
        the request's sampling says, as a one-hypothesis method does)."""
        return BeamSearch(self.width, float(self.length_penalty)) if self.width > 1 else None
