"""``prefalign serve --replicas N`` on a local Ray Serve, on loopback.

The module's Ray starts in this process (the same ``serve_on_ray`` the CLI runs) with two
replicas of the embedded model, one torch thread each, and stops at the end; the last
tests check that no Ray process is left. A single-process server on the same model is
the reference. Marked ``ray_serve`` and ``embedded`` (about 2-3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("uvicorn")
from test_same_refusals import CASES as SAME_REFUSALS  # noqa: E402
from test_server import BAD_BODIES, LiveServer, wait_until  # noqa: E402

from prefalign import Aligner  # noqa: E402
from prefalign.server import create_app  # noqa: E402

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[1] / "src"


def _has_ray_serve() -> bool:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


needs_ray = pytest.mark.skipif(not _has_ray_serve(), reason="Ray Serve is not installed (pip install 'prefalign[cluster]')")


def ray_test(test: Any) -> Any:
    """Marks of the tests that run Ray Serve: ``ray_serve`` and ``embedded``."""
    return needs_ray(pytest.mark.ray_serve(pytest.mark.embedded(test)))


def test_serve_without_replicas_never_imports_ray(tmp_path):
    """One process, no Ray: `prefalign serve` up to the point where uvicorn would run."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import uvicorn
from typer.testing import CliRunner
from conftest import _tiny_llama
from prefalign import Aligner
from prefalign.models import load_tokenizer
tokenizer = load_tokenizer()
tiny = Aligner(_tiny_llama(len(tokenizer)), tokenizer)
served = []
uvicorn.run = lambda app, **kwargs: served.append(app)
uvicorn.Server.run = lambda self, sockets=None: served.append(self.config.app)  # serve's run_server
Aligner.from_pretrained = classmethod(lambda cls, *a, **k: tiny)
from prefalign.cli import app
result = CliRunner().invoke(app, ["serve", "--port", "1"])
assert result.exit_code == 0 and served, result.output
print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_cluster_options_need_replicas():
    from typer.testing import CliRunner

    from prefalign.cli import app

    result = CliRunner().invoke(app, ["serve", "--ray-address", "auto"])
    assert result.exit_code == 2 and "need --replicas N" in result.output


@needs_ray
def test_replica_options_become_ray_serve_settings():
    from prefalign.errors import PrefalignError
    from prefalign.server.ray_serve import ReplicaOptions

    assert ReplicaOptions(replicas=3).scaling() == {"num_replicas": 3}
    scaled = ReplicaOptions(replicas=2, max_replicas=4, target_ongoing_requests=6).scaling()
    assert scaled == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 6}}
    for bad, field in [(dict(replicas=1, min_replicas=3, max_replicas=2), "min_replicas"), (dict(replicas=5, max_replicas=4), "replicas"),
                       (dict(replicas=1, target_ongoing_requests=0), "target_ongoing_requests")]:
        with pytest.raises(PrefalignError) as info:
            ReplicaOptions(**bad)
        assert info.value.field == field


# --- a local Ray Serve with two replicas, and the single-process reference ------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_descendants(process: Any) -> set[Any]:
    """Processes under ``process`` (Ray's GCS, raylet, workers, replicas ...)."""
    return set(process.children(recursive=True))


def alive(processes: set[Any]) -> list[Any]:
    import psutil

    left = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


class Cluster:
    """``serve_on_ray`` entered for the module; ``stop()`` leaves it (also at teardown)."""

    def __init__(self) -> None:
        import psutil

        from prefalign.server.ray_serve import ReplicaOptions, serve_on_ray

        self.me = psutil.Process()
        before = ray_descendants(self.me)
        settings = dict(max_batch=16, max_queue=64, max_tokens_cap=1024, max_body_bytes=64_000, model_id=None,
                        max_prompt_tokens=8192, api_key=KEY)
        self._context = serve_on_ray(dict(model=None, threads=1), settings, ReplicaOptions(replicas=2, cpus=1),
                                     port=free_port())
        self.live = self._context.__enter__()
        self.url = self.live.url
        self.processes = ray_descendants(self.me) - before
        self.stopped = False

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not _has_ray_serve():
        pytest.skip("Ray Serve is not installed")
    ray_cluster = Cluster()
    try:
        yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def single() -> Iterator[LiveServer]:
    with LiveServer(create_app(Aligner.from_pretrained(threads=1), max_body_bytes=64_000, api_key=KEY)) as live:
        yield live


KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PREFS = ["concise", "formal", "verbose", "psoups:expert"]
METHODS = ["amulet", "la", "pref", "base"]


def body_for(i: int, *, stream: bool, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
        "preference": PREFS[i % 4], "alignment": {"method": METHODS[(i // 4) % 4]},
    }


def stream(url: str, body: dict[str, Any], on_first: threading.Event | None = None) -> tuple[int, list[dict[str, Any]], bool]:
    """POST a streamed request: (status, the data events, whether it ended with [DONE])."""
    events, done = [], False
    with httpx.stream("POST", url + "/v1/chat/completions", json={k: v for k, v in body.items() if v is not None}, headers=AUTH,
                      timeout=180) as response:
        if response.status_code != 200:
            return response.status_code, [json.loads(response.read())], False
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            events.append(json.loads(line[6:]))
            if on_first is not None and len(events) >= 2:
                on_first.set()
    return 200, events, done


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def without_ids(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("id", "created")}


@ray_test
def test_sixteen_streams_through_two_replicas_equal_the_single_process_server(cluster, single):
    health = cluster.health()
    assert health["status"] == "ok" and health["replicas"]["ready"] == 2
    replicas_seen: set[str] = set()
    finished = threading.Event()

    def watch() -> None:  # which replicas had requests in flight
        while not finished.is_set():
            replicas_seen.update(cluster.health()["in_flight"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        through_ray = list(pool.map(lambda i: stream(cluster.url, body_for(i, stream=True)), range(16)))
        finished.set()
        watcher.join()
        alone = list(pool.map(lambda i: stream(single.url, body_for(i, stream=True)), range(16)))
    assert len(replicas_seen) == 2, replicas_seen  # both replicas served
    for (status, events, done), (_, expected, _) in zip(through_ray, alone):
        assert status == 200 and done
        assert text_of(events) == text_of(expected) and events[-1]["usage"]["completion_tokens"] == 16
        # Byte for byte the same chunks, but for each response's id and creation time.
        assert [without_ids(e) for e in events] == [without_ids(e) for e in expected]
    assert cluster.health()["stats"]["completed"] >= 16
    # Plain (non-streamed) answers and the other endpoints are the same too.
    body = body_for(3, stream=False)
    a = httpx.post(cluster.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    b = httpx.post(single.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert a.status_code == b.status_code == 200 and without_ids(a.json()) == without_ids(b.json())
    text = {"prompt": "Say hi.", "max_tokens": 6, "temperature": 0, "preference": "concise"}
    a, b = (httpx.post(u + "/v1/completions", json=text, headers=AUTH, timeout=120) for u in (cluster.url, single.url))
    assert without_ids(a.json()) == without_ids(b.json())
    a, b = (httpx.get(u + "/v1/models", headers=AUTH, timeout=30).json() for u in (cluster.url, single.url))
    assert [without_ids(m) for m in a["data"]] == [without_ids(m) for m in b["data"]]


# "context overflow" (and the same refusals' "context window") overflows only the tiny model's
# window, not the embedded model's; PAD without a PRM is refused only off the embedded model.
REFUSALS = [(name, changes, status, param) for name, changes, status, param in BAD_BODIES if name != "context overflow"] + [
    (case.name, case.server, 400, case.param) for case in SAME_REFUSALS
    if case.server is not None and not case.loads and case.field != "prm"
]


@ray_test
def test_bad_bodies_are_refused_at_the_ingress_like_the_single_process_server(cluster, single):
    before = cluster.health()["stats"]["submitted"]
    for name, changes, status, param in REFUSALS:
        body = {"messages": [{"role": "user", "content": "How do I boil an egg?"}], "max_tokens": 4, "temperature": 0,
                "preference": "concise", **changes}
        body = {k: v for k, v in body.items() if v is not None}
        if name == "needs preference":
            body.pop("preference")
        answers = [httpx.post(u + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) for u in (cluster.url, single.url)]
        assert answers[0].status_code == answers[1].status_code == status, name
        assert answers[0].json() == answers[1].json(), name
        assert answers[0].json()["error"]["param"] == param
    # Raw garbage, no key, a wrong key: the same too.
    raw = [httpx.post(u + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json", **AUTH}, timeout=30)
           for u in (cluster.url, single.url)]
    assert raw[0].status_code == raw[1].status_code == 400 and raw[0].json() == raw[1].json()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        keyless = [httpx.post(u + "/v1/chat/completions", json=body, headers=headers, timeout=30) for u in (cluster.url, single.url)]
        assert keyless[0].status_code == keyless[1].status_code == 401 and keyless[0].json() == keyless[1].json()
        assert keyless[0].headers["www-authenticate"] == "Bearer"
    # None of them reached a replica.
    assert cluster.health()["stats"]["submitted"] == before


def find_replica_actor(replica: str) -> Any:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if replica in actor["name"] and "prefalign-engine" in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica}")


@ray_test
def test_killing_a_replica_fails_only_its_requests_and_it_comes_back(cluster):
    import ray

    n_streams, n_plain, tokens = 6, 2, 160
    started = [threading.Event() for _ in range(n_streams)]
    results: dict[int, Any] = {}

    def run_stream(i: int, max_tokens: int = tokens) -> None:
        results[i] = stream(cluster.url, body_for(i, stream=True, max_tokens=max_tokens), started[i])

    def run_plain(i: int) -> None:
        response = httpx.post(cluster.url + "/v1/chat/completions", json=body_for(i, stream=False, max_tokens=tokens), headers=AUTH, timeout=180)
        results[i] = (response.status_code, response.json(), None)

    threads = [threading.Thread(target=run_stream, args=(i,)) for i in range(n_streams)]
    threads += [threading.Thread(target=run_plain, args=(n_streams + i,)) for i in range(n_plain)]
    for thread in threads:
        thread.start()
    assert all(event.wait(120) for event in started), "the streams did not start"
    assert wait_until(lambda: cluster.health()["running"] == n_streams + n_plain, 60)
    in_flight = cluster.health()["in_flight"]
    assert sum(in_flight.values()) == n_streams + n_plain
    victim = max(in_flight, key=in_flight.get)
    survivor_count = n_streams + n_plain - in_flight[victim]
    ray.kill(find_replica_actor(victim), no_restart=True)
    for thread in threads:
        thread.join(180)
    assert not any(thread.is_alive() for thread in threads), "a client was left waiting"

    failed = ok = 0
    for i, (status, payload, _) in results.items():
        if i < n_streams:
            assert status == 200
            last = payload[-1]
            if "error" in last:  # after the first byte: an SSE error event, then [DONE]
                assert last["error"]["code"] == "replica_unavailable" and last["error"]["type"] == "server_error"
                failed += 1
            else:
                assert last["usage"]["completion_tokens"] == tokens
                ok += 1
        else:
            if status == 503:  # a non-streamed request: 503 JSON
                assert payload["error"]["code"] == "replica_unavailable"
                failed += 1
            else:
                assert status == 200 and payload["usage"]["completion_tokens"] == tokens
                ok += 1
    assert all(results[i][2] for i in range(n_streams)), "every stream ends with [DONE]"
    # Only the killed replica's requests failed; the other replica's all finished.
    assert 1 <= failed <= in_flight[victim] and ok >= survivor_count and ok + failed == n_streams + n_plain

    # Ray Serve restarts the replica; later requests succeed and the new replica serves
    # (rounds of 4 concurrent streams until the router, told of the replacement by Ray
    # Serve's controller, sends it one).
    assert wait_until(lambda: cluster.health()["replicas"]["ready"] == 2, 180), cluster.health()
    serving: set[str] = set()
    for _ in range(5):
        started[:4] = [threading.Event() for _ in range(4)]
        later = [threading.Thread(target=run_stream, args=(i, 32)) for i in range(4)]
        for thread in later:
            thread.start()
        assert all(event.wait(120) for event in started[:4])
        serving |= set(cluster.health()["in_flight"])
        for thread in later:
            thread.join(180)
        assert all(results[i][0] == 200 and results[i][2] and "error" not in results[i][1][-1] for i in range(4))
        if serving - set(in_flight):
            break
    assert victim not in serving and serving - set(in_flight), (serving, in_flight)


@ray_test
def test_stopping_the_server_leaves_no_ray_process(cluster):
    import ray

    processes = cluster.processes
    assert processes, "Ray started no process under this one?"
    cluster.stop()
    assert not ray.is_initialized()
    assert wait_until(lambda: not alive(processes), 60), [p.cmdline()[:3] for p in alive(processes)]


@ray_test
def test_cli_replicas_stop_on_sigterm_without_leftovers(tmp_path):
    """`prefalign serve --replicas 1` as users run it: up, answering, then SIGTERM: all gone."""
    import psutil

    port = free_port()
    command = [sys.executable, "-c", "from prefalign.cli import app; app()", "serve", "--replicas", "1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=sink)
    parent = psutil.Process(proc.pid)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json().get("status") == "ok"
            except (httpx.TransportError, ValueError):
                return False

        # Up, and started (the "serving ..." line comes once the command waits for a signal).
        assert wait_until(lambda: "serving " in log.read_text() and up(), 240), log.read_text()[-2000:]
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        processes = ray_descendants(parent)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert wait_until(lambda: not alive(processes), 60), [p.cmdline()[:3] for p in alive(processes)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
