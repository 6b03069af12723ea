"""Ctrl-C mid-step: a real SIGINT through ``generate``, ``stream`` and the server.

The engine must be consistent after any interruption of a step: the interrupted
requests are gone, the caches match the rows, and the next call answers exactly as a
fresh :class:`~prefalign.Aligner` over the same model does.

A SIGINT that arrives after the call under test has returned would stop the pytest
run itself, so while a test runs, SIGINT goes to a handler that raises
``KeyboardInterrupt`` (what Python's default one does) only while *armed*.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from prefalign import Aligner

PROMPTS = ["Why is the sky blue?", "Write a haiku about tea and rain, please."]
#: Long enough that a SIGINT sent within the first second lands mid-generation.
LONG = dict(preference="concise", method="amulet", max_new_tokens=400, ignore_eos=True)
SHORT = dict(preference="concise", method="amulet", max_new_tokens=12, ignore_eos=True)


class _Armed:
    def __init__(self) -> None:
        self.armed = False
        self.fired = 0

    def __call__(self, signum: int, frame: object) -> None:
        if self.armed:
            self.armed = False
            self.fired += 1
            raise KeyboardInterrupt


@pytest.fixture
def sigint() -> Iterator[_Armed]:
    handler = _Armed()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield handler
    finally:
        handler.armed = False
        signal.signal(signal.SIGINT, previous)


@contextmanager
def sigint_after(handler: _Armed, delay: float) -> Iterator[None]:
    """Send this process a real SIGINT ``delay`` seconds from now (from another thread)."""
    handler.armed = True
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        handler.armed = False


class AtForward(torch.nn.Module):
    """Wraps a causal LM: its ``at``-th forward first calls ``action`` (send a SIGINT, raise)."""

    def __init__(self, model: torch.nn.Module, at: int, action) -> None:
        super().__init__()
        self.inner, self.config, self.generation_config = model, model.config, model.generation_config
        self.at, self.action, self.calls = at, action, 0

    @property
    def cache_keyword(self) -> str:
        from prefalign.compat import cache_keyword

        return cache_keyword(self.inner)

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.action()
        return self.inner(*args, **kwargs)


def SigintInForward(model: torch.nn.Module, at: int) -> AtForward:
    """The ``at``-th forward sends the process a SIGINT, so the KeyboardInterrupt surfaces
    inside the engine's step (deterministically mid-step)."""
    return AtForward(model, at, lambda: os.kill(os.getpid(), signal.SIGINT))


def RaiseInForward(model: torch.nn.Module, at: int, error: BaseException) -> AtForward:
    """The ``at``-th forward raises ``error`` (a BaseException)."""

    def throw() -> None:
        raise error

    return AtForward(model, at, throw)


@pytest.fixture
def fresh(tiny_llama, tokenizer):
    """The answers of a fresh Aligner over the same model."""
    al = Aligner(tiny_llama, tokenizer)
    return {
        "short": [r.token_ids for r in al.generate(PROMPTS, **SHORT)],
        "sampled": [r.token_ids for r in al.generate(PROMPTS, **{**SHORT, "temperature": 0.8, "seed": 3})],
    }


def assert_as_fresh(al: Aligner, fresh: dict) -> None:
    assert not al.engine.has_work and al.engine.num_active == 0
    assert [r.token_ids for r in al.generate(PROMPTS, **SHORT)] == fresh["short"]
    assert [r.token_ids for r in al.generate(PROMPTS, **{**SHORT, "temperature": 0.8, "seed": 3})] == fresh["sampled"]
    streamed = [[], []]
    for event in al.stream(PROMPTS, **SHORT):
        streamed[event.index].extend(event.token_ids)
    assert streamed == fresh["short"]


@pytest.mark.parametrize("at", [1, 2, 3, 7])
def test_sigint_inside_a_step_of_generate(tiny_llama, tokenizer, sigint, fresh, at):
    """Forward 1 is the prefill, 2 the first decode step, then later decode steps."""
    model = SigintInForward(tiny_llama, at)
    al = Aligner(model, tokenizer)
    sigint.armed = True
    with pytest.raises(KeyboardInterrupt):
        al.generate(PROMPTS, **LONG)
    assert sigint.fired == 1
    assert_as_fresh(al, fresh)


@pytest.mark.parametrize("at", [1, 4])
def test_sigint_inside_a_step_of_a_chunked_prefill(tiny_llama, tokenizer, sigint, fresh, at):
    """While one request decodes and another's prompt is prefilled in chunks."""
    model = SigintInForward(tiny_llama, at + 3)
    al = Aligner(model, tokenizer)
    al.engine.prefill_chunk = 4
    first = al.build_request(PROMPTS[0], **LONG)
    al.engine.add(first)
    al.engine.step()
    al.engine.step()
    al.engine.add(al.build_request("Tell me a long story about a dragon and a knight and a castle.", **LONG))
    sigint.armed = True
    with pytest.raises(KeyboardInterrupt):
        while al.engine.has_work:
            al.engine.step()
    assert sigint.fired == 1
    assert al.engine.pop_result(first.request_id) is None
    al.engine.prefill_chunk = None
    assert_as_fresh(al, fresh)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5, 1.0])
def test_sigint_at_a_random_moment_of_generate(llama_aligner, sigint, fresh, delay):
    al = llama_aligner
    try:
        with sigint_after(sigint, delay):
            al.generate(PROMPTS, **LONG)
    except KeyboardInterrupt:
        pass
    assert_as_fresh(al, fresh)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_sigint_at_a_random_moment_of_a_stream(llama_aligner, sigint, fresh, delay):
    al = llama_aligner
    seen = 0
    try:
        with sigint_after(sigint, delay):
            for _ in al.stream(PROMPTS, **LONG):
                seen += 1
    except KeyboardInterrupt:
        pass
    assert_as_fresh(al, fresh)


def test_sigint_inside_a_step_of_a_stream(tiny_llama, tokenizer, sigint, fresh):
    al = Aligner(SigintInForward(tiny_llama, 5), tokenizer)
    sigint.armed = True
    events = []
    with pytest.raises(KeyboardInterrupt):
        for event in al.stream(PROMPTS, **LONG):
            events.append(event)
    assert sigint.fired == 1 and events  # the stream had begun
    assert_as_fresh(al, fresh)


def test_random_delays_do_interrupt(llama_aligner, sigint):
    """The delayed SIGINTs above do land mid-generation (else those tests prove little)."""
    al = llama_aligner
    interrupted = 0
    for delay in (0.05, 0.2, 0.5):
        try:
            with sigint_after(sigint, delay):
                al.generate(PROMPTS, **LONG)
        except KeyboardInterrupt:
            interrupted += 1
    assert interrupted >= 2


def test_an_interrupted_reset_is_finished_by_the_next_call(llama_aligner, fresh):
    """Even a second Ctrl-C inside the reset that follows the first leaves no half state."""
    al = llama_aligner
    engine = al.engine
    engine.add(al.build_request(PROMPTS[0], **LONG))
    engine.step()
    engine.step()
    engine._consistent = False  # what an interrupted step or reset leaves behind
    assert not engine.has_work and engine.num_active == 0
    assert_as_fresh(al, fresh)


# --- the server ----------------------------------------------------------------------------
#
# Python delivers a signal to the main thread only, so a SIGINT never interrupts the
# scheduler thread's step: under `prefalign serve` it reaches uvicorn, which shuts the
# server down (tested with a real `prefalign serve` process below). What can interrupt
# the scheduler's step is a BaseException raised inside it: it must fail the running
# requests and leave the server serving, with answers as a fresh engine's.


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(1), GeneratorExit()], ids=lambda e: type(e).__name__)
def test_a_base_exception_in_the_scheduler_s_step_leaves_it_serving(tiny_llama, tokenizer, error):
    pytest.importorskip("uvicorn")
    import httpx

    from prefalign.server import create_app
    from test_server import LiveServer

    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "preference": "concise", "alignment": {"method": "amulet"}}
    expected = Aligner(tiny_llama, tokenizer).generate(PROMPTS[0], **SHORT)[0].text
    app = create_app(Aligner(RaiseInForward(tiny_llama, 3, error), tokenizer), model_id="tiny")
    with LiveServer(app) as server:
        url = server.url + "/v1/chat/completions"
        failed = httpx.post(url, json=body, timeout=60)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_failure"
        assert type(error).__name__ in failed.json()["error"]["message"]
        for _ in range(2):
            answer = httpx.post(url, json=body, timeout=60)
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == expected
        health = server.health()
        assert health["stats"]["engine_resets"] == 1 and health["engine_active"] == 0
        assert server.scheduler._thread.is_alive()


def test_sigint_stops_prefalign_serve_cleanly_mid_stream(tiny_llama, tokenizer, tmp_path):
    """A real `prefalign serve` process: Ctrl-C while a stream runs ends it promptly, exit 0."""
    pytest.importorskip("uvicorn")
    import socket
    import subprocess
    import sys

    import httpx

    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", "from prefalign.cli import app; app()", "serve", "--model", str(model_dir), "--port", str(port),
         "--no-fast", "--threads", "1", "--served-model-name", "tiny", "--max-tokens-cap", "1800", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 900, "temperature": 0,
                "ignore_eos": True, "stream": True, "preference": "concise"}
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 5:
                        process.send_signal(signal.SIGINT)
                        sent = time.monotonic()
        # The stream ends at once, its last event saying why (not cut after a timeout).
        assert len(lines) < 100 and lines[-1] == "data: [DONE]"
        assert '"server_shutting_down"' in lines[-2]
        process.wait(timeout=30)
        assert time.monotonic() - sent < 10
        output = process.stdout.read()
        # 130 = 128 + SIGINT: uvicorn re-raises the signal once it has shut down cleanly,
        # so a shell sees what Ctrl-C means.
        assert process.returncode in (0, 130), output
        assert "Traceback" not in output and "ERROR" not in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_step_running_in_another_thread_is_not_taken_for_an_interrupted_one(tiny_llama, tokenizer):
    """The server's handlers read the engine (``num_active``) while its scheduler thread
    steps: a step in progress elsewhere must not be "repaired" (reset) under its feet."""
    import threading

    from prefalign.decoding.sampling import SamplingParams
    from prefalign.engine import Engine, GenerationRequest
    from prefalign.methods import make_method

    engine = Engine(tiny_llama, tokenizer)
    request = GenerationRequest(
        contexts=[("policy", tokenizer.encode("Hello there"))], method=make_method("base"),
        sampling=SamplingParams(max_new_tokens=4, ignore_eos=True),
    )
    engine.add(request)
    inside, release = threading.Event(), threading.Event()
    original = engine._decode

    def slow_decode(*args, **kwargs):
        inside.set()
        release.wait(10)
        return original(*args, **kwargs)

    engine._decode = slow_decode
    stepper = threading.Thread(target=engine.step)
    stepper.start()
    assert inside.wait(10)
    assert engine.num_active == 0 and engine.holds(request.request_id)  # read from this thread, mid-step
    release.set()
    stepper.join(10)
    engine._decode = original
    while engine.has_work:
        engine.step()
    result = engine.pop_result(request.request_id)
    assert result is not None and result.finish_reason == "length" and len(result.token_ids) == 4
