"""Helpers shared by the judge tests: a results directory as `prefalign eval` writes it,
and a stub OpenAI-compatible chat server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable


def make_run(directory: Path, answers: dict[str, list[str]], preference: str = "amulet:concise") -> Path:
    """A results directory as `prefalign eval` writes it: one row per prompt × variant."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant, texts in answers.items():
        for i, text in enumerate(texts):
            rows.append({
                "dataset": "toy", "prompt_id": f"p{i}", "prompt": f"Question {i}?", "preference": preference,
                "preference_text": "Your answer should be concise as much as possible.",
                "method": variant, "variant": variant, "sweep": {}, "params": {}, "template": "amulet",
                "text": text, "completion_tokens": len(text.split()), "finish_reason": "stop", "seconds": 1.0,
                "forward_passes": 5, "judge": "length_words", "direction": -1, "score": float(len(text.split())),
                "guards": {"perplexity": 5.0, "repetition_4": 0.0, "non_dictionary_share": 0.0, "words": len(text.split())},
                "generation": f"{variant}-{i}", "shared": False,
                "batch": {"id": f"b-{variant}", "plan": f"b-{variant}", "size": 4, "elapsed": 1.0}, "time": "t",
            })
    with (directory / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (directory / "config.json").write_text(json.dumps({"settings": {"model": "toy"}, "runs": []}))
    return directory


_SLOT = re.compile(r'"text": """(.*?)"""', re.S)


def longer_wins(t1: str, t2: str) -> str:
    return "Tie" if len(t1) == len(t2) else ("Text 1" if len(t1) > len(t2) else "Text 2")


class Stub:
    """A scripted OpenAI-compatible chat server: ``faults`` are consumed one per request."""

    def __init__(self, rule: Callable[[str, str], str] = longer_wins) -> None:
        self.rule = rule
        self.faults: list[str] = []  # "429", "500", "stall", "malformed", "prose"
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "stub-judge", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    stub.auth.append(self.headers.get("Authorization", ""))
                    fault = stub.faults.pop(0) if stub.faults else None
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    if stub.delay:
                        time.sleep(stub.delay)
                    if fault == "429":
                        return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                    if fault == "500":
                        return self._send(500, {"error": {"message": "boom"}})
                    if fault == "stall":
                        time.sleep(1.5)
                        return self._send(500, {"error": {"message": "late"}})
                    t1, t2 = _SLOT.findall(body["messages"][-1]["content"])[:2]
                    reply = {"malformed": "I prefer Text 1", "prose": "Both are fine"}.get(fault or "", stub.rule(t1, t2))
                    self._send(200, {
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103},
                    })
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
