"""The llama.cpp backend: same methods, llama.cpp's kernels (skipped without llama-cpp-python).

Tokens differ from the fp32 transformers path (quantized kernels), so the checks are
against llama.cpp itself: the backend's greedy ``base`` equals plain llama.cpp greedy
decoding of the same GGUF; its ``amulet`` equals the closed form recomputed here from
two plain llama.cpp contexts' logits.
"""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from prefalign import Aligner  # noqa: E402
from prefalign.errors import PrefalignError  # noqa: E402
from prefalign.methods import amulet_coefficient  # noqa: E402
from prefalign.models import embedded_gguf_path  # noqa: E402

PROMPTS = ["Why is the sky blue?", "Give me three tips for a job interview.", "What is a hash table?"]
N = 24


@pytest.fixture(scope="module")
def gguf():
    try:
        return embedded_gguf_path()
    except Exception as exc:
        pytest.skip(f"embedded GGUF not installed: {exc}")


@pytest.fixture(scope="module")
def al(gguf) -> Aligner:
    return Aligner.from_pretrained(str(gguf), backend="llamacpp", threads=1)


def _plain(gguf):
    # logits_all: this llama-cpp-python keeps logits in ``scores`` only then.
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=1, n_batch=512, logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def plain(gguf):
    return _plain(gguf)


@pytest.fixture(scope="module")
def plain2(gguf):
    return _plain(gguf)


class Greedy:
    """Plain llama.cpp decoding of one context: prompt once, then one token at a time."""

    def __init__(self, llm, prompt: list[int]) -> None:
        self.llm = llm
        llm.reset()
        llm.eval(prompt)

    def logits(self) -> np.ndarray:
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)

    def feed(self, token: int) -> None:
        self.llm.eval([token])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_greedy_base_equals_plain_llamacpp(al, plain):
    for prompt in PROMPTS[:2]:
        request = al.build_request(prompt, None, "base", max_new_tokens=N, ignore_eos=True)
        decoder = Greedy(plain, list(request.contexts[0][1]))
        expected = []
        for _ in range(N):
            token = int(decoder.logits().argmax())
            expected.append(token)
            decoder.feed(token)
        assert al.generate(prompt, method="base", max_new_tokens=N, ignore_eos=True)[0].token_ids == expected


@pytest.fixture
def recorded(al, monkeypatch):
    """Every log-prob block llama.cpp returned to the engine, in order."""
    from prefalign.runners.llamacpp import LlamaCppModel

    blocks: list[np.ndarray] = []
    original = LlamaCppModel.decode_batch

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out is not None:
            blocks.append(out.double().numpy())
        return out

    monkeypatch.setattr(LlamaCppModel, "decode_batch", spy)
    return blocks


def test_amulet_equals_the_closed_form_from_the_backends_own_rows(al, recorded):
    """Recomputed here in float64 from the two rows llama.cpp gave at each step."""
    c = amulet_coefficient(2.0, 2.0, 10.0, 60)
    request = al.build_request(PROMPTS[0], "concise", "amulet", max_new_tokens=16, ignore_eos=True, kl_budget=0)  # the paper's rule
    got = al.engine.generate([request])[0].token_ids
    assert len(recorded) == 16  # one prefill block, then one decode block per token
    expected = []
    for block in recorded:
        b, p = block[0], block[1]  # the request's contexts: base, then preference
        expected.append(int(np.argmax(p + c * (p - b))))
    assert got == expected


#: Bounds on the difference (nats) between a row's top-10 log-probs decoded alone and
#: inside a batch: llama.cpp's kernels are not batch-invariant. Measured on 8 prompts ×
#: 32 tokens in a batch of 8: median 0.20, largest 0.71; 6 of 8 answers diverge
#: (docs/benchmarks.md). A row reading another row's KV cells would differ by far more.
BATCH_DISAGREEMENT_MAX, BATCH_DISAGREEMENT_MEDIAN = 1.0, 0.35


def test_batched_rows_stay_within_the_kernels_disagreement(al, recorded):
    """Alone vs in a batch: the same tokens until a token whose top two log-probs are
    closer than the kernels' disagreement flips (measured, docs/benchmarks.md)."""
    together = [r.token_ids for r in al.generate(PROMPTS, preference="concise", method="pref", max_new_tokens=N, ignore_eos=True)]
    batched = [block.copy() for block in recorded]
    differences = []
    for i, prompt in enumerate(PROMPTS):
        recorded.clear()
        alone = al.generate(prompt, preference="concise", method="pref", max_new_tokens=N, ignore_eos=True)[0].token_ids
        diverge = next((j for j, (x, y) in enumerate(zip(alone, together[i])) if x != y), N)
        for step in range(min(diverge + 1, N)):  # up to the first differing token: same prefix
            top = np.argsort(recorded[step][0])[-10:]
            differences.append(np.abs(recorded[step][0][top] - batched[step][i][top]).max())
    assert max(differences) < BATCH_DISAGREEMENT_MAX
    assert np.median(differences) < BATCH_DISAGREEMENT_MEDIAN


@pytest.mark.parametrize("method,kwargs", [("la", {}), ("amulet", {"exact": True}), ("beam", {"width": 2}), ("pref", {})])
def test_every_method_but_pad_runs(al, method, kwargs):
    out = al.generate(PROMPTS[:2], preference=[("concise", 2.0), ("formal", 1.0)], method=method, max_new_tokens=8, **kwargs)
    assert all(r.finish_reason in ("stop", "length") and r.error is None for r in out)
    assert all(r.usage.completion_tokens >= 1 for r in out)


def test_chunked_prefill_equals_whole(al):
    whole = [r.token_ids for r in al.generate(PROMPTS, preference="concise", method="amulet", max_new_tokens=8)]
    al.engine.prefill_chunk = 7
    al.engine.chunk_idle_prefill = True
    try:
        chunked = [r.token_ids for r in al.generate(PROMPTS, preference="concise", method="amulet", max_new_tokens=8)]
    finally:
        al.engine.prefill_chunk = None
    assert chunked == whole


def test_rows_that_leave_free_their_sequences(al):
    runner_free = lambda: len(al.engine._states["policy"].runner.free)  # noqa: E731
    al.generate(PROMPTS[0], method="base", max_new_tokens=2)
    before = runner_free()
    events = al.stream(PROMPTS, preference="concise", method="beam", width=3, max_new_tokens=12)
    next(events)
    events.close()
    assert not al.engine.has_work and runner_free() == before


def test_n_answers_share_a_prefilled_sequence_and_free_every_copy(al):
    """The n answers' identical contexts are prefilled as one sequence, then copied
    (llama_memory_seq_cp) to each answer's row, and every copy is freed at the end.
    llama.cpp's results depend on the batch (two identical requests decoded side by side
    differ by up to ~0.1 in a log-prob on this model), so the copies are compared with the
    request alone only where that cannot tip them: the prefill's row and the first tokens."""
    kwargs = dict(preference="concise", method="amulet", max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5)
    al.generate(PROMPTS[0], method="base", max_new_tokens=2)
    free = len(al.engine._states["policy"].runner.free)
    alone = al.generate(PROMPTS[0], **kwargs)[0]
    answers = al.generate(PROMPTS[0], n=3, **kwargs)
    assert len(al.engine._states["policy"].runner.free) == free
    assert answers[0].logprobs[0] == answers[1].logprobs[0] == answers[2].logprobs[0] == alone.logprobs[0]
    assert all(a.token_ids[:3] == alone.token_ids[:3] for a in answers)


def test_pad_is_refused_with_the_backend_to_use(al):
    with pytest.raises(PrefalignError, match="transformers backend"):
        al.generate(PROMPTS[0], preference="concise", method="pad", max_new_tokens=2)
    assert al.generate(PROMPTS[0], method="base", max_new_tokens=2)[0].finish_reason in ("stop", "length")


def test_a_non_gguf_model_is_refused(tmp_path):
    with pytest.raises(PrefalignError, match="GGUF"):
        Aligner.from_pretrained(str(tmp_path), backend="llamacpp")


def test_eval_runs_on_the_llamacpp_backend_and_reruns_give_the_same_answers(gguf, tmp_path):
    import json

    from prefalign.eval.runner import EvalConfig, read_results, run_eval

    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"index": 1, "question": "What is rain?"}, {"index": 2, "question": "Name a colour."}]))
    config = EvalConfig(datasets=[str(data)], preferences=["concise"], methods=["base", "pref"], max_new_tokens=6,
                        batch_size=2, model=str(gguf), threads=1, model_backend="llamacpp")
    answers = []
    for run in ("first", "second"):
        run_eval(config, tmp_path / run, progress=False, report=False)
        rows = read_results(tmp_path / run / "results.jsonl")
        answers.append(sorted((r["prompt_id"], r["method"], r["text"]) for r in rows))
    assert len(answers[0]) == 4 and answers[0] == answers[1]  # 2 prompts × (base, pref)
    assert json.loads((tmp_path / "first" / "config.json").read_text())["settings"]["backend"] == "llamacpp"
