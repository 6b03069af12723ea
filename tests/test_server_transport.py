"""What a client can do to the others through the socket: slow or silent connections,
connection floods, clients that stop reading a stream; and a few answers at the door.

Real sockets on 127.0.0.1 against uvicorn in a thread, with the connection limits of
``prefalign serve`` (``prefalign.server.transport``) set small so that tests are quick.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from typing import Any

import httpx
import pytest

pytest.importorskip("uvicorn")

from prefalign import Aligner  # noqa: E402
from prefalign.server import create_app  # noqa: E402
from prefalign.server.transport import ConnectionLimits  # noqa: E402
from test_server import OK_BODY, LiveServer  # noqa: E402

URL = "/v1/chat/completions"
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from conftest import _tiny_llama

    return _tiny_llama(len(tokenizer), max_positions=4096)


def connect(server: LiveServer, **options: int) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for name, value in options.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    sock.connect((host, int(port)))
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """Everything the server sends, and the monotonic time it closed (None: still open)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    return data, None


# --- slow and silent connections ---------------------------------------------------------

LIMITS = ConnectionLimits(head_timeout=1.0, keep_alive_timeout=1.0, max_connections=0, max_connections_per_ip=0)


@pytest.fixture(scope="module")
def guarded(tiny, tokenizer):
    app = create_app(Aligner(tiny, tokenizer), model_id="tiny", max_tokens_cap=8)
    with LiveServer(app, limits=LIMITS) as server:
        yield server


def test_slow_and_silent_connections_are_closed_while_a_normal_client_is_served(guarded):
    silent = [connect(guarded) for _ in range(20)]
    slow = [connect(guarded) for _ in range(20)]
    opened = time.monotonic()
    stop = threading.Event()

    def drip() -> None:  # one byte of the head per socket every 0.25 s, as a slowloris client
        position = 0
        while not stop.is_set() and position < len(HEAD):
            for sock in slow:
                try:
                    sock.send(HEAD[position : position + 1])
                except OSError:
                    pass
            position += 1
            stop.wait(0.25)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        response = httpx.post(guarded.url + URL, json=OK_BODY, timeout=30)  # served meanwhile
        assert response.status_code == 200, response.text
        closed_silent = [read_until_closed(s, 5.0) for s in silent]
        closed_slow = [read_until_closed(s, 5.0) for s in slow]
    finally:
        stop.set()
        dripper.join()
        for sock in silent + slow:
            sock.close()
    # Silent sockets: closed without a word; slow ones: a 408 naming the head deadline.
    assert all(data == b"" and at is not None and at - opened < LIMITS.head_timeout + 2.5 for data, at in closed_silent)
    for data, at in closed_slow:
        assert at is not None and at - opened < LIMITS.head_timeout + 2.5
        assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data
    assert httpx.get(guarded.url + "/health", timeout=10).json()["status"] == "ok"


def test_an_idle_kept_alive_connection_and_a_slow_second_head_are_closed(guarded):
    body = json.dumps(OK_BODY).encode()
    request = HEAD.replace(b"Content-Length: 10", b"Content-Length: %d" % len(body)) + body
    idle = connect(guarded)
    idle.sendall(request)
    slow = connect(guarded)
    slow.sendall(request)
    answered = time.monotonic()
    for sock in (idle, slow):
        sock.settimeout(30)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # The kept-alive connection stays silent: uvicorn's keep-alive timeout closes it.
    data, at = read_until_closed(idle, 5.0)
    assert at is not None and at - answered < LIMITS.keep_alive_timeout + 2.5
    # The second head arrives a byte every 0.3 s: the head deadline applies to it too.
    closed_at = None
    for i in range(len(HEAD)):
        try:
            slow.send(HEAD[i : i + 1])
        except OSError:
            break
        data, closed_at = read_until_closed(slow, 0.3)
        if closed_at is not None:
            break
    assert closed_at is not None and closed_at - answered < LIMITS.head_timeout + 2.5
    idle.close()
    slow.close()


def test_a_head_over_the_size_cap_gets_431(guarded):
    sock = connect(guarded)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Junk: " + b"a" * 40_000 + b"\r\n")
        data, at = read_until_closed(sock, 5.0)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 431") and at is not None


@pytest.mark.parametrize("cap", ["max_connections", "max_connections_per_ip"])
def test_connections_over_the_cap_get_503_and_the_server_recovers(tiny, tokenizer, cap):
    limits = ConnectionLimits(head_timeout=30.0, **{"max_connections": 0, "max_connections_per_ip": 0, cap: 5})
    app = create_app(Aligner(tiny, tokenizer), model_id="tiny", max_tokens_cap=8)
    with LiveServer(app, limits=limits) as server:
        held = [connect(server) for _ in range(5)]
        time.sleep(0.2)
        extra = connect(server)
        data, at = read_until_closed(extra, 5.0)
        extra.close()
        assert data.startswith(b"HTTP/1.1 503") and at is not None
        error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "too_many_connections" and cap.replace("_", "-") in error["message"]
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.post(server.url + URL, json=OK_BODY, timeout=30).status_code == 200


# --- a stream nobody reads ----------------------------------------------------------------


def test_a_stream_nobody_reads_is_cancelled_and_the_queued_one_is_served(tiny, tokenizer, caplog):
    app = create_app(Aligner(tiny, tokenizer), model_id="tiny", max_batch=1, max_tokens_cap=4000, idle_stream_timeout=1.0)
    body = json.dumps({**OK_BODY, "max_tokens": 4000, "ignore_eos": True, "stream": True}).encode()
    request = HEAD.replace(b"Content-Length: 10", b"Content-Length: %d" % len(body)) + body
    with caplog.at_level(logging.WARNING, logger="prefalign.server"), LiveServer(app) as server:
        # A small receive buffer: the server's writes start to wait after a few hundred tokens.
        reader = connect(server, SO_RCVBUF=4096)
        reader.sendall(request)  # ... and never reads
        assert wait_for(lambda: server.health()["running"] == 1)
        started = time.monotonic()
        second = httpx.post(server.url + URL, json={**OK_BODY, "max_tokens": 4, "stream": True}, timeout=60)  # queued behind it
        waited = time.monotonic() - started
        assert second.status_code == 200 and second.text.rstrip().endswith("data: [DONE]")
        assert '"finish_reason":"length"' in second.text
        stats = server.health()["stats"]
        assert stats["cancelled"] == 1 and stats["completed"] == 1
        # The slot was freed before the unread stream could finish its 4,000 tokens.
        assert stats["completion_tokens"] < 4000 + 4
        reader.setblocking(False)
        try:
            while reader.recv(1 << 20):  # drain what was buffered: the server has gone
                pass
        except BlockingIOError:
            pytest.fail("the connection of the unread stream is still open")
        except ConnectionResetError:
            pass
        reader.close()
    stalls = [r for r in caplog.records if "not read for" in r.getMessage()]
    assert len(stalls) == 1 and "1 s" in stalls[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert waited < 60


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# --- answers at the door ------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions/"), ("POST", "/v1/completions/"), ("GET", "/v1/models/")])
def test_a_trailing_slash_gets_404_without_echoing_host(guarded, method, path):
    response = httpx.request(method, guarded.url + path, json=OK_BODY, headers={"Host": "evil.example"}, follow_redirects=False, timeout=30)
    assert response.status_code == 404, response.text
    assert "location" not in response.headers
    assert "evil" not in response.text and all("evil" not in v for v in response.headers.values())
    error = response.json()["error"]
    if path == "/v1/models/":  # the model route with an empty model id
        assert error["code"] == "model_not_found"
    else:
        assert error["code"] == "not_found" and f"did you mean {path.rstrip('/')}?" in error["message"]


def test_a_prompt_over_the_context_window_says_the_prompt_is_too_long(tokenizer):
    from conftest import _tiny_llama

    app = create_app(Aligner(_tiny_llama(len(tokenizer), max_positions=128), tokenizer), model_id="tiny")
    long_chat = [{"role": "user", "content": "word " * 200}]
    with LiveServer(app) as server:
        for extra in ({}, {"max_tokens": 5}):
            response = httpx.post(server.url + URL, json={**OK_BODY, "messages": long_chat, **extra}, timeout=30)
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
            message = error["message"]
            assert message.startswith("the prompt is ") and "context window is 128 tokens" in message
            assert "at most 0" not in message and "max_tokens" not in message
            tokens = int(message.removeprefix("the prompt is ").split()[0])
            assert tokens > 128
        # Room for the prompt but not for max_tokens: that message still names max_tokens.
        response = httpx.post(server.url + URL, json={**OK_BODY, "messages": [{"role": "user", "content": "word " * 20}], "max_tokens": 120}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize(
    "raw,param",
    [
        (b'{"\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}', "\\ud800"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "alignment": {"method": "amulet", "\\udfff": 1}, "preference": "concise"}', "alignment"),
    ],
)
def test_a_key_that_is_not_unicode_is_named(guarded, raw, param):
    response = httpx.post(guarded.url + URL, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_value"
    assert "'None'" not in error["message"] and "\\ud" in error["message"] and "not valid Unicode" in error["message"]


def test_health_polled_during_streams_never_touches_the_engine(guarded, caplog):
    """/health is answered on the event loop while the scheduler thread steps: it must read
    the scheduler's counts, not the engine (whose properties repair an interrupted step)."""
    stop = threading.Event()
    polls = []

    def poll() -> None:
        with httpx.Client(base_url=guarded.url, timeout=30) as client:
            while not stop.is_set():
                polls.append(client.get("/health").json()["engine_active"])

    body = {**OK_BODY, "max_tokens": 8, "ignore_eos": True, "preference": "concise", "alignment": {"method": "amulet"}}
    with caplog.at_level(logging.WARNING):
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            with httpx.Client(base_url=guarded.url, timeout=30) as client:
                answers = [client.post(URL, json=body) for _ in range(20)]
        finally:
            stop.set()
            poller.join()
    assert all(a.status_code == 200 and a.json()["usage"]["completion_tokens"] == 8 for a in answers)
    assert len(polls) > 20 and any(polls)
    assert not [r for r in caplog.records if "interrupted" in r.getMessage()]
