"""The same bad input is refused the same way by the Python API, the CLI and the server:
the same field and the same message (the server speaks of ``max_tokens`` where the core
says ``max_new_tokens``), because one object checks each setting."""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from prefalign import Aligner
from prefalign.cli import app
from prefalign.errors import PrefalignError

pytest.importorskip("uvicorn")
from prefalign.server import create_app  # noqa: E402
from test_server import CHAT, LiveServer  # noqa: E402

#: (case, API kwargs, CLI arguments, server body changes, server param)
CASES = [
    ("seed out of range", {"seed": 2**64, "temperature": 0.5}, ["--seed", str(2**64), "-t", "0.5"], {"seed": 2**64, "temperature": 0.5}, "seed"),
    ("non-finite weight", {"preference": [("concise", float("inf"))]}, ["--weight", "inf"], None, "preference"),
    ("zero weight", {"preference": [("concise", 1.0), ("formal", 0.0)]}, ["-p", "formal", "--weight", "1", "--weight", "0"],
     {"preference": [{"text": "concise", "weight": 1.0}, {"text": "formal", "weight": 0.0}]}, "preference"),
    ("amulet lambda 0", {"lam": 0.0}, ["-P", "lam=0"], {"alignment": {"method": "amulet", "lam": 0.0}}, "alignment.lam"),
    ("max_new_tokens 0", {"max_new_tokens": 0}, ["-n", "0"], {"max_tokens": 0}, "max_tokens"),
]


@pytest.fixture(scope="module")
def tiny_al(tokenizer):
    from conftest import _tiny_llama

    return Aligner(_tiny_llama(len(tokenizer), max_positions=2048), tokenizer)


@pytest.fixture(scope="module")
def server(tiny_al):
    with LiveServer(create_app(Aligner(tiny_al.model, tiny_al.tokenizer), model_id="tiny")) as live:
        yield live


def api_error(al: Aligner, kwargs: dict) -> PrefalignError:
    call = {"preference": "concise", "method": "amulet", "max_new_tokens": 4, **kwargs}
    with pytest.raises(PrefalignError) as info:
        al.generate("hi", **call)
    return info.value


@pytest.mark.parametrize("case,api,cli,body,param", CASES, ids=[c[0] for c in CASES])
def test_api_cli_and_server_refuse_alike(tiny_al, server, monkeypatch, case, api, cli, body, param):
    error = api_error(tiny_al, api)
    message = str(error)

    # CLI: refused before any model loads (loading fails the test).
    import prefalign.aligner

    monkeypatch.setattr(prefalign.aligner.Aligner, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("the CLI loaded a model")))
    result = CliRunner().invoke(app, ["generate", "hi", "-p", "concise", "--method", "amulet", *cli], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert " ".join(message.split()) in " ".join(result.output.split())

    if body is None:  # JSON has no Infinity: refused as invalid JSON (tests/test_server_hardening.py)
        return
    sent = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0, "preference": "concise", **body}
    response = httpx.post(server.url + "/v1/chat/completions", json=sent, timeout=30)
    assert response.status_code == 400
    reply = response.json()["error"]
    assert reply["param"] == param
    assert reply["message"] == message.replace("max_new_tokens", "max_tokens")
