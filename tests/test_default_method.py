"""One default policy on every face (issue #23): a request that names no method is
answered with ``base`` without a preference and ``pref`` with one, by the Python API,
the CLI, chat and the server alike (:func:`prefalign.rules.choose_method`)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from prefalign import Aligner
from prefalign.cli import app
from prefalign.errors import PrefalignError
from prefalign.rules import DEFAULT_METHOD_WITH_PREFERENCE, DEFAULT_METHOD_WITHOUT_PREFERENCE, choose_method

PROMPT = "Why is the sky blue?"
#: (case, preference or None, the method the default policy picks)
CASES = [("no preference", None, "base"), ("a preference", "concise", "pref")]


@pytest.fixture(scope="module")
def tiny_al(tokenizer):
    from conftest import _tiny_llama

    return Aligner(_tiny_llama(len(tokenizer), max_positions=2048), tokenizer)


@pytest.fixture
def cli_loads_tiny(monkeypatch, tiny_al):
    """The CLI loads the tiny model instead of reading one from disk."""
    import prefalign.aligner

    monkeypatch.setattr(prefalign.aligner.Aligner, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_al))
    return tiny_al


def test_the_rule():
    assert (DEFAULT_METHOD_WITHOUT_PREFERENCE, DEFAULT_METHOD_WITH_PREFERENCE) == ("base", "pref")
    assert choose_method(None, None) == "base"
    assert choose_method(None, []) == "base"
    assert choose_method(None, "") == "base"
    assert choose_method(None, "concise") == "pref"
    assert choose_method(None, [("concise", 1.0), ("formal", 2.0)]) == "pref"
    assert choose_method("amulet", None) == "amulet"  # a named method is kept (and checked later)
    assert choose_method(None, "concise", "amulet") == "amulet"  # a server's --default-method replaces pref
    assert choose_method(None, None, "amulet") == "base"  # ... but never base


@pytest.mark.parametrize("case,preference,expected", CASES, ids=[c[0] for c in CASES])
def test_api_default(tiny_al, case, preference, expected):
    got = tiny_al.generate(PROMPT, preference=preference, max_new_tokens=6)[0]
    named = tiny_al.generate(PROMPT, preference=preference, method=expected, max_new_tokens=6)[0]
    assert got.token_ids == named.token_ids
    assert tiny_al.build_request(PROMPT, preference).method.name == expected
    streamed = [e.token_ids for e in tiny_al.stream(PROMPT, preference=preference, max_new_tokens=6)]
    assert [t for ids in streamed for t in ids] == named.token_ids


def test_api_plainest_call_answers(tiny_al):
    # Issue #23: this raised "method 'amulet' needs a preference".
    out = tiny_al.generate(PROMPT, max_new_tokens=3)
    assert len(out) == 1 and out[0].finish_reason in ("stop", "length")


def test_api_stream_of_nothing_raises_like_generate(tiny_al):
    for call in (tiny_al.generate, tiny_al.stream):
        with pytest.raises(PrefalignError) as info:
            call([])
        assert info.value.field == "prompt"


@pytest.mark.parametrize("case,preference,expected", CASES, ids=[c[0] for c in CASES])
def test_cli_default(cli_loads_tiny, case, preference, expected):
    args = ["generate", PROMPT, "-n", "6", "--json", "--fast", "off"] + (["-p", preference] if preference else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["method"] == expected
    named = cli_loads_tiny.generate(PROMPT, preference=preference, method=expected, max_new_tokens=6)[0]
    assert data["token_ids"] == named.token_ids


def test_chat_default_follows_the_preference(cli_loads_tiny):
    script = "/method\n/pref concise\n/method\n/pref none\n/method\n/quit\n"
    result = CliRunner().invoke(app, ["chat", "--fast", "off", "-n", "2"], input=script)
    assert result.exit_code == 0, result.output
    shown = re.findall(r"method: ([a-z]+(?: \(default\))?)", result.output)
    assert shown == ["base (default)", "pref (default)", "base (default)"]


def test_chat_method_is_checked_once(cli_loads_tiny, monkeypatch):
    import prefalign.cli

    calls = []
    original = prefalign.cli.check_request
    monkeypatch.setattr(prefalign.cli, "check_request", lambda **kw: calls.append(kw["method"]) or original(**kw))
    result = CliRunner().invoke(app, ["chat", "--fast", "off", "-n", "2"], input="/method la\n/quit\n")
    assert result.exit_code == 0, result.output
    assert calls[1:] == ["la"]  # the first call checks the command line


@pytest.mark.parametrize("case,preference,expected", CASES, ids=[c[0] for c in CASES])
def test_server_default(tiny_al, case, preference, expected):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from prefalign.server import create_app

    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0}
    if preference:
        body["preference"] = preference
    served = Aligner(tiny_al.model, tiny_al.tokenizer)  # the server's engine belongs to its scheduler
    with TestClient(create_app(served, model_id="tiny")) as client:
        reply = client.post("/v1/chat/completions", json=body)
        card = client.get("/v1/models").json()["data"][0]
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["alignment"]["method"] == expected
    named = tiny_al.generate(PROMPT, preference=preference, method=expected, max_new_tokens=6)[0]
    assert data["choices"][0]["message"]["content"] == named.text
    assert card["default_method"] == "pref"


def test_a_method_that_needs_a_preference_is_refused_alike(tiny_al, monkeypatch):
    """API, CLI (before any model loads) and server: one rule, one message."""
    with pytest.raises(PrefalignError) as info:
        tiny_al.generate(PROMPT, method="amulet")
    message, field = str(info.value), info.value.field
    assert field == "preference" and "needs a preference" in message

    import prefalign.aligner

    monkeypatch.setattr(prefalign.aligner.Aligner, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("the CLI loaded a model")))
    result = CliRunner().invoke(app, ["generate", PROMPT, "--method", "amulet"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and " ".join(message.split()) in " ".join(result.output.split())

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from prefalign.server import create_app

    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "alignment": {"method": "amulet"}}
    with TestClient(create_app(Aligner(tiny_al.model, tiny_al.tokenizer), model_id="tiny")) as client:
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == field and reply.json()["error"]["message"] == message
