"""The evaluation's plan: what a grid is, and what is left to do in a results directory.

* the sweep grammar (:func:`parse_sweep`: ``amulet.alpha=0.5,1,2``) and the grid's
  expansion into method variants (:func:`expand_methods`) and preferences
  (:func:`expand_preferences`), each checked before any model loads;
* :class:`EvalConfig`, everything that defines a run;
* the work units (:class:`Cell`: one row; :class:`Generation`: one engine request and
  the rows sharing its answer; :class:`Batch`), planned deterministically by
  :func:`plan_batches`;
* resume (:func:`batches_to_run`): which batches to decode again, given the rows
  already in ``results.jsonl`` (keyed by :func:`~prefalign.eval.results.row_key`).

Nothing here decodes or judges (:mod:`prefalign.eval.execute`) or writes files
(:mod:`prefalign.eval.runner`, :mod:`prefalign.eval.results`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..decoding.sampling import SamplingParams, split_repetition
from ..errors import PrefalignError
from ..methods import METHODS, make_method, method_class
from ..prompts import PRESETS, split_preference_values
from .datasets import Dataset
from .results import key_of, row_key

__all__ = [
    "Batch", "Cell", "EvalConfig", "Executor", "Generation", "MethodVariant", "batches_to_run", "expand_methods",
    "expand_preferences", "key_of", "parse_sweep", "plan_batches", "row_key",
]

Executor = Literal["local", "ray"]


# --- Grid specification ----------------------------------------------------------


@dataclass(frozen=True)
class MethodVariant:
    """A method with some parameters set: ``amulet`` or ``amulet(alpha=0.5)``.

    ``overrides`` are the parameters the user set (canonical field names, sorted);
    ``params`` are all the method's parameters with defaults filled in.
    """

    method: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """Short display name, e.g. ``amulet(alpha=0.5)``."""
        if not self.overrides:
            return self.method
        return f"{self.method}({','.join(f'{k}={_fmt_value(v)}' for k, v in self.overrides)})"

    @property
    def params(self) -> dict[str, Any]:
        """The method's parameters, plus any repetition control the variant sets."""
        method_params, repetition = split_repetition(dict(self.overrides))
        return {**make_method(self.method, **method_params).params(), **repetition}

    @property
    def needs_preference(self) -> bool:
        return method_class(self.method).needs_preference


def _fmt_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def _parse_value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def parse_sweep(spec: str) -> tuple[str, str, list[Any]]:
    """``"amulet.alpha=0.5,1,2,4"`` → ``("amulet", "alpha", [0.5, 1, 2, 4])``.

    Parameter aliases (``la.r``, ``amulet.lambda``) map to the method's field names.
    A single value (``beam.width=4``) just sets the parameter.
    """
    head, sep, values = spec.partition("=")
    method, dot, param = head.strip().partition(".")
    if not sep or not dot or not method or not param or not values.strip():
        raise PrefalignError(
            f"cannot read sweep {spec!r}; write METHOD.PARAM=V1,V2,... (e.g. amulet.alpha=0.5,1,2,4)", field="sweep"
        )
    cls = method_class(method.strip())  # raises UnknownNameError with the known methods
    # Its own spellings, or a repetition control (a sampling setting: pref.repetition_penalty=1.2).
    method, param = cls.name, cls.aliases.get(param.strip(), param.strip())
    parsed = [_parse_value(v) for v in values.split(",") if v.strip()]
    if len(set(map(repr, parsed))) != len(parsed):
        raise PrefalignError(f"sweep {spec!r} repeats a value", field="sweep")
    return method, param, parsed


def expand_methods(methods: Sequence[str], sweeps: Sequence[str] = ()) -> list[MethodVariant]:
    """The method variants of a grid: each method × the product of its sweeps' values.

    Every variant is built once here so that a bad parameter fails before any model
    loads. A sweep naming a method not in ``methods`` is an error (add the method).
    """
    names: list[str] = []
    for m in methods:
        name = method_class(m.strip()).name
        if name in names:
            raise PrefalignError(f"method {name!r} is listed twice", field="methods")
        names.append(name)
    if not names:
        raise PrefalignError(f"no methods given; choose from {', '.join(sorted(METHODS))}", field="methods")
    per_method: dict[str, dict[str, list[Any]]] = {n: {} for n in names}
    for spec in sweeps:
        method, param, values = parse_sweep(spec)
        if method not in per_method:
            raise PrefalignError(
                f"sweep {spec!r} is for method {method!r}, which is not among the methods ({', '.join(names)}); "
                "add it to --methods",
                field="sweep",
            )
        if param in per_method[method]:
            raise PrefalignError(f"parameter {method}.{param} is swept twice", field="sweep")
        per_method[method][param] = values
    variants: list[MethodVariant] = []
    for name in names:
        swept = per_method[name]
        keys = sorted(swept)
        for combo in itertools.product(*(swept[k] for k in keys)):
            overrides = tuple(zip(keys, combo))
            method_params, repetition = split_repetition(dict(overrides))
            make_method(name, **method_params)  # validate now: names the bad parameter
            SamplingParams(**repetition)
            variants.append(MethodVariant(name, overrides))
    return variants


def expand_preferences(values: Iterable[str]) -> list[str]:
    """Preference arguments → preference names/texts.

    Split by :func:`prefalign.prompts.split_preference_values` (comma-separated preset
    names, or one free-text preference per value); ``amulet:*``, ``psoups:*`` and ``pad:*`` stand for all presets of that paper.
    """
    out: list[str] = []
    for part in split_preference_values(values):  # the rule every command's -p follows
        if part.endswith(":*"):
            family = part[:-2].lower()
            names = [k for k in PRESETS if k.split(":")[0] == family]
            if not names:
                raise PrefalignError(f"no presets for {part!r}; families: amulet, psoups, pad", field="preferences")
            out.extend(names)
        else:
            out.append(part)
    if not out:
        raise PrefalignError("no preferences given (e.g. --preferences concise,formal)", field="preferences")
    if len(set(out)) != len(out):
        raise PrefalignError("a preference is listed twice", field="preferences")
    return out


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (the CLI options of ``prefalign eval``)."""

    datasets: list[str]
    preferences: list[str]
    methods: list[str]
    sweeps: list[str] = field(default_factory=list)
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int = 128
    prompt_field: str | None = None
    template: str | None = None
    batch_size: int = 8
    model: str | None = None
    prm: str | None = None
    fast: bool | str = "auto"
    threads: int | None = None
    executor: Executor = "local"
    #: What runs the model: ``transformers`` or ``llamacpp`` (see docs/backends.md).
    model_backend: str = "transformers"
    ray_address: str | None = None
    ray_workers: int | None = None
    judge_backend: Literal["auto", "embedding", "keywords"] = "auto"

    def generation_settings(self) -> dict[str, Any]:
        """Settings that every row of one results directory must share."""
        return {
            "model": self.model or "embedded",
            "max_new_tokens": self.max_new_tokens,
            "template": self.template,
            "prm": self.prm,
            "temperature": 0.0,
            # Only when not the default, so that runs made before the option resume.
            **({"backend": self.model_backend} if self.model_backend != "transformers" else {}),
        }

    def command(self, out: str | Path | None = None) -> str:
        """The ``prefalign eval`` command line that reproduces this configuration (into ``out``)."""
        from .echo import eval_command

        return eval_command(self, out)


# --- Work units --------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One results row to produce: a prompt under one preference with one method variant."""

    dataset: str
    prompt_id: str
    prompt: str
    preference: str
    variant: MethodVariant

    @property
    def key(self) -> str:
        return row_key(self.dataset, self.prompt_id, self.preference, self.variant.method, self.variant.params)


@dataclass(frozen=True)
class Generation:
    """One engine request and the rows that share its answer."""

    dataset: str
    prompt_id: str
    prompt: str
    #: The preference decoded with (None for methods that ignore it, e.g. base).
    preference: str | None
    variant: MethodVariant
    cells: tuple[Cell, ...]

    @property
    def id(self) -> str:
        payload = json.dumps([self.dataset, self.prompt_id, self.preference, self.variant.method, self.variant.params], sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Batch:
    """Generations of one method variant, decoded together.

    ``plan`` is the id of the batch as planned for the full grid; a batch reduced
    because some of its generations were answered by an earlier, different plan keeps
    the planned id there (see :func:`batches_to_run`).
    """

    index: int
    variant: MethodVariant
    generations: tuple[Generation, ...]
    plan: str | None = None

    @property
    def id(self) -> str:
        return hashlib.sha1("|".join(g.id for g in self.generations).encode()).hexdigest()[:12]

    @property
    def plan_id(self) -> str:
        return self.plan or self.id

    @property
    def keys(self) -> list[str]:
        return [c.key for g in self.generations for c in g.cells]


def batches_to_run(batches: Sequence[Batch], done: dict[str, str]) -> list[Batch]:
    """The batches still to decode, given ``done``: row key → planned batch id of its row.

    Generations whose rows all come from *another* plan (an earlier, smaller grid) are
    dropped from their batch. What remains is decoded whole even if some of its rows
    are done, when those rows come from this very batch (an interrupted run): then the
    resumed run decodes every answer in the same batch as an uninterrupted one would.
    """
    out = []
    for batch in batches:
        own, todo = [], False
        for gen in batch.generations:
            plans = [done.get(c.key) for c in gen.cells]
            if any(p is None for p in plans):
                todo = True
                own.append(gen)
            elif any(p == batch.plan_id for p in plans):
                own.append(gen)  # finished in this batch before an interruption: decode again
        if not todo:
            continue
        if len(own) == len(batch.generations):
            out.append(batch)
        else:
            out.append(Batch(batch.index, batch.variant, tuple(own), plan=batch.plan_id))
    return out


def plan_batches(datasets: Sequence[Dataset], preferences: Sequence[str], variants: Sequence[MethodVariant], batch_size: int) -> list[Batch]:
    """The deterministic list of batches of a grid (variant-major, then preference, dataset, prompt)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PrefalignError(f"batch size must be an integer ≥ 1, got {batch_size!r}", field="batch_size")
    batches: list[Batch] = []
    for variant in variants:
        gens: list[Generation] = []
        if variant.needs_preference:
            for pref in preferences:
                for ds in datasets:
                    for item in ds.items:
                        cell = Cell(ds.name, item.id, item.prompt, pref, variant)
                        gens.append(Generation(ds.name, item.id, item.prompt, pref, variant, (cell,)))
        else:
            # One answer per prompt, one row per preference (each scored by its own judge).
            for ds in datasets:
                for item in ds.items:
                    cells = tuple(Cell(ds.name, item.id, item.prompt, pref, variant) for pref in preferences)
                    gens.append(Generation(ds.name, item.id, item.prompt, None, variant, cells))
        for start in range(0, len(gens), batch_size):
            batches.append(Batch(len(batches), variant, tuple(gens[start:start + batch_size])))
    return batches
