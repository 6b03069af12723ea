"""The runner interface: a model can bring its own KV bookkeeping (``make_runner``).

A toy runner whose "model" scores the next token from the row's last token and length
checks that the engine drives any runner the same way, and that what a runner holds
for rows is released when they leave — finished, cancelled, or failed in prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from prefalign.engine import Engine, GenerationRequest, SamplingParams
from prefalign.methods import make_method

VOCAB = 50
POISON = 13


def toy_logprobs(history: list[int]) -> torch.Tensor:
    """A deterministic next-token distribution from the row's last token and length."""
    logits = torch.zeros(VOCAB)
    logits[(history[-1] * 7 + len(history)) % VOCAB] = 5.0
    logits[(history[-1] + 3) % VOCAB] = 4.0
    return torch.log_softmax(logits, dim=-1)


@dataclass
class ToyPrefill:
    seqs: list[list[int]]
    handles: list[int]
    runner: ToyRunner
    done: int = 0
    logprobs: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.done >= max(len(s) for s in self.seqs)

    def select(self, keep: list[int]) -> None:
        for i in set(range(len(self.seqs))) - set(keep):
            self.runner.held.discard(self.handles[i])
        self.seqs = [self.seqs[i] for i in keep]
        self.handles = [self.handles[i] for i in keep]


@dataclass
class ToyRunner:
    held: set[int] = field(default_factory=set)
    histories: list[list[int]] = field(default_factory=list)
    handles: list[int] = field(default_factory=list)
    next_tokens: list[int] = field(default_factory=list)
    counter: int = 0

    @property
    def rows(self) -> int:
        return len(self.histories)

    def start_prefill(self, seqs, tags):
        handles = []
        for _ in seqs:
            self.counter += 1
            self.held.add(self.counter)
            handles.append(self.counter)
        return ToyPrefill([list(s) for s in seqs], handles, self)

    def prefill_step(self, prefill, budget):
        if any(POISON in s for s in prefill.seqs):
            raise RuntimeError("poisoned prompt")
        longest = max(len(s) for s in prefill.seqs)
        step = longest - prefill.done if budget is None else max(1, budget // len(prefill.seqs))
        prefill.done = min(longest, prefill.done + step)
        if prefill.finished:
            prefill.logprobs = torch.stack([toy_logprobs(s) for s in prefill.seqs])
        return step * len(prefill.seqs)

    def join(self, prefill):
        self.histories += prefill.seqs
        self.handles += prefill.handles
        self.next_tokens += [0] * len(prefill.seqs)

    def decode(self):
        for history, token in zip(self.histories, self.next_tokens):
            history.append(token)
        return torch.stack([toy_logprobs(h) for h in self.histories])

    def select(self, keep, next_tokens):
        handles, histories, used = [], [], set()
        for old in keep:
            handle = self.handles[old]
            if old in used:
                self.counter += 1
                handle = self.counter
                self.held.add(handle)
            used.add(old)
            handles.append(handle)
            histories.append(list(self.histories[old]))
        for old, handle in enumerate(self.handles):
            if old not in used:
                self.held.discard(handle)
        self.handles, self.histories, self.next_tokens = handles, histories, list(next_tokens)


class ToyModel:
    def __init__(self) -> None:
        self.runner = ToyRunner()
        self.config = SimpleNamespace(max_position_embeddings=1000)
        self.generation_config = SimpleNamespace(eos_token_id=[VOCAB - 1])
        self.device = torch.device("cpu")

    def make_runner(self, pad_token_id: int) -> ToyRunner:
        self.runner = ToyRunner()
        return self.runner


class ToyTokenizer:
    pad_token_id = 0
    eos_token_id = VOCAB - 1

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(map(str, tokens))


def request(prompt: list[int], method: str = "base", **sampling) -> GenerationRequest:
    rule = make_method(method)
    contexts = [("policy", list(prompt)) for _ in rule.roles(1)]
    return GenerationRequest(contexts=contexts, method=rule, sampling=SamplingParams(max_new_tokens=6, ignore_eos=True, **sampling))


def expected_greedy(prompt: list[int], n: int = 6) -> list[int]:
    history, out = list(prompt), []
    for _ in range(n):
        token = int(toy_logprobs(history).argmax())
        out.append(token)
        history.append(token)
    return out


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_the_engine_drives_a_custom_runner(chunk):
    model = ToyModel()
    engine = Engine(model, ToyTokenizer(), prefill_chunk=chunk)
    engine.chunk_idle_prefill = True
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    results = engine.generate([request(p) for p in prompts])
    assert [r.token_ids for r in results] == [expected_greedy(p) for p in prompts]
    assert model.runner.held == set()  # every row left and released what it held


def test_beams_fork_and_everything_is_released():
    model = ToyModel()
    engine = Engine(model, ToyTokenizer())
    result = engine.generate([request([1, 2, 3], "beam")])[0]
    assert len(result.token_ids) == 6
    assert model.runner.held == set()


def test_failed_and_cancelled_prefills_release_their_rows():
    model = ToyModel()
    engine = Engine(model, ToyTokenizer(), prefill_chunk=1)
    engine.chunk_idle_prefill = True
    good, bad = request([1, 2, 3]), request([4, POISON, 5])
    results = engine.generate([good, bad])
    assert results[0].token_ids == expected_greedy([1, 2, 3])
    assert results[1].finish_reason == "error" and "poisoned" in results[1].error
    slow = request(list(range(1, 12)))
    engine.add(slow)
    engine.step()
    engine.cancel(slow.request_id)
    engine.step()
    assert not engine.has_work and model.runner.held == set()
