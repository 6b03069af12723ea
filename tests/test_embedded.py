"""End-to-end checks on the embedded SmolLM2-135M (real weights, real chat template)."""

from __future__ import annotations

import json

import pytest
import torch

from prefalign.prompts import encode_context, to_chat

pytestmark = pytest.mark.embedded

FALLBACK = ["What is the ozone layer?", "Give me three tips to sleep better.", "Why do cats purr?"]


def _prompts(shared_data_dir, n=3):
    path = shared_data_dir / "amulet" / "HelpSteer_train.json"
    return [r["question"] for r in json.loads(path.read_text())[:n]]


@pytest.fixture(scope="module")
def prompts(request):
    from conftest import SHARED_DATA

    return _prompts(SHARED_DATA) if SHARED_DATA.is_dir() else FALLBACK


def test_base_equals_transformers_generate(embedded, prompts):
    ids = encode_context(embedded.tokenizer, to_chat(prompts[0]), None, "default")
    ref = embedded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    ours = embedded.generate(prompts[0], method="base", max_new_tokens=32)[0].token_ids
    assert ours == [t for t in ref if t not in embedded.engine.eos_token_ids][: len(ours)]
    assert len(ours) > 5


@pytest.mark.parametrize("method", ["base", "amulet"])
def test_batch_invariance_on_embedded(embedded, prompts, method):
    alone = [embedded.generate(p, preference="concise", method=method, max_new_tokens=32)[0].token_ids for p in prompts]
    together = [r.token_ids for r in embedded.generate(prompts, preference="concise", method=method, max_new_tokens=32)]
    assert together == alone


def test_amulet_exact_loop_gives_identical_tokens(embedded, prompts):
    closed = embedded.generate(prompts[:2], preference="verbose", method="amulet", max_new_tokens=32)
    exact = embedded.generate(prompts[:2], preference="verbose", method="amulet", exact=True, max_new_tokens=32)
    assert [r.token_ids for r in closed] == [r.token_ids for r in exact]


def test_amulet_template_answers(embedded, prompts):
    out = embedded.generate(prompts[0], preference="formal", method="amulet", template="amulet", max_new_tokens=16)[0]
    assert out.text.strip()
    assert out.usage.completion_tokens == len(out.token_ids)
