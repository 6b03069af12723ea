"""Per-request decoding settings, and the one-hypothesis strategies: greedy and sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import PrefalignError

#: The seeds ``torch.Generator.manual_seed`` accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: Most alternatives ``top_logprobs`` returns per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: Most answers one request asks for (``n``).
MAX_CHOICES = 128
#: Below this temperature decoding is greedy: scores / T overflow to inf, and the
#: limit of sampling as T → 0 is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5
#: OpenAI's range for frequency_penalty and presence_penalty.
MAX_OPENAI_PENALTY = 2.0
#: Guards against nonsense values only (transformers accepts any positive float).
MAX_REPETITION_PENALTY = 100.0
MAX_NGRAM_SIZE = 64
#: The repetition controls' field names (the CLI's ``--param`` and the evaluation's
#: sweeps route these to the sampling settings instead of the method).
REPETITION_FIELDS = ("frequency_penalty", "presence_penalty", "repetition_penalty", "no_repeat_ngram_size")


@dataclass(frozen=True)
class SamplingParams:
    """Every per-request decoding setting: how scores become tokens and when to stop.

    ``temperature=0`` (or below 1e-5) means greedy (argmax); ``top_p``/``top_k`` (0 = off)
    cut the sampled distribution; ``seed`` makes sampling reproducible whatever the batch;
    ``max_new_tokens`` caps the answer; ``stop`` strings end it (the text is cut before
    them); ``ignore_eos`` decodes past the end-of-sequence token. ``logprobs`` returns,
    for each chosen token, its log-probability under the method's final scores (their
    log-softmax), and ``top_logprobs`` (0–20) the most likely tokens beside it. ``n``
    asks for n answers to the prompt (:meth:`for_choice`: answer i samples with seed
    ``seed + i``); they share the prompt's prefill.

    Repetition controls, applied to the method's scores before the token is chosen
    (:mod:`prefalign.decoding.repetition`; neutral defaults leave tokens unchanged):
    ``frequency_penalty`` and ``presence_penalty`` (OpenAI's, in [-2, 2]: ``score −
    count·frequency − (count > 0)·presence``, counting the answer's tokens),
    ``repetition_penalty`` (transformers', > 0, 1 = off: seen tokens' positive scores
    divided by it, negative ones multiplied; seen = prompt + answer, as in transformers)
    and ``no_repeat_ngram_size`` (transformers', 0 = off: no n-gram of the prompt +
    answer occurs twice).

    Every field is checked here, once, with an error naming it; the API, the CLI, the
    server and the evaluation all build this object (method parameters are checked by
    the method objects, in the same way).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PrefalignError(f"max_new_tokens must be an integer ≥ 1, got {n!r}", field="max_new_tokens")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise PrefalignError(f"stop must be a string or a list of strings, got {self.stop!r}", field="stop")
        for text in stop:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise PrefalignError("stop contains text that is not valid Unicode (a lone surrogate?)", field="stop") from None
        object.__setattr__(self, "stop", tuple(x for x in stop if x))
        if not isinstance(self.ignore_eos, bool):
            raise PrefalignError(f"ignore_eos must be true or false, got {self.ignore_eos!r}", field="ignore_eos")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t != t or t < 0 or math.isinf(t):
            raise PrefalignError(f"temperature must be a finite number ≥ 0, got {t!r}", field="temperature")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise PrefalignError(f"top_p must be in (0, 1], got {p!r}", field="top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise PrefalignError(f"top_k must be an integer ≥ 0 (0 = off), got {self.top_k!r}", field="top_k")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise PrefalignError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}", field="seed")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -MAX_OPENAI_PENALTY <= v <= MAX_OPENAI_PENALTY:
                raise PrefalignError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}", field=name)
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise PrefalignError(
                f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}] (1 = off, above 1 discourages repeats), got {r!r}",
                field="repetition_penalty",
            )
        g = self.no_repeat_ngram_size
        if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g <= MAX_NGRAM_SIZE:
            raise PrefalignError(
                f"no_repeat_ngram_size must be an integer in [0, {MAX_NGRAM_SIZE}] (0 = off), got {g!r}", field="no_repeat_ngram_size"
            )
        if not isinstance(self.logprobs, bool):
            raise PrefalignError(f"logprobs must be true or false, got {self.logprobs!r}", field="logprobs")
        k = self.top_logprobs
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS:
            raise PrefalignError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}", field="top_logprobs")
        if k and not self.logprobs:
            raise PrefalignError("top_logprobs needs logprobs=true", field="top_logprobs")
        n = self.n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
            raise PrefalignError(f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}", field="n")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalizes(self) -> bool:
        """True when a repetition control is on (the engine then keeps the answer's history)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0 or self.no_repeat_ngram_size)

    def for_choice(self, index: int) -> SamplingParams:
        """The settings of answer ``index`` of ``n``: one answer, seeded ``seed + index``
        (wrapped into the seed range; no seed: unseeded), so that each answer is
        reproducible and equals a single request with that seed."""
        seed = self.seed
        if seed is not None:
            seed = SEED_MIN + (seed + index - SEED_MIN) % (SEED_MAX - SEED_MIN + 1)
        return replace(self, n=1, seed=seed)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """The request's own random generator (None without a seed: torch's global one)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class Greedy:
    """The argmax of the scores. Rows of several greedy requests are chosen in one call."""

    width = 1

    def check(self, sampling: SamplingParams) -> None:
        pass

    @staticmethod
    def tokens(scores: torch.Tensor) -> list[int]:
        """The argmax of each row of ``scores`` ``[n, V]``."""
        return scores.argmax(dim=-1).tolist()

    def token(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """The argmax of one row ``[V]``."""
        return int(scores.argmax())


@dataclass(frozen=True)
class Sampling:
    """Sampling from the softmax of the scores after temperature, top-k and top-p
    (transformers' logits warpers, in that order), with the request's generator."""

    params: SamplingParams
    width = 1

    def check(self, sampling: SamplingParams) -> None:
        pass

    def token(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """One token sampled from one row of scores ``[V]``."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        params = self.params
        scores = scores[None, :]
        scores = TemperatureLogitsWarper(params.temperature)(None, scores)
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(None, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(params.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator)[0, 0])


def sample_rows(
    scores: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``scores`` ``[n, V]``, row ``i`` with ``params[i]`` and
    ``generators[i]``: ``(tokens [n], ok [n])``, both on the scores' device, no host sync.

    Row ``i``'s token is the one :meth:`Sampling.token` draws from that row alone with the
    same generator state (so a seeded answer is the same alone or in any batch): NaN
    scores count as −inf, the warpers run on the rows sharing their settings together,
    and ``torch.multinomial``'s draw of one sample — ``argmax(probs / q)``, ``q ~ Exp(1)``
    from the row's generator — is taken for all rows at once. ``ok`` is False where the
    row cannot be sampled (every score −inf, or +inf/NaN probabilities): the request fails.
    """
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    settings: dict[tuple[float, int, float], list[int]] = {}
    for i, p in enumerate(params):
        settings.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    warped = scores
    for (temperature, top_k, top_p), rows in settings.items():
        part = scores if len(settings) == 1 else scores[rows]
        part = TemperatureLogitsWarper(temperature)(None, part)
        if top_k:
            part = TopKLogitsWarper(top_k)(None, part)
        if top_p < 1.0:
            part = TopPLogitsWarper(top_p)(None, part)
        if len(settings) == 1:
            warped = part
        else:
            if warped is scores:
                warped = torch.empty_like(scores)
            warped[rows] = part
    probs = torch.softmax(warped, dim=-1)
    noise = torch.empty_like(probs)
    drawn = []
    for i, generator in enumerate(generators):
        # One row's generator failing (say, on another device) fails that row alone.
        try:
            noise[i].exponential_(1, generator=generator)
            drawn.append(True)
        except Exception:
            noise[i] = 1.0
            drawn.append(False)
    tokens = (probs / noise).argmax(dim=-1)
    ok = torch.isfinite(scores.amax(dim=-1)) & torch.isfinite(probs.sum(dim=-1))
    if not all(drawn):
        ok &= torch.tensor(drawn, device=ok.device)
    return tokens, ok


def split_repetition(params: dict) -> tuple[dict, dict]:
    """``params`` split into (method parameters, repetition controls of :class:`SamplingParams`)."""
    method = {k: v for k, v in params.items() if k not in REPETITION_FIELDS}
    return method, {k: v for k, v in params.items() if k in REPETITION_FIELDS}


__all__ = ["GREEDY_TEMPERATURE", "MAX_CHOICES", "MAX_TOP_LOGPROBS", "REPETITION_FIELDS", "split_repetition", "SEED_MAX", "SEED_MIN", "Greedy", "Sampling", "SamplingParams", "make_generator", "sample_rows"]
