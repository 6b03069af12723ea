"""Shared fixtures: tiny randomly initialised models that reuse the embedded tokenizer.

The embedded tokenizer (SmolLM2's, with a chat template) comes from prefalign's cache;
the first run converts the embedded GGUF once (~20 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two threads collapse when another process shares the CPU

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.3,  # peaked next-token distributions: fewer near-ties in greedy tests
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def _tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from prefalign.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return _tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer):
    return _tiny_gpt2(len(tokenizer))


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M Aligner (plain fp32, no fast path), loaded once."""
    if os.environ.get("PREFALIGN_SKIP_EMBEDDED"):
        pytest.skip("PREFALIGN_SKIP_EMBEDDED is set")
    from prefalign import Aligner

    return Aligner.from_pretrained(fast=False)


@pytest.fixture
def aligner(tiny_model, tokenizer):
    """An Aligner over a tiny model (Llama and GPT-2 variants), its own engine per test."""
    from prefalign import Aligner

    return Aligner(tiny_model, tokenizer)


@pytest.fixture
def llama_aligner(tiny_llama, tokenizer):
    from prefalign import Aligner

    return Aligner(tiny_llama, tokenizer)


def exploding_method(name: str = "explodes") -> type:
    """A method whose rule raises: stands in for any bug or overflow inside ``combine``."""
    from dataclasses import dataclass

    from prefalign.methods import Method
    from prefalign.methods.method import ContextRole

    @dataclass(frozen=True)
    class Explodes(Method):
        summary = "test: combine raises"
        needs_preference = False

        def roles(self, n):
            return [ContextRole(None)]

        def combine(self, scores):
            raise RuntimeError("value cannot be converted to type float without overflow")

    Explodes.name = name
    return Explodes


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("prefalign.aligner.Aligner.from_pretrained", refuse)
    monkeypatch.setattr("prefalign.models.load_model", refuse)
    monkeypatch.setattr("prefalign.aligner.load_model", refuse, raising=False)
