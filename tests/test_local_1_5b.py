"""End-to-end checks on the opt-in Qwen2.5-Coder-1.5B-Instruct (``prefalign.local_models``).

Never part of ``make test`` or CI: they run only with ``PREFALIGN_TEST_LOCAL_1_5B=1`` on a
machine where ``python -m prefalign.local_models install qwen2.5-1.5b`` was run (the model
takes ~7 GB of memory in fp32 and about a minute per test here).
"""

from __future__ import annotations

import os

import pytest

from prefalign.local_models import installed_path

MODEL = "qwen2.5-1.5b"

if not os.environ.get("PREFALIGN_TEST_LOCAL_1_5B"):
    _skip = "opt-in: set PREFALIGN_TEST_LOCAL_1_5B=1 to run the 1.5B model's checks"
elif installed_path(MODEL) is None:
    _skip = f"{MODEL} is not installed: python -m prefalign.local_models install {MODEL}"
else:
    _skip = ""

pytestmark = [pytest.mark.local_1_5b, pytest.mark.skipif(bool(_skip), reason=_skip or "-")]


@pytest.fixture(scope="module")
def qwen():
    import torch

    from prefalign import Aligner

    torch.set_num_threads(1)
    return Aligner.from_pretrained(MODEL, fast=False)  # plain fp32: ~7 GiB (the fast path peaks at ~15)


def test_loads_as_qwen2_and_answers_fluently(qwen):
    from prefalign.eval.guards import guard_report

    assert type(qwen.model).__name__ == "Qwen2ForCausalLM"
    out = qwen.generate("Why is the sky blue?", method="base", max_new_tokens=32)[0]
    assert out.usage.completion_tokens > 0
    assert not guard_report(out.text, finish_reason=out.finish_reason).collapsed


def test_safeguarded_amulet_is_fluent_and_shorter_when_concise(qwen):
    from prefalign.eval.guards import guard_report
    from prefalign.eval.judges import words

    prompt = "Explain how a bicycle gear system works."
    base = qwen.generate(prompt, method="base", max_new_tokens=64)[0]
    amulet = qwen.generate(prompt, preference="concise", method="amulet", max_new_tokens=64)[0]
    assert not guard_report(amulet.text, finish_reason=amulet.finish_reason).collapsed
    assert len(words(amulet.text)) < len(words(base.text))


def test_exact_loop_gives_the_closed_forms_tokens(qwen):
    prompt = "Name three uses of copper."
    closed = qwen.generate(prompt, preference="formal", method="amulet", kl_budget=0.0, max_new_tokens=16)[0]
    exact = qwen.generate(prompt, preference="formal", method="amulet", kl_budget=0.0, exact=True, max_new_tokens=16)[0]
    assert closed.token_ids == exact.token_ids
