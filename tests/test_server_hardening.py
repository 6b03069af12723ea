"""A bad or huge request never hurts anyone else: checks at the door, fault isolation, bodies.

Loopback only: every server here is uvicorn in a thread on 127.0.0.1 with a tiny model.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prefalign import Aligner  # noqa: E402
from prefalign.methods import METHODS, register  # noqa: E402
from prefalign.server import create_app  # noqa: E402
from conftest import exploding_method  # noqa: E402
from test_server import CHAT, OK_BODY, LiveServer  # noqa: E402

URL = "/v1/chat/completions"


def strict_json(text: str | bytes) -> Any:
    """Parse as strict JSON: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {name} in a response")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from conftest import _tiny_llama

    return _tiny_llama(len(tokenizer), max_positions=2048)


@pytest.fixture(scope="module")
def strict(tiny, tokenizer):
    """Small limits: a prompt cap of 300 tokens, a 1 s body timeout, at most 8 new tokens."""
    app = create_app(Aligner(tiny, tokenizer), model_id="tiny", max_prompt_tokens=300, body_timeout=1.0, max_tokens_cap=8, prefill_chunk=32)
    with LiveServer(app) as server:
        yield server


def post(server: LiveServer, body: Any = None, *, raw: bytes | None = None, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + URL, content=content, headers=headers, timeout=30)


def healthy(server: LiveServer) -> None:
    response = post(server, OK_BODY)
    assert response.status_code == 200, response.text
    assert server.health()["status"] == "ok"


# --- checks at the door --------------------------------------------------------------------

SURROGATE = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'

DOOR = [
    # (name, body changes or raw bytes, content type, status, param, code)
    ("seed too large", {"seed": 2**64}, "application/json", 400, "seed", "invalid_value"),
    ("seed too small", {"seed": -(2**63) - 1}, "application/json", 400, "seed", "invalid_value"),
    ("weight zero", {"preference": [{"text": "Be brief.", "weight": 0}]}, "application/json", 400, "preference", "invalid_value"),
    ("weight Infinity", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "preference": [{"text": "Be brief.", "weight": Infinity}]}', "application/json", 400, None, "invalid_json"),
    ("NaN temperature", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "application/json", 400, None, "invalid_json"),
    ("lone surrogate", SURROGATE, "application/json", 400, "messages.0.content", "invalid_value"),
    ("surrogate in preference", {"preference": "Be brief \ud800 please."}, "application/json", 400, "preference", "invalid_value"),
    ("text/plain body", OK_BODY, "text/plain", 415, None, "unsupported_media_type"),
    ("form body", OK_BODY, "application/x-www-form-urlencoded", 415, None, "unsupported_media_type"),
    ("no content type", OK_BODY, None, 415, None, "unsupported_media_type"),
    ("text over the character cap", {"messages": [{"role": "user", "content": "a" * 5000}]}, "application/json", 400, "messages", "context_length_exceeded"),
    ("prompt over the token cap", {"messages": [{"role": "user", "content": "word " * 400}]}, "application/json", 400, "messages", "context_length_exceeded"),
    ("prompt over the cap counted over contexts", {"messages": [{"role": "user", "content": "word " * 160}], "preference": "concise", "alignment": {"method": "amulet"}}, "application/json", 400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize("name,changes,content_type,status,param,code", DOOR, ids=[d[0] for d in DOOR])
def test_refused_at_the_door(strict, name, changes, content_type, status, param, code):
    if isinstance(changes, bytes):
        response = post(strict, raw=changes, content_type=content_type)
    else:
        body = {**OK_BODY, **changes}
        raw = json.dumps(body, ensure_ascii=True).encode() if "surrogate" not in name else json.dumps(body).encode("utf-8", "surrogatepass")
        response = post(strict, raw=raw, content_type=content_type)
    assert response.status_code == status, response.text
    error = strict_json(response.text)["error"]
    assert error["code"] == code and error["param"] == param and error["message"]
    healthy(strict)


def test_a_short_prompt_under_the_caps_is_served(strict):
    response = post(strict, {**OK_BODY, "messages": [{"role": "user", "content": "word " * 90}]})
    assert response.status_code == 200


def test_rendering_and_tokenising_run_off_the_event_loop(strict):
    aligner = strict.aligner
    seen: list[str] = []
    original = aligner.prepare  # renders and tokenises the contexts

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    aligner.prepare = spy
    try:
        assert post(strict, OK_BODY).status_code == 200
    finally:
        del aligner.prepare
    assert seen and all(name.startswith("prefalign-prepare") for name in seen)


# --- bodies -------------------------------------------------------------------------------


def _send_partial(server: LiveServer, *, close: bool) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b'{"messages": ['
        )
        if close:
            return b""
        sock.settimeout(15)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def test_a_client_leaving_mid_body_gets_no_500_and_no_traceback(strict, caplog):
    before = strict.health()["stats"]
    with caplog.at_level(logging.DEBUG):
        for _ in range(20):
            _send_partial(strict, close=True)
        time.sleep(0.5)
        healthy(strict)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    assert not any(r.exc_info for r in caplog.records)
    assert sum("before sending its whole body" in r.getMessage() for r in caplog.records) <= 20
    assert strict.health()["stats"]["failed"] == before["failed"]


def test_a_body_that_never_arrives_times_out_with_408(strict):
    reply = _send_partial(strict, close=False)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert b"request_timeout" in reply
    healthy(strict)


# --- a request that fails in the engine fails alone ---------------------------------------


Explodes = exploding_method("explodes-test")


@pytest.fixture
def explodes():
    register(Explodes)
    yield Explodes.name
    del METHODS[Explodes.name]


def _good_stream(server: LiveServer, prompt: str) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0,
            "stream": True, "ignore_eos": True, "preference": "concise", "alignment": {"method": "amulet"}}
    text = ""
    with httpx.stream("POST", server.url + URL, json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = strict_json(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_poison_inputs_while_four_streams_run(tiny, tokenizer, explodes):
    reference = Aligner(tiny, tokenizer)
    prompts = [f"Tell me a story about the number {i}." for i in range(4)]
    expected = [reference.generate(p, preference="concise", method="amulet", max_new_tokens=40, ignore_eos=True)[0].text for p in prompts]
    app = create_app(Aligner(tiny, tokenizer), model_id="tiny", max_tokens_cap=64, prefill_chunk=16)
    poison = [
        {**OK_BODY, "seed": 2**64, "temperature": 0.5},
        {**OK_BODY, "preference": [{"text": "Be brief.", "weight": 0}, {"text": "Be kind.", "weight": 1}]},
        {**OK_BODY, "max_tokens": 0},
        {**OK_BODY, "alignment": {"method": explodes}},
        {**OK_BODY, "messages": [{"role": "user", "content": "long " * 1500}]},  # legal, long: prefilled in chunks
    ]
    # Weights however far apart are valid (scaled by the request): they decode, every method.
    extreme = [
        {**OK_BODY, "preference": [{"text": "Be brief.", "weight": w1}, {"text": "Be kind.", "weight": w2}], "alignment": {"method": m}}
        for m in ("pref", "la", "amulet") for w1, w2 in ((1e300, 1.0), (1e308, 1e308), (5e-324, 1.0))
    ]
    with LiveServer(app) as server, ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_good_stream, server, p) for p in prompts]
        time.sleep(0.3)
        statuses = [post(server, body).status_code for body in poison]
        assert statuses[:3] == [400, 400, 400]
        assert statuses[3] == 500 and statuses[4] == 200
        for body in extreme:
            response = post(server, body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert [f.result(timeout=120) for f in streams] == expected
        failed = post(server, {**OK_BODY, "alignment": {"method": explodes}})
        error = failed.json()["error"]
        assert error["code"] == "request_failed" and "overflow" in error["message"]
        assert failed.json()["error"]["message"].startswith("request ")
        assert server.health()["stats"]["engine_resets"] == 0
        healthy(server)


# --- fuzzing the request schema -----------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(min_value=-1e-300, max_value=1e-300),
    st.text(max_size=30), st.sampled_from(["concise", "amulet", "la", "pad", "beam", "base", "pref", "", "\ud800", "user", "system"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
messages = st.one_of(
    values,
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]), "content": values}), max_size=3),
    st.just(CHAT),
)
alignment = st.one_of(
    values,
    st.fixed_dictionaries({"method": st.sampled_from(["amulet", "la", "pref", "base", "beam", "pad", "nope"])},
                          optional={"alpha": values, "lambda": values, "ratio": values, "width": values, "iterations": values, "plausibility": values, "exact": values, "template": values}),
)
FIELDS = {
    "model": st.one_of(st.just("tiny"), values), "messages": messages, "max_tokens": values, "max_completion_tokens": values,
    "temperature": values, "top_p": values, "top_k": values, "seed": values, "stop": values, "stream": st.booleans(),
    "n": values, "preference": st.one_of(values, st.lists(st.fixed_dictionaries({"text": values, "weight": values}), max_size=3)),
    "alignment": alignment, "ignore_eos": values, "logprobs": values, "frequency_penalty": values, "user": values,
    "stream_options": values, "response_format": values, "bogus": values,
}
junk_bodies = st.fixed_dictionaries({"messages": messages}, optional={k: v for k, v in FIELDS.items() if k != "messages"})

# Bodies of the right types with values at and past every limit: these reach the
# method, preference and sampling checks (junk bodies mostly stop at the schema).
numbers = st.one_of(
    st.integers(min_value=-3, max_value=12), st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(min_value=-2, max_value=5), st.sampled_from([0.0, 1e-300, 1e-5, 1e-4, 1e300, -1e300, 5e-324]),
)
integers = st.one_of(st.integers(min_value=-3, max_value=12), st.integers(min_value=-(2**65), max_value=2**65))
texts = st.one_of(st.sampled_from(["concise", "formal", "psoups:expert", "pad:humor", "Answer like a pirate.", "", " ", "concize", "\ud800"]), st.text(max_size=40))
plausible_alignment = st.fixed_dictionaries(
    {"method": st.sampled_from(["amulet", "la", "pref", "base", "beam"])},
    optional={"alpha": numbers, "lambda": numbers, "eta": numbers, "iterations": numbers, "ratio": numbers, "width": numbers,
              "length_penalty": numbers, "plausibility": numbers, "exact": st.booleans(), "template": st.sampled_from(["default", "amulet", "pad", "plain", "x"])},
)
plausible_bodies = st.fixed_dictionaries(
    {"model": st.just("tiny"), "messages": st.one_of(st.just(CHAT), st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]), "content": texts}), min_size=1, max_size=3))},
    optional={
        "max_tokens": integers, "temperature": st.one_of(numbers, st.floats(min_value=0, max_value=2)), "top_p": numbers, "top_k": st.integers(min_value=-2, max_value=2**40),
        "seed": integers, "stop": st.one_of(texts, st.lists(texts, max_size=6)), "stream": st.booleans(),
        "preference": st.one_of(texts, st.lists(st.one_of(texts, st.fixed_dictionaries({"text": texts, "weight": numbers})), max_size=10)),
        "alignment": plausible_alignment, "ignore_eos": st.booleans(),
    },
)
bodies = st.one_of(plausible_bodies, plausible_bodies, plausible_bodies, junk_bodies)


@pytest.fixture(scope="module")
def fuzz_server(tiny, tokenizer):
    app = create_app(Aligner(tiny, tokenizer), model_id="tiny", max_tokens_cap=4, max_prompt_tokens=2000, prefill_chunk=64)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        server.http = http
        yield server


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_bodies_never_get_a_server_error(fuzz_server, body):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    response = fuzz_server.http.post(URL, content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                strict_json(line[6:])
    else:
        payload = strict_json(response.text)
        assert ("error" in payload) == (response.status_code >= 400)


def test_after_fuzzing_the_server_is_healthy(fuzz_server):
    assert fuzz_server.health()["status"] == "ok"
    assert fuzz_server.health()["stats"]["engine_resets"] == 0
    assert post(fuzz_server, OK_BODY).status_code == 200
