"""Engine.session: submit, stream events with results, cancel leftovers however the caller exits."""

from __future__ import annotations

import pytest

from prefalign import Aligner

PROMPTS = ["Why is the sky blue?", "How do I boil an egg?"]


@pytest.fixture
def al(tiny_llama, tokenizer) -> Aligner:
    return Aligner(tiny_llama, tokenizer)


def requests(al):
    return [al.build_request(p, "concise", "amulet", max_new_tokens=6, ignore_eos=True) for p in PROMPTS]


def test_session_streams_every_result_once_and_leaves_nothing(al):
    reqs = requests(al)
    expected = [r.token_ids for r in al.engine.generate(requests(al))]
    with al.engine.session(reqs) as session:
        results = {e.request_id: e.result for e in session if e.result is not None}
    assert [results[r.request_id].token_ids for r in reqs] == expected
    assert not al.engine.has_work and all(al.engine.pop_result(r.request_id) is None for r in reqs)


def test_session_cancels_on_break_and_exception_and_engine_stays_usable(al):
    expected = [r.token_ids for r in al.engine.generate(requests(al))]
    reqs = requests(al)
    with al.engine.session(reqs) as session:
        for _ in session:
            break
    assert not al.engine.has_work and al.engine.num_active == 0
    with pytest.raises(RuntimeError, match="boom"):
        with al.engine.session(requests(al)) as session:
            for _ in session:
                raise RuntimeError("boom")
    assert not al.engine.has_work
    stream = al.stream(PROMPTS, "concise", "amulet", max_new_tokens=6, ignore_eos=True)
    next(stream)
    stream.close()  # generator closed mid-answer
    assert not al.engine.has_work
    assert [r.token_ids for r in al.engine.generate(requests(al))] == expected


def test_session_validates_all_before_queueing_any(al):
    good, bad = requests(al)
    bad.contexts = []
    with pytest.raises(Exception):
        al.engine.session([good, bad])
    assert not al.engine.has_work
