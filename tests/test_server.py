"""``prefalign serve``: a live uvicorn server on 127.0.0.1, driven with the official client.

A tiny random Llama (with the embedded tokenizer's chat template) keeps this fast; one
test runs the embedded SmolLM2 end to end (``-m embedded``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from prefalign import Aligner  # noqa: E402
from prefalign.server import create_app  # noqa: E402
from prefalign.server.transport import ConnectionLimits, uvicorn_settings  # noqa: E402

torch.set_num_threads(1)

CHAT = [{"role": "user", "content": "How do I boil an egg?"}]
MAX_BODY = 64_000


# --- a live server --------------------------------------------------------------------


class LiveServer:
    """uvicorn in a thread on a free loopback port, the socket bound before start."""

    def __init__(self, app: Any, limits: ConnectionLimits | None = None) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        # The connection limits of `prefalign serve` (its defaults unless given).
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2, **uvicorn_settings(limits))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    @property
    def scheduler(self) -> Any:
        return self.app.state.scheduler

    @property
    def aligner(self) -> Any:
        return self.app.state.aligner

    def client(self, **kwargs: Any) -> Any:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kwargs)

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=10).json()


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from conftest import _tiny_llama

    return _tiny_llama(len(tokenizer), max_positions=2048)


@pytest.fixture(scope="module")
def reference(tiny, tokenizer) -> Aligner:
    """An aligner with its own engine: the server's engine belongs to its scheduler thread."""
    return Aligner(tiny, tokenizer)


@pytest.fixture(scope="module")
def live(tiny, tokenizer) -> Iterator[LiveServer]:
    app = create_app(Aligner(tiny, tokenizer), max_batch=16, max_queue=64, max_tokens_cap=1800, max_body_bytes=MAX_BODY, model_id="tiny")
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def still_serves(client: Any) -> None:
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


# --- answers equal the engine's ---------------------------------------------------------

CASES = {
    "base": ({}, dict(preference=None, method="base")),
    "pref-default": ({"preference": "concise"}, dict(preference="concise", method="pref")),
    "la-weighted": (
        {"preference": [{"text": "Answer like a pirate.", "weight": 2.0}, "formal"], "alignment": {"method": "la", "ratio": 1.5}},
        dict(preference=[{"text": "Answer like a pirate.", "weight": 2.0}, "formal"], method="la", ratio=1.5),
    ),
    "amulet-template": (
        {"preference": "psoups:expert", "alignment": {"method": "amulet", "alpha": 1, "lambda": 3, "template": "amulet"}},
        dict(preference="psoups:expert", method="amulet", alpha=1.0, lam=3.0, template="amulet"),
    ),
    "beam": ({"preference": "formal", "alignment": {"method": "beam", "width": 2}}, dict(preference="formal", method="beam", width=2)),
    "sampled-seed": (
        {"preference": "concise", "alignment": {"method": "amulet"}, "temperature": 0.9, "top_p": 0.9, "seed": 7},
        dict(preference="concise", method="amulet", temperature=0.9, top_p=0.9, seed=7),
    ),
}


def _create_kwargs(extra: dict[str, Any], max_tokens: int = 12) -> dict[str, Any]:
    extra = dict(extra)
    kwargs: dict[str, Any] = {"model": "tiny", "messages": CHAT, "max_tokens": max_tokens}
    for key in ("temperature", "top_p", "seed"):
        if key in extra:
            kwargs[key] = extra.pop(key)
    kwargs.setdefault("temperature", 0)
    kwargs["extra_body"] = extra
    return kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_plain_and_streamed_answers_equal_the_engine(client, reference, case):
    body, ref_kwargs = CASES[case]
    ref_kwargs = dict(ref_kwargs)
    ref_kwargs.setdefault("temperature", 0)
    expected = reference.generate(CHAT, max_new_tokens=12, **ref_kwargs)[0]

    out = client.chat.completions.create(**_create_kwargs(body))
    assert out.object == "chat.completion"
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.model_dump(exclude_none=True) == expected.usage.as_dict()
    assert out.model_extra["alignment"]["method"] == ref_kwargs["method"]

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **_create_kwargs(body)))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude_none=True) == expected.usage.as_dict()


def test_response_echoes_alignment_and_usage(client):
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, temperature=0,
        extra_body={"preference": "concise", "alignment": {"method": "amulet", "alpha": 1.5}},
    )
    extra = out.model_extra
    assert extra["alignment"] == {"method": "amulet", "template": "default", "alpha": 1.5, "lam": 2.0, "eta": 10.0,
                                  "iterations": 60, "exact": False, "plausibility": 0.0, "kl_budget": 0.5, "repeat_ngram": 3}
    assert extra["preference"][0]["name"] == "concise"
    usage = out.usage.model_dump(exclude_none=True)
    assert usage["forward_passes"] == 4 and usage["context_tokens"] > usage["prompt_tokens"] > 0
    # The echo is a valid request: sending it back gives the same answer.
    again = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, temperature=0,
        extra_body={"preference": "concise", "alignment": extra["alignment"]},
    )
    assert again.choices[0].message.content == out.choices[0].message.content


def test_stop_strings_match_the_engine(client, reference):
    free = reference.generate(CHAT, preference="concise", method="pref", max_new_tokens=24, ignore_eos=True)[0].text
    stop = free[8:11]
    assert stop.strip(), free
    expected = reference.generate(CHAT, preference="concise", method="pref", max_new_tokens=24, ignore_eos=True, stop=[stop])[0]
    kwargs = _create_kwargs({"preference": "concise", "ignore_eos": True}, max_tokens=24)
    out = client.chat.completions.create(stop=[stop], **kwargs)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected.text, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stop=[stop], stream=True, **kwargs))
    assert streamed == expected.text


def test_completions_endpoint(client, reference):
    expected = reference.generate("Name a colour.", preference="formal", method="pref", max_new_tokens=10)[0]
    out = client.completions.create(model="tiny", prompt="Name a colour.", max_tokens=10, temperature=0,
                                    extra_body={"preference": "formal", "alignment": {"method": "pref"}})
    assert out.object == "text_completion"
    assert out.choices[0].text == expected.text
    streamed = client.completions.create(model="tiny", prompt="Name a colour.", max_tokens=10, temperature=0, stream=True,
                                         extra_body={"preference": "formal", "alignment": {"method": "pref"}})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    # OpenAI's default for plain completions is 16 tokens.
    default = client.completions.create(model="tiny", prompt="Name a colour.", temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16


def test_models_and_health(live, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = live.health()
    assert health["status"] == "ok" and health["model"] == "tiny"


# --- errors: the right 4xx, OpenAI's shape, and the server keeps serving -------------------

OK_BODY = {"model": "tiny", "messages": CHAT, "max_tokens": 2, "temperature": 0}

BAD_BODIES = [
    # (name, body changes, status, param)
    ("wrong type", {"temperature": "hot"}, 422, "temperature"),
    ("wrong type nested", {"messages": [{"role": "user", "content": 5}]}, 422, "messages.0.content"),
    ("missing messages", {"messages": None}, 422, "messages"),
    ("unknown field", {"preferences": "concise"}, 400, "preferences"),
    ("unknown method", {"alignment": {"method": "amulett"}, "preference": "concise"}, 400, "alignment.method"),
    ("unknown preset", {"preference": "concize"}, 400, "preference"),
    ("unknown method parameter", {"alignment": {"method": "amulet", "beta": 1}, "preference": "concise"}, 400, "alignment.beta"),
    ("needs preference", {"alignment": {"method": "amulet"}}, 400, "preference"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("no user message", {"messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("temperature range", {"temperature": 2.5}, 400, "temperature"),
    ("negative temperature", {"temperature": -1}, 400, "temperature"),
    ("top_p range", {"top_p": 0}, 400, "top_p"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over cap", {"max_tokens": 5000}, 400, "max_tokens"),
    ("max_completion_tokens over cap", {"max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    ("context overflow", {"messages": [{"role": "user", "content": "word " * 1900}], "max_tokens": 500}, 400, "max_tokens"),
    ("method parameter range", {"alignment": {"method": "amulet", "alpha": -1}, "preference": "concise"}, 400, "alignment.alpha"),
    ("method parameter type", {"alignment": {"method": "amulet", "alpha": "big"}, "preference": "concise"}, 400, "alignment.alpha"),
    ("parameter too large", {"alignment": {"method": "amulet", "alpha": 1e300}, "preference": "concise"}, 400, "alignment.alpha"),
    ("cost limit", {"alignment": {"method": "beam", "width": 64}, "preference": "concise"}, 400, "alignment.width"),
    ("negative weight", {"preference": [{"text": "Be brief.", "weight": -1}]}, 400, "preference"),
    ("beam with sampling", {"alignment": {"method": "beam", "width": 2}, "preference": "concise", "temperature": 0.5}, 400, "temperature"),
    ("n", {"n": 0}, 400, "n"),
    ("unsupported feature", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("frequency_penalty range", {"frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("presence_penalty range", {"presence_penalty": -3}, 400, "presence_penalty"),
    ("repetition_penalty range", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    ("no_repeat_ngram_size range", {"no_repeat_ngram_size": -1}, 400, "no_repeat_ngram_size"),
    ("unknown model", {"model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize("name,changes,status,param", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_gets_openai_error_and_server_keeps_serving(live, client, name, changes, status, param):
    body = {**OK_BODY, **changes}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    still_serves(client)


def test_repetition_controls_through_the_official_client(client):
    """OpenAI's penalties as fields, transformers' as vLLM-style extension fields: accepted
    and decoded (their effect is tested in tests/test_repetition.py)."""
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=24, temperature=0, frequency_penalty=1.0, presence_penalty=0.5,
        extra_body={"repetition_penalty": 1.2, "no_repeat_ngram_size": 1, "preference": "concise", "ignore_eos": True},
    )
    text = out.choices[0].message.content
    assert out.usage.completion_tokens == 24 and text


def test_bad_input_through_the_official_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=CHAT, extra_body={"alignment": {"method": "nope"}, "preference": "concise"})
    assert info.value.body["param"] == "alignment.method"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=CHAT, extra_body={"preference": 3})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    still_serves(client)


@pytest.mark.parametrize(
    "raw,status,code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b"[" * 50_000, 400, "invalid_json"),
        (b'{"messages": [], "x": "' + b"a" * MAX_BODY + b'"}', 413, "request_too_large"),
    ],
    ids=["syntax", "not an object", "not utf-8", "deep nesting", "too large"],
)
def test_malformed_bodies(live, client, raw, status, code):
    response = httpx.post(live.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    still_serves(client)


def test_chunked_body_over_the_limit_is_refused(live, client):
    def body() -> Iterator[bytes]:  # no Content-Length: the server must count
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000

    response = httpx.post(live.url + "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413
    still_serves(client)


def test_unknown_route_and_method(live, client):
    response = httpx.get(live.url + "/v1/engines", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    response = httpx.get(live.url + "/v1/chat/completions", timeout=10)
    assert response.status_code == 405 and "error" in response.json()
    assert "access-control-allow-origin" not in httpx.options(live.url + "/v1/models", headers={"Origin": "http://evil"}).headers
    still_serves(client)


def test_engine_failure_fails_the_batch_then_recovers(live, client):
    engine = live.aligner.engine

    def boom() -> list:
        raise RuntimeError("simulated engine failure")

    engine.step = boom  # an instance attribute: removed below, so this fails a few steps
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
    finally:
        del engine.step
    assert "simulated engine failure" in info.value.body["message"]
    assert live.aligner.engine is engine and not engine.has_work
    still_serves(client)
    assert live.health()["stats"]["engine_resets"] >= 1


# --- batching, disconnects, limits --------------------------------------------------------


def test_sixteen_concurrent_clients_are_batched(live, reference):
    prefs = ["concise", "formal", "verbose", "psoups:expert"]
    methods = ["amulet", "la", "pref", "base"]
    jobs = [(f"Question number {i}: what is {i} plus {i}?", prefs[i % 4], methods[(i // 4) % 4]) for i in range(16)]
    before = live.health()["stats"]

    def ask(job: tuple[str, str, str]) -> Any:
        prompt, pref, method = job
        return live.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0,
            extra_body={"preference": pref, "alignment": {"method": method}, "ignore_eos": True},
        )

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    after = live.health()["stats"]
    assert len(answers) == 16 and all(a.usage.completion_tokens == 24 for a in answers)
    # Same answers as alone: mixing methods and preferences in one batch changes nothing.
    for (prompt, pref, method), answer in zip(jobs, answers):
        expected = reference.generate(prompt, preference=pref, method=method, max_new_tokens=24, ignore_eos=True)[0]
        assert answer.choices[0].message.content == expected.text
    # Continuous batching: far fewer engine steps than tokens generated.
    steps, tokens = after["steps"] - before["steps"], after["completion_tokens"] - before["completion_tokens"]
    assert tokens == 16 * 24
    assert steps < tokens / 3, (steps, tokens)


def test_stream_disconnect_frees_the_slot(live):
    before = live.health()["stats"]
    stream = live.client().chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=1500, temperature=0, stream=True,
        extra_body={"preference": "concise", "ignore_eos": True},
    )
    seen = 0
    for chunk in stream:
        seen += 1
        if seen == 5:
            break
    assert live.scheduler.engine_active == 1
    stream.close()
    assert wait_until(lambda: live.scheduler.engine_active == 0 and live.scheduler.load()["running"] == 0)
    stats = live.health()["stats"]
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["completed"] == before["completed"]  # it did not run to its 1500 tokens


def test_non_streaming_disconnect_frees_the_slot(live):
    before = live.health()["stats"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", timeout=httpx.Timeout(10, read=0.5),
                   json={**OK_BODY, "max_tokens": 1500, "ignore_eos": True})
    assert wait_until(lambda: live.scheduler.engine_active == 0 and live.scheduler.load()["running"] == 0)
    stats = live.health()["stats"]
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["completed"] == before["completed"]


def test_queue_full_gets_429_with_retry_after(tiny, tokenizer):
    app = create_app(Aligner(tiny, tokenizer), max_batch=1, max_queue=1, max_tokens_cap=1800, model_id="tiny")
    long_body = {**OK_BODY, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=long_body) as first, \
             http.stream("POST", "/v1/chat/completions", json=long_body) as second:
            assert first.status_code == second.status_code == 200
            assert wait_until(lambda: server.scheduler.load() == {"running": 1, "waiting": 1})
            refused = http.post("/v1/chat/completions", json=OK_BODY)
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                server.client().chat.completions.create(**OK_BODY)
        # Both clients left: the running one is cancelled, the queued one dropped.
        assert wait_until(lambda: server.scheduler.load() == {"running": 0, "waiting": 0} and server.scheduler.engine_active == 0)
        still_serves(server.client())
        assert server.health()["stats"]["rejected"] == 2


def test_api_key_required_when_set(tiny, tokenizer):
    app = create_app(Aligner(tiny, tokenizer), api_key="s3cret", model_id="tiny")
    with LiveServer(app) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").chat.completions.create(**OK_BODY)
        response = httpx.post(server.url + "/v1/chat/completions", json=OK_BODY, timeout=10)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        assert server.health()["status"] == "ok"  # probes need no key
        still_serves(server.client(api_key="s3cret"))


# --- end to end on the embedded model ----------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_end_to_end(embedded):
    reference = Aligner(embedded.model, embedded.tokenizer)
    chat = [{"role": "user", "content": "How do I boil an egg?"}]
    expected = reference.generate(chat, preference="concise", method="amulet", max_new_tokens=24)[0]
    app = create_app(Aligner(embedded.model, embedded.tokenizer))
    with LiveServer(app) as server:
        client = server.client()
        model = client.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct"
        out = client.chat.completions.create(
            model=model, messages=chat, max_tokens=24, temperature=0,
            extra_body={"preference": "concise", "alignment": {"method": "amulet"}},
        )
        assert out.choices[0].message.content == expected.text and expected.text.strip()
        streamed = client.chat.completions.create(
            model=model, messages=chat, max_tokens=24, temperature=0, stream=True,
            extra_body={"preference": "concise", "alignment": {"method": "amulet"}},
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
        assert json.dumps(out.model_extra["alignment"])  # echoed, JSON-serialisable
