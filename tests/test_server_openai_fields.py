"""The OpenAI fields clients send: ``logprobs``/``top_logprobs`` and ``n``, whole and streamed.

``tools`` and non-text ``response_format`` stay refused by name.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from prefalign import Aligner  # noqa: E402
from prefalign.server import create_app  # noqa: E402
from test_logprobs_and_choices import direct_logprobs  # noqa: E402
from test_server import CHAT, LiveServer, reference, tiny  # noqa: E402, F401 - fixtures

URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def live(tiny, tokenizer):
    with LiveServer(create_app(Aligner(tiny, tokenizer), model_id="tiny", max_batch=8)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def body(**changes: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **changes}


# --- logprobs ------------------------------------------------------------------------------

METHODS = {
    "base": ({}, dict(preference=None, method="base")),
    "pref": ({"preference": "concise", "alignment": {"method": "pref"}}, dict(preference="concise", method="pref")),
    "amulet": ({"preference": "concise", "alignment": {"method": "amulet"}}, dict(preference="concise", method="amulet")),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_chat_logprobs_are_the_method_s_log_softmax(client, reference, method):
    extra, ref = METHODS[method]
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True, **extra}
    )
    content = out.choices[0].logprobs.content
    request = reference.build_request(CHAT, ref["preference"], ref["method"], max_new_tokens=8, ignore_eos=True)
    tokens = reference.engine.generate([request])[0].token_ids
    expected = direct_logprobs(reference, request, tokens)
    assert len(content) == len(tokens) == 8
    for entry, token, want in zip(content, tokens, expected):
        assert entry.logprob == pytest.approx(float(want[token]), abs=1e-4)
        values, ids = torch.topk(want, 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [reference.tokenizer.decode([i]) for i in ids.tolist()]
        assert entry.token == entry.top_logprobs[0].token  # greedy
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token or "\ufffd" in entry.token
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace") == out.choices[0].message.content


def test_streamed_chat_logprobs_equal_the_whole_answer_s(client):
    kwargs = dict(model="tiny", messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body={"ignore_eos": True, "preference": "concise"})
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]


def test_completions_logprobs_shape(client, reference):
    out = client.completions.create(model="tiny", prompt="Name a colour.", max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True, "preference": "formal", "alignment": {"method": "pref"}})
    logprobs = out.choices[0].logprobs
    result = reference.generate("Name a colour.", preference="formal", method="pref", max_new_tokens=6, ignore_eos=True, logprobs=True)[0]
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in result.logprobs], abs=1e-5)
    assert logprobs.tokens == [reference.tokenizer.decode([e.token]) for e in result.logprobs]
    assert all(1 <= len(top) <= 3 and max(top.values()) >= lp for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    streamed = list(client.completions.create(model="tiny", prompt="Name a colour.", max_tokens=6, temperature=0, logprobs=3, stream=True,
                                              extra_body={"ignore_eos": True, "preference": "formal", "alignment": {"method": "pref"}}))
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == logprobs.text_offset
    none = client.completions.create(model="tiny", prompt="Name a colour.", max_tokens=3, temperature=0, logprobs=0)
    assert all(top == {} for top in none.choices[0].logprobs.top_logprobs)


def test_no_logprobs_unless_asked(client):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0)
    assert out.choices[0].logprobs is None


# --- n ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_n_answers_are_indexed_reproducible_and_equal_single_requests(live, reference, stream):
    sent = body(n=3, seed=21, temperature=1.0, preference="concise", alignment={"method": "amulet"}, max_tokens=10)
    expected = [reference.generate(CHAT, preference="concise", method="amulet", max_new_tokens=10, ignore_eos=True,
                                   temperature=1.0, seed=21 + i)[0] for i in range(3)]

    def texts() -> list[str]:
        if not stream:
            reply = httpx.post(live.url + URL, json=sent, timeout=60).json()
            assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
            assert reply["usage"]["completion_tokens"] == sum(e.usage.completion_tokens for e in expected)
            return [c["message"]["content"] for c in reply["choices"]]
        found = ["", "", ""]
        finished = []
        with httpx.stream("POST", live.url + URL, json={**sent, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in httpx.Response(200, content=line[6:]).json()["choices"]:
                        found[choice["index"]] += choice["delta"].get("content") or ""
                        if choice["finish_reason"]:
                            finished.append(choice["index"])
        assert sorted(finished) == [0, 1, 2]
        return found

    first = texts()
    assert first == [e.text for e in expected]
    assert texts() == first
    assert len(set(first)) > 1


def test_n_through_the_official_client_and_completions(client, reference):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=2, temperature=0.8, seed=5, logprobs=True)
    assert [c.index for c in out.choices] == [0, 1] and all(len(c.logprobs.content) >= 1 for c in out.choices)
    comp = client.completions.create(model="tiny", prompt="Name a colour.", max_tokens=6, n=2, temperature=0.8, seed=5)
    expected = [reference.generate("Name a colour.", method="base", max_new_tokens=6, temperature=0.8, seed=5 + i)[0].text for i in range(2)]
    assert [c.text for c in comp.choices] == expected


# --- refusals ----------------------------------------------------------------------------------

REFUSED = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("json response_format", {"response_format": {"type": "json_object"}}, "response_format"),
    ("top_logprobs over 20", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("logprobs with beam", {"logprobs": True, "preference": "concise", "alignment": {"method": "beam", "width": 2}}, "logprobs"),
    ("n zero", {"n": 0}, "n"),
    ("n over max_batch", {"n": 9}, "n"),
]


@pytest.mark.parametrize("name,changes,param", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_by_name(live, name, changes, param):
    response = httpx.post(live.url + URL, json=body(**changes), timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.post(live.url + URL, json=body(), timeout=30).status_code == 200


def test_completions_logprobs_out_of_range_names_logprobs(live):
    sent = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "logprobs": 21}
    response = httpx.post(live.url + "/v1/completions", json=sent, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"
