"""RequestSpec: one frozen, checked request before any model; Aligner.prepare: the
checks that need the model, once."""

from __future__ import annotations

import dataclasses

import pytest

from prefalign import Aligner
from prefalign.errors import ContextLengthError, PrefalignError
from prefalign.spec import RequestSpec


@pytest.fixture(scope="module")
def tiny_al(tokenizer):
    from conftest import _tiny_llama

    return Aligner(_tiny_llama(len(tokenizer), max_positions=256), tokenizer)


def test_the_spec_is_frozen_and_splits_settings_from_method_parameters():
    spec = RequestSpec.build("amulet", [("concise", 2.0), "formal"], max_new_tokens=7, temperature=None, alpha=3.0)
    assert (spec.method.name, spec.method.alpha) == ("amulet", 3.0)
    assert spec.sampling.max_new_tokens == 7 and spec.sampling.temperature == 0.0  # None: unset
    assert spec.weights == (2.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.template = "plain"  # type: ignore[misc]


def test_the_default_method_of_every_face():
    assert RequestSpec.build().method.name == "base"
    assert RequestSpec.build(preference="concise").method.name == "pref"
    assert RequestSpec.build(preference="concise", default_method="amulet").method.name == "amulet"


def test_construction_checks_what_needs_no_model():
    with pytest.raises(PrefalignError) as info:
        RequestSpec.build("amulet")
    assert info.value.field == "preference"
    with pytest.raises(PrefalignError) as info:
        RequestSpec.build("base", template="nope")
    assert info.value.field == "template"
    with pytest.raises(PrefalignError) as info:  # built directly, not through build(): the same checks
        RequestSpec(RequestSpec.build().method, template="nope")
    assert info.value.field == "template"


def test_a_spec_decodes_what_the_keywords_decode(tiny_al):
    kwargs = dict(max_new_tokens=6, temperature=0.8, seed=3, alpha=2.0)
    by_keywords = tiny_al.generate(["hi", "why?"], "concise", "amulet", **kwargs)
    spec = RequestSpec.build("amulet", "concise", **kwargs)
    by_spec = tiny_al.generate(["hi", "why?"], spec=spec)
    assert [r.token_ids for r in by_spec] == [r.token_ids for r in by_keywords]
    streamed = [e for e in tiny_al.stream("hi", spec=spec)]
    assert [t for e in streamed for t in e.token_ids] == by_keywords[0].token_ids
    with pytest.raises(PrefalignError) as info:
        tiny_al.generate("hi", "concise", spec=spec)
    assert info.value.field == "spec"


def test_prepare_checks_the_window_or_fits_it(tiny_al):
    spec = RequestSpec.build("pref", "concise", max_new_tokens=1000)
    with pytest.raises(ContextLengthError) as info:
        tiny_al.prepare(spec, "hi")
    assert info.value.field == "max_new_tokens"
    request = tiny_al.prepare(spec, "hi", fit_window=True)
    longest = max(len(ids) for _, ids in request.contexts)
    assert request.sampling.max_new_tokens == 256 - longest
    assert tiny_al.prepare(RequestSpec.build("pref", "concise", max_new_tokens=5), "hi", fit_window=True).sampling.max_new_tokens == 5


def test_the_server_fits_an_unset_max_tokens_to_the_window(tokenizer):
    pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    from conftest import _tiny_llama
    from prefalign.server import create_app

    app = create_app(Aligner(_tiny_llama(len(tokenizer), max_positions=96), tokenizer), model_id="tiny")
    chat = [{"role": "user", "content": "hi"}]
    with TestClient(app) as client:
        body = {"model": "tiny", "temperature": 0, "ignore_eos": True, "alignment": {"method": "base"}}
        reply = client.post("/v1/chat/completions", json={**body, "messages": chat}).json()
        usage = reply["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 96, reply  # the whole window, no placeholder
        reply = client.post("/v1/completions", json={**body, "prompt": "hi"}).json()
        usage = reply["usage"]
        assert usage["completion_tokens"] == 16, reply  # the completions endpoint's default (OpenAI's)
