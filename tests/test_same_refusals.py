"""The same bad input is refused the same way by every face: the Python API, the CLI
(before any model loads), chat's ``/param``, the server and ``eval``: the same field and
the same message (the server speaks of ``max_tokens`` where the core says
``max_new_tokens``), because one object checks each setting (:class:`prefalign.spec.RequestSpec`
for what needs no model, :meth:`prefalign.Aligner.prepare` for what does)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from prefalign import Aligner
from prefalign.cli import app
from prefalign.errors import PrefalignError

pytest.importorskip("uvicorn")
from prefalign.server import create_app  # noqa: E402
from test_server import CHAT, LiveServer  # noqa: E402

#: The prompt every face sends (the context window's message counts its tokens).
PROMPT = CHAT[0]["content"]
#: The CLI's arguments for the API's defaults below (amulet with one preference).
AMULET = ["-p", "concise", "--method", "amulet"]


@dataclass
class Case:
    """One bad field, as each face spells it (None: that face has no way to say it)."""

    name: str
    api: dict[str, Any]
    field: str
    cli: list[str] | None = None
    server: dict[str, Any] | None = None
    param: str | None = None  # the server's name for the field
    chat: str | None = None  # chat's /param argument
    eval: dict[str, Any] | None = None  # EvalConfig fields
    eval_cli: list[str] | None = None  # `prefalign eval` arguments
    loads: bool = False  # model-dependent: the CLI loads the model first

    @property
    def id(self) -> str:
        return self.name


CASES = [
    Case("unknown method", {"method": "amulett"}, "method", ["-p", "concise", "--method", "amulett"],
         {"alignment": {"method": "amulett"}}, "alignment.method", eval={"methods": ["amulett"]},
         eval_cli=["--methods", "amulett"]),
    Case("needs a preference", {"preference": None}, "preference", ["--method", "amulet"],
         {"preference": None, "alignment": {"method": "amulet"}}, "preference"),
    Case("unknown template", {"template": "amulett"}, "template", [*AMULET, "--template", "amulett"],
         {"alignment": {"method": "amulet", "template": "amulett"}}, "alignment.template", eval={"template": "amulett"},
         eval_cli=["--template", "amulett"]),
    Case("seed out of range", {"seed": 2**64, "temperature": 0.5}, "seed", [*AMULET, "--seed", str(2**64), "-t", "0.5"],
         {"seed": 2**64, "temperature": 0.5}, "seed"),
    Case("non-finite weight", {"preference": [("concise", float("inf"))]}, "preference", [*AMULET, "--weight", "inf"]),
    Case("zero weight", {"preference": [("concise", 1.0), ("formal", 0.0)]}, "preference",
         [*AMULET, "-p", "formal", "--weight", "1", "--weight", "0"],
         {"preference": [{"text": "concise", "weight": 1.0}, {"text": "formal", "weight": 0.0}]}, "preference"),
    Case("amulet lambda 0", {"lam": 0.0}, "lam", [*AMULET, "-P", "lam=0"],
         {"alignment": {"method": "amulet", "lam": 0.0}}, "alignment.lam", chat="lam=0", eval={"sweeps": ["amulet.lam=0"]},
         eval_cli=["--sweep", "amulet.lam=0"]),
    Case("unknown method parameter", {"alpah": 1.0}, "alpah", [*AMULET, "-P", "alpah=1.0"],
         {"alignment": {"method": "amulet", "alpah": 1.0}}, "alignment.alpah", chat="alpah=1.0"),
    Case("max_new_tokens 0", {"max_new_tokens": 0}, "max_new_tokens", [*AMULET, "-n", "0"], {"max_tokens": 0}, "max_tokens",
         eval={"max_new_tokens": 0}, eval_cli=["-n", "0"]),
    Case("repetition_penalty 0", {"repetition_penalty": 0.0}, "repetition_penalty", [*AMULET, "-P", "repetition_penalty=0.0"],
         {"repetition_penalty": 0.0}, "repetition_penalty", chat="repetition_penalty=0.0",
         eval={"sweeps": ["amulet.repetition_penalty=0.0"]}, eval_cli=["--sweep", "amulet.repetition_penalty=0.0"]),
    Case("frequency_penalty 3", {"frequency_penalty": 3.0}, "frequency_penalty", [*AMULET, "-P", "frequency_penalty=3.0"],
         {"frequency_penalty": 3.0}, "frequency_penalty", chat="frequency_penalty=3.0"),
    Case("presence_penalty -3", {"presence_penalty": -3.0}, "presence_penalty", [*AMULET, "-P", "presence_penalty=-3.0"],
         {"presence_penalty": -3.0}, "presence_penalty", chat="presence_penalty=-3.0"),
    Case("n 0", {"n": 0}, "n", server={"n": 0}, param="n"),
    Case("top_logprobs too many", {"logprobs": True, "top_logprobs": 1000}, "top_logprobs",
         server={"logprobs": True, "top_logprobs": 1000}, param="top_logprobs"),
    Case("beam with sampling", {"method": "beam", "temperature": 0.7}, "temperature",
         ["-p", "concise", "--method", "beam", "-t", "0.7"], {"alignment": {"method": "beam"}, "temperature": 0.7}, "temperature"),
    Case("context window", {"max_new_tokens": 1000}, "max_new_tokens", [*AMULET, "-n", "1000"], {"max_tokens": 1000},
         "max_tokens", loads=True),
    Case("pad without a PRM", {"method": "pad"}, "prm", ["-p", "concise", "--method", "pad", "-m", "tiny"],
         {"alignment": {"method": "pad"}}, "prm"),
]


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tiny_al(tokenizer):
    from conftest import _tiny_llama

    model = _tiny_llama(len(tokenizer), max_positions=512)
    model.config.name_or_path = "tiny"  # the name the CLI's -m gives: PAD's PRM message names the policy
    return Aligner(model, tokenizer)


@pytest.fixture(scope="module")
def server(tiny_al):
    with LiveServer(create_app(Aligner(tiny_al.model, tiny_al.tokenizer), model_id="tiny")) as live:
        yield live


def api_error(al: Aligner, kwargs: dict) -> PrefalignError:
    call = {"preference": "concise", "method": "amulet", "max_new_tokens": 4, **kwargs}
    with pytest.raises(PrefalignError) as info:
        al.generate(PROMPT, **call)
    with pytest.raises(PrefalignError) as streamed:  # stream refuses at the call, as generate
        al.stream(PROMPT, **call)
    assert str(streamed.value) == str(info.value)
    return info.value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_face_refuses_alike(tiny_al, server, monkeypatch, tmp_path, case):
    error = api_error(tiny_al, case.api)
    message = str(error)
    assert error.field == case.field, message

    if case.cli is not None:  # refused before any model loads (loading fails the test) unless it needs the model
        import prefalign.aligner

        load = (lambda *a, **k: tiny_al) if case.loads else (lambda *a, **k: pytest.fail("the CLI loaded a model"))
        monkeypatch.setattr(prefalign.aligner.Aligner, "from_pretrained", classmethod(load))
        result = CliRunner().invoke(app, ["generate", PROMPT, "--no-stream", *case.cli], env={"COLUMNS": "400"})
        assert result.exit_code == 2, result.output
        assert _flat(message) in _flat(result.output)

    if case.chat is not None:
        import prefalign.aligner
        import prefalign.cli

        monkeypatch.setattr(prefalign.aligner.Aligner, "from_pretrained", classmethod(lambda *a, **k: tiny_al))
        lines = iter([f"/param {case.chat}", "/quit"])
        monkeypatch.setattr(prefalign.cli, "_read_line", lambda: next(lines))
        monkeypatch.setattr(prefalign.cli, "_enable_line_editing", lambda: None)
        result = CliRunner().invoke(app, ["chat", *AMULET], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        assert _flat(message) in _flat(result.output)

    if case.server is not None:
        sent = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0, "preference": "concise", **case.server}
        response = httpx.post(server.url + "/v1/chat/completions", json=sent, timeout=30)
        assert response.status_code == 400, response.text
        reply = response.json()["error"]
        assert reply["param"] == case.param
        assert reply["message"] == message.replace("max_new_tokens", "max_tokens")

    if case.eval is not None:
        from prefalign.eval.runner import EvalConfig, run_eval

        settings = {"datasets": [str(tmp_path / "none.json")], "preferences": ["concise"], "methods": ["amulet"], **case.eval}
        with pytest.raises(PrefalignError) as info:
            run_eval(EvalConfig(**settings), tmp_path / "out", progress=False, report=False)
        assert info.value.field == case.field
        assert str(info.value) == message

    if case.eval_cli is not None:  # `prefalign eval`, before any model loads
        import prefalign.eval.runner

        monkeypatch.setattr(prefalign.eval.runner, "_load_aligner", lambda *a, **k: pytest.fail("eval loaded a model"))
        data = tmp_path / "prompts.json"
        data.write_text('["hi"]')
        args = ["eval", "-d", str(data), "-p", "concise", "--methods", "amulet", "-o", str(tmp_path / "cli"), *case.eval_cli]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == 2, result.output
        assert _flat(message) in _flat(result.output)


def test_a_bad_backend_is_refused_alike_before_loading(monkeypatch):
    with pytest.raises(PrefalignError) as info:
        Aligner.from_pretrained(backend="llama")  # checked before anything loads
    assert info.value.field == "backend"

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("prefalign.aligner.Aligner.from_pretrained", refuse)
    monkeypatch.setattr("prefalign.aligner.load_model", refuse)
    result = CliRunner().invoke(app, ["generate", "hi", "--backend", "llama"], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert _flat(str(info.value)) in _flat(result.output)
    from prefalign.eval.runner import EvalConfig, run_eval

    with pytest.raises(PrefalignError) as evaluated:
        run_eval(EvalConfig(datasets=["x.json"], preferences=["concise"], methods=["base"], model_backend="llama"), "unused")
    assert (evaluated.value.field, str(evaluated.value)) == ("backend", str(info.value))
