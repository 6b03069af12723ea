"""``beam``: beam search on the preference context (the Amulet paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PrefalignError
from .pref import Pref


@dataclass(frozen=True)
class Beam(Pref):
    """Deterministic beam search over the preference context(s).

    Follows transformers' beam search (``early_stopping=True``): 2×width candidates
    per step, finished hypotheses scored by ``logprob / length**length_penalty``,
    stop once ``width`` hypotheses are finished. The paper's script passes
    ``do_sample=True`` to beam search; prefalign's beam is deterministic.
    """

    name = "beam"
    summary = "beam search on the preference context (baseline)"
    width: int = 16
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise PrefalignError(f"width must be an integer ≥ 1, got {self.width!r}", field="width")
        if not isinstance(self.length_penalty, (int, float)):
            raise PrefalignError("length_penalty must be a number", field="length_penalty")

    @property
    def beam_width(self) -> int:
        return self.width

