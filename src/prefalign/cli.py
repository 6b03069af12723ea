"""Command line: ``prefalign generate | chat | methods | demo | bench | serve | eval | report | train-prm | make-pairs``."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import PrefalignError

app = typer.Typer(
    help="Personalised alignment at decoding time (Amulet, PAD, Linear Alignment) for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)


def _parse_params(params: list[str]) -> dict[str, Any]:
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


def _preferences(preference: list[str], weight: list[float]) -> Any:
    if not preference:
        return None
    if weight and len(weight) != len(preference):
        raise PrefalignError("give one --weight per --preference (or none)", field="weight")
    if len(preference) == 1 and not weight:
        return preference[0]
    return [(p, w) for p, w in zip(preference, weight or [1.0] * len(preference))]


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _load(model: Optional[str], fast: str, threads: Optional[int]):
    from .aligner import Aligner

    try:
        if fast not in ("auto", "bf16", "off"):
            raise PrefalignError(f"--fast must be auto, bf16 or off, got {fast!r}", field="fast")
        with err_console.status(f"loading {model or 'the embedded model'}…"):
            return Aligner.from_pretrained(model, fast=False if fast == "off" else fast, threads=threads)
    except PrefalignError as exc:
        _fail(exc)


ModelOpt = typer.Option(None, "--model", "-m", help="Model: local dir, .gguf file or hub id (default: embedded SmolLM2-135M).")
FastOpt = typer.Option(
    "auto", "--fast",
    help="CPU fast path: auto (prepacked fp32 oneDNN weights, greedy tokens unchanged), bf16 (faster, may change tokens at near-ties), off.",
)
ThreadsOpt = typer.Option(1, "--threads", help="torch intra-op threads (1: measured no slower than 2 here, and robust when the CPU is shared).")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user's message."),
    preference: list[str] = typer.Option([], "--preference", "-p", help="Preset name or sentence; repeat to compose."),
    weight: list[float] = typer.Option([], "--weight", help="Weight of each --preference, in order."),
    method: str = typer.Option("amulet", "--method", help="base, pref, beam, la, amulet, pad (see `prefalign methods`)."),
    param: list[str] = typer.Option([], "--param", "-P", help="Method parameter key=value, e.g. alpha=2 (repeatable)."),
    w: Optional[float] = typer.Option(None, "--w", help="PAD reward weight (same as --param w=...)."),
    prm: Optional[str] = typer.Option(None, "--prm", help="PAD: path of a personalised reward model directory."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt of your own."),
    template: Optional[str] = typer.Option(None, "--template", help="default, amulet, pad or plain."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with text, tokens, finish reason, usage."),
    model: Optional[str] = ModelOpt,
    fast: str = FastOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Answer one prompt under a preference."""
    try:
        params = _parse_params(param)
        if w is not None:
            params["w"] = w
        chat: Any = prompt if system is None else [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        aligner = _load(model, fast, threads)
        if prm is not None:
            aligner.load_prm(prm)  # type: ignore[attr-defined]
        kwargs = dict(
            max_new_tokens=max_new_tokens, template=template, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop=stop or None, **params,
        )
        prefs = _preferences(preference, weight)
        if as_json or not stream:
            result = aligner.generate(chat, preference=prefs, method=method, **kwargs)[0]
            if as_json:
                print(json.dumps({
                    "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                    "usage": result.usage.as_dict(), "seconds": round(result.seconds, 3), "method": method,
                    "params": aligner.build_request(chat, prefs, method, **kwargs).method.params(),
                }, ensure_ascii=False))
            else:
                print(result.text)
            return
        for event in aligner.stream(chat, preference=prefs, method=method, **kwargs):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.finish_reason:
                sys.stdout.write("\n")
                if event.usage:
                    err_console.print(f"[dim]{event.finish_reason} · {event.usage.completion_tokens} tokens · {event.usage.forward_passes} forward passes[/]")
    except PrefalignError as exc:
        _fail(exc)


@app.command()
def chat(
    preference: list[str] = typer.Option([], "--preference", "-p", help="Starting preference (change with /pref)."),
    method: str = typer.Option("amulet", "--method"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    model: Optional[str] = ModelOpt,
    fast: str = FastOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Interactive chat; /pref TEXT, /method NAME, /param k=v, /reset, /help, /quit."""
    from .methods import make_method

    aligner = _load(model, fast, threads)
    prefs: Any = _preferences(preference, [])
    params: dict[str, Any] = {}
    history: list[dict[str, str]] = []
    console.print(f"[bold]prefalign chat[/] · method [cyan]{method}[/] · preference [magenta]{prefs or '(none)'}[/] · /help for commands")
    while True:
        try:
            line = console.input("[bold green]you> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line[1:].partition(" ")
            arg = arg.strip()
            try:
                if command in ("quit", "exit", "q"):
                    return
                if command == "help":
                    console.print("/pref TEXT|none · /method NAME · /param key=value · /reset · /quit")
                elif command == "pref":
                    prefs = None if arg in ("", "none") else arg
                    from .prompts import parse_preferences

                    parse_preferences(prefs)
                    console.print(f"preference: [magenta]{prefs or '(none)'}[/]")
                elif command == "method":
                    make_method(arg)
                    method, params = arg, {}
                    console.print(f"method: [cyan]{method}[/]")
                elif command == "param":
                    params.update(_parse_params([arg]))
                    make_method(method, **params)
                    console.print(f"params: {params}")
                elif command == "reset":
                    history = []
                    console.print("conversation cleared")
                else:
                    console.print(f"[red]unknown command /{command}[/] (try /help)")
            except PrefalignError as exc:
                params = {}
                console.print(f"[red]{exc}[/]")
            continue
        history.append({"role": "user", "content": line})
        answer = ""
        try:
            for event in aligner.stream(history, preference=prefs, method=method, max_new_tokens=max_new_tokens, temperature=temperature, **params):
                answer += event.text
                console.print(event.text, end="", markup=False, highlight=False)
            console.print()
            history.append({"role": "assistant", "content": answer})
        except KeyboardInterrupt:
            console.print("\n[dim](interrupted)[/]")
            history.pop()
        except PrefalignError as exc:
            history.pop()
            console.print(f"[red]{exc}[/]")


@app.command()
def methods(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the methods and their parameters (paper defaults)."""
    from .methods import METHODS

    rows = []
    for name, cls in sorted(METHODS.items()):
        fields = [(f.name, f.default) for f in dataclasses.fields(cls)]
        rows.append({"method": name, "summary": cls.summary, "needs_preference": cls.needs_preference, "params": dict(fields)})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="prefalign methods")
    table.add_column("method", style="cyan")
    table.add_column("what it does")
    table.add_column("parameters (defaults)")
    for row in rows:
        table.add_row(row["method"], row["summary"], ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "—")
    console.print(table)


@app.command()
def demo(
    limit: int = typer.Option(3, "--prompts", help="How many prompts."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", "-n"),
    model: Optional[str] = ModelOpt,
    fast: str = FastOpt,
    threads: Optional[int] = typer.Option(1, "--threads"),
) -> None:
    """Answer a few prompts under contrasting preferences with several methods, side by side."""
    from .demo import run_demo

    run_demo(_load(model, fast, threads), limit=limit, max_new_tokens=max_new_tokens, console=console)


@app.command()
def bench(
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    batch: list[int] = typer.Option([1, 8], "--batch", help="Batch sizes (repeatable)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer tokens and repetitions (a smoke run)."),
    out: Optional[str] = typer.Option(None, "--out", help="JSON results path (default benchmarks/results/decode_speed.json)."),
    markdown: Optional[str] = typer.Option(None, "--markdown", help="Also write the table into this markdown file."),
    threads: int = typer.Option(1, "--threads"),
) -> None:
    """Decode-speed benchmark on the embedded model (tokens/s per method, vs transformers and the uncached loop)."""
    from .bench import run_decode_benchmark

    run_decode_benchmark(max_new_tokens=max_new_tokens, batch_sizes=batch, quick=quick, out=out, markdown=markdown, threads=threads, console=console)


def _register_subsystems() -> None:
    """Commands whose code lives with its subsystem (server, evaluation, PRM training)."""
    from .eval.cli import eval_command, judge_command, report_command
    from .prm.cli import make_pairs, train_prm
    from .server.cli import serve

    app.command("serve")(serve)
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    app.command("judge")(judge_command)
    app.command("train-prm")(train_prm)
    app.command("make-pairs")(make_pairs)


_register_subsystems()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
