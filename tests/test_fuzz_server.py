"""A small run of ``benchmarks/fuzz_server.py``'s corpus against a live server: no answer ≥ 500.

The benchmark sends ≥ 1,000 requests (``benchmarks/results/fuzz_server.json``); this
sends 120 of the same seeded corpus (10 of each category) so that CI guards it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")

from prefalign import Aligner  # noqa: E402
from prefalign.server import create_app  # noqa: E402
from test_server import OK_BODY, LiveServer  # noqa: E402

_spec = importlib.util.spec_from_file_location("fuzz_server", Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_server.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_server"] = fuzz  # dataclasses look their module up there
_spec.loader.exec_module(fuzz)

WEIGHTS = "extreme preference weights"


@pytest.fixture(scope="module")
def fuzzed(tokenizer):
    from conftest import _tiny_llama

    app = create_app(Aligner(_tiny_llama(len(tokenizer), max_positions=2048), tokenizer), model_id="tiny", max_tokens_cap=4, max_prompt_tokens=2000)
    with LiveServer(app) as server:
        report = fuzz.run(server.url, fuzz.corpus(120, seed=1), clients=4, budget=300)
        yield server, report


def test_the_corpus_covers_every_category(fuzzed):
    _, report = fuzzed
    assert report["sent"] == 120
    assert {"malformed json", "wrong types", "unknown fields", WEIGHTS, "valid", "paths and methods", "odd headers", "raw socket framing"} <= set(report["by_category"])
    assert any(c.startswith("lone surrogate") for c in report["by_category"])
    assert "200" in report["by_category"]["valid"]  # the valid ones are served


def test_no_answer_is_a_server_error(fuzzed):
    server, report = fuzzed
    assert not report["errors"], report["errors"]
    assert not report["stream_error_events"]  # nor an error event inside a 200 stream
    assert server.health()["stats"]["engine_resets"] == 0
    assert httpx.post(server.url + "/v1/chat/completions", json=OK_BODY, timeout=30).status_code == 200


def test_extreme_weights_are_served(fuzzed):
    """Weights such as [1e300, 1] are valid (issue #26 §2): answered, not refused or failed."""
    _, report = fuzzed
    assert "200" in report["by_category"][WEIGHTS]
